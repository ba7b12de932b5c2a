"""Distillation's trained roles - the student and the critic - trained the way fine-tuning
trains its model: through training/recipe.py's TrainingRecipe, with the same memory savers
under the same setting names (OPTIMIZER, OFFLOAD_OPTIMIZER, OFFLOAD_FROZEN, LoRA's
LORA_RANK, LORA_ALPHA, LORA_TARGETS), so that the run (distill_streaming_model.py) and its
plan (planning/distill.py) make each role the same way.

role_settings turns the distillation's settings into the recipe's for one role: its
learning rate, its strategy ("lora" for the roles LORA_ROLES names: adapters plus the
action modules, every other weight frozen; else "full"), the distillation's AdamW betas,
the EMA without warm-up (the recipe's average starts at EMA_START_STEP). OFFLOAD_FROZEN
moves every frozen block weight to the host: the teacher's always, and a LoRA role's base.

LoRA here has no dropout: a checkpointed rollout is replayed in the backward and must compute
what the rollout computed (training/rollout.py), and the rollout is the student's play,
which has no dropout either.
"""

import torch

from training.optim import adamw_8bit_class
from training.recipe import Savers, TrainingRecipe, lora_config
from wan.lora import LoRAConfig

ROLES = ("student", "critic")
RECIPE = TrainingRecipe()


def learning_rate(s: dict, role: str) -> float:
    if role == "critic":
        return s["CRITIC_LR"]
    return s["DF_LEARNING_RATE"] if s["STAGE"] == "causal_init" else s["GENERATOR_LR"]


def role_settings(s: dict, role: str) -> dict:
    """The recipe's settings for training `role` ("student" or "critic")."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return {**s, "TRAINING_STRATEGY": "lora" if role in s["LORA_ROLES"] else "full", "LAST_LAYERS": 0,
            "LEARNING_RATE": learning_rate(s, role), "EMA_WARMUP": False, "OPTIMIZER_IN_BACKWARD": False,
            "LORA_DROPOUT": 0.0, "LORA_HEAD": False}


def savers_problems(s: dict, world: int = 1) -> list[str]:
    """What the savers and LoRA settings cannot do here, each with its way out (the
    recipe's rules: several ranks shard every role with FSDP, so no offload or 8-bit state
    there; the offloads need gradient checkpointing)."""
    found = []
    if any(role not in ROLES for role in s["LORA_ROLES"]):
        found.append(f"LORA_ROLES={','.join(s['LORA_ROLES'])}: choose among {', '.join(ROLES)} (or none)")
    elif s["LORA_ROLES"]:
        try:
            lora_config(role_settings(s, s["LORA_ROLES"][0])).check()
        except ValueError as error:
            found.append(f"LORA_TARGETS / LORA_RANK: {error}")
    # the teacher is frozen whatever the roles train, so OFFLOAD_FROZEN always has blocks to move
    checked = dict(role_settings(s, "student"), TRAINING_STRATEGY="lora")
    return found + Savers.of(checked).problems(checked, world, sharded=world > 1)


def student_lora(s: dict) -> LoRAConfig | None:
    """The student's adapters (None unless LORA_ROLES names it): what its export merges."""
    return lora_config(role_settings(s, "student"))


def prepare_role(model, s: dict, role: str) -> dict:
    """Freeze by the role's strategy (LoRA's adapters added, seeded by SEED); float32 masters
    of what it trains. Returns {name: parameter}."""
    return RECIPE.prepare(model, role_settings(s, role))


def role_optimizer(trainable: dict, s: dict, role: str, device: torch.device, host: torch.device,
                   imitating_cuda: bool = False):
    """The role's AdamW (or 8-bit AdamW, or offloaded to the host), at its learning rate."""
    return RECIPE.make_optimizer(trainable, role_settings(s, role), device, host, imitating_cuda)


def student_ema(trainable: dict, s: dict, host: torch.device):
    """The student's average (on the host with OFFLOAD_OPTIMIZER), or None with EMA_DECAY 0."""
    return RECIPE.make_ema(trainable, role_settings(s, "student"), host)


def offload_frozen(model, s: dict, host: torch.device):
    """OFFLOAD_FROZEN: the model's frozen block weights on the host (after any wrapping), or
    None (also for a model with none frozen)."""
    if not any(not p.requires_grad for block in model.blocks for p in block.parameters()):
        return None
    return RECIPE.offload(model, s, host)


def allow_saved_optimizer_state(s: dict) -> None:
    """Let a resumed run read its saved optimizer state: OPTIMIZER=adamw_8bit saves torchao's
    8-bit state tensors, which torch.load(weights_only=True) accepts only once torchao has
    registered them as safe (when its optimizer module is imported) - in a fresh process,
    before the state is read."""
    if Savers.of(s).optimizer == "adamw_8bit":
        adamw_8bit_class()


def describe_savers(s: dict) -> str:
    """The savers and LoRA roles in use, for the run's header and the plan."""
    savers = Savers.of(s)
    used = ([f"OPTIMIZER {savers.optimizer}"] if savers.optimizer != "adamw" else []) + [
        name for name, on in (("OFFLOAD_OPTIMIZER (student's and critic's state and the EMA on the host)",
                               savers.offload_optimizer),
                              ("OFFLOAD_FROZEN (frozen block weights on the host)", savers.offload_frozen)) if on]
    if s["LORA_ROLES"]:
        used.append(f"LoRA for the {' and the '.join(s['LORA_ROLES'])} (rank {s['LORA_RANK']}, alpha "
                    f"{s['LORA_ALPHA']:g}, {','.join(s['LORA_TARGETS'])}, + the action modules)")
    return ", ".join(used) or "none (float32 AdamW on the GPU)"
