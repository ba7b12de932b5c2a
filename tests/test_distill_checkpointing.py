"""Checkpointed distillation (GRADIENT_CHECKPOINTING): every stage's gradients of student
and critic equal the plain path's, on one process and with FSDP on two gloo ranks; a
checkpointed rollout keeps its blocks' inputs, not their graphs, so what it keeps grows by
a few latents per block; the stream's cache copy is independent of the stream."""

import gc
import os
import subprocess
import weakref
import sys
from contextlib import nullcontext

import pytest
import torch

import test_distillation
from conftest import REPO_ROOT
from model_helpers import perturb_, tiny_model
from test_distillation import H, W, conditions
from test_long_tuning import SCHEDULE, SMALL, tiny_vae
from training import diffusion_forcing as df
from training.dmd import (DistillationModels, RolloutSettings, critic_loss, critic_micro_batch, generator_loss,
                          generator_micro_batch)
from training.long_tuning import advance, new_stream
from training.ranks import Ranks, full_tensors, wrap_for_ranks
from training.rollout import SampleNoise, backward_with_replays, rollout
from wan.causal import causal_from

one_thread = test_distillation.one_thread  # autouse: tiny models on one torch thread
STAGES = ("causal_init", "dmd", "long_tune")
TOLERANCE = 1e-6  # the largest element difference, relative to the gradient's largest element


def models_for(stage: str, checkpointed: bool, ranks: Ranks) -> DistillationModels:
    """The stage's tiny roles (the critic different from the teacher, so that there is a DMD
    gradient), each wrapped for the ranks as the script wraps them (FSDP on several)."""
    student = causal_from(tiny_model(0), 6, 0)
    teacher, critic = tiny_model(0).requires_grad_(False), perturb_(tiny_model(0), seed=3, scale=0.02)
    for model in (student, critic):
        model.set_gradient_checkpointing(checkpointed)
    for model in (student, teacher, critic):
        wrap_for_ranks(model, True, ranks, torch.device("cpu"), use_bf16=False)
    return DistillationModels(student, teacher, critic)


def stage_gradients(stage: str, checkpointed: bool, ranks: Ranks = Ranks(), exit_step: int = 1) -> dict:
    """One micro-batch of the stage on this rank's sample (stage C: a stream's second
    iteration); the whole gradients of student and critic, {"student.<name>": ...}."""
    models = models_for(stage, checkpointed, ranks)
    settings = RolloutSettings(SCHEDULE, 5.0, 20, 980)
    c = conditions(frames=9 if stage != "long_tune" else 12, seed=ranks.rank)
    noise = SampleNoise(0, stage, [ranks.rank], "cpu")
    if stage == "causal_init":
        inputs = {"latents": noise.randn(16, 9, H, W), "cond_concat": c.cond_concat, "visual_context": c.visual_context,
                  "keyboard": c.keyboard, "mouse": c.mouse}
        levels = torch.tensor([[900] * 3 + [300] * 3 + [600] * 3])
        df.micro_batch(models.student, inputs, levels, noise.randn(16, 9, H, W), 5.0, df.bell_weights(5.0),
                       nullcontext(), 1.0)
    elif stage == "dmd":
        generator_micro_batch(models, c, noise, exit_step, settings, nullcontext(), 0.5)
        critic_micro_batch(models, c, SampleNoise(0, "critic", [ranks.rank], "cpu"), 2, settings, nullcontext(), 0.5)
    else:
        stream = new_stream(models.student, c, tiny_vae())
        with torch.no_grad():
            advance(models.student, stream, SMALL, 0, noise, SCHEDULE, exit_step, nullcontext(), False)
        window = advance(models.student, stream, SMALL, 1, noise, SCHEDULE, exit_step, nullcontext(), True)
        judging = window.conditions(stream)
        generator_loss(models, window.latents, judging, noise, settings, nullcontext(), 1.0, window.mask)
        critic_loss(models, window.latents, judging, noise, settings, nullcontext(), 1.0, window.mask)
    gradients = {}
    for role in ("student", "critic"):
        named = {f"{role}.{n}": p.grad for n, p in getattr(models, role).named_parameters() if p.grad is not None}
        gradients.update(full_tensors(named, ranks.main))
    return gradients


def relative_difference(plain: dict, checkpointed: dict) -> float:
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    worst = max((plain[n] - checkpointed[n]).abs().max().item() for n in plain)
    return worst / max(plain[n].abs().max().item() for n in plain)


@pytest.mark.parametrize("stage,exit_step", [("causal_init", 0), ("dmd", 0), ("dmd", 2), ("long_tune", 1)])
def test_checkpointed_gradients_equal_the_plain_paths(stage, exit_step):
    plain = stage_gradients(stage, False, exit_step=exit_step)
    assert any(n.startswith("student.") for n in plain)
    assert any(n.startswith("critic.") for n in plain) == (stage != "causal_init")
    assert relative_difference(plain, stage_gradients(stage, True, exit_step=exit_step)) < TOLERANCE


def test_the_comparison_sees_another_exit_step():
    """Not blind: the gradients of a rollout that exits one step later are far from these."""
    assert relative_difference(stage_gradients("dmd", False, exit_step=0),
                               stage_gradients("dmd", True, exit_step=1)) > 0.01


WORKER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from training.ranks import init_ranks
import test_distill_checkpointing as t
ranks, _ = init_ranks("cpu")
found = {{f"{{stage}}:{{on}}": t.stage_gradients(stage, on, ranks) for stage in t.STAGES for on in (False, True)}}
if ranks.main:
    torch.save(found, sys.argv[1])
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_checkpointed_gradients_equal_the_plain_paths_with_fsdp_on_two_ranks(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO_ROOT), tests=str(REPO_ROOT / "tests")))
    out = tmp_path / "gradients.pt"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = torch.load(out, weights_only=True)
    for stage in STAGES:
        plain, checkpointed = found[f"{stage}:False"], found[f"{stage}:True"]
        assert any(n.startswith("student.") for n in plain), stage
        assert relative_difference(plain, checkpointed) < TOLERANCE, stage
    # the ranks' gradients were averaged: two ranks' samples differ from one rank's alone
    assert relative_difference(stage_gradients("dmd", False), found["dmd:False"]) > 0.01


def test_a_checkpointed_rollout_keeps_its_blocks_inputs_not_their_graphs():
    """What a rollout with gradients leaves alive: the graph of every exit step (plain), or
    per block its exit input and output (checkpointed) - a few latents, whatever the model."""
    def kept(checkpointed: bool, frames: int) -> int:
        student = causal_from(tiny_model(0), 6, 0)
        student.set_gradient_checkpointing(checkpointed)
        c = conditions(frames=frames)
        weights = {p.untyped_storage().data_ptr() for p in student.parameters()}
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            made = rollout(student, c, SampleNoise(0, "g", [0], "cpu"), SCHEDULE, 2, frames, with_grad=True)
        assert made.requires_grad
        return sum(storages.values())

    assert kept(True, 9) == 0 and kept(True, 3) == 0  # a checkpointed rollout saves nothing for autograd
    assert kept(False, 9) >= 3 * kept(False, 3) > 0  # the plain one: every block's graph (the later ones longer)


def test_a_stream_cache_copy_is_independent_and_equal():
    student = causal_from(tiny_model(0), 6, 0).eval()
    c = conditions(frames=9)
    cache = student.new_cache(1, H, W)
    with torch.no_grad():
        rollout(student, c, SampleNoise(0, "g", [0], "cpu"), SCHEDULE, 1, 6, cache=cache)
        copy = cache.copy()
        assert (copy.global_end, copy.local_end) == (cache.global_end, cache.local_end) == (6, 6)
        pairs = [(a, b) for x, y in zip(cache.layers, copy.layers) for a, b in zip(x.rolling(), y.rolling())]
        assert pairs and all(torch.equal(a.k, b.k) and a.k is not b.k for a, b in pairs)
        ahead = rollout(student, c, SampleNoise(0, "h", [0], "cpu"), SCHEDULE, 1, 3, cache=cache, start_frame=6)
        assert cache.global_end == 9 and copy.global_end == 6  # the copy did not move with the stream
        again = rollout(student, c, SampleNoise(0, "h", [0], "cpu"), SCHEDULE, 1, 3, cache=copy, start_frame=6)
    assert torch.equal(ahead, again)


def test_a_streams_buffers_die_with_it_without_the_cyclic_collector():
    """A rollout makes a fresh stream each time (two per stage-B iteration, and the replay's):
    its buffers must go when it does, not when Python's cyclic collector next runs."""
    student = causal_from(tiny_model(0), 6, 0)
    made = []
    original = student.new_cache

    def recording(*args, **kwargs):
        cache = original(*args, **kwargs)
        made.append(weakref.ref(cache.layers[0].self_kv.k))
        return cache

    student.new_cache = recording
    student.set_gradient_checkpointing(True)
    gc.disable()
    try:
        x = rollout(student, conditions(frames=6), SampleNoise(0, "g", [0], "cpu"), SCHEDULE, 1, 6, with_grad=True)
        backward_with_replays(x.square().sum())
        assert len(made) == 2 and all(buffer() is None for buffer in made)  # the rollout's and the replay's
    finally:
        gc.enable()
