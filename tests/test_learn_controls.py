"""A guard against wiring bugs between the actions and the model: a tiny model trained with
its actions must learn what the same model trained with the actions zeroed cannot.

The world is synthetic and made so that the actions decide a large part of the latents:
every later latent frame is the one before it plus KEY_PATTERN times +1 (W held) or -1 (S
held) plus MOUSE_PATTERN times the sign of the mouse yaw, each drawn anew for every latent
frame and held over its four video frames. Without the actions the sign of each step is a
coin toss; with them it is known. If the actions never reached the blocks - a dropped
argument, a branch left out, the keyboard and mouse columns swapped or their rows
misaligned with the frames - the two runs would learn the same thing.

The margins: both runs start from the same weights and see the same latents, noise and
sigmas, so with a disconnected action path they are the same computation and their
validation losses agree to float rounding (a ratio of 1.0000). Connected, the run without
actions ends about a third above the run with them (ratio 1.33 on the machine this was
written on); the test asks for MIN_LOSS_RATIO = 1.2. The trained model's action gain
(validation with another clip's actions / with its own, training/flow_matching.validate)
is about 2.0, where a model that ignores the actions scores exactly 1; the test asks for
MIN_GAIN = 1.5. Zeroing only the keyboard or only the mouse of the trained model raises
its loss by about 38% and 20%: each branch must cost at least MIN_BRANCH_RATIO = 1.1, so
one branch left unwired fails too. 300 steps of a 1.6M-parameter model: 15-40 s on one
CPU thread, depending on what else runs.
"""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from training.flow_matching import flow_matching_step, validate
from wan import flow
from wan.conditioning import cond_concat_from_latent
from wan.config import tiny_config
from wan.model import WanModel
from wan.shapes import LATENT_CHANNELS, VAE_TIME_STRIDE, video_frame_count

LATENT_FRAMES, SIDE = 3, 2           # 3 latent frames of one 2x2 patch: one token per frame
FRAMES = video_frame_count(LATENT_FRAMES)
KEYS = 4                             # W, S, A, D
MOUSE_YAW = 0.5                      # model units; column 1 is yaw
STEPS, BATCH, LEARNING_RATE = 300, 16, 3e-3
MIN_LOSS_RATIO = 1.2
MIN_GAIN = 1.5
MIN_BRANCH_RATIO = 1.1
CPU = torch.device("cpu")


def synthetic_clips(count: int, generator: torch.Generator) -> list[dict]:
    """Clips of the synthetic world (see the module docstring) as the latent cache serves them."""
    patterns = torch.randn(2, LATENT_CHANNELS, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1234))
    key_pattern, mouse_pattern = patterns
    clips = []
    for _ in range(count):
        keyboard, mouse = torch.zeros(FRAMES, KEYS), torch.zeros(FRAMES, 2)
        latents = [torch.randn(LATENT_CHANNELS, 1, SIDE, SIDE, generator=generator)]
        for k in range(1, LATENT_FRAMES):
            rows = slice(VAE_TIME_STRIDE * (k - 1) + 1, VAE_TIME_STRIDE * k + 1)  # the video frames of latent frame k
            forward = bool(torch.randint(0, 2, (), generator=generator))
            turn = 1.0 if torch.randint(0, 2, (), generator=generator) else -1.0
            keyboard[rows, 0 if forward else 1] = 1.0
            mouse[rows, 1] = turn * MOUSE_YAW
            latents.append(latents[-1] + (1.0 if forward else -1.0) * key_pattern + turn * mouse_pattern)
        latents = torch.cat(latents, dim=1)
        first_only = torch.cat([latents[:, :1], torch.zeros_like(latents[:, 1:])], dim=1)
        clips.append({"latents": latents, "cond_concat": cond_concat_from_latent(first_only[None])[0],
                      "visual_context": torch.zeros(4, 32), "keyboard": keyboard, "mouse": mouse})
    return clips


class ClipSet:
    """The little of CachedClipDataset that validate() uses: items, and .clips with the actions."""

    def __init__(self, items: list[dict]):
        self.items = items
        self.clips = [SimpleNamespace(keyboard=item["keyboard"], mouse=item["mouse"]) for item in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def trained_model(use_actions: bool) -> WanModel:
    """STEPS of flow matching from a seeded tiny model; the batches, noise and sigmas are
    the same for both kinds of run, only the actions differ."""
    torch.manual_seed(0)
    model = WanModel(tiny_config(keyboard_dim=KEYS, dim=128, num_heads=2, ffn_dim=256)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        clips = synthetic_clips(BATCH, generator)
        batch = {name: torch.stack([clip[name] for clip in clips]) for name in clips[0]}
        if not use_actions:
            batch["keyboard"], batch["mouse"] = torch.zeros_like(batch["keyboard"]), torch.zeros_like(batch["mouse"])
        sigma = flow.sample_sigmas(BATCH, shift=1.0, generator=generator)
        noise = torch.randn(batch["latents"].shape, generator=generator)
        flow_matching_step(model, batch, sigma, noise, nullcontext()).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@pytest.fixture
def one_thread():
    """The model is so small that a second thread mostly waits for the first (on a busy
    machine, many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_training_with_actions_learns_what_zeroed_actions_cannot(one_thread):
    items = synthetic_clips(32, torch.Generator().manual_seed(99))
    sigmas = flow.validation_sigmas(4, shift=1.0)
    model = trained_model(True)
    with_actions = validate(model, ClipSet(items), sigmas, 0, CPU, nullcontext())
    without = validate(trained_model(False), ClipSet([zero_actions(item, "keyboard", "mouse") for item in items]),
                       sigmas, 0, CPU, nullcontext())
    ratio = without["val_loss"] / with_actions["val_loss"]
    print(f"validation loss with actions {with_actions['val_loss']:.4f}, zeroed {without['val_loss']:.4f} "
          f"(ratio {ratio:.3f}); action gain {with_actions['action_gain']:.4f}")
    assert ratio >= MIN_LOSS_RATIO, (with_actions, without)
    assert with_actions["action_gain"] >= MIN_GAIN, with_actions
    # each branch carries its half: taking either away from the trained model costs loss
    for branch in ("keyboard", "mouse"):
        lost = validate(model, ClipSet([zero_actions(item, branch) for item in items]), sigmas, 0, CPU, nullcontext())
        print(f"{branch} zeroed: validation loss {lost['val_loss']:.4f}")
        assert lost["val_loss"] >= MIN_BRANCH_RATIO * with_actions["val_loss"], (branch, lost, with_actions)


def zero_actions(item: dict, *names: str) -> dict:
    return dict(item, **{name: torch.zeros_like(item[name]) for name in names})
