"""The local web page of a live stream, served by the standard library's HTTP server.

    GET  /                the page (play/page.html)
    GET  /frame?after=N   the latest frame as JPEG once it is newer than frame N (waits up
                          to FRAME_WAIT_SECONDS, then 204); its number in X-Frame-Index
    GET  /status          JSON: the model, the keys, frame rates, the last block's action
    POST /input           JSON {"down": [keys], "up": [keys], "move": [dx, dy], "release_all": bool}
    POST /restart         start the stream over from the first image
    POST /pause           JSON {"paused": true or false}

One client or a few, on this machine: a thread per request is plenty, and the frames go
by long polling, which every browser does the same way (an MJPEG stream would need none
of the page's script, but the page could not count frames or tell when one arrives).
POSTs must carry a JSON body (Content-Type application/json), which a page of another
site cannot send here without the browser first asking, and this server never says yes.
"""

import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from play.player import Player
from play.session import InputError, InputSession

PAGE = Path(__file__).with_name("page.html")
FRAME_WAIT_SECONDS = 10.0
MAX_BODY_BYTES = 64 * 1024


class PlayServer(ThreadingHTTPServer):
    daemon_threads = True  # a page still waiting for a frame does not keep the script alive

    def __init__(self, address: tuple[str, int], player: Player, session: InputSession, info: dict):
        self.player, self.session = player, session
        self.info = info  # what the page shows about the model and its keys (fixed for the run)
        self.page = PAGE.read_bytes()
        super().__init__(address, PlayHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"


class PlayHandler(BaseHTTPRequestHandler):
    server: PlayServer
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/":
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif url.path == "/status":
            self._send_json({**self.server.info, **self.server.player.status()})
        elif url.path == "/frame":
            try:
                after = int(parse_qs(url.query).get("after", ["-1"])[0])
            except ValueError:
                return self._send_error(HTTPStatus.BAD_REQUEST, "after must be a whole number (a frame index)")
            frame = self.server.player.frame_after(after, FRAME_WAIT_SECONDS)
            if frame is None:
                self._send(HTTPStatus.NO_CONTENT, b"", None)
            else:
                self._send(HTTPStatus.OK, frame.jpeg, "image/jpeg", {"X-Frame-Index": str(frame.index)})
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no page {url.path}")

    def do_POST(self):
        path = urlsplit(self.path).path
        if path not in ("/input", "/restart", "/pause"):
            return self._send_error(HTTPStatus.NOT_FOUND, f"no endpoint {path}")
        message = self._read_json()
        if message is None:
            return
        if path == "/input":
            try:
                self.server.session.apply(message)
            except InputError as error:
                return self._send_error(HTTPStatus.BAD_REQUEST, str(error))
        elif path == "/restart":
            self.server.player.restart()
        else:
            paused = message.get("paused") if isinstance(message, dict) else None
            if not isinstance(paused, bool):
                return self._send_error(HTTPStatus.BAD_REQUEST, 'send {"paused": true} or {"paused": false}')
            self.server.player.pause(paused)
        self._send_json({"ok": True})

    def log_message(self, format, *args):
        pass  # one line per frame request would bury the script's own output

    # ------------------------------------------------------------------ helpers

    def _read_json(self):
        """The request's JSON body, or None after answering with the problem."""
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
            return json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            self._send_error(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {error}")
            return None

    def _send_json(self, obj, status=HTTPStatus.OK):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _send_error(self, status, message: str):
        self._send_json({"error": message}, status)

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
