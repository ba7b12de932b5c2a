"""Every memory saver, in the combinations the guide's "which card" table recommends, resumes to
the bit: a run stopped in the middle of an optimizer step, after a save in the middle of an
epoch, continues to the same final weights and metrics as the run that was never stopped.

The stop is an exception raised inside a training forward (in this process, so that every
case fits the suite's time): what a resumed run can use is what the stopped one left on disk,
exactly as after a kill. tests/test_training.py kills a real process with SIGKILL.
bench/bench_savers.py --resume prints the same comparison (on any commit, before and after).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_base_model as fb
import training.recipe
from runs.folder import METRICS_FILE

# name -> (strategy, savers and the settings they need): every saver, in the guide's recipes
CASES = {
    "full, offload_optimizer, EMA on the host": ("full", {"OFFLOAD_OPTIMIZER": True, "EMA_DECAY": 0.9}),
    "full, adamw_8bit + in_backward (24 GB)": ("full", {"OPTIMIZER": "adamw_8bit", "OPTIMIZER_IN_BACKWARD": True}),
    "full, adamw_8bit + offload_optimizer": ("full", {"OPTIMIZER": "adamw_8bit", "OFFLOAD_OPTIMIZER": True}),
    "lora with dropout, offload_optimizer + offload_frozen (12 GB)": (
        "lora", {"OFFLOAD_OPTIMIZER": True, "OFFLOAD_FROZEN": True, "LORA_DROPOUT": 0.1}),
    "action_only, offload_optimizer + offload_frozen (12 GB)": ("action_only", {"OFFLOAD_OPTIMIZER": True,
                                                                               "OFFLOAD_FROZEN": True}),
    "last_layers, adamw_8bit + offload_frozen (12 GB)": ("last_layers", {"OPTIMIZER": "adamw_8bit",
                                                                        "OFFLOAD_FROZEN": True}),
}
STOP_IN_STEP = 3  # the save at step 2 is then inside the first epoch


class Stopped(Exception):
    """Stands for a kill: raised inside a training forward."""


def settings_for(assets: dict, folder, strategy: str, savers: dict) -> dict:
    """The tiny demo run of a case: 2 epochs, a save every 2 optimizer steps."""
    in_backward = savers.get("OPTIMIZER_IN_BACKWARD", False)
    s = dict(assets, CHECKPOINT_DIR=str(folder), TRAINING_STRATEGY=strategy, NUM_EPOCHS=2, BATCH_SIZE=2,
             GRAD_ACCUM_STEPS=1 if in_backward else 2, NUM_WORKERS=0, SAVE_EVERY_EPOCHS=0, SAVE_EVERY_STEPS=2,
             VAL_EVERY_EPOCHS=2, PREVIEW_EVERY_EPOCHS=0, LORA_RANK=4, LORA_ALPHA=4.0, LAST_LAYERS=1,
             GRADIENT_CHECKPOINTING=True, **savers)
    fb.check_settings(s)
    return s


def stopped_and_resumed(assets: dict, root: Path, strategy: str, savers: dict, on_resume: dict | None = None) -> dict:
    """Train a case straight through, and again stopped inside optimizer step STOP_IN_STEP (its
    last micro-batch) then resumed (with the settings on_resume changes). Returns both final
    files, both metrics.csv's rows and the steps per epoch."""
    straight = settings_for(assets, root / "straight", strategy, savers)
    steps = fb.train(straight)["steps"]
    stopped = settings_for(assets, root / "stopped", strategy, savers)
    real, calls = training.recipe.flow_matching_step, [0]

    def stopping(*args, **kwargs):
        calls[0] += 1
        if calls[0] == STOP_IN_STEP * stopped["GRAD_ACCUM_STEPS"]:
            raise Stopped
        return real(*args, **kwargs)

    training.recipe.flow_matching_step = stopping
    try:
        fb.train(stopped)
        raise AssertionError("the run was not stopped")
    except Stopped:
        pass
    finally:
        training.recipe.flow_matching_step = real
    left = (root / "stopped" / fb.FINAL_FILE).exists()
    fb.train(dict(stopped, RESUME=True, **(on_resume or {})))
    return {"straight": load_file(root / "straight" / fb.FINAL_FILE),
            "resumed": load_file(root / "stopped" / fb.FINAL_FILE),
            "straight rows": (root / "straight" / METRICS_FILE).read_text().splitlines(),
            "resumed rows": (root / "stopped" / METRICS_FILE).read_text().splitlines(),
            "steps per epoch": steps // 2, "final file left by the stopped run": left}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_stopped_run_with_savers_resumes_to_the_bit(case, tiny_assets, tmp_path):
    strategy, savers = CASES[case]
    if savers.get("OPTIMIZER") == "adamw_8bit":
        pytest.importorskip("torchao", reason="OPTIMIZER=adamw_8bit needs torchao (requirements.txt)")
    runs = stopped_and_resumed(tiny_assets, tmp_path, strategy, savers)
    assert runs["steps per epoch"] > STOP_IN_STEP and not runs["final file left by the stopped run"]
    assert largest_difference(runs["straight"], runs["resumed"]) == 0.0
    columns = slice(0, 5)  # step, epoch, loss, lr, grad_norm (not the seconds)
    assert [r.split(",")[columns] for r in runs["straight rows"]] == [r.split(",")[columns]
                                                                       for r in runs["resumed rows"]]


@pytest.mark.slow
def test_the_offloaded_optimizer_may_be_switched_off_on_resume(tiny_assets, tmp_path):
    """Its saved state is the same as the optimizer's on the GPU, so a run may resume with or
    without OFFLOAD_OPTIMIZER (the same float32 arithmetic on a CPU: to the bit)."""
    runs = stopped_and_resumed(tiny_assets, tmp_path, "full", {"OFFLOAD_OPTIMIZER": True}, {"OFFLOAD_OPTIMIZER": False})
    assert largest_difference(runs["straight"], runs["resumed"]) == 0.0


def test_the_reinitialised_keyboard_depends_on_the_seed_alone(tiny_assets):
    """A keyboard of another width is drawn from SEED's own generator: the same whatever used the
    global generator before (a first run encodes clips, a rerun reuses the cache), another seed
    gives another draw."""
    from wan.loading import load_base_model

    width = len(tiny_assets["KEYBOARD_KEYS"]) + 1
    torch.manual_seed(0)
    first, names = load_base_model(tiny_assets["BASE_MODEL_DIR"], keyboard_dim=width, seed=42)
    torch.rand(1000)  # what encoding clips would have drawn
    again, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"], keyboard_dim=width, seed=42)
    other, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"], keyboard_dim=width, seed=43)
    assert names
    first, again, other = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(first[n], again[n]) for n in names)
    assert not any(torch.equal(first[n], other[n]) for n in names)
