"""The CUDA code path on fake 'cuda' tensors: runs on any CPU, in CI.

The training step's forward (every strategy, with and without gradient checkpointing),
its gradient clipping and fused AdamW step, the latent-cache encoding (VAE + CLIP) and a
preview's sampling step and decode run with the settings a GPU gets (bf16 weights,
autocast_for's CUDA autocast, encoders in bf16). A tensor left on the CPU, an op without a
CUDA kernel or a layer left in float32 fails here.

What fake 'cuda' cannot cover (tests/test_cuda.py does, on a GPU):
- the backward: autograd's engine asks the CUDA driver for the device before running it,
  so the gradients, AccumulateGrad and gradient checkpointing's recomputation are not run
  (the planner runs them on the imitation, tests/test_planning.py);
- which attention kernel a GPU picks (without a device, the math backend runs here);
- numerics (fake tensors have no values), streams, pinned memory, DDP/FSDP, torch.compile.
"""

from contextlib import contextmanager

import pytest
import torch

from generation.bidirectional import decode_frames, sample_latents
from latents.encoders import encode_clip_batch
from planning.imitation import CudaKernelsOnly, cuda_autocast_without_gpu, fake_tensors
from planning.measure import materialise, meta_module
from training.flow_matching import batch_from_random_inputs, flow_matching_step, model_inputs, prepare_trainable
from wan.clip import CLIPVisionConfig, CLIPVisionTower
from wan.config import tiny_config
from wan.device import autocast_for, run_dtype
from wan.lora import LoRAConfig
from wan.model import STRATEGIES, WanModel, random_inputs
from wan.vae import VAEConfig, WanVAE

CUDA = torch.device("cuda")
LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)


@contextmanager
def layer_output_dtypes(*modules):
    """The dtypes the Linear and convolution layers of modules return meanwhile (the model's
    own float32 parts - time embedding, modulation, head - call F.linear, not the layers)."""
    dtypes = set()
    layers = [m for module in modules for m in module.modules() if isinstance(m, LAYERS)]
    hooks = [m.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype)) for m in layers]
    try:
        yield dtypes
    finally:
        for hook in hooks:
            hook.remove()


@pytest.fixture
def fake_cuda():
    with cuda_autocast_without_gpu(), fake_tensors(imitate_cuda=False, top_mode=CudaKernelsOnly()):
        yield


def cpu_batch(config, batch: int = 2) -> dict:
    """A micro-batch as the DataLoader gives it: on the CPU."""
    return batch_from_random_inputs(random_inputs(config, batch, 3, 4, 6))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_step_forward_and_optimizer_step_run_on_cuda(fake_cuda, strategy, checkpointing):
    config = tiny_config()
    model = materialise(meta_module(lambda: WanModel(config)), CUDA, run_dtype(CUDA))
    trainable = prepare_trainable(model, strategy, 1, LoRAConfig(4, 4.0, ("self_attn", "ffn")))
    model.set_gradient_checkpointing(checkpointing)
    inputs = model_inputs(cpu_batch(config), CUDA)
    sigma, noise = torch.rand(2), torch.randn(inputs["latents"].shape)  # on the CPU, as sample_noise draws them
    with layer_output_dtypes(model) as dtypes:
        losses = flow_matching_step(model, inputs, sigma, noise, autocast_for(CUDA))
    assert losses.device.type == "cuda" and losses.dtype == torch.float32 and losses.shape == (2,)
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    # the step after the backward, with the gradients it would leave
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
    assert norm.device.type == "cuda"
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-5, fused=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert all(t.device.type == "cuda" for state in optimizer.state.values() for t in state.values())


def test_a_tensor_left_on_the_cpu_fails(fake_cuda):
    config = tiny_config()
    model = materialise(meta_module(lambda: WanModel(config)), CUDA, run_dtype(CUDA))
    batch = cpu_batch(config)
    inputs = model_inputs(batch, CUDA)
    inputs["visual_context"] = batch["visual_context"]  # forgotten
    with pytest.raises(RuntimeError, match="devices"):
        flow_matching_step(model, inputs, torch.rand(2), torch.randn(batch["latents"].shape), autocast_for(CUDA))


def test_an_op_without_a_cuda_kernel_fails(fake_cuda):
    q = torch.randn(1, 2, 8, 16, device=CUDA, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="no CUDA kernel"):
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)


def test_the_cache_encoding_runs_on_cuda_in_bf16(fake_cuda):
    vae = materialise(meta_module(lambda: WanVAE(VAEConfig.tiny())), CUDA, run_dtype(CUDA)).requires_grad_(False)
    clip = materialise(meta_module(lambda: CLIPVisionTower(CLIPVisionConfig.tiny())), CUDA, run_dtype(CUDA))
    video = torch.empty(2, 3, 9, 32, 64)  # decoded frames, on the CPU
    with layer_output_dtypes(vae, clip) as dtypes:
        encoded = encode_clip_batch(vae.eval(), clip.eval(), video, torch.bfloat16)
    assert dtypes == {torch.bfloat16}
    assert len(encoded) == 2
    for item in encoded:
        assert {t.device.type for t in item.values()} == {"cpu"}
        assert item["latents"].shape == (16, 3, 4, 8) and item["latents"].dtype == torch.bfloat16
        assert item["visual_context"].shape == (CLIPVisionConfig.tiny().num_tokens, CLIPVisionConfig.tiny().width)


def test_a_preview_sampling_step_and_its_decode_run_on_cuda(fake_cuda):
    config = tiny_config()
    model = materialise(meta_module(lambda: WanModel(config)), CUDA, run_dtype(CUDA)).eval()
    vae = materialise(meta_module(lambda: WanVAE(VAEConfig.tiny())), CUDA, run_dtype(CUDA)).eval()
    batch = cpu_batch(config, batch=1)
    with layer_output_dtypes(model, vae) as dtypes:
        latents = sample_latents(
            model, batch["cond_concat"].to(CUDA), batch["visual_context"].to(CUDA), batch["keyboard"][0],
            batch["mouse"][0], 1, 5.0, torch.Generator().manual_seed(0), autocast_for(CUDA))
        frames = decode_frames(vae, latents)
    assert latents.device.type == "cuda" and latents.dtype == torch.float32
    assert dtypes == {torch.bfloat16}
    assert frames.device.type == "cpu" and frames.dtype == torch.float32 and frames.shape == (9, 3, 32, 48)
