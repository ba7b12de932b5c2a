"""What a GPU would wait for, seen on the CPU: a dispatch mode over fake 'cuda' tensors that
records every op which makes the host wait for the device (torch.cuda.set_sync_debug_mode
calls these synchronising) and every copy between host and device."""

import torch
from torch.utils._pytree import tree_leaves

from planning.imitation import CudaKernelsOnly


def _device_type(value) -> str | None:
    return None if value is None else torch.device(value).type


class HostSyncs(CudaKernelsOnly):
    """Records, while active, into `syncs`: a scalar read of a 'cuda' tensor (.item(),
    float(), bool(), tolist()), a copy from 'cuda' to the host, and a blocking copy from the
    host to 'cuda'; into `copies`: every copy between host and 'cuda' (a non-blocking one
    from pinned memory does not make the host wait, but it still is a host copy)."""

    def __init__(self):
        super().__init__()
        self.syncs, self.copies = [], []

    def clear(self) -> None:
        self.syncs, self.copies = [], []

    def _copy(self, name: str, source: str, target: str, non_blocking: bool) -> None:
        if source == target:
            return
        self.copies.append(f"{name} {source} -> {target}")
        if target == "cpu" or not non_blocking:
            self.syncs.append(f"{name} {source} -> {target}{'' if non_blocking else ' (blocking)'}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name == "aten::_local_scalar_dense" and args[0].device.type == "cuda":
            self.syncs.append(f"{name} (a scalar read)")
        elif name == "aten::_to_copy":
            target = _device_type(kwargs.get("device")) or args[0].device.type
            self._copy(name, args[0].device.type, target, bool(kwargs.get("non_blocking", False)))
        elif name == "aten::copy_":
            self._copy(name, args[1].device.type, args[0].device.type,
                       bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False)))
        elif name in ("aten::nonzero", "aten::masked_select", "aten::unique_dim", "aten::_unique2") and any(
                isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tree_leaves(args)):
            self.syncs.append(f"{name} (an output sized by values)")
        return super().__torch_dispatch__(func, types, args, kwargs)
