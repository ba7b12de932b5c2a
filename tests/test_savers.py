"""The memory savers change what training learns only within a stated distance: 100 optimizer
steps on the tiny model with each saver end close to the same steps with float32 AdamW.

The distance is max |saver - adamw| over the trained tensors divided by max |adamw - start|
(how far plain AdamW moved them). The offloads and the in-backward step do the same float32
arithmetic in another place or order, so they stay within rounding; the 8-bit state rounds
both moments every step, so it drifts a few per cent of the way travelled.
"""

from contextlib import nullcontext

import pytest
import torch

from model_helpers import tiny_model
from training.flow_matching import batch_from_random_inputs
from training.recipe import TrainingRecipe
from wan.model import random_inputs

STEPS = 100
CPU = torch.device("cpu")
BASE = dict(LEARNING_RATE=1e-3, WEIGHT_DECAY=0.01, MAX_GRAD_NORM=1.0, EMA_DECAY=0.0, EMA_WARMUP=True,
            LAST_LAYERS=1, GRAD_ACCUM_STEPS=1, GRADIENT_CHECKPOINTING=True, SEED=0, LORA_RANK=4,
            LORA_ALPHA=4.0, LORA_TARGETS=("self_attn", "ffn"), LORA_DROPOUT=0.0, LORA_HEAD=False)
# saver -> (settings, strategy, largest distance allowed)
SAVERS = {
    "offload_optimizer": ({"OFFLOAD_OPTIMIZER": True}, "full", 1e-4),
    "in_backward": ({"OPTIMIZER_IN_BACKWARD": True}, "full", 1e-4),
    "offload_frozen": ({"OFFLOAD_FROZEN": True}, "lora", 1e-4),
    "adamw_8bit": ({"OPTIMIZER": "adamw_8bit"}, "full", 0.1),
}


def train(strategy: str, savers: dict) -> tuple[dict, dict]:
    """(start, end) of the trained tensors after STEPS steps on fixed inputs and seeded noise."""
    settings = dict(BASE, TRAINING_STRATEGY=strategy, **savers)
    recipe, model = TrainingRecipe(), tiny_model(seed=0)
    trainable = recipe.prepare(model, settings)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    model.set_gradient_checkpointing(True)
    model.train()
    recipe.offload(model, settings, CPU)
    optimizer = recipe.make_optimizer(trainable, settings, CPU, CPU)
    inputs = batch_from_random_inputs(random_inputs(model.config, 2, 2, 4, 4))
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        sigma, noise = torch.rand(2, generator=g), torch.randn(inputs["latents"].shape, generator=g)
        recipe.micro_batch(model, inputs, sigma, noise, nullcontext(), 0.5)
        norm = recipe.clip_gradients(optimizer, trainable, settings)
        assert norm > 0
        recipe.optimizer_step(optimizer, None, trainable, step)
    return start, {n: p.detach().clone() for n, p in trainable.items()}


def distance(start: dict, reference: dict, other: dict) -> float:
    travelled = max((reference[n] - start[n]).abs().max().item() for n in reference)
    return max((other[n] - reference[n]).abs().max().item() for n in reference) / travelled


@pytest.fixture(scope="module")
def plain_runs():
    return {strategy: train(strategy, {}) for strategy in ("full", "lora")}


@pytest.mark.parametrize("saver", list(SAVERS))
def test_each_saver_ends_near_float32_adamw(saver, plain_runs):
    if saver == "adamw_8bit":
        pytest.importorskip("torchao", reason="OPTIMIZER=adamw_8bit needs torchao (requirements.txt)")
    settings, strategy, allowed = SAVERS[saver]
    start, reference = plain_runs[strategy]
    _, end = train(strategy, settings)
    assert distance(start, reference, end) < allowed


def test_the_distance_sees_a_different_learning_rate(plain_runs):
    """The measure is not blind: a run at 0.8x the learning rate is far outside the savers' bounds."""
    start, reference = plain_runs["full"]
    _, end = train("full", {"LEARNING_RATE": 0.8e-3})
    assert distance(start, reference, end) > 0.1
