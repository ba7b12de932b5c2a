"""What --demo means: the demo run's folder, its settings, and the set-up that writes the
demo recording and the tiny models in the official file formats: a random base model and
CLIP tower, and the VAE trained on the demo world (demo_world/vae_training.py).

The training demo and the preview demo share these, so `generate_preview.py --demo`
finds what `finetune_base_model.py --demo` wrote.
"""

import shutil
from pathlib import Path

import torch

from demo_world.recording import DEMO_RUNS, is_current_demo_recording, write_demo_recording
from demo_world.vae_training import DEMO_VAE_FILE, train_demo_vae
from generation.finetuned import FINAL_FILE
from recordings.errors import DataError
from recordings.input_csv import CSV_NAME
from wan.clip import CLIPVisionConfig, CLIPVisionTower, save_clip
from wan.config import tiny_config
from wan.files import write_atomic
from wan.loading import CONFIG_NAME, save_base_model
from wan.model import WanModel
from wan.vae import save_vae

DEMO_DIR = "demo_run"
# The training demo: the real pipeline on a generated recording with tiny random weights, on CPU.
TRAINING_DEMO_SETTINGS = dict(
    BASE_MODEL_DIR=f"{DEMO_DIR}/models/base_model", VAE_PATH=f"{DEMO_DIR}/models/tiny_vae.pth",
    CLIP_PATH=f"{DEMO_DIR}/models/tiny_clip.pth", DATA_DIR=f"{DEMO_DIR}/data",
    CACHE_DIR=f"{DEMO_DIR}/latent_cache", CHECKPOINT_DIR=f"{DEMO_DIR}/checkpoints", CACHE_DTYPE="fp32",
    VIDEO_HEIGHT=64, VIDEO_WIDTH=112, SEQUENCE_LENGTH=17, CLIP_STRIDE=8, VAL_FRACTION=0.15,
    # Turns reach the model at 0.3 to 0.9 per frame, not the base model's 0.1 (MOUSE_SCALE 0.05):
    # the demo's base model is random, and Adam moves each weight by about the learning rate per
    # step, so a mouse layer fed 0.1 needs its weights to travel 6 times as far as one fed the
    # demo's typical 0.6 before the turns matter as much. After 500 steps of batch 64 on the
    # benchmark's recording (600-step demo VAE) the action gain was 1.021 at 0.05, 1.040 at 0.3 (1.046 at
    # 1.5, beyond the data check's range); scaling up the mouse layer's initial weights
    # instead gave 1.020. A pretrained base model reads 0.1 already.
    MOUSE_SCALE=0.3,
    # Batches of 32: the keys are a small part of each clip's loss, and the gradients of small
    # batches bury them (bench/bench_learn_controls.py: batch 2 learns them 5x slower per
    # minute). Validation every 20 epochs: an epoch of 3 steps costs less than validating it.
    TRAINING_STRATEGY="full",
    BATCH_SIZE=32, GRAD_ACCUM_STEPS=1, NUM_EPOCHS=80, LEARNING_RATE=4e-3, WARMUP_STEPS=10, VAL_EVERY_EPOCHS=20,
    GRADIENT_CHECKPOINTING=False, MIXED_PRECISION="fp32", NUM_WORKERS=0, DEVICE="cpu",
    SAVE_EVERY_EPOCHS=40, LOG_EVERY_STEPS=5, PREVIEW_EVERY_EPOCHS=80,
)
# What `play_world.py --demo` plays: the student `distill_streaming_model.py --demo` distils
# from the training demo's model, the last stage's (C, else B) that exists; until that has
# run, the training demo's base model with its final checkpoint over it, run causally but
# not distilled.
DISTILL_DEMO_DIR = f"{DEMO_DIR}/distill"
PLAY_DEMO_MODEL_DIRS = (f"{DISTILL_DEMO_DIR}/long_tune/student", f"{DISTILL_DEMO_DIR}/dmd/student")
PLAY_DEMO_CHECKPOINT = ""                # a student has no checkpoint over it
PLAY_DEMO_FALLBACK_MODEL_DIR = TRAINING_DEMO_SETTINGS["BASE_MODEL_DIR"]
PLAY_DEMO_FALLBACK_CHECKPOINT = f"{TRAINING_DEMO_SETTINGS['CHECKPOINT_DIR']}/{FINAL_FILE}"
DEMO_RECORDING_FRAMES = 900              # 36 s of play: enough variety that validation means something
# What the demo says after its controls line. Its recording is short (a model can memorise
# how each clip moves instead of reading the keys), and even where the predictions follow
# the keys, the previews do not follow them yet (bench/RESULTS.md says why).
DEMO_CONTROLS_NOTES = {
    True: ("demo: the predictions follow the keys and mouse, but the generated preview does not follow them yet "
           "(it scores about as well with another clip's keys): a few CPU minutes teach the tiny model what the "
           "keys do to its predictions, not to drive; in 10 minutes bench/bench_learn_controls.py --world=turns "
           "teaches a wider one to turn with the mouse (bench/RESULTS.md)"),
    False: ("demo: a few minutes on the short demo recording teach the keys only a little; "
            "bench/bench_learn_controls.py trains longer on a longer recording and plots how the action gain grows"),
}
DEMO_MODEL = dict(dim=64, num_layers=3, num_heads=4, ffn_dim=128)  # tiny_config() arguments


def prepare_demo(settings: dict, num_frames: int = DEMO_RECORDING_FRAMES, runs: tuple[str, ...] = DEMO_RUNS) -> None:
    """Write the demo recording and the tiny models in the real file formats (once; later
    demo runs reuse them and their latent cache), and clear demo_run/checkpoints (a
    CHECKPOINT_DIR given on the command line is never cleared). A recording from an older
    demo script (or another deck of `runs`) is rendered again in demo_run/data, and refused
    anywhere else."""
    data_dir = Path(settings["DATA_DIR"])
    if (data_dir / CSV_NAME).is_file() and not is_current_demo_recording(data_dir, num_frames, runs=runs):
        if data_dir != Path(TRAINING_DEMO_SETTINGS["DATA_DIR"]):  # never delete a folder we were pointed at
            raise DataError(f"{data_dir / CSV_NAME}: not the demo recording this version writes ({num_frames} frames "
                            "of the current demo script and its deck of runs); delete the folder or choose another "
                            "DATA_DIR")
        print(f"demo: {data_dir} holds a recording of an older demo script; rendering it again")
        shutil.rmtree(data_dir)
    if not (data_dir / CSV_NAME).is_file():
        print(f"demo: rendering {num_frames} frames of the synthetic recording into {data_dir}")
        write_demo_recording(data_dir, num_frames, settings["VIDEO_HEIGHT"], settings["VIDEO_WIDTH"], runs=runs)
    if not Path(settings["VAE_PATH"]).is_file():
        write_demo_vae(settings["VAE_PATH"])
    torch.manual_seed(0)
    clip_config = CLIPVisionConfig.tiny()
    if not Path(settings["CLIP_PATH"]).is_file():
        save_clip(CLIPVisionTower(clip_config), settings["CLIP_PATH"])
    model_dir = Path(settings["BASE_MODEL_DIR"])
    if not (model_dir / CONFIG_NAME).is_file():  # written last: its absence means an unfinished set-up
        write_demo_base_model(model_dir, len(settings["KEYBOARD_KEYS"]))
    if not settings["RESUME"] and settings["CHECKPOINT_DIR"] == TRAINING_DEMO_SETTINGS["CHECKPOINT_DIR"]:
        shutil.rmtree(settings["CHECKPOINT_DIR"], ignore_errors=True)  # only the demo's own folder


def write_demo_base_model(model_dir, keyboard_dim: int, model: dict = DEMO_MODEL) -> None:
    """A random tiny base model (tiny_config(**model)) in the official format at model_dir,
    drawn from torch's global generator."""
    config = tiny_config(keyboard_dim=keyboard_dim, clip_dim=CLIPVisionConfig.tiny().width, **model)
    network = WanModel(config)
    with torch.no_grad():  # like a pretrained model, no zero output layers (any strategy can learn)
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_base_model(network, model_dir)


def write_demo_vae(path) -> None:
    """The demo's VAE at path: a copy of the shipped weights, or, where they are missing,
    trained now by the code that made them."""
    if DEMO_VAE_FILE.is_file():
        write_atomic(path, lambda temporary: shutil.copyfile(DEMO_VAE_FILE, temporary))
        return
    print(f"demo: {DEMO_VAE_FILE} is missing; training the demo VAE on demo-world frames "
          "(about half an hour on one CPU thread)")
    save_vae(train_demo_vae(), path)


def demo_paths_under(root, settings: dict = TRAINING_DEMO_SETTINGS) -> dict:
    """The demo's path settings moved from demo_run/ to root/ (tests and benchmarks)."""
    return {name: str(Path(root) / value.removeprefix(DEMO_DIR + "/")) for name, value in settings.items()
            if isinstance(value, str) and value.startswith(DEMO_DIR + "/")}
