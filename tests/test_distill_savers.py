"""The memory savers of distillation (training/roles.py: fine-tuning's savers for the student
and the critic) change what stage B learns only within a stated distance: a few DMD
iterations on tiny models with each saver end close to the same iterations without it, for
both trained roles. Distance: max |saver - plain| over every trained number, divided by
max |plain - start| (how far the plain run moved them), as tests/test_savers.py measures
fine-tuning's. LoRA roles train only their adapters and action modules, and the exported
LoRA student is the adapted model with its adapters merged.
"""

from contextlib import nullcontext

import pytest
import torch

import distill_streaming_model as ds
import test_distillation
from model_helpers import perturb_, tiny_model
from planning import memory
from planning.distill import plan_distillation
from test_distillation import conditions
from training.dmd import DistillationModels, RolloutSettings, critic_micro_batch, generator_micro_batch, \
    is_generator_step
from training.roles import RECIPE, offload_frozen, prepare_role, role_optimizer, role_settings, savers_problems
from training.rollout import FewStepSchedule, SampleNoise
from wan.causal import causal_from
from wan.config import tiny_config
from wan.loading import load_streaming_model
from wan.lora import LoRAConfig, add_lora, is_adapter_name
from wan.model import random_inputs

one_thread = test_distillation.one_thread  # autouse: tiny models on one torch thread
CPU = torch.device("cpu")
STEPS = 8  # iterations: the student learns at every second, the critic at every one
BASE = dict(STAGE="dmd", GENERATOR_LR=1e-3, CRITIC_LR=1e-3, DF_LEARNING_RATE=1e-3, WEIGHT_DECAY=0.01,
            ADAM_BETAS=(0.9, 0.95), MAX_GRAD_NORM=1.0, EMA_DECAY=0.0, GRAD_ACCUM_STEPS=1, GENERATOR_EVERY=2,
            GRADIENT_CHECKPOINTING=True, SEED=0, OPTIMIZER="adamw", OFFLOAD_OPTIMIZER=False, OFFLOAD_FROZEN=False,
            LORA_ROLES=(), LORA_RANK=4, LORA_ALPHA=4.0, LORA_TARGETS=("self_attn", "ffn"))
WIDE = dict(dim=64, num_layers=3, ffn_dim=128)  # weight matrices of >= 4,096 numbers: torchao quantises them
LORA = {"LORA_ROLES": ("student", "critic")}
# saver -> (its settings, the plain run's settings, model shape, largest distance allowed)
SAVERS = {
    "offload_optimizer": ({"OFFLOAD_OPTIMIZER": True}, {}, {}, 1e-4),
    "offload_frozen (the teacher)": ({"OFFLOAD_FROZEN": True}, {}, {}, 1e-4),
    "offload_frozen with LoRA roles": ({**LORA, "OFFLOAD_FROZEN": True}, LORA, {}, 1e-4),
    "adamw_8bit": ({"OPTIMIZER": "adamw_8bit"}, {}, WIDE, 0.1),
}


def distil(changes: dict, shape: dict) -> dict:
    """STEPS stage-B iterations (each role's optimizer made and stepped as the script does);
    the trained tensors of both roles at the start and the end, {"student.<name>": ...}."""
    s = dict(BASE, **changes)
    assert savers_problems(s) == []
    student = causal_from(tiny_model(0, **shape), 6, 0)
    teacher = tiny_model(0, **shape).requires_grad_(False)
    critic = perturb_(tiny_model(0, **shape), seed=3, scale=0.02)
    trainable = {role: prepare_role(model, s, role) for role, model in (("student", student), ("critic", critic))}
    for model in (student, critic):
        model.set_gradient_checkpointing(True)
        model.train()
    for model in (teacher, student, critic):
        offload_frozen(model, s, CPU)
    optimizers = {role: role_optimizer(trainable[role], s, role, CPU, CPU) for role in trainable}
    models = DistillationModels(student, teacher, critic)
    rollout = RolloutSettings(FewStepSchedule.of((1000, 666, 333), 5.0), 5.0, 20, 980)
    c = conditions(batch=2, frames=6, clip_dim=student.config.clip_dim)

    def named(role):
        return {f"{role}.{n}": p.detach().clone() for n, p in trainable[role].items()}

    start = {**named("student"), **named("critic")}
    for step in range(STEPS):
        roles = ["critic"]
        if is_generator_step(step, s["GENERATOR_EVERY"]):
            generator_micro_batch(models, c, SampleNoise(0, "generator", [step, step + 100], CPU), step % 3,
                                  rollout, nullcontext(), 0.5)
            roles.append("student")
        critic_micro_batch(models, c, SampleNoise(0, "critic", [step, step + 100], CPU), (step + 1) % 3, rollout,
                           nullcontext(), 0.5)
        for role in roles:
            assert RECIPE.clip_gradients(optimizers[role], trainable[role], role_settings(s, role)) > 0
            optimizers[role].step()
            optimizers[role].zero_grad(set_to_none=True)
    return {"start": start, "end": {**named("student"), **named("critic")}}


def distance(reference: dict, other: dict) -> float:
    start, ref, end = reference["start"], reference["end"], other["end"]
    assert ref.keys() == end.keys()
    travelled = max((ref[n] - start[n]).abs().max().item() for n in ref)
    return max((end[n] - ref[n]).abs().max().item() for n in ref) / travelled


@pytest.fixture(scope="module")
def plain_runs():
    return {}


@pytest.mark.parametrize("saver", list(SAVERS))
def test_each_saver_learns_what_the_plain_run_learns(saver, plain_runs):
    if saver == "adamw_8bit":
        pytest.importorskip("torchao", reason="OPTIMIZER=adamw_8bit needs torchao (requirements.txt)")
    changes, plain, shape, allowed = SAVERS[saver]
    key = (tuple(sorted((k, str(v)) for k, v in plain.items())), tuple(sorted(shape.items())))
    if key not in plain_runs:
        plain_runs[key] = distil(plain, shape)
    reference = plain_runs[key]
    assert any(n.startswith("student.") for n in reference["end"]) and any(n.startswith("critic.") for n in
                                                                            reference["end"])
    assert distance(reference, distil(changes, shape)) < allowed


def test_the_distance_sees_a_different_learning_rate(plain_runs):
    """Not blind: a run at 0.8x the learning rates is far outside the savers' bounds."""
    reference = distil({}, {})
    assert distance(reference, distil({"GENERATOR_LR": 0.8e-3, "CRITIC_LR": 0.8e-3}, {})) > 0.1


def test_lora_roles_train_their_adapters_and_action_modules_only():
    s = dict(BASE, LORA_ROLES=("critic",))
    student, critic = causal_from(tiny_model(0), 6, 0), tiny_model(1)
    student_names, critic_names = prepare_role(student, s, "student"), prepare_role(critic, s, "critic")
    assert list(student_names) == [n for n, _ in student.named_parameters()]  # the student: every weight
    assert all(is_adapter_name(n) or ".action_model." in n for n in critic_names)
    assert any(is_adapter_name(n) for n in critic_names) and any(".action_model." in n for n in critic_names)
    assert all(not p.requires_grad for n, p in critic.named_parameters() if n not in critic_names)
    assert all(p.dtype == torch.float32 for p in critic_names.values())
    assert role_settings(s, "critic")["LEARNING_RATE"] == 1e-3 and role_settings(s, "critic")["LORA_DROPOUT"] == 0
    assert role_settings(dict(s, STAGE="causal_init", DF_LEARNING_RATE=2e-5), "student")["LEARNING_RATE"] == 2e-5


def test_the_exported_lora_student_is_the_adapted_model_merged(tmp_path):
    """A LoRA student's export (what play_world.py loads) computes what the trained, adapted
    student computes."""
    student = causal_from(tiny_model(0), 6, 0)
    lora = LoRAConfig(4, 8.0, ("self_attn", "ffn"))
    add_lora(student, lora, seed=1)
    perturb_(student, seed=5, scale=0.05)  # trained adapters: B no longer zero
    roles = ds.Roles(student, None, None, {}, {}, ("W", "S", "A", "D"), [])
    ds.export_student(roles, {n: t.detach().clone() for n, t in student.state_dict().items()}, tmp_path / "student",
                      {"stage": "dmd"}, main=True, lora=lora)
    exported = load_streaming_model(tmp_path / "student")
    inputs = random_inputs(student.config, 1, 3, 4, 6, seed=2)
    inputs["t"] = inputs["t"][:, None].expand(-1, 3)
    with torch.no_grad():
        expected, got = student(**inputs), exported(**inputs)
    assert not any(is_adapter_name(n) for n, _ in exported.named_parameters())
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes,message", [
    ({"LORA_ROLES": ("teacher",)}, "LORA_ROLES=teacher: choose among student, critic"),
    ({"LORA_ROLES": ("student",), "LORA_TARGETS": ("bogus",)}, "LORA_TARGETS / LORA_RANK"),
    ({"OFFLOAD_FROZEN": True, "GRADIENT_CHECKPOINTING": False}, "OFFLOAD_FROZEN needs GRADIENT_CHECKPOINTING"),
    ({"OPTIMIZER": "sgd"}, "OPTIMIZER='sgd'"),
])
def test_savers_that_cannot_work_are_named(changes, message):
    assert any(message in p for p in savers_problems(dict(BASE, **changes)))


def test_several_gpus_take_fsdp_not_the_one_gpu_savers():
    assert savers_problems(dict(BASE, LORA_ROLES=("student", "critic")), world=2) == []
    assert any("FSDP" in p for p in savers_problems(dict(BASE, OFFLOAD_OPTIMIZER=True), world=2))


def test_the_plan_streams_a_lora_student_whose_frozen_blocks_live_on_the_host():
    """LoRA roles with OFFLOAD_FROZEN: the student's stream starts with a context pass that calls
    each block's cross-attention outside the block's forward (CausalWanModel.prepare_cached);
    the offload must bring that block's frozen weights for it, or a GPU run stops on weights
    left in host memory. The planner imitates a GPU with the host elsewhere ("meta"), so its
    stage-B and stage-C steps meet the same devices as a real run; they also count what the
    savers take away: the frozen weights and most of the optimizer state."""
    settings, _ = ds.parse_settings(["--VIDEO_HEIGHT=32", "--VIDEO_WIDTH=64", "--SEQUENCE_LENGTH=21",
                                     "--STREAM_MAX_LATENTS=9", "--STREAM_CHUNK_LATENTS=6"])
    plain = plan_distillation(dict(settings, LORA_ROLES=("student", "critic")), config=tiny_config(),
                              stages=("dmd", "long_tune"))
    saved = plan_distillation(dict(settings, LORA_ROLES=("student", "critic"), OFFLOAD_FROZEN=True,
                                   OFFLOAD_OPTIMIZER=True), config=tiny_config(), stages=("dmd", "long_tune"))
    for stage in ("dmd", "long_tune"):
        before, after = plain.stages[stage].breakdown, saved.stages[stage].breakdown
        assert after[memory.WEIGHTS] < before[memory.WEIGHTS], stage
        assert after.get(memory.OPTIMIZER_STATE, 0) < before[memory.OPTIMIZER_STATE] / 2, (stage, after, before)
