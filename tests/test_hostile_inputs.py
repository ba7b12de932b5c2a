"""Hostile input, second round (issue 27): the play server (foreign Host and Origin, the
token beyond loopback, bodies that are not an object, nesting, made-up keys, dropped
connections), huge lengths (a bound on every size setting, streamed headless actions),
LoRA alpha and merges, a base model's fingerprint, stale temp files of a killed headless
run, edited distillation and fine-tuning states, and the settings checks that must come
before any long work."""

import fcntl
import http.client
import io
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_unreal_data as data
import distill_streaming_model as ds
import finetune_base_model as fb
import generate_preview as gp
import play_world
from cli.settings import SETTING_RULES
from generation.action_scripts import ActionScriptError, read_action_script
from generation.finetuned import LORA_CONTENTS, load_model, merge_lora_file
from play.server import host_name, is_loopback
from play_helpers import served_player, wait_for
from runs.errors import TrainingError
from runs.folder import STATE_FILE
from wan.config import WanConfig
from wan.fingerprint import FINGERPRINT_KEY, model_fingerprint
from wan.loading import CheckpointError
from wan.lora import LoRAConfig, add_lora
from wan.model import WanModel


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
        # ... and one whose frames came down one response (the page's /frames)
        reset_connection(port, f"GET /frames?after=-1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        wait_for(lambda: len(calls) >= 5, "the frames to meet the closed connections", timeout=120)
        wait_for(lambda: server.streams_open == 0, "the stream to end")
        time.sleep(0.2)
        assert request(server, "GET", "/status")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err[-2000:]


# ----------------------------------------------------------------------------- huge lengths

SIZE_WORDS = re.compile(r"LENGTH|SIZE|FRAMES|FRAME\b|STEPS|BLOCKS|RANK|HEIGHT|WIDTH|CLIPS|SAMPLES|LATENTS|LAYERS|"
                        r"WORKERS|EPOCHS|SIGMAS|STRIDE|EVERY|PORT|KEYS|TARGETS|_GB|SEED")


def size_settings() -> list:
    """(name, default) of every setting of the five scripts that is a whole number, a list or
    an optional number, or a number whose name says it is a size, length or count."""
    found = {}
    for script in (data, fb, gp, ds, play_world):
        for name, value in script.SETTINGS.defaults.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (number and (isinstance(value, int) or SIZE_WORDS.search(name))) or isinstance(value, tuple) \
                    or value is None:
                found.setdefault(name, pytest.param(name, value, id=f"{script.__name__}:{name}"))
    return list(found.values())


@pytest.mark.parametrize("name, default", size_settings())
def test_every_size_length_and_count_setting_has_a_bound(name, default):
    rule = SETTING_RULES.get(name)
    assert rule is not None, f"{name} has no rule in cli/settings.py SETTING_RULES: give it a bound"
    if isinstance(default, tuple):
        element = default[0] if default else 1000
        assert rule(tuple([element] * 10_000)), f"{name}: a list of 10,000 entries is not refused"
    else:
        assert rule(10**12), f"{name}: 10**12 is not refused"
        assert rule(default) is None, f"{name}: its own default {default!r} is refused"


@pytest.mark.parametrize("script, argv, message", [
    ("play_world", ["--headless", "--ACTIONS=W*9", "--NUM_BLOCKS=1000000000"],
     "NUM_BLOCKS=1000000000: must be at most 7,500"),
    ("play_world", ["--headless", "--ACTIONS=W*9", "--NUM_BLOCKS=100000000000000000000"], "must be at most 7,500"),
    ("play_world", ["--headless", "--ACTIONS=W*9", "--NUM_BLOCKS=1e20"], "NUM_BLOCKS is an int"),
    ("generate_preview", ["--NUM_FRAMES=4000000001", "--ACTIONS=W*4000000001"],
     "NUM_FRAMES has 4,000,000,001 frames; at most 1,025"),
    ("finetune_base_model", ["--SEQUENCE_LENGTH=4000000001"], "SEQUENCE_LENGTH has 4,000,000,001 frames"),
    ("finetune_base_model", ["--SEED=100000000000000000000"], "SEED=100000000000000000000: must be at most"),
    ("distill_streaming_model", ["--STREAM_MAX_LATENTS=1000000"], "STREAM_MAX_LATENTS=1000000: must be at most 257"),
    ("distill_streaming_model", ["--DENOISING_STEPS=" + ",".join(map(str, range(1000, 0, -1)))],
     "DENOISING_STEPS has 1,000 steps; at most 50"),
])
def test_huge_lengths_are_refused_by_name_before_anything_is_allocated(script, argv, message, capsys):
    module = {"play_world": play_world, "generate_preview": gp, "finetune_base_model": fb,
              "distill_streaming_model": ds}[script]
    assert module.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_parser_refuses_a_repeat_count_beyond_its_bound_before_making_a_row():
    with pytest.raises(ActionScriptError, match=r"term 2 'W\*4000000001' \(column 5\): the script already gives "
                                                r"4,000,000,010 rows here, more than the 90,000 frames of an hour"):
        read_action_script("A*9 W*4000000001", "WSAD")  # the default bound: an hour at 25 fps
    script = read_action_script("W*90000", "WSAD")
    chunks = script.chunks([9] + [12] * 3)
    assert [len(next(chunks)[0]) for _ in range(4)] == [9, 12, 12, 12]  # a block at a time, not 90,000 rows


def _script_paths(tiny_assets) -> list[str]:
    return [f"--MODEL_DIR={tiny_assets['BASE_MODEL_DIR']}", f"--VAE_PATH={tiny_assets['VAE_PATH']}",
            f"--CLIP_PATH={tiny_assets['CLIP_PATH']}", f"--RECORDING={tiny_assets['DATA_DIR']}",
            f"--VIDEO_HEIGHT={tiny_assets['VIDEO_HEIGHT']}", f"--VIDEO_WIDTH={tiny_assets['VIDEO_WIDTH']}",
            "--DEVICE=cpu"]


def never(*args, **kwargs):
    raise AssertionError("the model was loaded before the actions were checked")


@pytest.mark.parametrize("actions, message", [
    ("W*9 jump*3", "term 2 'jump*3' (column 5): 'jump' is not a key of KEYBOARD_KEYS (W, S, A, D)"),
    ("W*4000000001", "more than the 90,000 frames of an hour at 25 fps"),
    ("W*40", "more than the 21 frames NUM_BLOCKS=2 shows"),
])
def test_an_action_script_problem_is_reported_before_the_model_loads(tiny_assets, tmp_path, monkeypatch, capsys,
                                                                     actions, message):
    monkeypatch.setattr(play_world, "load_model", never)
    monkeypatch.setattr(gp, "load_model", never)
    monkeypatch.setattr(gp, "load_encoders", never)
    blocks = ["--NUM_BLOCKS=2"] if "21 frames" in message else []
    assert play_world.main(["--headless", *_script_paths(tiny_assets), f"--ACTIONS={actions}", *blocks,
                            f"--OUTPUT={tmp_path / 'x.mp4'}"]) == 1
    assert message in capsys.readouterr().err
    if "jump" in actions:
        assert gp.main([f"--BASE_MODEL_DIR={tiny_assets['BASE_MODEL_DIR']}", f"--ACTIONS={actions}",
                        "--NUM_FRAMES=13", f"--FIRST_FRAME={tiny_assets['DATA_DIR']}/frame_0001.png"]) == 1
        assert message in capsys.readouterr().err


def test_a_killed_headless_runs_temp_file_is_removed_by_the_next_run(tiny_assets, tmp_path, capsys):
    output = tmp_path / "out" / "play.mp4"
    output.parent.mkdir()
    # what write_atomic leaves when the process is killed mid-write
    fd, stale = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    other = output.parent / ".other.mp4.abcdefgh.tmp"  # another output's: not this run's to judge
    other.write_bytes(b"half")
    fd, live = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a run writing the same OUTPUT right now
    try:
        code = play_world.main(["--headless", *_script_paths(tiny_assets), "--ACTIONS=W*9", f"--OUTPUT={output}"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert f"removed 1 unfinished temporary file(s) of play.mp4 left by an interrupted run: {Path(stale).name}" in out
        assert sorted(p.name for p in output.parent.iterdir()) == sorted([output.name, other.name, Path(live).name])
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- LoRA files and their base

def write_lora_file(tiny_assets, path: Path, alpha: str = "4.0", value: float | None = None, **metadata) -> Path:
    """A LoRA file of rank 2 on the blocks' self-attention over the tiny base, its adapters
    random (or all `value`), recording the base's fingerprint and `alpha` as its lora_alpha."""
    base = tiny_assets["BASE_MODEL_DIR"]
    with torch.device("meta"):
        model = WanModel(WanConfig.from_json(Path(base) / "config.json"))
    names = add_lora(model, LoRAConfig(2, 1.0, ("self_attn",)))
    shapes = {n: t.shape for n, t in model.state_dict().items() if n in names}
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.full(s, value) if value is not None else torch.randn(s, generator=g) * 0.01
               for n, s in shapes.items()}
    meta = {**LoRAConfig(2, 1.0, ("self_attn",)).metadata(), "lora_alpha": alpha, "contents": LORA_CONTENTS,
            "keyboard_keys": ",".join(tiny_assets["KEYBOARD_KEYS"]), FINGERPRINT_KEY: model_fingerprint(base),
            **metadata}
    save_file(tensors, path, metadata=meta)
    return path


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "0.0", "-2.0"])
def test_a_lora_alpha_that_is_not_finite_and_positive_is_refused_when_the_file_is_read(tiny_assets, tmp_path, alpha):
    lora = write_lora_file(tiny_assets, tmp_path / "lora.safetensors", alpha)
    merged = tmp_path / "merged.safetensors"
    with pytest.raises(CheckpointError, match=rf"{lora}: its LoRA metadata .* \(LoRA alpha {alpha}: must be a "
                                              "finite positive number"):
        merge_lora_file(tiny_assets["BASE_MODEL_DIR"], lora, merged)
    assert not merged.exists()
    with pytest.raises(CheckpointError, match="must be a finite positive number"):
        load_model(tiny_assets["BASE_MODEL_DIR"], lora, tiny_assets["KEYBOARD_KEYS"], "cpu", torch.float32)


def test_a_merge_with_non_finite_values_is_refused_and_nothing_is_written(tiny_assets, tmp_path):
    lora = write_lora_file(tiny_assets, tmp_path / "huge.safetensors", value=1e30)  # B A overflows float32
    merged = tmp_path / "merged.safetensors"
    with pytest.raises(CheckpointError, match=r"huge.safetensors: merging the adapter of blocks.0.self_attn.q gives "
                                              r"[\d,]+ non-finite values \(NaN or inf\) \(LoRA alpha 4, rank 2\)"):
        merge_lora_file(tiny_assets["BASE_MODEL_DIR"], lora, merged)
    assert not merged.exists() and list(tmp_path.iterdir()) == [lora]
    nan = write_lora_file(tiny_assets, tmp_path / "nan.safetensors", value=float("nan"))
    with pytest.raises(CheckpointError, match=r"nan.safetensors: 24 tensor\(s\) hold non-finite values \(NaN or "
                                              r"inf\): blocks.0.self_attn.k.lora_down.weight \(128\), .*; the "
                                              "file is damaged, or it was saved from a run that diverged"):
        merge_lora_file(tiny_assets["BASE_MODEL_DIR"], nan, merged)
    assert not merged.exists()


def copy_base(tiny_assets, folder: Path, change=None, dtype=None) -> Path:
    """The tiny base model folder copied, its first tensor changed by change(t), or every
    tensor stored in dtype."""
    shutil.copytree(tiny_assets["BASE_MODEL_DIR"], folder)
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    if change is not None:
        name = sorted(tensors)[0]
        tensors[name] = change(tensors[name].clone())
    if dtype is not None:
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
    save_file(tensors, weights)
    return folder


def with_element(tensor: torch.Tensor, index: int, value: float) -> torch.Tensor:
    flat = tensor.flatten()
    flat[index] = value
    return flat.view(tensor.shape)


def test_the_fingerprint_tells_bases_apart_from_a_few_bytes_each(tiny_assets, tmp_path):
    base = tiny_assets["BASE_MODEL_DIR"]
    same = copy_base(tiny_assets, tmp_path / "same")
    first = copy_base(tiny_assets, tmp_path / "first", change=lambda t: with_element(t, 0, 7.0))
    last = copy_base(tiny_assets, tmp_path / "last", change=lambda t: with_element(t, -1, 7.0))
    half = copy_base(tiny_assets, tmp_path / "bf16", dtype=torch.bfloat16)
    prints = [model_fingerprint(folder) for folder in (base, same, first, last, half)]
    assert prints[0] == prints[1] and len(set(prints)) == 4 and all(len(p) == 16 for p in prints)


def test_a_file_trained_over_another_base_is_refused_unless_overridden(tiny_assets, tmp_path):
    lora = write_lora_file(tiny_assets, tmp_path / "lora.safetensors")
    other = copy_base(tiny_assets, tmp_path / "other_base", change=lambda t: t + 0.01)  # another fine-tune, say
    merged = tmp_path / "merged.safetensors"
    with pytest.raises(CheckpointError, match=rf"{lora} was trained over a base model whose weights differ from "
                                              rf"those in {other} \(fingerprint [0-9a-f]{{16}} recorded in the file, "
                                              r"[0-9a-f]{16} here\).*set IGNORE_BASE_FINGERPRINT=true"):
        merge_lora_file(other, lora, merged)
    assert not merged.exists()
    with pytest.raises(CheckpointError, match="was trained over a base model whose weights differ"):
        load_model(other, lora, tiny_assets["KEYBOARD_KEYS"], "cpu", torch.float32)
    assert merge_lora_file(other, lora, merged, ignore_base_fingerprint=True).is_file()
    loaded = load_model(tiny_assets["BASE_MODEL_DIR"], lora, tiny_assets["KEYBOARD_KEYS"], "cpu", torch.float32)
    assert "LoRA rank 2" in loaded.description  # over its own base: taken
    for script in (fb, gp, ds, play_world):  # every script that applies a file over a base can override
        assert "IGNORE_BASE_FINGERPRINT" in script.SETTINGS.names


# ----------------------------------------------------------------------------- saved states, and settings before work

DISTILL_TINY = dict(SEQUENCE_LENGTH=21, CLIP_STRIDE=8, BATCH_SIZE=1, DF_STEPS=2, DF_LEARNING_RATE=1e-3,
                    EMA_DECAY=0.5, EMA_START_STEP=0, VAL_EVERY_STEPS=100, VAL_CLIPS=1, VAL_SAMPLES=1,
                    TEACHER_STEPS=2, VAL_PREVIEW=False, SAVE_EVERY_STEPS=1, LOG_EVERY_STEPS=1,
                    MIXED_PRECISION="fp32", GRADIENT_CHECKPOINTING=False, NUM_WORKERS=0, DEVICE="cpu", CHECKPOINT="")


@pytest.fixture(scope="module")
def bidirectional_student_run(tiny_assets, tmp_path_factory):
    """Stage A started from a bidirectional base-model folder as STUDENT_DIR (which used to
    be refused with advice the range check refused too): (settings, summary, header)."""
    root = tmp_path_factory.mktemp("distill_states")
    s = {**ds.SETTINGS.defaults, **{n: v for n, v in tiny_assets.items() if n in ds.SETTING_NAMES}, **DISTILL_TINY,
         "STUDENT_DIR": tiny_assets["BASE_MODEL_DIR"], "CACHE_DIR": str(root / "cache"),
         "CHECKPOINT_DIR": str(root / "run")}
    ds.check_settings(s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = ds.train(s)
    finally:
        torch.set_num_threads(threads)
    return s, summary


def test_a_bidirectional_student_dir_starts_the_student_with_the_settings_window(bidirectional_student_run):
    s, summary = bidirectional_student_run
    info = (Path(s["CHECKPOINT_DIR"]) / ds.INFO_FILE).read_text()
    assert f"student: {s['STUDENT_DIR']} (action modules in" in info
    assert "a bidirectional model, run block-causally with LOCAL_ATTN_SIZE=6 SINK_SIZE=0" in info
    assert "window 6 (sink 0)" in info and summary["steps"] == 2
    config = json.loads((Path(summary["student"]) / "config.json").read_text())
    assert (config["local_attn_size"], config["sink_size"]) == (6, 0)


def edited_state(s: dict, edit) -> Path:
    """The run's saved state with edit(state) applied, in a copy of its folder."""
    source = Path(s["CHECKPOINT_DIR"])
    folder = source.parent / f"edited_{time.monotonic_ns()}"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".lock"))
    state = torch.load(folder / STATE_FILE, weights_only=True)
    edit(state)
    torch.save(state, folder / STATE_FILE)
    return folder


def first_student_tensor(state) -> str:
    return sorted(state["student"])[0]


def set_nan(state):
    name = first_student_tensor(state)
    state["student"][name] = with_element(state["student"][name].clone(), 0, float("nan"))


@pytest.mark.parametrize("edit, message", [
    (lambda st: st.pop("student"), r"student: missing; expected the student's trained tensors: \d+ finite tensors"),
    (lambda st: st["student"].__setitem__(first_student_tensor(st), torch.zeros(3, 3)),
     r"student: \S+ has shape \[3, 3\], this run's model \[\d+(, \d+)*\]"),
    (lambda st: st.__setitem__("schedule", {"bogus": 1}), "schedule: fields a schedule does not have: bogus"),
    (lambda st: st["schedule"].__setitem__("total", "many"), r"schedule: total got str 'many' \(a whole number"),
    (lambda st: st.__setitem__("settings", [1, 2]), r"settings: got list \[1, 2\]; expected the run's settings, a dict"),
    (lambda st: st.__setitem__("history", "lots"), "history: got str 'lots'; expected a list of one dict"),
    (lambda st: st.__setitem__("global_step", "2"), "global_step: got str '2'; expected a whole number from 0"),
    (lambda st: st.__setitem__("global_step", -5), "global_step: got -5; expected a whole number from 0 to 1,000,000,000"),
    (lambda st: st.__setitem__("global_step", 10**12), "global_step: got 1,000,000,000,000; expected a whole number"),
    (lambda st: st.__setitem__("global_step", 1e12), "global_step: got float 1000000000000.0"),
    (lambda st: st.__setitem__("global_step", 50), "global_step: 50 steps done, beyond the 2 the saved schedule plans"),
    (set_nan, r"student: \S+ holds 1 non-finite values \(NaN or inf\)"),
    (lambda st: st.__setitem__("critic", {}), r"critic: got dict \{\}; expected None \(stage A has no critic\)"),
    (lambda st: st.__setitem__("ema_updates", 7), "ema_updates: 7, more than the 2 steps done"),
])
def test_an_edited_distillation_state_is_refused_naming_the_file_and_field(bidirectional_student_run, edit, message):
    s, _ = bidirectional_student_run
    folder = edited_state(s, edit)
    with pytest.raises(TrainingError, match=rf"cannot resume from {folder / STATE_FILE}: it is not a state this run "
                                            rf"can continue \(1 problem\(s\)\):\n  {message}"):
        ds.train(dict(s, CHECKPOINT_DIR=str(folder), RESUME=True, DF_STEPS=4))
    assert not (folder / "student_step3").exists() and torch.load(folder / STATE_FILE, weights_only=True)


@pytest.mark.slow
def test_an_edited_fine_tuning_state_is_refused_by_the_same_checks(tiny_assets, tmp_path):
    s = dict(tiny_assets, CHECKPOINT_DIR=str(tmp_path / "run"), NUM_EPOCHS=1, BATCH_SIZE=2, GRAD_ACCUM_STEPS=1,
             NUM_WORKERS=0, SAVE_EVERY_EPOCHS=1, PREVIEW_EVERY_EPOCHS=0, EMA_DECAY=0.9)
    fb.check_settings(s)
    fb.train(s)
    state_path = Path(s["CHECKPOINT_DIR"]) / STATE_FILE
    saved = torch.load(state_path, weights_only=True)
    cases = [
        (lambda st: st.pop("trainable"), r"trainable: missing; expected the trained tensors: \d+ finite tensors"),
        (lambda st: st["optimizer"]["state"][sorted(st["optimizer"]["state"])[0]].__setitem__(
            "exp_avg_sq", torch.full((2, 2), float("inf"))), r"optimizer: exp_avg_sq of \S+ has shape \[2, 2\]"),
        (lambda st: st.__setitem__("epoch_loss", [float("nan"), 3]), r"epoch_loss: entry 0 got float nan"),
        (lambda st: st.__setitem__("position", 10**6), r"position: got 1,000,000; expected a whole number from 0 to \d+"),
        (lambda st: st.__setitem__("ema", None), r"ema: got NoneType None; expected the EMA weights"),
    ]
    for edit, message in cases:
        state = torch.load(io_copy(saved), weights_only=True)
        edit(state)
        torch.save(state, state_path)
        with pytest.raises(TrainingError, match=rf"cannot resume from {state_path}: .*\n  {message}"):
            fb.train(dict(s, RESUME=True, NUM_EPOCHS=2))
    # (the states as the trainers write them resume: tests/test_training.py, test_distillation_runs.py)


def io_copy(obj) -> io.BytesIO:
    """A deep copy of a state through torch.save (what an edit of the file starts from)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_adamw_8bit_without_torchao_is_a_settings_error_before_any_work(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed: `import torchao` fails
    monkeypatch.setattr(fb, "train", never)
    monkeypatch.setattr(fb, "plan", never)
    monkeypatch.setattr(fb, "prepare_demo", never)
    for argv in (["--OPTIMIZER=adamw_8bit"], ["--OPTIMIZER=adamw_8bit", "--plan"], ["--demo", "--OPTIMIZER=adamw_8bit"]):
        assert fb.main(argv) == 1
        err = capsys.readouterr().err
        assert "OPTIMIZER=adamw_8bit is torchao's 8-bit AdamW, and torchao is not installed: pip install torchao" in err
    monkeypatch.undo()
    assert fb.parse_settings(["--OPTIMIZER=adamw_8bit"])[0]["OPTIMIZER"] == "adamw_8bit"  # installed here
