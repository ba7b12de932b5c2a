"""Several ranks with torchrun, on CPU with gloo: the same weights as one rank with the same
effective batch, resume on another number of ranks, and a failure on one rank ends all."""

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import finetune_base_model as fb
from conftest import REPO_ROOT
from runs.folder import STATE_FILE

SCRIPT = str(REPO_ROOT / "finetune_base_model.py")
# 6 training clips and 2 validation clips: even, so two ranks share every micro-batch
COMMON = {"CLIP_STRIDE": 8, "VAL_FRACTION": 0.2, "NUM_EPOCHS": 2, "GRAD_ACCUM_STEPS": 1, "NUM_WORKERS": 0, "DEVICE": "cpu",
          "SAVE_EVERY_EPOCHS": 0, "LEARNING_RATE": 1e-3, "WARMUP_STEPS": 1}

WRAPPER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import finetune_base_model as fb
action, rank, at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import training.recipe
real, calls = training.recipe.flow_matching_step, [0]
def step(*a, **k):
    calls[0] += 1
    if int(os.environ.get("RANK", "0")) == rank and calls[0] == at:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"boom on rank {{rank}}")
    return real(*a, **k)
training.recipe.flow_matching_step = step
sys.exit(fb.main(sys.argv[4:]))
"""


def args_for(tiny_assets, out_dir, **overrides) -> list:
    s = dict(tiny_assets, **COMMON, CHECKPOINT_DIR=str(out_dir), **overrides)
    return [f"--{n}={','.join(v) if isinstance(v, tuple) else v}" for n, v in s.items() if n in fb.SETTING_NAMES]


def run(cmd, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def torchrun(script_args, nproc=2):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *script_args])


def final_weights(out_dir) -> dict:
    return load_file(out_dir / fb.FINAL_FILE)


def assert_close(a: dict, b: dict, tolerance: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst < tolerance, f"largest difference {worst}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy,engine,extra", [("action_only", "DDP", {}), ("full", "FSDP", {}),
                                                  ("lora", "FSDP", {"SHARD_MODEL": True, "LORA_RANK": 4})])
def test_two_ranks_batch_one_equal_one_rank_batch_two(tiny_assets, tmp_path, strategy, engine, extra):
    two = torchrun([SCRIPT, *args_for(tiny_assets, tmp_path / "two", TRAINING_STRATEGY=strategy, BATCH_SIZE=1,
                                      **extra)])
    assert two.returncode == 0, two.stderr[-3000:]
    info = (tmp_path / "two" / fb.INFO_FILE).read_text()
    assert f"{engine} over 2 ranks" in info and "effective batch 2 (BATCH_SIZE 1 x GRAD_ACCUM_STEPS 1 x 2" in info
    assert list((tmp_path / "two" / fb.PREVIEW_DIR).glob("epoch2.*"))  # the main rank wrote the preview
    one = run([sys.executable, SCRIPT, *args_for(tiny_assets, tmp_path / "one", TRAINING_STRATEGY=strategy,
                                                 BATCH_SIZE=2, **extra)])
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert_close(a, b, 1e-5)
    history = [torch.load(tmp_path / d / STATE_FILE, weights_only=True)["history"] for d in ("two", "one")]
    assert [h["val_loss"] for h in history[0]] == pytest.approx([h["val_loss"] for h in history[1]], rel=1e-5)
    assert [h["train_loss"] for h in history[0]] == pytest.approx([h["train_loss"] for h in history[1]], rel=1e-5)


@pytest.mark.slow
def test_two_rank_run_resumes_on_one_rank(tiny_assets, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO_ROOT)))
    options = dict(TRAINING_STRATEGY="action_only", SAVE_EVERY_STEPS=1, EMA_DECAY=0.5)
    killed = torchrun([str(wrapper), "kill", "0", "5", *args_for(tiny_assets, tmp_path / "run", BATCH_SIZE=1,
                                                                  **options)])
    assert killed.returncode != 0
    assert not (tmp_path / "run" / fb.FINAL_FILE).exists()
    resumed = run([sys.executable, SCRIPT, *args_for(tiny_assets, tmp_path / "run", BATCH_SIZE=2, RESUME=True,
                                                     **options)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "on 1 rank(s)" in resumed.stdout
    straight = run([sys.executable, SCRIPT, *args_for(tiny_assets, tmp_path / "straight", BATCH_SIZE=2, **options)])
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_close(final_weights(tmp_path / "run"), final_weights(tmp_path / "straight"), 1e-5)


@pytest.mark.slow
def test_exception_on_one_rank_ends_every_rank_with_its_message(tiny_assets, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO_ROOT)))
    started = time.time()
    failed = torchrun([str(wrapper), "raise", "1", "2", *args_for(tiny_assets, tmp_path / "run", BATCH_SIZE=1,
                                                                   TRAINING_STRATEGY="full")])
    assert failed.returncode != 0
    assert "error (rank 1 of 2): RuntimeError: boom on rank 1" in failed.stderr
    assert time.time() - started < 120
