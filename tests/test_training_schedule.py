"""The learning-rate schedule, its re-planning on resume, EMA warm-up, the weight-decay
groups and the process group's backends - the pieces every trainer shares."""

import math

import pytest
import torch
import torch.distributed as dist

from training.ema import EMA, ema_decay
from training.optim import build_adamw, decays, parameter_groups
from training.ranks import Ranks, process_group_backend
from training.schedule import LRSchedule, apply_learning_rate


def factors(schedule: LRSchedule) -> list[float]:
    return [schedule.factor(k) for k in range(schedule.total)]


def test_schedule_first_peak_once_and_last_exactly_the_floor():
    f = factors(LRSchedule(warmup=3, total=8, min_ratio=0.1))
    assert f[:3] == pytest.approx([1 / 4, 2 / 4, 3 / 4])      # warm-up rises from 1/(W+1)
    assert f[3] == 1.0 and f.count(1.0) == 1                   # the peak, applied once
    assert f[-1] == pytest.approx(0.1)                         # the last step is MIN_LR_RATIO
    assert all(a > b for a, b in zip(f[3:], f[4:]))             # then strictly down
    mid = LRSchedule(warmup=10, total=111, min_ratio=0.1).factor(60)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5)                # cosine half-way between step 10 and 110


def test_schedule_without_warmup_starts_at_the_peak():
    f = factors(LRSchedule(warmup=0, total=5, min_ratio=0.0))
    assert f[0] == 1.0 and f[-1] == pytest.approx(0.0) and f[2] == pytest.approx(0.5)


def test_the_optimizer_gets_the_step_s_learning_rate():
    params = {"w": torch.nn.Parameter(torch.ones(2, 2)), "b": torch.nn.Parameter(torch.zeros(2))}
    optimizer = build_adamw(params, 1e-3, 0.01, torch.device("cpu"))
    schedule = LRSchedule(2, 6, 0.1)
    lrs = [apply_learning_rate(optimizer, 1e-3, schedule, k) for k in range(6)]
    assert all(g["lr"] == lrs[-1] for g in optimizer.param_groups)
    assert lrs == pytest.approx([1e-3 * x for x in factors(schedule)])


def test_a_longer_run_on_resume_continues_without_a_jump():
    old = LRSchedule(warmup=3, total=8, min_ratio=0.1)
    new = old.extended_to(16, step=5)
    assert new.factor(5) == pytest.approx(old.factor(5))        # continuous where the run stands
    assert new.factor(15) == pytest.approx(0.1)                 # and down to the floor at the new end
    later = [new.factor(k) for k in range(5, 16)]
    assert all(a >= b for a, b in zip(later, later[1:]))         # never climbing back up
    assert "down to 0.1 x at step 16" in new.describe_change(old, 5)


def test_a_finished_run_extended_trains_at_the_floor():
    old = LRSchedule(warmup=3, total=8, min_ratio=0.1)
    new = old.extended_to(12, step=8)
    assert [new.factor(k) for k in range(8, 12)] == pytest.approx([0.1] * 4)
    assert "floor" in new.describe_change(old, 8)


def test_a_run_extended_during_warm_up_keeps_warming_up():
    old = LRSchedule(warmup=4, total=8, min_ratio=0.0)
    new = old.extended_to(20, step=2)
    assert [new.factor(k) for k in range(2, 5)] == pytest.approx([3 / 5, 4 / 5, 1.0])
    assert new.factor(19) == pytest.approx(0.0)
    assert old.extended_to(8, step=5) == old and new.describe_change(new, 2) == ""


def test_ema_warm_up_follows_training_early_and_settles_at_the_decay():
    assert ema_decay(0.999, 0) == pytest.approx(0.1) and ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.999, 10**6) == 0.999 and ema_decay(0.999, 0, warmup=False) == 0.999
    weight = torch.nn.Parameter(torch.zeros(3))
    warm, cold = EMA({"w": weight}, 0.999), EMA({"w": weight}, 0.999, warmup=False)
    with torch.no_grad():
        weight.fill_(1.0)
    for k in range(200):
        warm.update({"w": weight}, k)
        cold.update({"w": weight}, k)
    # after 200 steps towards weights of 1: the plain average is still ~82% the starting weights
    assert cold.shadow["w"][0].item() == pytest.approx(1 - 0.999 ** 200, rel=1e-4)
    assert warm.shadow["w"][0].item() > 0.9


def test_weight_decay_spares_biases_norms_and_modulation():
    from model_helpers import tiny_model

    model = tiny_model()
    named = dict(model.named_parameters())
    spared = {n for n, p in named.items() if not decays(n, p)}
    assert "blocks.0.modulation" in spared and "head.modulation" in spared
    assert "blocks.0.self_attn.q.bias" in spared and "blocks.0.self_attn.norm_q.weight" in spared
    assert "blocks.0.self_attn.q.weight" not in spared and "patch_embedding.weight" not in spared
    decayed, kept = parameter_groups(named, 0.01)
    assert decayed["weight_decay"] == 0.01 and kept["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(kept["params"]) == len(named)


def group_backend_run(backend: str) -> list[float]:
    """Ranks.sum and a validation-style all-reduce of CPU tensors in a group made with `backend`."""
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        totals = torch.ones(3, dtype=torch.float64)
        dist.all_reduce(totals)  # as validate() does
        dist.barrier()
        # a Ranks that believes it has company takes the collective path, as every micro-batch does
        return Ranks(0, 2).sum(totals.tolist())
    finally:
        dist.destroy_process_group()


def test_the_cuda_process_group_reduces_cpu_tensors():
    """Builds the group exactly as the CUDA path does, with gloo standing in for NCCL (no GPU
    here): every collective on CPU tensors must have a backend."""
    cuda_backend = process_group_backend(use_cuda=True)
    assert "cpu:" in cuda_backend and "cuda:nccl" in cuda_backend
    assert group_backend_run(cuda_backend.replace("nccl", "gloo")) == [1.0, 1.0, 1.0]
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        group_backend_run("cuda:gloo")  # what "nccl" alone gives: the bug this guards against
    assert process_group_backend(use_cuda=False) == "gloo"
