"""Count the device memory a run holds, tensor by tensor, as the CUDA caching allocator does,
and the FLOPs it computes.

MemoryTracker is a dispatch mode entered above a FakeTensorMode: it sees every op's outputs,
adds each new storage's size (rounded up to the allocator's 512-byte blocks) when it appears
and subtracts it when the storage dies (a weakref callback), so `peak` is what
torch.cuda.max_memory_allocated() would report for the same code on a GPU. Every storage
carries a label - what it is (weights, gradients, ...) or the phase that made it - and the
labels' totals are kept at the peak, which gives the breakdown.

FLOPs are counted with torch.utils.flop_counter's formulas (matmuls, convolutions,
attention), op by op as they run: a checkpointed block's recomputation counts again.
(FlopCounterMode itself is not used: its module tracker keeps the backward's tensors alive.)

Not counted (the caller states it): the CUDA context, the caching allocator's reserve and
fragmentation, cuBLAS/cuDNN workspaces and the scratch memory of fused kernels.
"""

import weakref
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from planning.imitation import ScalarReadsAnswered

ALLOCATION_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of this

WEIGHTS = "weights"
OPTIMIZER_STATE = "optimizer state"
GRADIENTS = "gradients"
ACTIVATIONS = "activations"
WEIGHT_COPIES = "autocast weight copies"
BACKWARD = "backward temporaries"
OPTIMIZER_STEP = "optimizer-step temporaries"
INPUTS = "inputs and tables"
LABELS = (WEIGHTS, OPTIMIZER_STATE, GRADIENTS, ACTIVATIONS, WEIGHT_COPIES, BACKWARD, OPTIMIZER_STEP, INPUTS)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# The CPU's flash attention, which the imitation runs, has no formula in torch's counter.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def flop_formulas() -> dict:
    """{op packet: formula(*args, out_val=out, **kwargs) -> FLOPs}: torch's, plus CPU_ATTENTION_FLOPS."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS).flop_registry


def allocated_bytes(nbytes: int) -> int:
    """What the caching allocator hands out for a tensor of nbytes (nothing for an empty one)."""
    return -(-nbytes // ALLOCATION_BLOCK) * ALLOCATION_BLOCK


def in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread."""
    return torch._C._current_graph_task_id() != -1


class MemoryTracker(ScalarReadsAnswered):
    """Live and peak bytes of one device's storages, by label (see LABELS).

    New storages take the label of the current phase (`with tracker.phase(ACTIVATIONS):`),
    except those made inside a backward (BACKWARD) and lower-precision copies of weights
    (WEIGHT_COPIES). track() labels tensors that exist already or change role (weights,
    optimizer state, gradients). Only storages on `device` count.
    """

    def __init__(self, device: torch.device, count_flops: bool = False):
        super().__init__()
        self.device = torch.device(device)
        self.flops = 0
        self._flop_formulas = flop_formulas() if count_flops else {}
        self.label = INPUTS
        self.current = 0
        self.by_label = Counter()
        self.peak = 0
        self.peak_by_label = Counter()
        self.peak_op = ""
        self.at_backward_start = None  # by_label when the first backward op ran
        self._live = {}  # id(storage) -> [bytes, label, weakref]

    # --- labels

    @contextmanager
    def phase(self, label: str):
        previous, self.label = self.label, label
        try:
            yield self
        finally:
            self.label = previous

    def track(self, tensors, label: str) -> None:
        """Count these tensors' storages (if not yet) under label."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._note(t, label, relabel=True)

    def forget(self, tensors) -> None:
        """Stop counting these tensors, which have lived since reset_peak() but which the real
        run would not hold: out of the live bytes, the peak and its breakdown alike."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor) and t.device == self.device:
                entry = self._live.pop(id(t.untyped_storage()), None)
                if entry is not None:
                    nbytes, label, _ = entry
                    self.current -= nbytes
                    self.by_label[label] -= nbytes
                    self.peak -= nbytes
                    self.peak_by_label[label] -= nbytes

    def label_of(self, tensor) -> str | None:
        """The label tensor's storage is counted under (None: not counted)."""
        if not isinstance(tensor, torch.Tensor) or tensor.device != self.device:
            return None
        entry = self._live.get(id(tensor.untyped_storage()))
        return entry[1] if entry else None

    def reset_peak(self) -> None:
        self.peak, self.peak_by_label, self.peak_op = self.current, Counter(self.by_label), "(before the run)"
        self.at_backward_start = None
        self.flops = 0

    def live_bytes(self, label: str | None = None) -> int:
        return self.current if label is None else self.by_label[label]

    # --- bookkeeping

    def _note(self, tensor: torch.Tensor, label: str, relabel: bool = False, op: str = "") -> None:
        if tensor.device != self.device:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None:
            if relabel and entry[1] != label:
                self.by_label[entry[1]] -= entry[0]
                self.by_label[label] += entry[0]
                entry[1] = label
            return
        nbytes = allocated_bytes(storage.nbytes())
        self._live[key] = [nbytes, label, weakref.ref(storage, lambda _, key=key: self._free(key))]
        self.current += nbytes
        self.by_label[label] += nbytes
        if self.current > self.peak:
            self.peak, self.peak_by_label, self.peak_op = self.current, Counter(self.by_label), op

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is None:  # forgotten
            return
        nbytes, label, _ = entry
        self.current -= nbytes
        self.by_label[label] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.answer(func, args, kwargs)
        formula = self._flop_formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        backward = in_backward()
        if backward and self.at_backward_start is None:
            self.at_backward_start = Counter(self.by_label)
        label = BACKWARD if backward else self.label
        if func is torch.ops.aten._to_copy.default and self.label_of(args[0]) == WEIGHTS:
            label = WEIGHT_COPIES
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._note(t, label, op=f"{func}" + (" (backward)" if backward else ""))
        return out
