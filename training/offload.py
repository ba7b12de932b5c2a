"""Frozen blocks in host memory: each block's frozen weights are copied to the GPU for the
block's forward (and its recomputation in the backward) and dropped after, so a 12-16 GB
card holds one or two blocks' frozen weights instead of all 30.

This saves memory only with gradient checkpointing: without it autograd keeps every
block's weights for the backward (the matmuls' input gradients need them), so the copies
would all stay alive. With it, a block's forward keeps nothing but its input, and the
recomputation's copies die with the block's backward.

On a GPU the next block's weights are copied on a side stream while the current block
computes (prefetching), so the compute stream never waits for PCIe unless the guess of
which block comes next was wrong: blocks run 0, 1, ... in the forward and back down in
the backward's recomputation (next_block). The prefetched block costs one more block's
frozen weights of GPU memory (the planner's imitation prefetches too, so it counts them).
On the CPU nothing moves.
"""

import torch

from wan.model import WanModel


def next_block(called: int, previous: int | None, direction: int, count: int) -> tuple[int, int]:
    """(the block expected after block `called`, the direction blocks now run in: +1 or -1),
    given the block called before it and the direction until then. Blocks run up in a
    forward and down in the backward's recomputation, which starts with the forward's last
    block again; so does the next forward with the backward's last (block 0)."""
    if previous is not None:
        if called == previous + 1:
            direction = 1
        elif called == previous - 1:
            direction = -1
        elif called == previous:
            direction = -direction
        else:
            direction = 1
    expected = called + direction
    return (expected if 0 <= expected < count else called), direction


class FrozenBlocksOffload:
    """Moves the frozen tensors of model.blocks to `host` (pinned when the model is on CUDA)
    and brings each block's back for the length of its call, prefetching the next block's on
    a GPU. The trained tensors stay where they are; parameter names and objects do not
    change (a block's parameters are host tensors between calls)."""

    def __init__(self, model: WanModel, host: torch.device):
        self.blocks = []
        device = torch.device("cpu")
        for index, block in enumerate(model.blocks):
            device = next(block.parameters()).device
            frozen = []
            for module in block.modules():
                for name, p in module._parameters.items():
                    if p is not None and not p.requires_grad:
                        on_host = torch.empty(p.shape, dtype=p.dtype, device=host, pin_memory=device.type == "cuda")
                        on_host.copy_(p.detach())
                        module._parameters[name] = torch.nn.Parameter(on_host, requires_grad=False)
                        frozen.append((module, name))
            block.forward = self._loading(index, block.forward, frozen, device)
            # a stream's context pass (CausalWanModel.prepare_cached) calls the block outside its forward
            block.context_kv = self._loading(index, block.context_kv, frozen, device)
            self.blocks.append((block, frozen))
        self.device = device
        # a GPU copies on a side stream; the planner's imitation of one (host "meta") copies in place
        self.prefetching = device.type == "cuda" or host.type == "meta"
        self.side = torch.cuda.Stream(device) if device.type == "cuda" and host.type == "cpu" else None
        self.prefetched = None  # (block index, its frozen tensors on the device, the copies' event)
        self.previous, self.direction = None, 1
        self.hits = self.misses = 0  # calls whose block was prefetched, and not

    def _on_device(self, index: int) -> list[torch.Tensor]:
        """Block index's frozen tensors on the device: the prefetched ones (the compute stream
        waits for their copies on the GPU, not the host), or copied now."""
        prefetched, self.prefetched = self.prefetched, None
        if prefetched is not None and prefetched[0] == index:
            self.hits += 1
            _, tensors, ready = prefetched
            if ready is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(ready)
                for tensor in tensors:  # made on the side stream, used on this one
                    tensor.record_stream(current)
            return tensors
        self.misses += 1
        return [module._parameters[name].to(self.device, non_blocking=True) for module, name in self.blocks[index][1]]

    def _prefetch(self, index: int) -> None:
        frozen = self.blocks[index][1]
        if self.side is None:
            self.prefetched = (index, [module._parameters[name].to(self.device, non_blocking=True)
                                       for module, name in frozen], None)
            return
        with torch.cuda.stream(self.side):
            tensors = [module._parameters[name].to(self.device, non_blocking=True) for module, name in frozen]
            ready = torch.cuda.Event()
            ready.record(self.side)
        self.prefetched = (index, tensors, ready)

    def _loading(self, index: int, forward, frozen: list, device: torch.device):
        """block.forward (or block.context_kv) with its frozen tensors on device for the call
        (and the next block's on their way). try/finally: the checkpoint's recomputation may
        stop a block part-way (by an exception), and the copies must not stay behind."""

        def call(*args, **kwargs):
            on_host = [module._parameters[name] for module, name in frozen]
            loaded = self._on_device(index) if self.prefetching else [p.to(device, non_blocking=True) for p in on_host]
            if self.prefetching:
                expected, self.direction = next_block(index, self.previous, self.direction, len(self.blocks))
                self.previous = index
                self._prefetch(expected)
            for (module, name), p in zip(frozen, loaded):
                module._parameters[name] = torch.nn.Parameter(p, requires_grad=False)
            try:
                return forward(*args, **kwargs)
            finally:
                for (module, name), p in zip(frozen, on_host):
                    module._parameters[name] = p

        return call

    def host_bytes(self) -> int:
        return sum(module._parameters[name].nbytes for _, frozen in self.blocks for module, name in frozen)
