"""The page end to end in headless Chromium: it loads, frames arrive, and a key pressed and
a mouse dragged in the browser reach the model's action input.

The browser is driven through chromedriver's W3C WebDriver protocol (plain HTTP + JSON),
with the few calls needed written out below - no client library. Skipped where Chromium or
chromedriver is absent (Debian: apt-get install chromium chromium-driver; .ci/run installs
them when it runs as root with apt).
"""

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import pytest

from play_helpers import served_player, wait_for

BROWSER = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                if (path := shutil.which(name))), None)
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(BROWSER is None or DRIVER is None,
                                reason="needs Chromium and chromedriver on PATH (Debian: apt-get install chromium "
                                       "chromium-driver); .ci/run installs them when it can")


class WebDriver:
    """A headless Chromium session through chromedriver: just the calls this test makes."""

    def __init__(self):
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
                                "--window-size=900,700"]}
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
            assert browser.run("return document.getElementById('view').naturalWidth") > 0

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
            rates = wait_for(lambda: "fps" in (text := browser.run(
                "return document.getElementById('rates').textContent")) and text, "the frame rates on the page")
            assert "model" in rates and "block" in rates
            assert server.player.status()["error"] is None
        finally:
            browser.close()
