"""The local web page of a live stream, served by the standard library's HTTP server.

    GET  /                the page (play/page.html)
    GET  /frames?after=N  every frame shown from now on, newer than frame N, as one response
                          that does not end (the page's way): messages of a 4-byte length,
                          a JSON header {"index", "action": {"keys", "mouse", "seq"}}, a
                          4-byte length and the JPEG (length 0: nothing new for
                          FRAME_WAIT_SECONDS, a check that the page is still there)
    GET  /frame?after=N   the latest frame as JPEG once it is newer than frame N (waits up
                          to FRAME_WAIT_SECONDS, then 204): long polling, for simple clients;
                          its number in X-Frame-Index, its action's seq in X-Input-Seq
    GET  /status          JSON: the model, the keys and what they do, frame rates, the last
                          block's action, the pages receiving frames
    POST /input           JSON {"down": [keys], "up": [keys], "move": [dx, dy], "release_all": bool,
                          "seq": the page's number for the message}
    POST /restart         start the stream over from the first image
    POST /pause           JSON {"paused": true or false}

One client or a few, on this machine: a thread per request is plenty. The frames go to the
page pushed down one response (fetch's streamed body, which every current browser reads
the same way), not by long polling: a poll costs a round trip per frame, so over a link of
100 ms a poll-per-frame page shows at most 10 frames per second, and a key's frame waits
for the next poll (bench/bench_play_latency.py measures both through a delaying proxy;
bench/RESULTS.md "Play latency"). A WebSocket would give the same push, with a library and
a second protocol to guard; the keys go up as POSTs on kept-alive connections, one
one-way trip each. Small writes go out at once (TCP_NODELAY): a frame is never held back
waiting for the page's acknowledgement of the one before.

Who may ask (every request is checked before it is answered, refusals are 403 with the
reason):
- The Host header must name this server: a loopback name (localhost, 127.0.0.1, [::1]) or
  the HOST it was started on. A web page whose own name is made to resolve to this
  machine (DNS rebinding) sends its own name, and is refused. Any port is accepted: an SSH
  forward (ssh -L 9000:localhost:8000) changes it, and a port names no one.
- A request a browser sends from another origin (an Origin that is not this server's, or
  Sec-Fetch-Site cross-site or same-site) is refused; the page's own requests are
  same-origin. POSTs must also carry a JSON body (Content-Type application/json), which a
  page of another site cannot send here without the browser first asking (CORS), and this
  server never says yes.
- With HOST beyond loopback (another machine may connect), every request needs the token
  made at start (secrets.token_urlsafe) and printed in the URL to open, like Jupyter's:
  `?token=...` on the first request, after which the page's requests carry it in a
  cookie (HttpOnly, SameSite=Strict), so the page's script never handles it and no other
  site's request carries it. HOST 0.0.0.0 (every network) answers to any name, as the
  machine's names are not known; the token is what keeps others out.
"""

import hmac
import ipaddress
import json
import re
import secrets
import socket
import struct
import sys
import threading
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from play.player import Player
from play.session import InputError, InputSession

PAGE = Path(__file__).with_name("page.html")
FRAME_WAIT_SECONDS = 10.0
MAX_BODY_BYTES = 64 * 1024
MAX_STREAMS = 16  # pages receiving frames at once (each holds a thread); more get 503
READ_TIMEOUT_SECONDS = 60.0  # a client that stops sending mid-request frees its thread after this
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
ALLOWED_FETCH_SITES = ("same-origin", "none")  # Sec-Fetch-Site of the page's own requests, or typed in
TOKEN_PARAMETER = "token"
HOST_HEADER = re.compile(r"\[([0-9a-f:.]+)\](?::\d{1,5})?|([^:\[\]/\s@]+)(?::\d{1,5})?")  # [ipv6]:port or name:port
JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The name in a Host header ("[::1]:8000" -> "::1", "Example:80" -> "example"); None when
    it is not a name with an optional port."""
    match = HOST_HEADER.fullmatch(header.strip().lower())
    return None if match is None else match.group(1) or match.group(2)


def frame_message(header: dict, jpeg: bytes) -> bytes:
    """One message of /frames: the header's JSON and the JPEG, each after its length (4 bytes,
    big-endian), as one write."""
    head = json.dumps(header).encode()
    return b"".join((struct.pack(">I", len(head)), head, struct.pack(">I", len(jpeg)), jpeg))


class PlayServer(ThreadingHTTPServer):
    daemon_threads = True  # a page still waiting for a frame does not keep the script alive

    def __init__(self, address: tuple[str, int], player: Player, session: InputSession, info: dict):
        self.player, self.session = player, session
        self.info = info  # what the page shows about the model and its keys (fixed for the run)
        self.page = PAGE.read_bytes()
        host = address[0]
        self.wildcard = host in WILDCARD_HOSTS
        # Anything beyond loopback needs the token (the guide's rule for local servers).
        self.token = None if is_loopback(host) else secrets.token_urlsafe(24)
        self.host_names = set(LOOPBACK_NAMES) | ({host.strip("[]").lower()} if not self.wildcard else set())
        super().__init__(address, PlayHandler)
        self.cookie_name = f"play_token_{self.server_address[1]}"  # one per port: two players on one machine
        self._streams_lock = threading.Lock()
        self.streams_open = 0  # pages receiving frames (/frames responses under way)

    @property
    def url(self) -> str:
        """The URL to open (with the token when there is one)."""
        host, port = self.server_address[:2]
        if self.wildcard:
            host = socket.gethostname()
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/" + (f"?{TOKEN_PARAMETER}={self.token}" if self.token else "")

    def handle_error(self, request, client_address) -> None:
        """A page closed, a tab reloaded or the network dropped mid-answer: nothing to say.
        Anything else gets one line, not a traceback (the stream goes on)."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):  # BrokenPipe, ConnectionReset, ConnectionAborted
            return
        print(f"play server: a request from {client_address[0]} failed ({type(error).__name__}: {error})",
              file=sys.stderr)


class PlayHandler(BaseHTTPRequestHandler):
    server: PlayServer
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_SECONDS
    disable_nagle_algorithm = True  # TCP_NODELAY: a frame or an answer goes out at once

    def do_GET(self):
        url = urlsplit(self.path)
        if self._refused(url, page=url.path == "/"):
            return
        if url.path == "/":
            cookie = self._token_cookie(url)
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8",
                       {"Set-Cookie": cookie} if cookie else None)
        elif url.path == "/status":
            self._send_json({**self.server.info, "accepted": self.server.session.accepted_keys(),
                             **self.server.player.status(), "streams": self.server.streams_open})
        elif url.path in ("/frame", "/frames"):
            try:
                after = int(parse_qs(url.query).get("after", ["-1"])[0])
            except ValueError:
                return self._send_error(HTTPStatus.BAD_REQUEST, "after must be a whole number (a frame index)")
            if url.path == "/frames":
                return self._stream_frames(after)
            frame = self.server.player.frame_after(after, FRAME_WAIT_SECONDS)
            if frame is None:
                self._send(HTTPStatus.NO_CONTENT, b"", None)
            else:
                self._send(HTTPStatus.OK, frame.jpeg, "image/jpeg", {"X-Frame-Index": str(frame.index),
                                                                     "X-Input-Seq": str(frame.action["seq"])})
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no page {url.path[:100]}")

    def do_POST(self):
        url = urlsplit(self.path)
        if self._refused(url):
            return
        if url.path not in ("/input", "/restart", "/pause"):
            return self._send_error(HTTPStatus.NOT_FOUND, f"no endpoint {url.path[:100]}")
        message = self._read_json()
        if message is None:
            return
        if url.path == "/input":
            try:
                self.server.session.apply(message)
            except InputError as error:
                return self._send_error(HTTPStatus.BAD_REQUEST, str(error))
        elif url.path == "/restart":
            self.server.player.restart()
        else:
            paused = message.get("paused")
            if not isinstance(paused, bool):
                return self._send_error(HTTPStatus.BAD_REQUEST, 'send {"paused": true} or {"paused": false}')
            self.server.player.pause(paused)
        self._send_json({"ok": True})

    def _stream_frames(self, after: int) -> None:
        """Each frame newer than `after` as it is shown, until the page goes (a write to a
        closed connection raises ConnectionError, which handle_error passes over quietly) or
        the player stops."""
        server = self.server
        with server._streams_lock:
            full = server.streams_open >= MAX_STREAMS
            if not full:
                server.streams_open += 1
        if full:
            return self._send_error(HTTPStatus.SERVICE_UNAVAILABLE, f"{MAX_STREAMS} pages are watching already: "
                                                                     "close one")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "close")  # the body ends when the connection does
        try:
            self.end_headers()
            while True:
                frame = server.player.frame_after(after, FRAME_WAIT_SECONDS)
                if frame is None:
                    if server.player.stopped:
                        return
                    self.wfile.write(frame_message({"index": after}, b""))  # still there?
                    continue
                after = frame.index
                self.wfile.write(frame_message({"index": frame.index, "action": frame.action}, frame.jpeg))
        finally:
            with server._streams_lock:
                server.streams_open -= 1

    # ------------------------------------------------------------------ who may ask

    def _refused(self, url, page: bool = False) -> bool:
        """Answer 403 (and True) unless the request names this server, comes from its own
        page (or no page) and carries the token when one is needed. The page itself may be
        opened from a link on another site (it is the same for everyone); what it fetches
        may not."""
        hosts = self.headers.get_all("Host") or []
        name = host_name(hosts[0]) if len(hosts) == 1 else None
        if name is None or not (self.server.wildcard or name in self.server.host_names):
            shown = hosts[0][:100] if len(hosts) == 1 else f"{len(hosts)} Host headers"
            return self._forbid(f"this server answers to {', '.join(sorted(self.server.host_names))} (the names it "
                                f"was started for), not Host {shown!r}: open the URL play_world.py printed")
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower().rstrip("/") != f"http://{hosts[0].strip().lower()}":
            return self._forbid(f"requests from another site's page (Origin {origin[:100]!r}) are refused")
        site = self.headers.get("Sec-Fetch-Site")
        if not page and site is not None and site.lower() not in ALLOWED_FETCH_SITES:
            return self._forbid(f"requests from another site's page (Sec-Fetch-Site {site[:40]!r}) are refused")
        if self.server.token and not self._has_token(url):
            return self._forbid("this server needs its token: open the URL with ?token=... that play_world.py "
                                "printed when it started")
        return False

    def _has_token(self, url) -> bool:
        given = parse_qs(url.query).get(TOKEN_PARAMETER, [])[:1]
        try:
            cookies = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            cookies = SimpleCookie()
        if self.server.cookie_name in cookies:
            given.append(cookies[self.server.cookie_name].value)
        expected = self.server.token.encode()
        return any(hmac.compare_digest(value.encode("utf-8", "replace"), expected) for value in given)

    def _token_cookie(self, url) -> str | None:
        """The cookie that carries the token for the page's own requests, once it came in the URL."""
        if self.server.token and TOKEN_PARAMETER in parse_qs(url.query):
            return f"{self.server.cookie_name}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
        return None

    def _forbid(self, reason: str) -> bool:
        self._send_error(HTTPStatus.FORBIDDEN, reason)
        return True

    def log_message(self, format, *args):
        pass  # one line per frame request would bury the script's own output

    # ------------------------------------------------------------------ helpers

    def _read_json(self) -> dict | None:
        """The request's JSON object, or None after answering with the problem."""
        if self.headers.get_content_type() != "application/json":
            self._send_error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json")
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self._send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a body of 0 to {MAX_BODY_BYTES} bytes, please")
            return None
        body = self.rfile.read(length)
        try:
            message = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            self._send_error(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {error}")
            return None
        except RecursionError:  # [[[[...]]]]: deeper than the parser goes
            self._send_error(HTTPStatus.BAD_REQUEST, "the body nests too deeply: send one JSON object like "
                                                     '{"down": ["W"]}')
            return None
        if not isinstance(message, dict):
            self._send_error(HTTPStatus.BAD_REQUEST, f"the body must be a JSON object ({{...}}), got "
                                                     f"{JSON_NAMES.get(type(message), type(message).__name__)}")
            return None
        return message

    def _send_json(self, obj, status=HTTPStatus.OK):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _send_error(self, status, message: str):
        # the connection closes: a refused request's body may be left unread
        self._send(status, json.dumps({"error": message}).encode(), "application/json", {"Connection": "close"})

    def _send(self, status, body: bytes, content_type: str | None, headers: dict | None = None):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != HTTPStatus.NO_CONTENT:  # a 204 has no body, and says no length
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
