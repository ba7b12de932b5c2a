"""Run the real code's CUDA path on fake tensors, without a GPU.

FakeTensorMode runs every op for its shapes, dtypes and devices only: no memory, no
arithmetic. A fake 'cuda' run is not enough for a training step, for two reasons:

- autograd's engine asks the CUDA driver about the device before it runs a backward over
  'cuda' tensors ("hasPrimaryContext expects a valid device index"), so only forwards run;
- without a device to ask, scaled_dot_product_attention takes the math backend, which
  builds the L x L score matrix (8.4 GB per call at 13,200 tokens) that a GPU's flash or
  cuDNN kernel never holds.

So the planner stands fake 'cpu' tensors in for the GPU: the CPU's fused attention saves
what flash attention saves (the output and a float32 logsumexp), and while
cuda_autocast_rules_on_cpu() is active the CPU's autocast follows the CUDA rules. Those
differ: CUDA runs layer_norm, softmax, sum, pow, rsqrt ... in float32, while the CPU list
keeps them in bf16 and casts cat/stack inputs instead. tests/test_planning.py compares the
imitation's ops, dtypes and shapes with a fake 'cuda' forward, op for op.

Data-dependent reads (`.item()`, `if tensor:`) have no value on fake tensors;
ScalarReadsAnswered answers them with zero / False. The paths planned here only use them
for input range checks and the Euler sampler's step sizes.
"""

import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wan.action import action_tables
from wan.device import AUTOCAST_SETTINGS
from wan.rope import video_rope_table

IMITATED_DEVICE = torch.device("cpu")
# Tables memoised per (shape, device): a fake run must neither use real ones nor leave fake ones.
TABLE_CACHES = (video_rope_table, action_tables)

# The CUDA autocast policy of every op AutocastCUDA registers (PyTorch's
# aten/src/ATen/autocast_mode.h op lists; rms_norm, linalg_matrix_sqrth, _cudnn_rnn and the
# cudnn convolutions are registered in autocast_mode.cpp / checked on fake 'cuda' tensors).
# A torch upgrade that registers an op missing here fails tests/test_planning.py.
_CUDA_LOWER = """_convolution _convolution.deprecated conv1d conv2d conv3d conv_tbc conv_transpose1d
    conv_transpose2d.input conv_transpose3d.input convolution prelu addmm addmv addr matmul einsum mm mv
    linalg_vecdot linear addbmm baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell
    _thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention
    scaled_dot_product_attention cudnn_convolution cudnn_convolution_transpose _cudnn_rnn"""
_CUDA_FP32 = """acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar
    pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm group_norm frobenius_norm.dim
    nuclear_norm nuclear_norm.dim cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d
    hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss
    multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits
    dist pdist cdist renorm logsumexp upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d
    _upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d
    _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa rms_norm
    linalg_matrix_sqrth"""
_CUDA_FP32_SET_OPT_DTYPE = """prod prod.dim_int prod.dim_Dimname softmax.int softmax.Dimname log_softmax.int
    log_softmax.Dimname cumprod cumprod.dimname cumsum cumsum.dimname linalg_vector_norm linalg_matrix_norm
    linalg_matrix_norm.str_ord sum sum.dim_IntList sum.dim_DimnameList"""
_CUDA_FP32_APPEND_DTYPE = "norm.Scalar norm.ScalarOpt_dim norm.names_ScalarOpt_dim"
_CUDA_PROMOTE = "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add"
CUDA_AUTOCAST_POLICY = {
    **{name: "lower_precision" for name in _CUDA_LOWER.split()},
    **{name: "fp32" for name in _CUDA_FP32.split()},
    **{name: "fp32_set_opt_dtype" for name in _CUDA_FP32_SET_OPT_DTYPE.split()},
    **{name: "fp32_append_dtype" for name in _CUDA_FP32_APPEND_DTYPE.split()},
    **{name: "promote" for name in _CUDA_PROMOTE.split()},
    "binary_cross_entropy": "banned",
}
# Ops the CPU's autocast already runs in lower precision, as CUDA's does: their native
# kernels stay (they keep autocast's weight cache); every other op either list names gets
# a Python kernel with the CUDA policy, or none ("passthrough") if CUDA leaves it alone.
CPU_LOWER_PRECISION = """conv1d conv1d.padding conv2d conv2d.padding conv3d conv3d.padding bmm mm linalg_vecdot
    baddbmm addmm _addmm_activation addbmm linear _convolution.deprecated matmul conv_tbc mkldnn_rnn_layer
    conv_transpose1d conv_transpose2d.input conv_transpose3d.input prelu scaled_dot_product_attention
    _native_multi_head_attention""".split()
_NORM_WITH_DTYPE = {"Scalar": "ScalarOpt_dtype", "ScalarOpt_dim": "ScalarOpt_dim_dtype",
                    "names_ScalarOpt_dim": "names_ScalarOpt_dim_dtype"}
_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def registered_autocast_ops(dispatch_key: str) -> set[str]:
    """Names ("layer_norm", "pow.Scalar") of the aten ops with a kernel for an autocast key."""
    names = torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
    return {name.removeprefix("aten::") for name in names if name.startswith("aten::")}


def cpu_autocast_overrides() -> dict[str, str]:
    """{op name: policy} for the AutocastCPU kernels that make the CPU follow CUDA's rules."""
    cuda_ops = registered_autocast_ops("AutocastCUDA")
    unknown = sorted(cuda_ops - set(CUDA_AUTOCAST_POLICY))
    if unknown:
        raise RuntimeError(f"torch {torch.__version__} autocasts {unknown} on CUDA, which planning/imitation.py "
                           "has no policy for: add them to CUDA_AUTOCAST_POLICY (see PyTorch's autocast_mode.h)")
    keep = set(CPU_LOWER_PRECISION) & {n for n in cuda_ops if CUDA_AUTOCAST_POLICY[n] == "lower_precision"}
    overrides = {name: CUDA_AUTOCAST_POLICY[name] for name in cuda_ops - keep}
    overrides.update({name: "passthrough" for name in registered_autocast_ops("AutocastCPU") - cuda_ops})
    return overrides


def _eligible(value) -> bool:
    """What autocast casts: floating tensors of the autocast device, never float64."""
    return (isinstance(value, torch.Tensor) and value.device.type == IMITATED_DEVICE.type
            and value.is_floating_point() and value.dtype != torch.float64)


def _cast(value, dtype: torch.dtype):
    if _eligible(value):
        return value if value.dtype == dtype else value.to(dtype)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _cast_arguments(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Cast every eligible argument, last to first: the order in which the compiled wrappers'
    casts run (their call arguments are evaluated right to left), so that traces match op for op."""
    kwargs = dict(reversed([(k, _cast(v, dtype)) for k, v in reversed(kwargs.items())]))
    return tuple(reversed([_cast(a, dtype) for a in reversed(args)])), kwargs


def _promoted_dtype(values, lower: torch.dtype) -> torch.dtype:
    """The widest floating dtype among the eligible arguments: float32 wins over lower."""
    dtype = lower
    for value in values:
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for t in tensors:
            if _eligible(t):
                if t.dtype == torch.float32:
                    dtype = torch.float32
                elif t.dtype != lower:
                    raise RuntimeError(f"autocast to {lower} met a {t.dtype} tensor (CUDA refuses it too)")
    return dtype


def _with_dtype_argument(op, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Set the op's optional `dtype` argument to dtype unless the caller gave one."""
    arguments = op._schema.arguments
    index = next(i for i, a in enumerate(arguments) if a.name == "dtype")
    if arguments[index].kwarg_only:
        if kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": dtype}
        return args, kwargs
    args = list(args) + [arguments[i].default_value for i in range(len(args), index + 1)]
    if args[index] is None:
        args[index] = dtype
    return tuple(args), kwargs


def _autocast_kernel(name: str, policy: str):
    base, _, overload = name.partition(".")
    op = getattr(getattr(torch.ops.aten, base), overload or "default")

    def kernel(*args, **kwargs):
        target = op
        if policy == "banned":
            raise RuntimeError(f"aten::{name} is unsafe to autocast (CUDA refuses it); use its *_with_logits form")
        if policy == "lower_precision":
            args, kwargs = _cast_arguments(args, kwargs, torch.get_autocast_dtype(IMITATED_DEVICE.type))
        elif policy == "fp32":
            args, kwargs = _cast_arguments(args, kwargs, torch.float32)
        elif policy == "fp32_set_opt_dtype" and _eligible(args[0]):
            args, kwargs = _with_dtype_argument(op, args, kwargs, torch.float32)
        elif policy == "fp32_append_dtype":
            target = getattr(torch.ops.aten.norm, _NORM_WITH_DTYPE[overload])
            kwargs = {**kwargs, "dtype": torch.float32 if _eligible(args[0]) else args[0].dtype}
        elif policy == "promote":
            dtype = _promoted_dtype([*args, *kwargs.values()], torch.get_autocast_dtype(IMITATED_DEVICE.type))
            args, kwargs = _cast_arguments(args, kwargs, dtype)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return target(*args, **kwargs)

    return kernel


@contextmanager
def cuda_autocast_without_gpu():
    """Let torch.autocast("cuda") (so autocast_for(cuda)) work without a GPU, for fake 'cuda'
    runs: it otherwise warns "CUDA is not available" and disables itself."""
    common = torch.cuda.amp.common
    saved = common.amp_definitely_not_available, torch.cuda.is_bf16_supported
    common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: True
    try:
        yield
    finally:
        common.amp_definitely_not_available, torch.cuda.is_bf16_supported = saved


@contextmanager
def cuda_autocast_rules_on_cpu():
    """While active, torch.autocast("cpu") casts as torch.autocast("cuda") does.

    Except for the ops both run in lower precision (native kernels, weight cache included),
    the casts of the Python kernels are not cached: autocast only caches lower-precision
    copies of float32 leaf weights, so this matters only for weights passed to an op that
    CUDA runs in lower precision and the CPU does not (einsum, mv, ...; none in this project).
    """
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose
            for name, policy in sorted(cpu_autocast_overrides().items()):
                library.impl(name, _autocast_kernel(name, policy), "AutocastCPU")
        yield
    finally:
        library._destroy()


def imitated_autocast(enabled: bool):
    """The autocast the GPU would train under (wan/device.py's settings), on the imitation."""
    return torch.autocast(IMITATED_DEVICE.type, **AUTOCAST_SETTINGS) if enabled else nullcontext()


class ScalarReadsAnswered(TorchDispatchMode):
    """Answer data-dependent scalar reads of fake tensors with zero (False for bools).

    Must be entered after (above) the FakeTensorMode. Reads the fake mode can answer (from
    tensors made of Python constants) keep their real value.
    """

    def __init__(self):
        super().__init__()
        self.answered = 0

    def answer(self, func, args, kwargs):
        if func is torch.ops.aten._local_scalar_dense.default:
            try:
                return func(*args, **kwargs)
            except DataDependentOutputException:
                self.answered += 1
                dtype = args[0].dtype
                return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.answer(func, args, kwargs or {})


class CudaKernelsOnly(ScalarReadsAnswered):
    """Fail any op on fake 'cuda' tensors that has no CUDA kernel (a CPU-only op would pass
    a fake run unnoticed: fake tensors run every op's meta function, whatever the device)."""

    KERNEL_KEYS = ("CUDA", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional",
                   "CompositeImplicitAutograd")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("aten::") and any(isinstance(t, torch.Tensor) and t.device.type == "cuda"
                                             for t in tree_leaves((args, kwargs))):
            if not any(torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for key in self.KERNEL_KEYS):
                raise RuntimeError(f"{name} has no CUDA kernel, but it was called on CUDA tensors")
        return self.answer(func, args, kwargs)


@contextmanager
def fake_tensors(imitate_cuda: bool = True, top_mode: ScalarReadsAnswered | None = None):
    """A FakeTensorMode for a planning run: tensors made inside are fake, on any device.

    With imitate_cuda, the CPU's autocast follows the CUDA rules meanwhile. top_mode (a
    MemoryTracker, say) is entered above the fake mode in place of a plain
    ScalarReadsAnswered; yields it. The memoised RoPE and action tables are cleared before
    and after, so that fake and real tables never meet. Real tensors that reach fake code
    (module constants, meta-built modules' values) are converted on the fly.
    """
    for cache in TABLE_CACHES:
        cache.cache_clear()
    top_mode = top_mode or ScalarReadsAnswered()
    try:
        with (FakeTensorMode(allow_non_fake_inputs=True), cuda_autocast_rules_on_cpu() if imitate_cuda
              else nullcontext(), top_mode):
            yield top_mode
    finally:
        for cache in TABLE_CACHES:
            cache.cache_clear()
