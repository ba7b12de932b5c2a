"""The CUDA path (bf16 autocast, bf16 frozen weights with float32 masters, fused AdamW,
encoders in bf16), run where a GPU is present; skipped on CPU-only machines such as CI."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_base_model as fb
from wan.clip import load_clip
from wan.loading import load_base_model
from wan.vae import load_vae

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_training_on_cuda_in_bf16(tiny_assets, tmp_path):
    s = dict(tiny_assets, CHECKPOINT_DIR=str(tmp_path / "checkpoints"), DEVICE="cuda", MIXED_PRECISION="bf16",
             TRAINING_STRATEGY="action_only", NUM_EPOCHS=2, NUM_WORKERS=0, GRADIENT_CHECKPOINTING=True,
             PREVIEW_EVERY_EPOCHS=1, PREVIEW_STEPS=2, CACHE_DIR=str(tmp_path / "cache"))
    fb.check_settings(s)
    summary = fb.train(s)
    info = (tmp_path / "checkpoints" / fb.INFO_FILE).read_text()
    assert "bf16 autocast, float32 master weights" in info and "peak GPU memory" in info
    assert summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"] * 1.5
    final = load_file(tmp_path / "checkpoints" / fb.FINAL_FILE)
    base = load_file(next(Path(s["BASE_MODEL_DIR"]).glob("*.safetensors")))
    for name, tensor in final.items():
        if ".action_model." in name:
            assert tensor.dtype == torch.float32  # trained in float32 masters
        else:
            assert torch.equal(tensor.float(), base[name].to(torch.bfloat16).float()), name  # frozen, bf16


def test_bf16_model_on_cuda_matches_float32_on_cpu(tiny_assets):
    from wan.model import random_inputs
    cpu, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"])
    gpu, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"], device="cuda", dtype=torch.bfloat16)
    inputs = random_inputs(cpu.config, 2, 3, 4, 6)
    with torch.no_grad():
        expected = cpu(**inputs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = gpu(**{k: v.cuda() if v is not None else None for k, v in inputs.items()}).cpu()
    assert (got - expected).norm() / expected.norm() < 0.03


def test_encoders_in_bf16_on_cuda_match_float32_on_cpu(tiny_assets):
    video = torch.rand(1, 3, 9, 32, 64) * 2 - 1
    for load, run in ((load_vae, lambda m, v: m.encode(v)), (load_clip, lambda m, v: m.encode_frames(v[:, :, 0]))):
        cpu = load(tiny_assets["VAE_PATH" if load is load_vae else "CLIP_PATH"])
        gpu = load(tiny_assets["VAE_PATH" if load is load_vae else "CLIP_PATH"], device="cuda", dtype=torch.bfloat16)
        expected = run(cpu, video).float()
        got = run(gpu, video.cuda().to(torch.bfloat16)).float().cpu()
        assert (got - expected).norm() / expected.norm() < 0.05


def test_streaming_student_in_bf16_on_cuda_matches_float32_on_cpu():
    from generation.streaming import StreamingGenerator, block_action_chunks
    from model_helpers import tiny_causal_model
    from test_streaming_model import block_timesteps, run_stream
    from wan.model import random_inputs
    from wan.vae import StreamingDecoder, VAEConfig, WanVAE

    cpu = tiny_causal_model(seed=0, local_attn_size=4).eval()
    gpu = tiny_causal_model(seed=0, local_attn_size=4).eval().to("cuda", torch.bfloat16)
    inputs = random_inputs(cpu.config, 2, 9, 4, 6)
    t = block_timesteps(2, 3, seed=1)
    with torch.no_grad():
        expected = run_stream(cpu, inputs, t)
        got = run_stream(gpu, {k: v.cuda() for k, v in inputs.items()}, t.cuda()).cpu()
    assert (got - expected).norm() / expected.norm() < 0.03
    vae = WanVAE(VAEConfig.tiny()).to("cuda", torch.float16).eval()
    generator = StreamingGenerator(gpu, inputs["cond_concat"], inputs["visual_context"], StreamingDecoder(vae))
    blocks = list(generator.stream(block_action_chunks(inputs["keyboard_cond"], inputs["mouse_cond"], 3)))
    assert [b.video.shape[2] for b in blocks] == [9, 12, 12]
    assert all(torch.isfinite(b.video).all() and b.video.device.type == "cuda" for b in blocks)


def test_the_compiled_stream_on_cuda_computes_what_the_eager_one_does():
    """COMPILE=reduce-overhead (inductor + CUDA graphs) against eager, bf16, 5 blocks: the
    graphs of the first two blocks, then replays."""
    from generation.streaming import StreamingGenerator
    from model_helpers import tiny_causal_model
    from wan.model import random_inputs

    model = tiny_causal_model(seed=0, local_attn_size=6).eval().to("cuda", torch.bfloat16)
    inputs = random_inputs(model.config, 1, 15, 4, 6, device="cuda")

    def stream(mode):
        generator = StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"], compile_mode=mode)
        actions = [(torch.eye(4)[[b % 4]], torch.tensor([[0.0, 0.1]])) for b in range(5)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.cat([generator.step(*a).latents.clone() for a in actions], dim=2)

    torch._dynamo.reset()
    eager, compiled = stream("off"), stream("reduce-overhead")
    assert torch.isfinite(compiled).all()
    assert (compiled - eager).norm() / eager.norm() < 0.02


def test_offloaded_frozen_blocks_prefetched_on_a_side_stream_train_exactly_as_resident_ones():
    from model_helpers import tiny_model
    from training.flow_matching import batch_from_random_inputs
    from training.recipe import TrainingRecipe
    from wan.model import random_inputs

    settings = dict(LEARNING_RATE=1e-3, WEIGHT_DECAY=0.01, MAX_GRAD_NORM=1.0, EMA_DECAY=0.0, EMA_WARMUP=True,
                    LAST_LAYERS=1, GRAD_ACCUM_STEPS=1, GRADIENT_CHECKPOINTING=True, SEED=0, LORA_RANK=4,
                    LORA_ALPHA=4.0, LORA_TARGETS=("self_attn", "ffn"), LORA_DROPOUT=0.0, LORA_HEAD=False,
                    TRAINING_STRATEGY="lora")

    def run(offload_frozen: bool):
        recipe, model = TrainingRecipe(), tiny_model(seed=0, num_layers=4).to("cuda")
        trainable = recipe.prepare(model, dict(settings, OFFLOAD_FROZEN=offload_frozen))
        model.set_gradient_checkpointing(True)
        offload = recipe.offload(model, dict(settings, OFFLOAD_FROZEN=offload_frozen), torch.device("cpu"))
        optimizer = recipe.make_optimizer(trainable, settings, torch.device("cuda"), torch.device("cpu"))
        inputs = batch_from_random_inputs(random_inputs(model.config, 2, 3, 4, 4, device="cuda"))
        g = torch.Generator().manual_seed(1)
        losses = []
        for step in range(3):
            sigma, noise = torch.rand(2, generator=g), torch.randn(inputs["latents"].shape, generator=g)
            losses.append(recipe.micro_batch(model, optimizer, inputs, sigma.cuda(), noise.cuda(),
                                             torch.autocast("cuda", dtype=torch.bfloat16), 0.5).detach())
            recipe.clip_gradients_on_device(optimizer, trainable, settings)
            recipe.optimizer_step(optimizer, None, trainable, step)
        return torch.stack(losses), {n: p.detach().clone() for n, p in trainable.items()}, offload

    plain_losses, plain, _ = run(False)
    offloaded_losses, offloaded, offload = run(True)
    assert offload.hits > 0 and offload.misses == 1
    assert torch.equal(plain_losses, offloaded_losses)
    assert all(torch.equal(plain[n], offloaded[n]) for n in plain)


def test_the_offloaded_optimizer_copies_every_gradient_before_it_steps():
    from training.optim import OffloadedOptimizer, build_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 256, device="cuda")) for _ in range(6)]
    reference = [p.detach().cpu().clone().requires_grad_() for p in params]
    optimizer = OffloadedOptimizer([{"params": params, "weight_decay": 0.0}],
                                   lambda groups: build_optimizer(groups, "adamw", 1e-2, torch.device("cpu")),
                                   torch.device("cpu"), pin=True)
    on_host = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        for p, r in zip(params, reference):
            r.grad = torch.randn(p.shape) * 10
            p.grad = r.grad.to("cuda", non_blocking=True)
        torch.cuda._sleep(200_000_000)  # the GPU busy: without the step's wait the host would read stale gradients
        optimizer.step()
        on_host.step()
    assert all(torch.equal(p.cpu(), r.detach()) for p, r in zip(params, reference))
