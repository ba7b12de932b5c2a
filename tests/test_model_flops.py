import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_model import forward_flops
from model_helpers import tiny_model
from wan.model import random_inputs


@pytest.mark.parametrize("batch, size", [(1, (2, 4, 6)), (2, (3, 6, 4))])
def test_analytic_flops_equal_counted_matmul_flops(batch, size):
    # The benchmark's TFLOP/s rest on forward_flops; torch's counter sees every matmul,
    # convolution and attention call the model really makes (attention through the math
    # backend, whose matmuls it counts; the fused CPU kernel has no FLOP formula).
    model = tiny_model(seed=0, keyboard_dim=5)
    inputs = random_inputs(model.config, batch, *size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(**inputs)
    assert forward_flops(model.config, batch, *size) == counter.get_total_flops()
