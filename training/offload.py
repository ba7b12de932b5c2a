"""Frozen blocks in host memory: each block's frozen weights are copied to the GPU for the
block's forward (and its recomputation in the backward) and dropped after, so a 12-16 GB
card holds one or two blocks' frozen weights instead of all 30.

This saves memory only with gradient checkpointing: without it autograd keeps every
block's weights for the backward (the matmuls' input gradients need them), so the copies
would all stay alive. With it, a block's forward keeps nothing but its input, and the
recomputation's copies die with the block's backward.
"""

import torch

from wan.model import WanModel


class FrozenBlocksOffload:
    """Moves the frozen tensors of model.blocks to `host` (pinned when the model is on CUDA)
    and brings each block's back for the length of its call. The trained tensors stay where
    they are; parameter names and objects do not change (a block's parameters are host
    tensors between calls)."""

    def __init__(self, model: WanModel, host: torch.device):
        self.blocks = []
        for block in model.blocks:
            device = next(block.parameters()).device
            frozen = []
            for module in block.modules():
                for name, p in module._parameters.items():
                    if p is not None and not p.requires_grad:
                        on_host = torch.empty(p.shape, dtype=p.dtype, device=host, pin_memory=device.type == "cuda")
                        on_host.copy_(p.detach())
                        module._parameters[name] = torch.nn.Parameter(on_host, requires_grad=False)
                        frozen.append((module, name))
            block.forward = self._loading(block, block.forward, frozen, device)
            self.blocks.append((block, frozen))

    @staticmethod
    def _loading(block, forward, frozen: list, device: torch.device):
        """block.forward with its frozen tensors on device for the call. try/finally: the
        checkpoint's recomputation may stop a block part-way (by an exception), and the
        copies must not stay behind."""

        def call(*args, **kwargs):
            on_host = [module._parameters[name] for module, name in frozen]
            for (module, name), p in zip(frozen, on_host):
                module._parameters[name] = torch.nn.Parameter(p.to(device, non_blocking=True), requires_grad=False)
            try:
                return forward(*args, **kwargs)
            finally:
                for (module, name), p in zip(frozen, on_host):
                    module._parameters[name] = p

        return call

    def host_bytes(self) -> int:
        return sum(module._parameters[name].nbytes for _, frozen in self.blocks for module, name in frozen)
