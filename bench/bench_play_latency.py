"""Key-to-frame latency of the play page's two ways of getting frames, through a link with
added delay: long polling (GET /frame?after=N, one request per frame) and the pushed
stream the page uses (GET /frames, one response that carries every frame).

    python bench/bench_play_latency.py                  # 0 and 50 ms each way, 20 s per case
    python bench/bench_play_latency.py --delays 0,25,50 --seconds 10
    python bench/bench_play_latency.py --transports stream --block-ahead   # as before the just-in-time start

A tiny random student and VAE (CPU) stream behind a real PlayServer on loopback; a local
TCP proxy (below, standard library only) holds every byte for DELAY ms in each direction
before passing it on, so a round trip gains 2 x DELAY (DELAY 50: an RTT of 100 ms, a
rented GPU a continent away). A client does what the page does: it reads frames (by long
polling, or from the stream) and, every PRESS_EVERY seconds, presses a key - a POST
/input {"down": [key], "seq": n} on a kept-alive connection, the key let go 0.1 s later -
and takes the time from sending the press to receiving the first frame whose action
carries seq >= n (the page's own measurement).

Because client, proxy and server share this machine's clock, each press's latency splits
into its parts:
    up       sending the press -> the server has it (the link's one-way trip + the POST)
    stream   the server has it -> the first frame made from it is shown: waiting for the
             next block to start, making it (the model; independent of the transport)
    down     shown at the server -> received by the client (the transport's part)
The transport cannot beat one round trip (up + down >= 2 x DELAY): that is the
theoretical minimum, against which each transport's up + down is compared. Also printed:
frames received per second (the server shows 25) and the model's median seconds per block
(its making time, which sets how far ahead of the screen the next block starts).

--block-ahead starts each block as soon as fewer than a block's frames wait (the player
before it started blocks just in time, play/player.py LEAD_MARGIN): the stream part then
holds a whole block's showing time more.
"""

import argparse
import http.client
import json
import queue
import random
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_streaming import build  # noqa: E402
from generation.streaming import StreamingGenerator  # noqa: E402
from play.controls import controls_for  # noqa: E402
from play.player import Player  # noqa: E402
from play.server import PlayServer  # noqa: E402
from play.session import InputSession  # noqa: E402
from wan.conditioning import STREAM_COND_LATENT_FRAMES  # noqa: E402
from wan.config import tiny_config  # noqa: E402
from wan.model import random_inputs  # noqa: E402
from wan.vae import StreamingDecoder, VAEConfig  # noqa: E402

KEYS = ("W", "S", "A", "D")
PRESS_EVERY = 0.25   # seconds between presses (several per block, at every phase of it)
HOLD = 0.1           # seconds a key is held
WARM_UP = 2.0        # seconds of frames before the first press


# ----------------------------------------------------------------------------- the link

class DelayingProxy:
    """Listens on a free loopback port and forwards each connection to `target`, every chunk
    of bytes held `delay` seconds in each direction (in order; the bandwidth is not limited)."""

    def __init__(self, target: tuple[str, int], delay: float):
        self.target, self.delay = target, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        held: queue.Queue = queue.Queue()

        def read() -> None:
            while True:
                try:
                    data = source.recv(65536)
                except OSError:
                    data = b""
                held.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def write() -> None:
            while True:
                due, data = held.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.listener.close()


# ----------------------------------------------------------------------------- the server

def served_tiny_player(latent_hw: tuple[int, int]) -> PlayServer:
    """A PlayServer on loopback streaming a tiny random student (its speed is not measured
    here: it keeps up with 25 fps on the CPU, as a distilled student does on a GPU)."""
    config = tiny_config(local_attn_size=6, action_blocks=(0,))
    model, vae = build(config, VAEConfig.tiny(), torch.device("cpu"), torch.float32, torch.float32)
    model.requires_grad_(False)
    inputs = random_inputs(config, 1, STREAM_COND_LATENT_FRAMES, *latent_hw)
    generator = StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"], StreamingDecoder(vae))
    controls = controls_for("universal", KEYS, True)
    session = InputSession(controls, mouse_sensitivity=0.01, mouse_limit=0.25)
    info = {"model": "tiny random student", "mode": "universal", "keys": list(KEYS), "help": ""}
    server = PlayServer(("127.0.0.1", 0), Player(generator, session, KEYS), session, info)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.player.start()
    return server


class ServerLog:
    """When the server applied each message number and showed each frame it handed out
    (wraps the session's apply and the player's frame_after)."""

    def __init__(self, server: PlayServer):
        self.arrived: dict[int, float] = {}   # seq -> applied at
        self.shown: dict[int, float] = {}     # frame index -> shown at
        apply, frame_after = server.session.apply, server.player.frame_after

        def logged_apply(message) -> None:
            apply(message)
            if isinstance(message, dict) and "seq" in message:
                self.arrived[message["seq"]] = time.monotonic()

        def logged_frame_after(*args, **kwargs):
            frame = frame_after(*args, **kwargs)
            if frame is not None:
                self.shown[frame.index] = frame.shown_at
            return frame

        server.session.apply, server.player.frame_after = logged_apply, logged_frame_after


# ----------------------------------------------------------------------------- the clients

class FrameReader:
    """Receives frames like the page: (received at, shown at, seq) of each, in a thread."""

    def __init__(self, port: int, transport: str, log: ServerLog):
        self.port, self.transport, self.log = port, transport, log
        self.frames: list[tuple[float, float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll if transport == "poll" else self._stream, daemon=True)
        self.thread.start()

    def _record(self, index: int, seq: int) -> None:
        self.frames.append((time.monotonic(), self.log.shown[index], seq))

    def _poll(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        after = -1
        while not self.stop.is_set():
            connection.request("GET", f"/frame?after={after}")
            reply = connection.getresponse()
            reply.read()
            if reply.status == 200:
                after = int(reply.getheader("X-Frame-Index"))
                self._record(after, int(reply.getheader("X-Input-Seq")))
        connection.close()

    def _stream(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("GET", "/frames?after=-1")
        reply = connection.getresponse()
        while not self.stop.is_set():
            header = json.loads(reply.read(struct.unpack(">I", reply.read(4))[0]))
            jpeg = reply.read(struct.unpack(">I", reply.read(4))[0])
            if jpeg:
                self._record(header["index"], header["action"]["seq"])
        reply.close()
        connection.close()


def run_case(server: PlayServer, log: ServerLog, transport: str, delay: float, seconds: float,
             first_seq: int) -> dict:
    """Presses through a proxy of `delay` for `seconds`; the parts of each press's latency."""
    proxy = DelayingProxy(server.server_address[:2], delay)
    reader = FrameReader(proxy.port, transport, log)
    keys = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    rng = random.Random(0)
    time.sleep(WARM_UP)
    presses, seq, block_seconds = [], first_seq, []
    start_frames, start = len(reader.frames), time.monotonic()
    while time.monotonic() - start < seconds:
        if server.player.last_block is not None:
            block_seconds.append(server.player.last_block[1])
        key = rng.choice(KEYS)
        for part, pause in (("down", HOLD), ("up", PRESS_EVERY - HOLD + rng.uniform(-0.05, 0.05))):
            seq += 1
            sent = time.monotonic()
            body = json.dumps({part: [key], "seq": seq})
            keys.request("POST", "/input", body, {"Content-Type": "application/json"})
            keys.getresponse().read()
            if part == "down":
                presses.append((seq, sent))
            time.sleep(max(0.0, sent + pause - time.monotonic()))
    frames_per_second = (len(reader.frames) - start_frames) / (time.monotonic() - start)
    time.sleep(1.5)  # the last presses' frames
    reader.stop.set()
    keys.close()
    proxy.close()

    parts = {"total": [], "up": [], "stream": [], "down": []}
    for number, sent in presses:
        answer = next((f for f in reader.frames if f[2] >= number), None)
        if answer is None or number not in log.arrived:
            continue
        received, shown, _ = answer
        applied = log.arrived[number]
        parts["total"].append(received - sent)
        parts["up"].append(applied - sent)
        parts["stream"].append(shown - applied)
        parts["down"].append(received - shown)
    return {"transport": transport, "delay_ms": 1000 * delay, "presses": len(presses),
            "answered": len(parts["total"]), "frames_per_second": frames_per_second,
            "block_ms": 1000 * statistics.median(block_seconds),
            **{name: 1000 * statistics.median(values) for name, values in parts.items() if values},
            **{f"{name}_mean": 1000 * statistics.fmean(values) for name, values in parts.items() if values},
            "last_seq": seq}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="0,50", help="added delay each way, ms, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of presses per case")
    parser.add_argument("--transports", default="poll,stream")
    parser.add_argument("--size", default="2x4", help="latent height x width (x8 for pixels)")
    parser.add_argument("--block-ahead", action="store_true",
                        help="start each block as soon as fewer than a block's frames wait (the old rule)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    latent_hw = tuple(int(v) for v in args.size.split("x"))
    server = served_tiny_player(latent_hw)
    if args.block_ahead:
        server.player._lead_frames = lambda: server.player.block_frames
    log = ServerLog(server)
    print(f"tiny random student at {8 * latent_hw[0]}x{8 * latent_hw[1]} px, shown at {server.player.fps} fps; "
          f"{args.seconds:.0f} s of presses every {PRESS_EVERY} s per case; next block started "
          f"{'a block ahead' if args.block_ahead else 'just in time'}; medians (means) in ms")
    print(f"{'transport':<10} {'delay':>6} {'presses':>8} {'frames/s':>9} {'key->frame':>15} {'up':>13} "
          f"{'stream':>15} {'down':>13} {'up+down':>9} {'minimum':>8} {'block':>6}")
    results, seq = [], 0
    try:
        for delay in (float(d) / 1000 for d in args.delays.split(",")):
            for transport in args.transports.split(","):
                r = run_case(server, log, transport, delay, args.seconds, seq)
                seq = r["last_seq"]
                results.append(r)
                link = r["up"] + r["down"]
                print(f"{transport:<10} {r['delay_ms']:>4.0f}ms {r['answered']:>4}/{r['presses']:<3} "
                      f"{r['frames_per_second']:>9.1f} {r['total']:>6.0f} ({r['total_mean']:>4.0f})  "
                      f"{r['up']:>4.0f} ({r['up_mean']:>4.0f})  {r['stream']:>6.0f} ({r['stream_mean']:>4.0f})  "
                      f"{r['down']:>4.0f} ({r['down_mean']:>4.0f})  {link:>9.0f} {2 * r['delay_ms']:>8.0f} "
                      f"{r['block_ms']:>6.0f}",
                      flush=True)
    finally:
        server.shutdown()
        server.server_close()
        server.player.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
