"""The memory savers change what training learns only within a stated distance: 50 optimizer
steps on a tiny model with each saver end close to the same steps with float32 AdamW, and no
single weight ever takes a step much larger than float32 AdamW's largest.

Three measures of each run against the plain float32 AdamW run (the guide quotes them):
- distance: max |saver - adamw| over every trained number, divided by max |adamw - start|
  (how far plain AdamW moved them);
- l2: the same with L2 norms over all trained numbers;
- step ratio: the largest single-number step of any optimizer step, in learning rates,
  divided by plain AdamW's largest.
The offloads and the in-backward step do the same float32 arithmetic in another place or
order, so they stay within rounding; the 8-bit state rounds both moments every step, so it
drifts a few per cent of the way travelled. The 8-bit runs use the demo's width (dim 64),
where most weight matrices have the 4,096 numbers torchao needs to quantise them at all.
"""

import math
from contextlib import nullcontext

import pytest
import torch

from model_helpers import tiny_model
from training.flow_matching import batch_from_random_inputs
from training.optim import StepInBackward, build_optimizer, parameter_groups
from training.recipe import TrainingRecipe
from wan.model import random_inputs

STEPS = 50
CPU = torch.device("cpu")
BASE = dict(LEARNING_RATE=1e-3, WEIGHT_DECAY=0.01, MAX_GRAD_NORM=1.0, EMA_DECAY=0.0, EMA_WARMUP=True,
            LAST_LAYERS=1, GRAD_ACCUM_STEPS=1, GRADIENT_CHECKPOINTING=True, SEED=0, LORA_RANK=4,
            LORA_ALPHA=4.0, LORA_TARGETS=("self_attn", "ffn"), LORA_DROPOUT=0.0, LORA_HEAD=False)
WIDE = dict(dim=64, num_layers=3, ffn_dim=128)  # the demo model's shape: 8-bit state on most matrices
CLIPPED = 0.02  # a MAX_GRAD_NORM under every step's gradient norm here (the runs check it): every step clips
# saver -> (settings, strategy, model, largest distance allowed, largest step ratio allowed)
SAVERS = {
    "offload_optimizer": ({"OFFLOAD_OPTIMIZER": True}, "full", {}, 1e-4, 1.001),
    "in_backward": ({"OPTIMIZER_IN_BACKWARD": True}, "full", {}, 1e-4, 1.001),
    "in_backward, clipping every step": ({"OPTIMIZER_IN_BACKWARD": True, "MAX_GRAD_NORM": CLIPPED}, "full", {},
                                         1e-4, 1.001),
    "offload_frozen": ({"OFFLOAD_FROZEN": True}, "lora", {}, 1e-4, 1.001),
    "adamw_8bit": ({"OPTIMIZER": "adamw_8bit"}, "full", WIDE, 0.1, 2.0),
}


def train(strategy: str, savers: dict, model_shape: dict, make_optimizer=None) -> dict:
    """STEPS steps on fixed inputs and seeded noise: the trained tensors at the start and the
    end, the largest single-number step of each optimizer step, and every gradient norm.
    make_optimizer(groups, lr): another optimizer than the recipe's (bench/bench_savers.py)."""
    settings = dict(BASE, TRAINING_STRATEGY=strategy, **savers)
    recipe, model = TrainingRecipe(), tiny_model(seed=0, **model_shape)
    trainable = recipe.prepare(model, settings)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    model.set_gradient_checkpointing(True)
    model.train()
    recipe.offload(model, settings, CPU)
    optimizer = (recipe.make_optimizer(trainable, settings, CPU, CPU) if make_optimizer is None else
                 make_optimizer(parameter_groups(trainable, settings["WEIGHT_DECAY"]), settings["LEARNING_RATE"]))
    inputs = batch_from_random_inputs(random_inputs(model.config, 2, 2, 4, 4))
    g = torch.Generator().manual_seed(1)
    largest_steps, norms = [], []
    for step in range(STEPS):
        before = {n: p.detach().clone() for n, p in trainable.items()}
        sigma, noise = torch.rand(2, generator=g), torch.randn(inputs["latents"].shape, generator=g)
        recipe.micro_batch(model, optimizer, inputs, sigma, noise, nullcontext(), 0.5)
        norms.append(recipe.clip_gradients(optimizer, trainable, settings))
        recipe.optimizer_step(optimizer, None, trainable, step)
        largest_steps.append(max((p.detach() - before[n]).abs().max().item() for n, p in trainable.items()))
    end = {n: p.detach().clone() for n, p in trainable.items()}
    return {"start": start, "end": end, "largest_steps": largest_steps, "norms": norms}


def distance(reference: dict, other: dict) -> float:
    start, ref, end = reference["start"], reference["end"], other["end"]
    travelled = max((ref[n] - start[n]).abs().max().item() for n in ref)
    return max((end[n] - ref[n]).abs().max().item() for n in ref) / travelled


def l2(reference: dict, other: dict) -> float:
    start, ref, end = reference["start"], reference["end"], other["end"]
    travelled = math.sqrt(sum((ref[n] - start[n]).square().sum().item() for n in ref))
    return math.sqrt(sum((end[n] - ref[n]).square().sum().item() for n in ref)) / travelled


def step_ratio(reference: dict, other: dict) -> float:
    return max(other["largest_steps"]) / max(reference["largest_steps"])


@pytest.fixture(scope="module")
def plain_runs():
    """float32 AdamW for each (strategy, model, MAX_GRAD_NORM) the savers are compared with."""
    runs = {}

    def plain(strategy: str, model_shape: dict, max_grad_norm: float) -> dict:
        key = (strategy, tuple(model_shape.items()), max_grad_norm)
        if key not in runs:
            runs[key] = train(strategy, {"MAX_GRAD_NORM": max_grad_norm}, model_shape)
        return runs[key]

    return plain


@pytest.mark.parametrize("saver", list(SAVERS))
def test_each_saver_ends_near_float32_adamw_and_never_steps_far_beyond_it(saver, plain_runs):
    settings, strategy, model_shape, allowed, allowed_ratio = SAVERS[saver]
    if settings.get("OPTIMIZER") == "adamw_8bit":
        pytest.importorskip("torchao", reason="OPTIMIZER=adamw_8bit needs torchao (requirements.txt)")
    reference = plain_runs(strategy, model_shape, settings.get("MAX_GRAD_NORM", BASE["MAX_GRAD_NORM"]))
    run = train(strategy, settings, model_shape)
    if settings.get("MAX_GRAD_NORM") == CLIPPED:
        assert min(reference["norms"]) > 2 * CLIPPED  # so clipping did act on every step
    assert distance(reference, run) < allowed
    assert l2(reference, run) < allowed
    assert step_ratio(reference, run) < allowed_ratio
    if allowed < 0.01:  # the same arithmetic: the same gradient norms in metrics.csv (in-backward measures its own)
        assert run["norms"] == pytest.approx(reference["norms"], rel=1e-5)


def test_the_distance_sees_a_different_learning_rate(plain_runs):
    """The measure is not blind: a run at 0.8x the learning rate is far outside the savers' bounds."""
    reference = plain_runs("full", {}, BASE["MAX_GRAD_NORM"])
    slower = train("full", {"LEARNING_RATE": 0.8e-3}, {})
    assert distance(reference, slower) > 0.1


def test_the_distance_sees_clipping(plain_runs):
    """...and clipping every step (what global clipping in the backward must reproduce) is
    hundreds of times the in-backward bound away from not clipping: a per-tensor clip, close
    to none, could not pass."""
    assert distance(plain_runs("full", {}, BASE["MAX_GRAD_NORM"]), plain_runs("full", {}, CLIPPED)) > 0.01


# ----------------------------------------------------------------------------- the 8-bit second moment

def spread_out_steps(make_optimizer, numbers: int = 256 * 64, steps: int = 150) -> torch.Tensor:
    """The largest step (in learning rates) of each number over `steps` steps of gradients whose
    sizes span six orders of magnitude within each 256-number block, and swing from step to
    step: the case where block-wise scaling rounds small second moments to zero.
    make_optimizer(groups, lr), without weight decay here."""
    p = torch.nn.Parameter(torch.zeros(numbers))
    optimizer = make_optimizer([{"params": [p], "weight_decay": 0.0}], 1e-3)
    g = torch.Generator().manual_seed(1)
    sizes = torch.exp(torch.empty(numbers).uniform_(-14, 0, generator=g))
    largest = torch.zeros(numbers)
    for _ in range(steps):
        swing = torch.exp(torch.randn(numbers, generator=g) * 1.5)
        sign = torch.where(torch.rand(numbers, generator=g) < 0.7, 1.0, -1.0)
        p.grad = sizes * swing * sign
        before = p.detach().clone()
        optimizer.step()
        largest = torch.maximum(largest, (p.detach() - before).abs() / optimizer.param_groups[0]["lr"])
    return largest


def float32_adamw(groups, lr):
    return build_optimizer(groups, "adamw", lr, CPU)


def torchao_adamw_8bit(groups, lr):
    """torchao's AdamW8bit as torchao ships it (zero in the second moment's map), run eagerly
    on the CPU like ours."""
    from torchao.optim import AdamW8bit

    class Eager(AdamW8bit):
        def step(self, closure=None):
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return Eager(groups, lr=lr)


def our_adamw_8bit(groups, lr):
    return build_optimizer(groups, "adamw_8bit", lr, CPU)


@pytest.fixture(scope="module")
def float32_spread_steps():
    return spread_out_steps(float32_adamw)


def test_8bit_second_moment_without_zero_keeps_every_step_within_2x_float32(float32_spread_steps):
    pytest.importorskip("torchao", reason="OPTIMIZER=adamw_8bit needs torchao (requirements.txt)")
    assert spread_out_steps(our_adamw_8bit).max() <= 2 * float32_spread_steps.max()


def test_torchaos_own_map_breaks_that_bound(float32_spread_steps):
    """The bound is not blind: torchao's map, with zero in the second moment, steps some
    numbers hundreds of times further than float32 AdamW ever does."""
    pytest.importorskip("torchao", reason="OPTIMIZER=adamw_8bit needs torchao (requirements.txt)")
    assert spread_out_steps(torchao_adamw_8bit).max() > 100 * float32_spread_steps.max()


# ----------------------------------------------------------------------------- the step in the backward

def test_each_tensor_steps_alone_in_the_backward():
    """Stepping one tensor visits that tensor only: the backward's optimizer work grows with the
    number of tensors, not with its square."""
    model = tiny_model(seed=0)
    trainable = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(parameter_groups(trainable, 0.01), lr=1e-3)
    in_backward = StepInBackward(optimizer, trainable, max_norm=1.0)
    visits, real_step = [], optimizer.step

    def counting_step(*args, **kwargs):
        visits.append(sum(len(group["params"]) for group in optimizer.param_groups))
        return real_step(*args, **kwargs)

    optimizer.step = counting_step
    inputs = random_inputs(model.config, 1, 2, 4, 4)
    in_backward.backward(model(**inputs).square().mean())
    reached = len(in_backward.seen)
    assert visits == [1] * reached and reached > 0.9 * len(trainable)
    assert all(p.grad is None for p in trainable.values())
    assert in_backward.take_norm() > 0
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(trainable)  # groups restored
