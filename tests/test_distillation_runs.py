"""distill_streaming_model.py end to end on the tiny assets: stage A then stage B write a
student that play_world.py loads, so does stage C, a killed run (B or C) resumes to the
same bits, two gloo ranks (FSDP) train what one rank does, bad settings are named; and
the plan's counts."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import distill_streaming_model as ds
from conftest import REPO_ROOT
from planning import memory
from planning.distill import fewest_gpus, iteration_flops, per_gpu, plan_distillation, run_flops
from planning.measure import Measurement
from play.model import load_play_model
from runs.folder import METRICS_FILE, STATE_FILE
from wan.config import tiny_config
from wan.loading import STREAMING_WEIGHTS_NAME
from wan.vae import VAEConfig, WanVAE

SCRIPT = str(REPO_ROOT / "distill_streaming_model.py")
# 21 frames = 6 latent frames = 2 blocks of 3; tiny everything, one thread (see run())
TINY = dict(SEQUENCE_LENGTH=21, CLIP_STRIDE=8, BATCH_SIZE=1, DF_STEPS=4, DMD_STEPS=6, GENERATOR_EVERY=2,
            DF_LEARNING_RATE=1e-3, GENERATOR_LR=1e-3, CRITIC_LR=1e-3, EMA_DECAY=0.5, EMA_START_STEP=2,
            VAL_EVERY_STEPS=100, VAL_CLIPS=1, VAL_SAMPLES=2, TEACHER_STEPS=3, VAL_PREVIEW=False, SAVE_EVERY_STEPS=2,
            LOG_EVERY_STEPS=1, MIXED_PRECISION="fp32", GRADIENT_CHECKPOINTING=False, NUM_WORKERS=0, DEVICE="cpu")


def settings_for(tiny_assets, cache_dir, out_dir, **overrides) -> dict:
    s = {**ds.SETTINGS.defaults, **{n: v for n, v in tiny_assets.items() if n in ds.SETTING_NAMES}, **TINY,
         "CHECKPOINT": "", "CACHE_DIR": str(cache_dir), "CHECKPOINT_DIR": str(out_dir), **overrides}
    ds.check_settings(s)
    return s


def cli_args(s: dict) -> list:
    return [f"--{n}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for n, v in s.items()
            if n in ds.SETTING_NAMES]


def run(cmd):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stage_a(tiny_assets, tmp_path_factory):
    """A stage A run (in-process), shared by this module's tests: (settings, summary)."""
    root = tmp_path_factory.mktemp("distill")
    s = settings_for(tiny_assets, root / "cache", root / "causal_init", VAL_PREVIEW=True, VAL_EVERY_STEPS=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return s, ds.train(s)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("override,message", [
    ("--SEQUENCE_LENGTH=17", "5 latent frames; the student makes blocks of 3.*e.g. "),
    ("--STAGE=dmd", "STAGE=dmd starts from a streaming student: set STUDENT_DIR"),
    ("--STAGE=long", "STAGE='long': choose one of causal_init, dmd, long_tune"),
    ("--SINK_SIZE=4", "SINK_SIZE <= LOCAL_ATTN_SIZE - 3"),
    ("--DENOISING_STEPS=900,500", "DENOISING_STEPS=900,500: whole numbers from 1000 down"),
    ("--SCORE_MIN_TIMESTEP=990", "need 0 <= MIN < MAX <= 1000"),
    ("--DF_WEIGHTING=cosine", "DF_WEIGHTING='cosine'"),
    ("--GENERATOR_EVERY=0", "GENERATOR_EVERY=0: must be at least 1"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        ds.parse_settings([override])


@pytest.mark.parametrize("overrides,message", [
    (["--STREAM_MAX_LATENTS=40"], "STREAM_MAX_LATENTS=40: .*e.g. 9, 15, 21"),
    (["--STREAM_OVERLAP_LATENTS=2"], "both whole blocks of 3"),
    (["--LONG_TUNE_STEPS=100"], "LONG_TUNE_STEPS=100: whole sequences of 6 iterations.*e.g. 96 or 102"),
    (["--STREAM_CHUNK_LATENTS=0"], "STREAM_CHUNK_LATENTS=0: must be at least 1"),
])
def test_bad_stream_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        ds.parse_settings(["--STAGE=long_tune", "--STUDENT_DIR=student", *overrides])


def test_micro_batches_give_the_same_samples_to_any_number_of_ranks():
    one = ds.micro_batches(3, accum=1, batch=2, ranks=ds.Ranks())
    two = [ds.micro_batches(3, accum=1, batch=1, ranks=ds.Ranks(r, 2)) for r in range(2)]
    assert one == [[6, 7]] and [m[0] for m in two] == [[6], [7]]
    assert ds.micro_batches(1, accum=2, batch=1, ranks=ds.Ranks()) == [[2], [3]]


# ----------------------------------------------------------------------------- whole runs

@pytest.mark.slow
def test_stage_a_then_b_write_a_student_that_play_world_loads(stage_a, tmp_path):
    s, summary = stage_a
    out = Path(s["CHECKPOINT_DIR"])
    names = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    assert names == ["metrics.csv", "previews", "student", "tensorboard", "training_curves.png", "training_info.txt",
                     "training_state.pt"]
    assert [h["step"] for h in summary["history"]] == [0, 4]
    assert all(h["teacher_distance"] > 0 and h["fps"] > 0 for h in summary["history"])
    # two noises per clip: both sides' spreads, the teacher's made once for the run
    assert all(h["distribution_distance"] is not None and h["student_spread"] > 0 for h in summary["history"])
    assert len({h["teacher_spread"] for h in summary["history"]}) == 1 and summary["history"][0]["teacher_spread"] > 0
    assert list((out / "previews").glob("step4.*"))
    rows = (out / METRICS_FILE).read_text().splitlines()
    assert rows[0].split(",") == list(ds.METRICS_COLUMNS) and len(rows) == 1 + 4
    info = (out / ds.INFO_FILE).read_text()
    for field in ("stage causal_init", "teacher:", "window 6", "diffusion forcing", "step 4: teacher distance",
                  "distribution distance", "action score", "frames/s", "students: student", "status: finished",
                  f"(play the latest: python play_world.py --MODEL_DIR={out / 'student'})"):
        assert field in info, field
    reader = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    assert [e.step for e in reader.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in reader.Scalars("validation/teacher_distance")] == [0, 4]
    assert [e.step for e in reader.Images("preview/video")] == [0, 4]
    assert ds.what_next("causal_init", str(out), str(out / "student")) == [
        f"play it: python play_world.py --MODEL_DIR={out / 'student'}",
        "next stage (with your other settings as in this run): python distill_streaming_model.py --STAGE=dmd "
        f"--STUDENT_DIR={out / 'student'} --CHECKPOINT_DIR={out.parent / 'dmd'}"]

    b = dict(s, STAGE="dmd", STUDENT_DIR=str(out / "student"), CHECKPOINT_DIR=str(tmp_path / "dmd"), DMD_STEPS=4)
    torch.set_num_threads(1)
    summary_b = ds.train(b)
    metrics = [r.split(",") for r in (tmp_path / "dmd" / METRICS_FILE).read_text().splitlines()[1:]]
    # the student learns every second step (its loss is empty otherwise), the critic every step
    assert [r[1] != "" for r in metrics] == [False, True, False, True] and all(r[2] != "" for r in metrics)
    assert [r[7] != "" for r in metrics] == [False, True, False, True]
    assert summary_b["history"][0]["weights"] == "trained" and summary_b["history"][-1]["weights"] == "ema"

    student_dir = tmp_path / "dmd" / "student"
    loaded = load_play_model(student_dir, "", "universal", (), "cpu", torch.float32)
    assert loaded.distilled and loaded.keyboard_keys == ("W", "S", "A", "D")
    with safe_open(student_dir / STREAMING_WEIGHTS_NAME, "pt") as f:
        meta = f.metadata()
        assert all(name.startswith("model.") for name in f.keys())
    assert meta["stage"] == "dmd" and meta["weights"] == "ema" and meta["denoising_steps"] == "1000,666,333"
    state = torch.load(tmp_path / "dmd" / STATE_FILE, weights_only=True)
    saved = load_file(student_dir / STREAMING_WEIGHTS_NAME)
    assert all(torch.equal(saved["model." + n], t) for n, t in state["ema"].items())
    assert any(not torch.equal(saved["model." + n], t) for n, t in state["student"].items())
    start = load_file(out / "student" / STREAMING_WEIGHTS_NAME)
    assert any(not torch.equal(start[n], saved[n]) for n in saved)


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import distill_streaming_model as ds
at, count = int(sys.argv[1]), [0]
real = getattr(ds, {critic!r})
def judged(*a, **k):
    count[0] += 1
    if count[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
setattr(ds, {critic!r}, judged)
sys.exit(ds.main(sys.argv[2:]))
"""


# stage B's savers all at once (one GPU's): LoRA student and critic, 8-bit state offloaded to the host
# with the EMA, the frozen blocks on the host, checkpointed rollouts
SAVERS = dict(LORA_ROLES=("student", "critic"), LORA_RANK=4, LORA_ALPHA=4.0, OPTIMIZER="adamw_8bit",
              OFFLOAD_OPTIMIZER=True, OFFLOAD_FROZEN=True, GRADIENT_CHECKPOINTING=True)


@pytest.mark.slow
@pytest.mark.parametrize("savers", [{}, SAVERS], ids=["plain", "savers"])
def test_a_stage_b_run_killed_mid_step_resumes_to_the_same_bits(stage_a, tmp_path, savers):
    if savers:
        pytest.importorskip("torchao", reason="OPTIMIZER=adamw_8bit needs torchao (requirements.txt)")
    s, _ = stage_a
    common = dict(s, STAGE="dmd", STUDENT_DIR=str(Path(s["CHECKPOINT_DIR"]) / "student"), VAL_PREVIEW=False,
                  VAL_EVERY_STEPS=100, **savers)
    straight = run([sys.executable, SCRIPT, *cli_args(dict(common, CHECKPOINT_DIR=str(tmp_path / "straight")))])
    assert straight.returncode == 0, straight.stderr[-3000:]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO_ROOT), critic="critic_micro_batch"))
    killed = dict(common, CHECKPOINT_DIR=str(tmp_path / "killed"))
    died = run([sys.executable, str(killer), "5", *cli_args(killed)])  # in step 5, after the save at step 4
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert not (tmp_path / "killed" / "student").exists()
    assert torch.load(tmp_path / "killed" / STATE_FILE, weights_only=True)["global_step"] == 4
    resumed = run([sys.executable, SCRIPT, *cli_args(killed), "--RESUME=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    a = load_file(tmp_path / "straight" / "student" / STREAMING_WEIGHTS_NAME)
    b = load_file(tmp_path / "killed" / "student" / STREAMING_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rows = [(tmp_path / d / METRICS_FILE).read_text().splitlines() for d in ("straight", "killed")]
    assert [r.split(",")[:8] for r in rows[0]] == [r.split(",")[:8] for r in rows[1]]


# stage C on the tiny clips: streams of 9 latent frames (6, then 3 more), windows of 6 with 3 overlap;
# checkpointed (its rollouts replayed from a copy of the stream's cache), which resumes to the bit too
LONG = dict(STAGE="long_tune", STREAM_CHUNK_LATENTS=6, STREAM_OVERLAP_LATENTS=3, STREAM_MAX_LATENTS=9,
            LONG_TUNE_STEPS=6, SAVE_EVERY_STEPS=1, VAL_PREVIEW=False, VAL_EVERY_STEPS=100,
            GRADIENT_CHECKPOINTING=True)


@pytest.mark.slow
def test_a_long_tune_run_killed_mid_sequence_resumes_to_the_same_bits_and_plays(stage_a, tmp_path):
    s, _ = stage_a
    common = dict(s, **LONG, STUDENT_DIR=str(Path(s["CHECKPOINT_DIR"]) / "student"))
    straight = run([sys.executable, SCRIPT, *cli_args(dict(common, CHECKPOINT_DIR=str(tmp_path / "straight")))])
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "straight"
    metrics = [r.split(",") for r in (out / METRICS_FILE).read_text().splitlines()[1:]]
    assert [r[1] != "" for r in metrics] == [False, True] * 3 and all(r[2] != "" for r in metrics)
    info = (out / ds.INFO_FILE).read_text()
    for field in ("stage long_tune", "streams: 9 latent frames per clip, 6 in the first iteration then 3",
                  "clips of 33 frames (9 latent frames)", "step 6: teacher distance", "status: finished"):
        assert field in info, field
    loaded = load_play_model(out / "student", "", "universal", (), "cpu", torch.float32)
    assert loaded.distilled
    with safe_open(out / "student" / STREAMING_WEIGHTS_NAME, "pt") as f:
        assert f.metadata()["stage"] == "long_tune"

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO_ROOT), critic="critic_loss"))
    killed = dict(common, CHECKPOINT_DIR=str(tmp_path / "killed"))
    died = run([sys.executable, str(killer), "4", *cli_args(killed)])  # in step 4: sequence 2's second iteration
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    # the save due after step 3 waited for the sequence's end: the last one is step 2's
    assert torch.load(tmp_path / "killed" / STATE_FILE, weights_only=True)["global_step"] == 2
    resumed = run([sys.executable, SCRIPT, *cli_args(killed), "--RESUME=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(out / "student" / STREAMING_WEIGHTS_NAME)
    b = load_file(tmp_path / "killed" / "student" / STREAMING_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rows = [(tmp_path / d / METRICS_FILE).read_text().splitlines() for d in ("straight", "killed")]
    assert [r.split(",")[:8] for r in rows[0]] == [r.split(",")[:8] for r in rows[1]]
    start = load_file(Path(s["CHECKPOINT_DIR"]) / "student" / STREAMING_WEIGHTS_NAME)
    assert any(not torch.equal(start[n], a[n]) for n in a)


@pytest.mark.slow
def test_two_gloo_ranks_with_fsdp_train_what_one_rank_does(stage_a, tmp_path):
    s, _ = stage_a
    common = dict(s, STAGE="dmd", STUDENT_DIR=str(Path(s["CHECKPOINT_DIR"]) / "student"), VAL_PREVIEW=False,
                  VAL_EVERY_STEPS=100, DMD_STEPS=4, SAVE_EVERY_STEPS=0)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
               *cli_args(dict(common, BATCH_SIZE=1, CHECKPOINT_DIR=str(tmp_path / "two")))])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 ranks (FSDP)" in (tmp_path / "two" / ds.INFO_FILE).read_text()
    one = run([sys.executable, SCRIPT, *cli_args(dict(common, BATCH_SIZE=2, CHECKPOINT_DIR=str(tmp_path / "one")))])
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(tmp_path / "two" / "student" / STREAMING_WEIGHTS_NAME)
    b = load_file(tmp_path / "one" / "student" / STREAMING_WEIGHTS_NAME)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst < 1e-5, worst
    losses = [[r.split(",")[1:3] for r in (tmp_path / d / METRICS_FILE).read_text().splitlines()[1:]]
              for d in ("two", "one")]
    two_ranks, one_rank = ([float(v) if v else None for r in rows for v in r] for rows in losses)
    assert [v is None for v in two_ranks] == [v is None for v in one_rank]  # the same steps logged each loss
    assert [v for v in two_ranks if v is not None] == pytest.approx([v for v in one_rank if v is not None], rel=1e-4)


# ----------------------------------------------------------------------------- the plan

@pytest.fixture(scope="module")
def tiny_plan():
    """The plan of every stage on the tiny config, 3 GPUs asked for, the EMA on."""
    s, _ = ds.parse_settings(["--VIDEO_HEIGHT=32", "--VIDEO_WIDTH=64", "--SEQUENCE_LENGTH=21", "--GPUS=3",
                              "--DMD_STEPS=10", "--LONG_TUNE_STEPS=12"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return plan_distillation(s, config=tiny_config())
    finally:
        torch.set_num_threads(threads)


def test_the_plan_counts_three_models_the_ema_and_shards_what_fsdp_shards(tiny_plan):
    config = tiny_config()
    student = ds.CausalWanModel(config.with_window(6, 0))
    params = sum(p.numel() for p in student.parameters())
    a, b = tiny_plan.stages["causal_init"], tiny_plan.stages["dmd"]
    # by hand: float32 student (and critic) with two AdamW moments, the student's float32 EMA; the teacher bf16
    slack = 512 * 4 * len(list(student.parameters()))  # allocator rounding
    assert abs(a.breakdown[memory.WEIGHTS] - params * (4 + 2)) <= slack
    assert abs(a.breakdown[memory.OPTIMIZER_STATE] - params * (2 * 4 + 4)) <= slack
    assert abs(b.breakdown[memory.WEIGHTS] - params * (4 + 4 + 2)) <= slack
    assert abs(b.breakdown[memory.OPTIMIZER_STATE] - params * (2 * 2 * 4 + 4)) <= 2 * slack
    assert b.peak > a.peak and b.flops > a.flops > 0
    sharded = sum(b.breakdown.get(label, 0) for label in (memory.WEIGHTS, memory.OPTIMIZER_STATE, memory.GRADIENTS))
    assert per_gpu(b, 1) == b.peak and per_gpu(b, 4) == pytest.approx(b.peak - sharded * 3 / 4)
    # stage C: stage B's models plus the VAE (bf16 like the teacher) for the anchors
    c = tiny_plan.stages["long_tune"]
    with torch.device("meta"):
        vae = list(WanVAE(VAEConfig()).parameters())
    vae_bytes, vae_slack = sum(p.numel() for p in vae) * 2, 512 * len(vae)
    assert abs(c.breakdown[memory.WEIGHTS] - b.breakdown[memory.WEIGHTS] - vae_bytes) <= vae_slack
    assert c.breakdown[memory.OPTIMIZER_STATE] == b.breakdown[memory.OPTIMIZER_STATE] and c.flops > 0


def test_each_stage_of_the_plan_starts_with_its_peak_on_gpus_gpus(tiny_plan):
    text = tiny_plan.format()
    peaks = re.findall(r"^predicted peak GPU memory: ([0-9.]+) GiB$", text, flags=re.M)
    stages = list(tiny_plan.stages)
    assert peaks == [f"{per_gpu(tiny_plan.stages[stage], 3) / 2**30:.2f}" for stage in stages]
    for stage, section in zip(stages, text.split("predicted peak GPU memory")[1:]):
        assert "on each of 3 GPU(s)" in section and "3 GPUs" in section and "8 GPUs" in section
        assert all(card in section for card in ("H100 SXM", "A100 80GB", "L40S", "RTX 4090")), stage
    assert "The whole recipe (DF_STEPS=3000, DMD_STEPS=10, LONG_TUNE_STEPS=12)" in text
    assert "Which card" in text and "GPU-h" in text
    with pytest.raises(ValueError, match="GPUS=0: must be a whole number in \\[1, 64\\]"):
        ds.parse_settings(["--GPUS=0"])
    with pytest.raises(ValueError, match="GPUS=65"):
        ds.parse_settings(["--GPUS=65"])


def test_the_runs_cost_counts_generator_and_critic_only_iterations(tiny_plan):
    s = tiny_plan.settings
    b, c = tiny_plan.stages["dmd"], tiny_plan.stages["long_tune"]
    generator, critic = b.flops_by_part["generator"], b.flops_by_part["critic"]
    assert generator > critic > 0 and b.flops == generator + critic
    # DMD_STEPS=10, GENERATOR_EVERY=5: two generator iterations, eight critic-only ones
    assert run_flops("dmd", b, s) == pytest.approx(2 * (generator + critic) + 8 * critic)
    assert run_flops("dmd", b, dict(s, GRAD_ACCUM_STEPS=3)) == pytest.approx(3 * run_flops("dmd", b, s))
    # stage C, 12 steps = two sequences of 6: the 5th step of each is a generator iteration, the
    # first of each a stream's first iteration (9 new frames, no anchor)
    part = c.flops_by_part
    first, later = (part[f"{k}:rollout"] + part[f"{k}:critic"] for k in ("first", "later"))
    expected = 2 * (first + 4 * later + later + part["later:generator"])
    assert run_flops("long_tune", c, s) == pytest.approx(expected)
    assert iteration_flops("causal_init", tiny_plan.stages["causal_init"], s, 0) == tiny_plan.stages["causal_init"].flops


def test_the_fewest_gpus_that_fit_follow_the_sharded_share():
    gib = 2**30
    m = Measurement(peak=50 * gib, breakdown={memory.WEIGHTS: 40 * gib, memory.ACTIVATIONS: 10 * gib}, peak_op="")
    # 40 / n + 10 GiB per GPU, with the margin (x1.1 + 0.75): 1 GPU 55.75, 2 GPUs 33.75, 4 GPUs 22.75
    assert [fewest_gpus(m, card) for card in (80, 48, 24, 20)] == [1, 2, 4, 8]
    assert fewest_gpus(m, 12) is None


def test_plan_stages_plans_only_the_stages_named(monkeypatch):
    """PLAN_STAGES=dmd: stage B alone (no minutes spent on A and C), its cost not called the recipe's."""
    s, _ = ds.parse_settings(["--VIDEO_HEIGHT=32", "--VIDEO_WIDTH=64", "--SEQUENCE_LENGTH=21", "--DMD_STEPS=10",
                              "--PLAN_STAGES=dmd", "--OPTIMIZER=adamw_8bit"])
    planned = []
    monkeypatch.setattr(ds, "plan_distillation", lambda settings, stages: planned.append(stages) or
                        plan_distillation(settings, config=tiny_config(), stages=stages))
    text = ds.plan(s)
    assert planned == [("dmd",)] and text.count("predicted peak GPU memory") == 1 and "Stage B (dmd)" in text
    assert "Stage A" not in text and "The planned stages (PLAN_STAGES) (DMD_STEPS=10)" in text
    assert "The whole recipe" not in text
    for bad, message in (("dmd,bogus", "PLAN_STAGES=dmd,bogus: one or more of causal_init, dmd, long_tune"),
                         ("dmd,dmd,dmd,dmd", "PLAN_STAGES has 4 stages; at most 3")):
        with pytest.raises(ValueError, match=message):
            ds.parse_settings([f"--PLAN_STAGES={bad}"])


def test_a_plan_for_several_gpus_refuses_the_one_gpu_savers():
    s, _ = ds.parse_settings(["--GPUS=2", "--OFFLOAD_OPTIMIZER=true"])
    with pytest.raises(ValueError, match="GPUS=2 GPUs:\n  FSDP .* use OPTIMIZER=adamw without OFFLOAD_OPTIMIZER"):
        ds.plan(s)
