"""What `distill_streaming_model.py --demo` means: stages A, B and C on the tiny models and
the latent cache of the fine-tuning demo (demo_run/), each stage in its own run folder
under demo_run/distill/; stage C's student is what `play_world.py --demo` plays."""

import shutil
from pathlib import Path

from demo_world.setup import DISTILL_DEMO_DIR, PLAY_DEMO_MODEL_DIRS, TRAINING_DEMO_SETTINGS
from generation.finetuned import FINAL_FILE

# Settings shared with the training demo (its files, data, split and mouse scale).
_SHARED = ("BASE_MODEL_DIR", "VAE_PATH", "CLIP_PATH", "DATA_DIR", "CACHE_DIR", "CACHE_DTYPE", "VIDEO_HEIGHT",
           "VIDEO_WIDTH", "VAL_FRACTION", "MOUSE_SCALE")
# Settings of every stage: the fine-tuning demo's model, data and cache; clips of 33 frames
# (9 latent frames = 3 blocks, so the 6-frame window rolls within a clip); CPU, float32.
# Stage C streams those same clips (no new encoding): 6 latent frames, then 3 more, its
# windows of 6 frames with 3 overlapping.
DISTILL_DEMO_SETTINGS = dict(
    {name: TRAINING_DEMO_SETTINGS[name] for name in _SHARED},
    CHECKPOINT=f"{TRAINING_DEMO_SETTINGS['CHECKPOINT_DIR']}/{FINAL_FILE}",
    SEQUENCE_LENGTH=33, CLIP_STRIDE=24, BATCH_SIZE=2, GRAD_ACCUM_STEPS=1,
    EMA_DECAY=0.9, EMA_START_STEP=60, VAL_EVERY_STEPS=100, VAL_CLIPS=2, TEACHER_STEPS=50,
    GRADIENT_CHECKPOINTING=False, MIXED_PRECISION="fp32", NUM_WORKERS=0, DEVICE="cpu",
    SAVE_EVERY_STEPS=50, LOG_EVERY_STEPS=10,
    DF_STEPS=200, DF_LEARNING_RATE=1e-3, DMD_STEPS=200, GENERATOR_LR=2e-4, CRITIC_LR=1e-3,
    LONG_TUNE_STEPS=40, STREAM_CHUNK_LATENTS=6, STREAM_OVERLAP_LATENTS=3, STREAM_MAX_LATENTS=9,
)
DEMO_STAGES = ("causal_init", "dmd", "long_tune")
_STAGE_FOLDERS = {"causal_init": f"{DISTILL_DEMO_DIR}/causal_init", "dmd": str(Path(PLAY_DEMO_MODEL_DIRS[1]).parent),
                  "long_tune": str(Path(PLAY_DEMO_MODEL_DIRS[0]).parent)}


def demo_stage_settings(stage: str) -> dict:
    """The demo's per-stage settings: its run folder, and each stage's student from the
    stage before's."""
    stage_settings = {"STAGE": stage, "CHECKPOINT_DIR": _STAGE_FOLDERS[stage], "RESUME": False, "STUDENT_DIR": ""}
    index = DEMO_STAGES.index(stage)
    if index:
        stage_settings["STUDENT_DIR"] = f"{_STAGE_FOLDERS[DEMO_STAGES[index - 1]]}/student"
    return stage_settings


def clear_demo_runs() -> None:
    """Remove the demo's own stage folders, so that --demo can be run again (as the training
    demo clears demo_run/checkpoints); nothing outside them is touched."""
    for folder in _STAGE_FOLDERS.values():
        shutil.rmtree(folder, ignore_errors=True)


def missing_demo_inputs(settings: dict) -> list[str]:
    """The fine-tuning demo's outputs the distillation demo needs and cannot find."""
    needed = [settings["BASE_MODEL_DIR"], settings["CHECKPOINT"], settings["VAE_PATH"], settings["CLIP_PATH"],
              settings["DATA_DIR"]]
    return [str(p) for p in needed if not Path(p).exists()]
