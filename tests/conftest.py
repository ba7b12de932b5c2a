import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT / "reference"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Two cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def reference_dir():
    return REFERENCE_DIR


def demo_settings(root: Path, *overrides: str) -> dict:
    """The --demo settings with every path under root, validating every epoch (tests compare
    per-epoch histories), and any --NAME=value overrides."""
    import finetune_base_model as fb
    from demo_world.setup import demo_paths_under

    paths = [f"--{name}={value}" for name, value in demo_paths_under(root).items()]
    settings, _ = fb.parse_settings(["--demo", *paths, "--VAL_EVERY_EPOCHS=1", *overrides])
    return settings


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict:
    """A demo recording (80 frames, 32x64) and tiny random base model, VAE and CLIP files in
    the official formats, made once per test run by the demo's own set-up code."""
    from demo_world.setup import prepare_demo

    settings = demo_settings(tmp_path_factory.mktemp("tiny_assets"), "--VIDEO_HEIGHT=32", "--VIDEO_WIDTH=64",
                             "--SEQUENCE_LENGTH=9", "--CLIP_STRIDE=4")
    prepare_demo(settings, num_frames=80)
    return settings


def data_settings(**changes):
    """convert_unreal_data.py's data settings, with changes by field name (sequence_length=9, ...)."""
    import convert_unreal_data

    return convert_unreal_data.data_settings({}).replace(**changes)
