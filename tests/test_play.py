"""play/ and play_world.py: the player's input to per-block actions, the mode rules, the
headless stream into an MP4, the streaming writer, the page's HTTP endpoints, model loading,
and the script end to end on the tiny demo assets."""

import http.client
import io
import json
import math
import struct
import urllib.error
import urllib.request
import weakref
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import play_world
from generation.errors import GenerationError
from play.controls import STEER_TURN, controls_for, key_meanings, page_keys
from generation.action_scripts import read_action_script
from play.headless import blocks_covering, blocks_within, script_blocks, sequence_blocks, stream_frames
from play.model import load_play_model
from play.player import LEAD_MARGIN, Player
import play.server as play_server
from play.server import frame_message
from play.session import InputError, InputSession
from play_helpers import KEYS, served_player, tiny_stream, wait_for
from model_helpers import tiny_causal_model, tiny_model
from video.overlay import compose_frames
from video.writer import write_video_stream
from wan.causal import CausalWanModel, causal_from
from wan.config import tiny_config
from wan.loading import load_streaming_model, save_base_model, save_streaming_model
from wan.model import random_inputs


def _session(mode="universal", keys=KEYS, mouse=True, **kwargs):
    return InputSession(controls_for(mode, keys, mouse), kwargs.pop("sensitivity", 0.01), kwargs.pop("limit", 0.25),
                        **kwargs)


def _frames_in(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


# ----------------------------------------------------------------------------- the session

def test_held_and_tapped_keys_and_the_mouse_become_the_blocks_action():
    session = _session(key_aliases={"UP": "W"})
    session.apply({"down": ["up"]})             # an alias of W, any case
    session.apply({"down": ["A"], "up": ["A"]})  # a tap between two blocks still counts once
    session.apply({"move": [100, -40]})
    session.apply({"move": [20, -20]})          # summed: 120 px right, 60 px up
    action = session.take_action(frames=12)
    assert action.keyboard.tolist() == [1, 0, 1, 0] and action.keys == ("W", "A")
    # spread over the block's 12 frames at 0.01 per pixel; up the screen is pitch > 0
    assert action.mouse.tolist() == pytest.approx([60 * 0.01 / 12, 120 * 0.01 / 12])
    again = session.take_action(frames=12)
    assert again.keyboard.tolist() == [1, 0, 0, 0] and again.mouse.tolist() == [0, 0]
    session.apply({"move": [-1e4, 0], "up": ["W"]})
    last = session.take_action(frames=9)
    assert last.keyboard.tolist() == [0, 0, 0, 0] and last.mouse.tolist() == [0, -0.25]  # MOUSE_LIMIT


def test_the_session_fills_every_row_of_each_block():
    generator = tiny_stream()
    session = _session()
    session.press("W")
    session.move(24, 0)
    rows = []
    for change in (lambda: None, lambda: (session.release("W"), session.press("D"))):
        change()
        action = session.take_action(generator.rows_for_next_block)
        rows.append(generator.rows_for_next_block)
        generator.step(action.keyboard[None], action.mouse[None])
    keyboard, mouse = generator.history["keyboard"][0], generator.history["mouse"][0]
    # STREAMING_SPEC 6.5: block 0's action on raw rows 0..8, block 1's on rows 9..20
    assert rows == [9, 12]
    assert keyboard[:9].tolist() == [[1, 0, 0, 0]] * 9 and keyboard[9:21].tolist() == [[0, 0, 0, 1]] * 12
    assert torch.allclose(mouse[:9], torch.tensor([0, 24 * 0.01 / 9]).expand(9, 2))
    assert mouse[9:21].abs().sum() == 0


def test_the_modes_own_rules():
    templerun = _session("templerun", ("Q", "W", "S", "Z", "C", "A", "D"), mouse=False)
    idle = templerun.take_action(12)
    assert idle.keys == ("Q",) and idle.mouse is None  # no-move while nothing else is held
    templerun.press("W")
    assert templerun.take_action(12).keys == ("W",)

    gta = _session("gta_drive", ("W", "S"))
    assert gta.controls.game_keys == ("W", "S", "A", "D")
    gta.apply({"down": ["W", "D"], "move": [0, -120]})
    action = gta.take_action(12)
    assert action.keyboard.tolist() == [1, 0]
    assert action.mouse.tolist() == pytest.approx([0, STEER_TURN])  # yaw only; D steers right

    own = controls_for("universal", ("W", "SPACE"), True)  # a fine-tuned model's own keys: no mode rules
    assert own.idle_key is None and own.steer_keys == () and own.pitch


@pytest.mark.parametrize("message, problem", [
    ({"down": ["W"], "move": [1]}, "move must be"),
    ({"down": ["W"], "move": [float("nan"), 0]}, "move must be"),
    ({"down": "W"}, "down must be a list"),
    ({"down": ["W-1"]}, "down must be a list"),
    ({"down": ["W"], "jump": True}, "unknown input field"),
    ({"down": ["W"], "release_all": "yes"}, "release_all must be"),
    ({"down": ["W"], "seq": -1}, "seq must be"),
    ({"down": ["W"], "seq": 2**53}, "seq must be"),
    ({"down": ["W"], "seq": "7"}, "seq must be"),
    ({"down": ["W"], "seq": True}, "seq must be"),
    ({"down": ["W"], "seq": 1.5}, "seq must be"),
    (["W"], "a JSON object"),
])
def test_a_bad_message_is_refused_whole(message, problem):
    session = _session()
    with pytest.raises(InputError, match=problem):
        session.apply(message)
    assert session.held() == []


def test_a_blocks_action_carries_the_highest_message_number_it_read():
    session = _session()
    assert session.take_action(12).input_seq == -1  # no numbered message yet
    session.apply({"down": ["W"], "seq": 1_700_000_000_005})
    session.apply({"move": [3, 0], "seq": 1_700_000_000_004})  # answered out of order: the highest counts
    action = session.take_action(12)
    assert action.input_seq == 1_700_000_000_005 and action.describe()["seq"] == 1_700_000_000_005
    assert session.take_action(12).input_seq == 1_700_000_000_005  # later blocks carry it on
    session.apply({"up": ["W"]})  # a message without a number leaves it
    assert session.take_action(12).input_seq == 1_700_000_000_005


def test_each_key_says_what_it_does_and_the_page_keys_avoid_the_models():
    universal = controls_for("universal", KEYS, True)
    assert key_meanings("universal", universal) == {"W": "forward", "S": "back", "A": "strafe left",
                                                    "D": "strafe right"}
    gta = controls_for("gta_drive", ("W", "S"), True)
    assert key_meanings("gta_drive", gta)["D"] == "steer right"  # a steering key, not a column
    templerun = controls_for("templerun", ("Q", "W", "S", "Z", "C", "A", "D"), False)
    assert list(key_meanings("templerun", templerun).values()) == [
        "no move", "jump", "slide", "turn left", "turn right", "left side", "right side"]
    own = controls_for("universal", ("W", "SPACE", "K"), True)  # a fine-tuned model's own columns
    assert key_meanings("universal", own) == {"W": "forward", "SPACE": "jump"}  # K: no usual meaning
    assert page_keys(universal) == {"pause": "P", "restart": "R"}
    assert page_keys(controls_for("universal", ("W", "P", "R", "BACKSPACE"), True)) == {"pause": "PAUSE",
                                                                                      "restart": "F9"}
    crowded = controls_for("universal", ("P", "PAUSE", "F8"), True)  # every candidate taken: the button only
    assert page_keys(crowded) == {"pause": None, "restart": "R"}
    assert "R restarts" in play_world.controls_help(crowded) and "pauses" not in play_world.controls_help(crowded)


def test_frames_are_paced_at_the_streams_rate_and_blocks_started_just_in_time():
    session = _session()
    player = Player(tiny_stream(), session, KEYS)  # not started: its rules alone
    assert player.block_frames == 12 and player.fps == 25
    assert player._frame_interval(waiting=5) == 1 / 25 and player._lead_frames() == 12  # no block made yet
    player.last_block = (12, 0.12)  # 100 frames/s: faster than shown
    assert player._frame_interval(waiting=5) == 1 / 25
    assert player._lead_frames() == math.ceil(0.12 * 25 * LEAD_MARGIN) + 1 == 5  # 160 ms of frames left
    player.last_block = (12, 1.2)  # 10 frames/s: a block's frames spread over the time it took
    assert player._frame_interval(waiting=5) == pytest.approx(0.1)
    assert player._frame_interval(waiting=12) == 1 / 25  # a backlog of a block goes at full speed
    assert player._lead_frames() == 12  # the next block starts as soon as this one is out


def test_mouse_settings_must_be_positive():
    with pytest.raises(ValueError, match="mouse_sensitivity"):
        _session(sensitivity=0.0)
    with pytest.raises(ValueError, match="mouse_limit"):
        _session(limit=math.inf)


# ----------------------------------------------------------------------------- headless

def test_block_counts():
    assert [blocks_covering(rows, 3) for rows in (1, 9, 10, 21, 22)] == [1, 1, 2, 2, 3]
    assert [blocks_within(rows, 3) for rows in (8, 9, 20, 21, 33)] == [0, 1, 1, 2, 3]


def test_headless_blocks_stream_into_an_mp4_with_the_right_frame_count(tmp_path):
    generator = tiny_stream()
    blocks = 3
    rows = 1 + 4 * (3 * blocks - 1)
    keyboard = torch.zeros(rows, 4)
    keyboard[:, 0] = 1
    mouse = torch.zeros(rows, 2)
    mouse[9:, 1] = 0.1
    per_block = []
    frames = stream_frames(generator, sequence_blocks(keyboard, mouse, blocks, 3), KEYS, blocks,
                           on_block=lambda index, seconds, count: per_block.append(count))
    path, count = write_video_stream(tmp_path / "play.mp4", frames)
    assert per_block == [9, 12, 12]  # 1 + 4(P - 1) for the first block, 4P after
    assert count == rows == 33 and _frames_in(path) == 33
    assert generator.block_index == blocks
    with pytest.raises(ValueError, match="3 blocks take 33 action rows, got 32"):
        next(stream_frames(generator, sequence_blocks(keyboard[:32], mouse[:32], blocks, 3), KEYS, blocks))


def test_a_script_streams_block_by_block_the_rows_it_expands_to():
    script = read_action_script("W*10 D+mouse(0,0.1)*4 idle*3", KEYS)
    keyboard, mouse = script.tensors()
    assert script.rows == 17 and script.uses_mouse
    blocks = list(script_blocks(script, 3, 3))
    assert [len(k) for k, _ in blocks] == [9, 12, 12]
    streamed_keyboard, streamed_mouse = (torch.cat([b[i] for b in blocks]) for i in (0, 1))
    assert torch.equal(streamed_keyboard[:17], keyboard) and torch.equal(streamed_mouse[:17], mouse)
    assert torch.equal(streamed_keyboard[17:], keyboard[-1:].expand(16, -1))  # the last row held
    assert all(m is None for _, m in script_blocks(script, 2, 3, mouse=False))


def test_the_stream_writer_never_holds_all_frames_and_leaves_nothing_on_failure(tmp_path):
    alive, most_alive = [], 0

    def frames(count, fail_at=None):
        nonlocal most_alive
        for i in range(count):
            if i == fail_at:
                raise RuntimeError("the stream broke")
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))
            frame = np.full((16, 32, 3), i * 4 % 256, np.uint8)
            alive.append(weakref.ref(frame))
            yield frame

    path, count = write_video_stream(tmp_path / "long.mp4", frames(60))
    assert count == 60 and _frames_in(path) == 60
    assert most_alive <= 2  # each frame is let go once encoded (numpy frees it then: no cycles)

    with pytest.raises(RuntimeError, match="the stream broke"):
        write_video_stream(tmp_path / "broken.mp4", frames(30, fail_at=20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]  # no partial file, no temp file
    with pytest.raises(ValueError, match="even H and W"):
        write_video_stream(tmp_path / "odd.mp4", iter([np.zeros((15, 32, 3), np.uint8)]))
    with pytest.raises(ValueError, match="must be an .mp4"):
        write_video_stream(tmp_path / "x.gif", frames(2))


def test_a_piece_of_a_video_is_numbered_as_in_the_whole():
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(6, 32, 176, 3, generator=g) * 255).to(torch.uint8).numpy()  # wide enough for the number
    keyboard, mouse = (torch.rand(6, 4, generator=g) > 0.5).float(), torch.rand(6, 2, generator=g) * 0.2 - 0.1
    whole = compose_frames({"generated": video}, keyboard, mouse, KEYS)
    piece = compose_frames({"generated": video[3:]}, keyboard[3:], mouse[3:], KEYS, numbering=(3, 6))
    assert np.array_equal(piece, whole[3:])
    assert not np.array_equal(compose_frames({"generated": video[3:]}, keyboard[3:], mouse[3:], KEYS), whole[3:])
    live = compose_frames({"": video[3:]}, keyboard[3:], mouse[3:], KEYS, numbering=(3, None))
    assert np.array_equal(live[:, :32], video[3:])  # no label over the picture
    assert not np.array_equal(live[:, 32:], piece[:, 32:])  # "3", not "3/5"


def test_causal_from_shares_the_weights_and_sets_the_window(tmp_path):
    base = tiny_model().eval().requires_grad_(False)
    causal = causal_from(base, local_attn_size=4, sink_size=1)
    assert isinstance(causal, CausalWanModel) and not causal.training
    assert (causal.config.local_attn_size, causal.config.sink_size) == (4, 1)
    assert base.config.local_attn_size == -1  # the bidirectional model itself is untouched
    for (name, ours), (_, theirs) in zip(causal.named_parameters(), base.named_parameters()):
        assert ours.data_ptr() == theirs.data_ptr() and not ours.requires_grad, name
    folder = save_base_model(base, tmp_path / "base")
    loaded = load_streaming_model(folder, config=base.config.with_window(4, 1))
    inputs = random_inputs(causal.config, 1, 6, 2, 4, seed=1)
    inputs["t"] = inputs["t"][:, None].expand(-1, 6)
    with torch.no_grad():
        assert torch.allclose(causal(**inputs), loaded(**inputs), atol=1e-5)


# ----------------------------------------------------------------------------- the page's endpoints

def _get(url, timeout=60):
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.status, dict(reply.headers), reply.read()


def _post(url, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _status(server):
    return json.loads(_get(server.url + "status")[2])


def test_the_http_endpoints(tmp_path):
    with served_player() as server:
        url = server.url
        status, headers, page = _get(url)
        assert status == 200 and headers["Content-Type"].startswith("text/html") and b"playState" in page

        assert _post(url + "input", {"down": ["W"]}) == (200, {"ok": True})
        s = _status(server)
        assert s["held"] == ["W"] and s["keys"] == list(KEYS) and s["capture"] == list(KEYS) and s["mouse"]
        assert s["frames_made"] == 0 and not s["watched"]  # no block before a page asks for frames
        status, headers, jpeg = _get(url + "frame?after=-1")
        assert status == 200 and headers["Content-Type"] == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
        index = int(headers["X-Frame-Index"])
        status, headers, _ = _get(url + f"frame?after={index}")
        assert status == 200 and int(headers["X-Frame-Index"]) > index
        # the next block takes W: the model's action input says so
        s = wait_for(lambda: (lambda s: s if s["last_action"] and "W" in s["last_action"]["keys"] else None)(
            _status(server)), "a block made with W held")
        assert s["model_fps"] > 0 and s["frames_made"] >= 9 and s["watched"]

        assert _post(url + "input", {"down": "W"})[0] == 400
        assert _post(url + "input", b"{not json")[0] == 400
        assert _post(url + "input", {"down": ["W"]}, content_type="text/plain")[0] == 415
        assert _post(url + "input", b"x" * 70000)[0] == 413
        assert _post(url + "pause", {"paused": "yes"})[0] == 400
        assert _post(url + "nothing", {})[0] == 404
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(url + "nothing")
        with pytest.raises(urllib.error.HTTPError, match="400"):
            _get(url + "frame?after=x")

        assert _post(url + "pause", {"paused": True}) == (200, {"ok": True})
        assert _status(server)["paused"] is True
        assert _post(url + "restart", {}) == (200, {"ok": True})
        _post(url + "pause", {"paused": False})
        wait_for(lambda: _status(server)["stream"] == 1, "the restarted stream")
        assert _status(server)["error"] is None


def _read_message(reply) -> tuple[dict, bytes]:
    """One message of /frames: its header and JPEG."""
    header = json.loads(reply.read(struct.unpack(">I", reply.read(4))[0]))
    return header, reply.read(struct.unpack(">I", reply.read(4))[0])


def test_frames_stream_down_one_response_clean_and_stamped_with_the_input_they_answer():
    assert frame_message({"index": 3}, b"\xff\xd8") == b"\x00\x00\x00\x0c" + b'{"index": 3}' + b"\x00\x00\x00\x02\xff\xd8"
    with served_player() as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        connection.request("GET", "/frames?after=-1")
        reply = connection.getresponse()
        assert reply.status == 200 and reply.getheader("Content-Type") == "application/octet-stream"
        header, jpeg = _read_message(reply)
        assert header["index"] == 0 and header["action"] == {"keys": [], "mouse": [0.0, 0.0], "seq": -1}
        assert Image.open(io.BytesIO(jpeg)).size == (32, 16)  # the model's frame, no action strip under it
        assert _status(server)["streams"] == 1
        assert _post(server.url + "input", {"down": ["W"], "seq": 41}) == (200, {"ok": True})
        indexes = [header["index"]]
        while header["action"]["seq"] != 41:  # the first frame made from the press
            header, jpeg = _read_message(reply)
            indexes.append(header["index"])
        assert header["action"]["keys"] == ["W"] and indexes == sorted(set(indexes))  # in order (the latest: none late)
        status, headers, _ = _get(server.url + f"frame?after={header['index'] - 1}")  # long polling says it too
        assert status == 200 and int(headers["X-Input-Seq"]) == 41
        reply.close()  # the page goes: its response ends at the next frame it cannot send
        connection.close()
        wait_for(lambda: server.streams_open == 0, "the stream to end with its connection")


def test_the_pages_receiving_frames_at_once_are_bounded(monkeypatch):
    monkeypatch.setattr(play_server, "MAX_STREAMS", 2)
    with served_player() as server:
        port = server.server_address[1]
        watching = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(3)]
        replies = []
        for connection in watching:
            connection.request("GET", "/frames?after=-1")
            replies.append(connection.getresponse())
        assert [reply.status for reply in replies] == [200, 200, 503]
        assert "2 pages are watching already" in json.loads(replies[2].read())["error"]
        _read_message(replies[0])
        for reply, connection in zip(replies, watching):
            reply.close()
            connection.close()
        wait_for(lambda: server.streams_open == 0, "the streams to end")


def test_a_keyboard_only_student_plays_with_its_idle_key():
    keys = ("Q", "W", "S", "Z", "C", "A", "D")
    with served_player(tiny_stream(enable_mouse=False, keyboard_dim=7), keys=keys, mode="templerun") as server:
        assert _get(server.url + "frame?after=-1")[0] == 200
        s = _status(server)
        assert s["last_action"] == {"keys": ["Q"], "mouse": None, "seq": -1} and not s["mouse"]
        assert server.player.generator.history["mouse"] is None


# ----------------------------------------------------------------------------- the model

def test_a_student_folder_loads_with_its_recorded_keys_and_a_base_folder_is_not_distilled(tmp_path):
    student = tiny_causal_model(local_attn_size=6, keyboard_dim=2)
    save_streaming_model(student, tmp_path / "student", metadata={"keyboard_keys": "W,SPACE"})
    loaded = load_play_model(tmp_path / "student", "", "universal", (), "cpu", torch.float32)
    assert loaded.distilled and loaded.keyboard_keys == ("W", "SPACE")
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    for name, tensor in student.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name

    with pytest.raises(GenerationError, match="KEYBOARD_KEYS has 4"):
        load_play_model(tmp_path / "student", "", "universal", KEYS, "cpu", torch.float32)
    unnamed = tiny_causal_model(local_attn_size=6, keyboard_dim=2)
    save_streaming_model(unnamed, tmp_path / "unnamed")
    with pytest.raises(GenerationError, match="2 columns but MODE=universal has 4.*to gta_drive"):
        load_play_model(tmp_path / "unnamed", "", "universal", (), "cpu", torch.float32)
    assert load_play_model(tmp_path / "unnamed", "", "gta_drive", (), "cpu", torch.float32).keyboard_keys == ("W", "S")

    base = tiny_model()
    save_base_model(base, tmp_path / "base")
    loaded = load_play_model(tmp_path / "base", "", "gta_drive", (), "cpu", torch.float32)
    assert not loaded.distilled and loaded.keyboard_keys == KEYS  # the base model's columns
    assert loaded.model.config.local_attn_size == 4  # gta_drive's window
    assert "not distilled" in loaded.description
    with pytest.raises(GenerationError, match="holds a streaming model; leave CHECKPOINT empty"):
        load_play_model(tmp_path / "student", "some.safetensors", "universal", (), "cpu", torch.float32)


def test_a_folder_without_a_config_takes_modes(tmp_path, monkeypatch):
    import play.model

    config = tiny_config(local_attn_size=6, action_blocks=(0,))
    monkeypatch.setattr(play.model, "distilled_config", lambda mode: config)
    student = tiny_causal_model(local_attn_size=6)
    save_streaming_model(student, tmp_path / "official")
    (tmp_path / "official" / "config.json").unlink()
    loaded = load_play_model(tmp_path / "official", "", "universal", (), "cpu", torch.float32)
    assert loaded.distilled and "MODE=universal's config" in loaded.description
    with safe_open(tmp_path / "official" / "streaming_model.safetensors", "pt") as f:
        assert all(name.startswith("model.") for name in f.keys())  # read in the official layout


# ----------------------------------------------------------------------------- the script

def _script_paths(tiny_assets) -> list[str]:
    return [f"--MODEL_DIR={tiny_assets['BASE_MODEL_DIR']}", f"--VAE_PATH={tiny_assets['VAE_PATH']}",
            f"--CLIP_PATH={tiny_assets['CLIP_PATH']}", f"--RECORDING={tiny_assets['DATA_DIR']}",
            f"--VIDEO_HEIGHT={tiny_assets['VIDEO_HEIGHT']}", f"--VIDEO_WIDTH={tiny_assets['VIDEO_WIDTH']}",
            "--DEVICE=cpu"]


def test_headless_script_plays_a_recordings_own_actions_beside_its_frames(tiny_assets, tmp_path, capsys):
    output = tmp_path / "out" / "play.mp4"
    code = play_world.main(["--headless", *_script_paths(tiny_assets), "--START_FRAME=5", "--NUM_BLOCKS=2",
                            f"--OUTPUT={output}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning:" in err and "not a distilled streaming student" in err
    assert "frames 5-25 and their recorded actions" in out and "block 2/2: 12 frames" in out
    assert _frames_in(output) == 21
    with av.open(str(output)) as container:
        frame = next(container.decode(video=0))
    assert frame.width == 2 * tiny_assets["VIDEO_WIDTH"]  # generated | ground truth


def test_script_errors_name_the_setting(tiny_assets, tmp_path, monkeypatch, capsys):
    paths = _script_paths(tiny_assets)
    cases = [
        (["--headless", "--START_IMAGE=nothing.png", "--ACTIONS=W*9"], "START_IMAGE=nothing.png: no such file"),
        (["--headless", "--ACTIONS=W*9 jump*3"], "'jump' is not a key"),
        (["--headless", "--START_FRAME=70", "--NUM_BLOCKS=2"], "START_FRAME=70 needs frames 70-90"),
        (["--MODE=racing"], "MODE='racing'"),
        (["--headless", "--OUTPUT=x.gif"], "must end in .mp4"),
        (["--DENOISING_STEPS=1000,abc"], "DENOISING_STEPS=1000,abc"),
    ]
    for arguments, message in cases:
        assert play_world.main([*paths, *arguments]) == 1
        assert message in capsys.readouterr().err, arguments
    monkeypatch.chdir(tmp_path)  # no demo outputs here
    assert play_world.main(["--demo"]) == 1
    assert "python finetune_base_model.py --demo" in capsys.readouterr().err


def test_scripted_actions_fill_whole_blocks(tiny_assets, tmp_path, capsys):
    image = Path(tiny_assets["DATA_DIR"]) / "frame_0001.png"
    output = tmp_path / "scripted.mp4"
    code = play_world.main(["--headless", *_script_paths(tiny_assets), f"--START_IMAGE={image}",
                            "--ACTIONS=W*10 D+mouse(0,0.1)*4", f"--OUTPUT={output}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "ACTIONS gives 14 rows, one per frame; the model makes whole blocks (the first 9 frames, each later one " \
           "12), so 2 blocks show 21 frames (the last row held for 7 more)" in out
    assert _frames_in(output) == 21
