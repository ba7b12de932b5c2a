"""Several GPUs (torchrun): this process's rank, the process group, and how the model is
wrapped - DDP for the partial strategies, FSDP for "full" - plus whole-tensor gathering
and scattering for saving and resuming on any number of ranks."""

import datetime
import os
import sys
import traceback
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from wan.device import pick_device
from wan.model import WanModel


class Ranks:
    """This process's place among the training processes (one of one without torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.main = rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def process_group_backend(use_cuda: bool) -> str:
    """NCCL for CUDA tensors and gloo for CPU ones: the loss sums and validation totals are
    all-reduced as CPU tensors, and a group made with "nccl" alone has no backend for the
    CPU (every multi-GPU step would fail with "No backend type associated with device
    type cpu")."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_ranks(device_setting: str) -> tuple[Ranks, torch.device]:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: join the process group (NCCL for CUDA
    tensors, gloo for CPU ones) and take this rank's GPU. Without them: one process on
    pick_device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    picked = pick_device(device_setting)  # checks the setting on every path
    if world == 1:
        return Ranks(), picked
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = picked.type == "cuda"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(use_cuda), timeout=datetime.timedelta(minutes=30))
    return Ranks(dist.get_rank(), world, local_rank), device


def sharded(strategy: str, shard_model: bool, world: int) -> bool:
    """Whether several ranks train with FSDP: always for "full", for the others on request."""
    return world > 1 and (strategy == "full" or shard_model)


def wrap_for_ranks(model: WanModel, shard: bool, ranks: Ranks, device: torch.device, use_bf16: bool):
    """The module the training forward goes through. Partial strategies: DDP (frozen tensors
    are left out of its gradient buckets; find_unused_parameters because the action module's
    four norm weights are never used, as in the reference). shard (see sharded): FSDP shards
    parameters, gradients and optimizer state, computing in bf16 and reducing gradients in
    float32 (frozen tensors are sharded too, and get no gradient)."""
    if ranks.world == 1:
        return model
    if shard:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16 else None, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        # The root reshards after forward too: a no-grad forward (validation, previews) must not
        # leave unsharded parameters in place of the ones the optimizer holds.
        fully_shard(model, mp_policy=policy, reshard_after_forward=True)
        if hasattr(model, "forward_cached"):  # the streaming student's block-by-block forwards gather too
            register_fsdp_forward_method(model, "forward_cached")
            for block in model.blocks:  # and so does a stream's context pass, block by block
                register_fsdp_forward_method(block, "context_kv")
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def gradient_sync(wrapped, model: WanModel, enabled: bool):
    """Let the last micro-batch of a step all-reduce the gradients, not the others."""
    if isinstance(wrapped, DistributedDataParallel):
        return nullcontext() if enabled else wrapped.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def full_tensors(named: dict, main: bool) -> dict:
    """Whole CPU tensors on the main rank (FSDP shards are gathered; every rank must call)."""
    out = {}
    for name, t in named.items():
        t = t.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if main:
            out[name] = t.cpu().clone()
    return out


@torch.no_grad()
def load_full_tensors(targets: dict, tensors: dict) -> None:
    """Copy whole tensors into parameters or EMA shadows, sharding them like the target."""
    for name, target in targets.items():
        full = tensors[name].to(target.device if not isinstance(target, DTensor) else target.to_local().device)
        if isinstance(target, DTensor):
            full = distribute_tensor(full, target.device_mesh, target.placements)
        target.copy_(full)


def end_with_error(error: BaseException, ranks: "Ranks", expected: tuple) -> int:
    """A trainer script's failure: an expected error (bad input, a named problem) prints
    its message, anything else its traceback too, and the script exits 1. On one process an
    unexpected error is re-raised instead (its traceback is the report). On several ranks
    the process leaves at once: the others may wait in a collective for this one, and
    torchrun stops them, rather than all hanging in a clean shutdown. Call from an except
    block."""
    is_expected = isinstance(error, expected)
    if ranks.world == 1 and not is_expected:
        raise
    where = f" (rank {ranks.rank} of {ranks.world})" if ranks.world > 1 else ""
    if not is_expected:
        traceback.print_exc()
    print(f"error{where}: {error if is_expected else f'{type(error).__name__}: {error}'}", file=sys.stderr,
          flush=True)
    if ranks.world > 1:
        os._exit(1)
    return 1
