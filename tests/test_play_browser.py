"""The page end to end in headless Chromium: it loads, frames arrive, and a key pressed and
a mouse dragged in the browser reach the model's action input; the picture fills the window
with the keys (and what they do), the mouse, the frame rates and the key-to-frame latency
drawn over it; Pause and Restart work from their keys while the mouse is captured; a closed
tab ends quietly.

PLAY_SCREENSHOTS=docs python -m pytest tests/test_play_browser.py also saves the tests' page
at 1280x800 there (play_page_tiny.png, play_page_paused_tiny.png); `PYTHONPATH=. python
tests/test_play_browser.py docs` takes the guide's pictures (docs/play_page.png,
docs/play_page_paused.png) of `play_world.py --demo --HEADLESS=false`, the demo student
(run the demo chain first: finetune_base_model.py --demo, distill_streaming_model.py --demo).

The browser is driven through chromedriver's W3C WebDriver protocol (plain HTTP + JSON),
with the few calls needed written out below - no client library. Skipped where Chromium or
chromedriver is absent (Debian: apt-get install chromium chromium-driver; .ci/run installs
them when it runs as root with apt).
"""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from play_helpers import served_player, tiny_stream, wait_for

BROWSER = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                if (path := shutil.which(name))), None)
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(BROWSER is None or DRIVER is None,
                                reason="needs Chromium and chromedriver on PATH (Debian: apt-get install chromium "
                                       "chromium-driver); .ci/run installs them when it can")


class WebDriver:
    """A headless Chromium session through chromedriver: just the calls this test makes."""

    def __init__(self, width: int = 900, height: int = 700):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.process = subprocess.Popen([DRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        self.session = None
        try:
            wait_for(self._ready, "chromedriver to start", timeout=30, every=0.1)
            options = {"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                f"--window-size={width},{height}"]}
            capabilities = {"browserName": "chrome", "goog:chromeOptions": options}
            self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})["sessionId"]
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        try:
            return self._call("GET", "/status")["ready"]
        except (OSError, urllib.error.URLError):
            return False

    def _call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return json.loads(reply.read())["value"]
        except urllib.error.HTTPError as error:
            raise AssertionError(f"WebDriver {method} {path}: {error.read().decode(errors='replace')}") from None

    def _session_call(self, method: str, path: str, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session_call("POST", "/url", {"url": url})

    def run(self, script: str):
        return self._session_call("POST", "/execute/sync", {"script": script, "args": []})

    def keys(self, *steps) -> None:
        """Key actions, e.g. ("keyDown", "w"); keys stay down between calls until keyUp."""
        actions = [{"type": kind, "value": key} for kind, key in steps]
        self._session_call("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})

    def drag(self, element_id: str, dx: int, dy: int) -> None:
        """Press the mouse on the element's centre, move by (dx, dy) in a few steps, let go."""
        element = self._session_call("POST", "/element", {"using": "css selector", "value": f"#{element_id}"})
        start = {"type": "pointerMove", "duration": 0, "origin": element, "x": 0, "y": 0}  # the element's centre
        moves = [{"type": "pointerMove", "duration": 50, "origin": "pointer", "x": dx // 4, "y": dy // 4}
                 for _ in range(4)]
        steps = [start, {"type": "pointerDown", "button": 0}, *moves, {"type": "pointerUp", "button": 0}]
        self._session_call("POST", "/actions", {"actions": [
            {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": steps}]})

    def viewport(self, width: int, height: int) -> None:
        """Size the window so that the page itself is width x height (the window's frame aside)."""
        inner = self.run("return [window.innerWidth, window.innerHeight]")
        outer = self._session_call("GET", "/window/rect")
        self._session_call("POST", "/window/rect", {"width": outer["width"] + width - inner[0],
                                                    "height": outer["height"] + height - inner[1]})

    def element(self, css: str) -> dict:
        return self._session_call("POST", "/element", {"using": "css selector", "value": css})

    def click(self, css: str) -> None:
        self._session_call("POST", f"/element/{next(iter(self.element(css).values()))}/click", {})

    def screenshot(self, path) -> None:
        Path(path).write_bytes(base64.b64decode(self._session_call("GET", "/screenshot")))

    def close_tab(self) -> None:
        """Close the page's window (the session stays, as after closing a tab)."""
        self._session_call("DELETE", "/window")

    def close(self) -> None:
        if self.session is not None:
            try:
                self._call("DELETE", f"/session/{self.session}")
            except (AssertionError, OSError):
                pass
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def test_the_page_shows_frames_and_sends_keys_and_mouse_to_the_model():
    with served_player() as server:
        browser = WebDriver()
        try:
            browser.open(server.url)
            wait_for(lambda: browser.run("return window.playState.framesShown") >= 2, "frames on the page")
            wait_for(lambda: browser.run("return document.getElementById('view').naturalWidth") > 0,
                     "a decoded frame in the picture")

            browser.keys(("keyDown", "w"))
            wait_for(lambda: server.session.held() == ["W"], "the key press at the server")
            # a block made while W is held: its action input has the W column set on every row
            wait_for(lambda: (server.player.last_action is not None and server.player.last_action.keys == ("W",)),
                     "a block made with W")
            rows = server.player.generator.history["keyboard"][0, -12:]
            assert rows[:, 0].eq(1).all() and rows[:, 1:].eq(0).all()
            browser.keys(("keyUp", "w"))
            wait_for(lambda: server.session.held() == [], "the key release at the server")

            browser.drag("view", 120, 0)  # to the right: yaw > 0
            wait_for(lambda: (server.player.last_action is not None and server.player.last_action.mouse[1] > 0),
                     "a block made from the mouse drag")

            shown = browser.run("return window.playState.framesShown")
            wait_for(lambda: browser.run("return window.playState.framesShown") > shown, "more frames")
            rates = wait_for(lambda: "model" in (text := browser.run(
                "return document.getElementById('rates').textContent")) and text, "the frame rates on the page")
            assert "fps" in rates and "block" in rates
            assert server.player.status()["error"] is None
        finally:
            browser.close()


def text_of(browser, css: str) -> str:
    return browser.run(f"return document.querySelector({css!r}).textContent")


def box_of(browser, css: str) -> dict:
    return browser.run(f"const r = document.querySelector({css!r}).getBoundingClientRect(); "
                       "return {left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width, "
                       "height: r.height, shown: getComputedStyle(document.querySelector(" + repr(css) + ")).display "
                       "!== 'none'}")


def screenshot(browser, name: str) -> None:
    folder = os.environ.get("PLAY_SCREENSHOTS")
    if folder:
        browser.screenshot(Path(folder) / name)


def test_the_picture_fills_the_window_with_keys_mouse_rates_and_latency_drawn_over_it():
    with served_player(tiny_stream(latent=(4, 8))) as server:  # 32 x 64 pixels: the frames' aspect, 2:1
        browser = WebDriver(1280, 800)
        try:
            browser.open(server.url)
            browser.viewport(1280, 800)
            wait_for(lambda: browser.run("return window.playState.framesShown") >= 2, "frames on the page")
            # clean frames: the model's own size, no action strip drawn into them (read once the
            # picture element has decoded a frame: a new frame's source may still be loading)
            size = wait_for(lambda: browser.run("const v = document.getElementById('view'); "
                                                "return v.naturalWidth ? [v.naturalWidth, v.naturalHeight] : null"),
                            "a decoded frame in the picture")
            assert size == [64, 32]
            window = browser.run("return [window.innerWidth, window.innerHeight]")
            assert window == [1280, 800]
            stage = box_of(browser, "#stage")
            assert abs(stage["width"] / stage["height"] - 2) < 0.02, stage  # the frames' aspect
            assert stage["width"] >= 0.95 * window[0] or stage["height"] >= 0.85 * window[1], (stage, window)
            assert stage["width"] * stage["height"] >= 0.6 * window[0] * window[1], (stage, window)
            for part in ("#fps", "#latency", "#keys", "#mousebox"):  # over the picture, not beside it
                box = box_of(browser, part)
                assert box["shown"] and box["width"] > 0, part
                assert stage["left"] <= box["left"] and box["right"] <= stage["right"], part
                assert stage["top"] <= box["top"] and box["bottom"] <= stage["bottom"], part
            # each key with what it does (universal: W forward, S back, A strafe left, D strafe right)
            chips = browser.run("return [...document.querySelectorAll('#keys .key')].map(k => k.textContent)")
            assert chips == ["Wforward", "Sback", "Astrafe left", "Dstrafe right"]
            assert wait_for(lambda: "fps" in text_of(browser, "#fps") and text_of(browser, "#fps")[0].isdigit(),
                            "the page's frame rate")
            assert "P pauses, R restarts" in text_of(browser, "#help")

            browser.keys(("keyDown", "d"))
            assert browser.run("return document.querySelector('#keys .key[data-key=D]').className") == "key held"
            wait_for(lambda: browser.run("return window.playState.latencies.length") >= 1,
                     "a frame made from the key press")
            latency = browser.run("return window.playState.latencies[0]")
            assert 0 < latency < 60_000
            assert text_of(browser, "#latency").startswith(f"key \u2192 frame {latency:.0f} ms")
            wait_for(lambda: "inframe" in browser.run(
                "return document.querySelector('#keys .key[data-key=D]').className"), "the frame made with D marked")
            browser.drag("view", 160, -40)
            wait_for(lambda: (a := browser.run("return window.playState.frameAction")) and a["mouse"][1] > 0,
                     "a frame made from the drag")
            assert text_of(browser, "#mouse").startswith("yaw +")
            screenshot(browser, "play_page_tiny.png")
            browser.keys(("keyUp", "d"))
            assert server.player.status()["error"] is None
        finally:
            browser.close()


def test_pause_and_restart_work_from_their_keys_while_the_mouse_is_captured():
    with served_player() as server:
        browser = WebDriver(1280, 800)
        try:
            browser.open(server.url)
            browser.viewport(1280, 800)
            wait_for(lambda: browser.run("return window.playState.framesShown") >= 2, "frames on the page")
            wait_for(lambda: browser.run("return window.playState.status") is not None, "the page's status")
            browser.click("#view")  # captures the mouse: clicks now land on the picture, not on the buttons
            assert browser.run("return window.playState.lockRequested") == 1
            wait_for(lambda: browser.run("return document.pointerLockElement === document.getElementById('view')"),
                     "the mouse captured")
            assert box_of(browser, "#captured")["shown"] and "P pause" in text_of(browser, "#captured")
            browser.keys(("keyDown", "p"), ("keyUp", "p"))
            wait_for(lambda: server.player.status()["paused"], "the pause key to pause")
            assert browser.run("return document.pointerLockElement") is None  # pausing frees the mouse
            assert text_of(browser, "#pause").startswith("Resume")
            note = box_of(browser, "#note")
            assert note["shown"] and "Paused" in text_of(browser, "#note")
            screenshot(browser, "play_page_paused_tiny.png")
            browser.keys(("keyDown", "p"), ("keyUp", "p"))
            wait_for(lambda: not server.player.status()["paused"], "the pause key to resume")
            browser.click("#view")
            wait_for(lambda: browser.run("return document.pointerLockElement !== null"), "the mouse captured again")
            browser.keys(("keyDown", "r"), ("keyUp", "r"))
            wait_for(lambda: server.player.stream == 1, "the restart key to restart")
            assert server.session.held() == []  # neither key reached the model
            browser.run("document.exitPointerLock()")  # Esc (which WebDriver's keys do not reach)
            wait_for(lambda: browser.run("return document.pointerLockElement === null"), "the mouse freed")

            # a drag over the picture does not capture the mouse: the buttons stay reachable
            browser.drag("view", 80, 0)
            browser.click("#pause")
            wait_for(lambda: server.player.status()["paused"], "the Pause button after a drag")
            assert browser.run("return window.playState.lockRequested") == 2
            browser.click("#pause")
            wait_for(lambda: not server.player.status()["paused"], "the button to resume")
            browser.click("#restart")
            wait_for(lambda: server.player.stream == 2, "the Restart button")
        finally:
            browser.close()


def test_a_page_whose_keys_include_p_and_r_gets_other_keys_for_pause_and_restart():
    keys = ("W", "S", "A", "D", "P", "R")
    with served_player(tiny_stream(keyboard_dim=6), keys=keys) as server:
        browser = WebDriver()
        try:
            browser.open(server.url)
            wait_for(lambda: browser.run("return window.playState.framesShown") >= 1, "frames on the page")
            wait_for(lambda: text_of(browser, "#pause-key") == "PAUSE", "the pause key named")
            assert text_of(browser, "#restart-key") == "BACKSPACE"
            browser.keys(("keyDown", "p"))
            wait_for(lambda: server.session.held() == ["P"], "P held as the model's key")
            assert not server.player.status()["paused"]
            browser.keys(("keyUp", "p"), ("keyDown", "\ue003"), ("keyUp", "\ue003"))  # Backspace
            wait_for(lambda: server.player.stream == 1, "Backspace to restart")
        finally:
            browser.close()


def test_beyond_loopback_the_page_plays_from_its_token_url_and_nothing_plays_without_it():
    with served_player(host="0.0.0.0") as server:
        port, token = server.server_address[1], server.token
        browser = WebDriver()
        try:
            browser.open(f"http://127.0.0.1:{port}/")  # without the token: refused
            assert "needs its token" in browser.run("return document.body.textContent")
            browser.open(f"http://127.0.0.1:{port}/?token={token}")  # the printed URL; then the cookie
            wait_for(lambda: browser.run("return window.playState.framesShown") >= 2, "frames through the token")
            browser.keys(("keyDown", "w"))
            wait_for(lambda: server.session.held() == ["W"], "the key press through the token")
            browser.keys(("keyUp", "w"))
            assert browser.run("return document.cookie") == ""  # HttpOnly: the page's script never sees it
        finally:
            browser.close()


def test_a_closed_tab_ends_quietly(capfd):
    with served_player() as server:
        browser = WebDriver()
        try:
            browser.open(server.url)
            wait_for(lambda: browser.run("return window.playState.framesShown") >= 2, "frames on the page")
            assert server.streams_open == 1
            browser.close_tab()
            wait_for(lambda: server.streams_open == 0, "the frame stream to end with its tab")
            assert server.player.status()["error"] is None
        finally:
            browser.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err[-2000:]


def demo_screenshots(folder: str) -> None:
    """The guide's pictures: the page at 1280x800 while the demo student plays (W held, the
    mouse dragged right), and paused."""
    root = Path(__file__).resolve().parents[1]
    script = subprocess.Popen([sys.executable, "play_world.py", "--demo", "--HEADLESS=false", "--PORT=0"], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    browser = None
    try:
        for line in script.stdout:
            print(line, end="")
            if found := re.search(r"open (http://\S+) in a browser", line):
                break
        else:
            raise SystemExit("play_world.py --demo --HEADLESS=false stopped before serving the page")
        browser = WebDriver(1280, 800)
        browser.open(found.group(1))
        browser.viewport(1280, 800)
        wait_for(lambda: browser.run("return window.playState.framesShown") >= 40, "the demo's frames", timeout=300)
        browser.keys(("keyDown", "w"))
        for _ in range(3):
            browser.drag("view", 90, 0)
            time.sleep(0.3)
        wait_for(lambda: browser.run("return window.playState.latencies.length") >= 1, "a frame made from W",
                 timeout=120)
        time.sleep(1.5)  # a few more frames made with W and the mouse
        browser.screenshot(Path(folder) / "play_page.png")
        browser.keys(("keyUp", "w"), ("keyDown", "p"), ("keyUp", "p"))
        wait_for(lambda: "Paused" in text_of(browser, "#note"), "the pause")
        time.sleep(1.0)
        browser.screenshot(Path(folder) / "play_page_paused.png")
        print(f"wrote {folder}/play_page.png and {folder}/play_page_paused.png")
    finally:
        if browser is not None:
            browser.close()
        script.terminate()
        script.wait(timeout=30)


if __name__ == "__main__":
    demo_screenshots(sys.argv[1] if len(sys.argv) > 1 else "docs")
