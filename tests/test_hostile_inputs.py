"""Hostile input, second round (issue 27): the play server (foreign Host and Origin, the
token beyond loopback, bodies that are not an object, nesting, made-up keys, dropped
connections), huge lengths (a bound on every size setting, streamed headless actions),
LoRA alpha and merges, a base model's fingerprint, stale temp files of a killed headless
run, edited distillation and fine-tuning states, and the settings checks that must come
before any long work."""

import http.client
import json
import socket
import struct
import threading
import time
from contextlib import contextmanager

import pytest

from play.server import PlayServer, host_name, is_loopback
from play_helpers import served_player, wait_for


# ----------------------------------------------------------------------------- the play server

def request(server, method: str, path: str, host: str | None = None, body=None, headers: dict | None = None):
    """(status, headers, body) of one request with exactly these headers (Host included)."""
    port = server.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        all_headers = dict(headers or {})
        if data is not None:
            all_headers.setdefault("Content-Type", "application/json")
            all_headers["Content-Length"] = str(len(data))
        for name, value in all_headers.items():
            connection.putheader(name, value)
        connection.endheaders(data)
        reply = connection.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        connection.close()


def refusal(reply) -> str:
    status, _, body = reply
    assert status == 403, (status, body[:200])
    return json.loads(body)["error"]


def test_host_names_are_read_from_the_header():
    assert [host_name(h) for h in ("localhost:8000", "127.0.0.1", "[::1]:8000", "Rebind.Example:80")] == \
        ["localhost", "127.0.0.1", "::1", "rebind.example"]
    assert [host_name(h) for h in ("", "a b", "x:port", "[::1", "user@host:1")] == [None] * 5
    assert is_loopback("localhost") and is_loopback("127.0.0.5") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example")


def test_a_foreign_host_or_origin_is_refused_and_loopback_names_are_served():
    with served_player() as server:
        port = server.server_address[1]
        rebind = f"rebind.example:{port}"
        # the curl cases: a page whose name re-resolves to 127.0.0.1 sees nothing, steers nothing
        assert "not Host 'rebind.example" in refusal(request(server, "GET", "/frame?after=-1", rebind))
        status_reply = request(server, "GET", "/status", rebind)
        assert "answers to" in refusal(status_reply) and b"tiny random student" not in status_reply[2]
        refusal(request(server, "POST", "/input", rebind, {"down": ["W"]}, {"Origin": f"http://{rebind}"}))
        refusal(request(server, "POST", "/input", None, {"down": ["W"]}, {"Origin": f"http://{rebind}"}))
        refusal(request(server, "GET", "/status", None, headers={"Origin": "http://evil.example"}))
        refusal(request(server, "GET", "/status", None, headers={"Sec-Fetch-Site": "cross-site"}))
        assert server.session.held() == []
        assert not server.player.status()["watched"]  # no refused request started the stream

        for name in ("127.0.0.1", "localhost", "[::1]"):
            for host in (f"{name}:{port}", name, f"{name}:9000"):  # an SSH forward changes the port
                status, _, body = request(server, "GET", "/status", host)
                assert status == 200 and json.loads(body)["model"] == "tiny random student", host
        own = f"localhost:{port}"
        assert request(server, "POST", "/input", own, {"down": ["W"]}, {"Origin": f"http://{own}",
                                                                        "Sec-Fetch-Site": "same-origin"})[0] == 200
        assert server.session.held() == ["W"]
        assert request(server, "GET", "/", own, headers={"Sec-Fetch-Site": "cross-site"})[0] == 200  # a link to the page


def test_beyond_loopback_every_request_needs_the_token():
    with served_player(host="0.0.0.0") as server:
        token = server.token
        assert token and len(token) >= 32 and server.url.endswith(f"/?token={token}")
        for path in ("/", "/status", "/frame?after=-1", "/status?token=" + "x" * len(token)):
            assert "needs its token" in refusal(request(server, "GET", path))
        refusal(request(server, "POST", "/input", body={"down": ["W"]}))
        assert server.session.held() == []

        status, headers, page = request(server, "GET", f"/?token={token}")
        assert status == 200 and b"playState" in page
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"play_token_{server.server_address[1]}={token};")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        carried = {"Cookie": cookie.split(";")[0]}  # what the browser sends with the page's own requests
        assert request(server, "GET", "/status", headers=carried)[0] == 200
        assert request(server, "POST", "/input", body={"down": ["W"]}, headers=carried)[0] == 200
        assert request(server, "GET", f"/status?token={token}")[0] == 200
        assert server.session.held() == ["W"]
        refusal(request(server, "GET", "/status", headers={"Cookie": f"play_token_{server.server_address[1]}=wrong"}))


def test_loopback_needs_no_token():
    with served_player() as server:
        assert server.token is None and "token" not in server.url


@pytest.mark.parametrize("body, expected", [
    (b"null", "got null"), (b"[1, 2]", "got an array"), (b"3", "got a number"), (b'"W"', "got a string"),
    (b"[" * 32000 + b"]" * 32000, "nests too deeply"), (b"{" * 30000, "the body is not JSON"),
])
def test_a_body_that_is_not_one_flat_object_gets_a_400_naming_what_was_expected(body, expected):
    with served_player() as server:
        status, _, reply = request(server, "POST", "/input", body=body)
        assert status == 400 and expected in json.loads(reply)["error"]
        assert request(server, "POST", "/pause", body=b"null")[0] == 400
        assert request(server, "GET", "/status")[0] == 200  # the server goes on


def test_made_up_key_names_are_refused_by_name_and_never_held():
    with served_player() as server:
        for i in range(200):
            status, _, reply = request(server, "POST", "/input", body={"down": [f"K{i}_{j}" for j in range(64)]})
            assert status == 400
        error = json.loads(reply)["error"]
        assert error.startswith("unknown key(s) K199_0, K199_1") and "this model's keys are W, S, A, D, UP" in error
        assert server.session.held() == []
        status, _, body = request(server, "GET", "/status")
        assert len(body) < 4000 and json.loads(body)["accepted"] == ["W", "S", "A", "D", "UP"]
        assert request(server, "POST", "/input", body={"down": ["up", "S"]})[0] == 200  # an alias and a key
        assert server.session.held() == ["S", "W"]


@contextmanager
def errors_handled(server):
    """The server's handle_error calls, recorded (the real one still runs)."""
    calls, real = [], server.handle_error

    def spy(request, address):
        calls.append(address)
        real(request, address)

    server.handle_error = spy
    yield calls


def reset_connection(port: int, sent: bytes) -> None:
    """Send the start of a request, then drop the connection with a reset (RST)."""
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(sent)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


def test_a_client_that_resets_its_connection_ends_quietly(capfd):
    with served_player() as server, errors_handled(server) as calls:
        port = server.server_address[1]
        head = f"POST /input HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        reset_connection(port, (head + "Content-Length: 1000\r\n\r\n{").encode())  # reset mid-body
        wait_for(lambda: calls, "the server to meet the reset connection")
        # a page closed while its frame was on the way
        long_poll = f"GET /frame?after=-1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        for _ in range(3):
            reset_connection(port, long_poll)
        wait_for(lambda: len(calls) >= 4, "the frames to meet the closed connections", timeout=120)
        time.sleep(0.2)
        assert request(server, "GET", "/status")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err[-2000:]
