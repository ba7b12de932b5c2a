"""Measure a training step, a latent-cache encoding and a preview on fake tensors.

Each function builds what the GPU would hold (the model in its dtype, the optimizer with
its state, the encoders) on the imitated device, runs the real code under a
MemoryTracker and returns the peak with its breakdown. Nothing is allocated: the 1.8B
model costs seconds of Python, not gigabytes. What the real code keeps in host memory
(decoded frames, the CPU-side action rows) is made on HOST, which is not counted.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from planning import memory
from planning.imitation import IMITATED_DEVICE, fake_tensors, imitated_autocast
from planning.memory import MemoryTracker
from generation.bidirectional import decode_frames, sample_latents
from latents.cache import CACHE_DTYPES
from latents.encoders import encode_clip_batch
from training.flow_matching import batch_from_random_inputs
from training.recipe import TrainingRecipe
from wan.action import action_tables
from wan.clip import CLIPVisionConfig, CLIPVisionTower
from wan.conditioning import build_cond_concat, build_visual_context
from wan.config import WanConfig
from wan.device import run_dtype
from wan.model import WanModel, random_inputs
from wan.rope import video_rope_table
from wan.shapes import latent_frame_count, latent_size, tokens_per_latent_frame
from wan.vae import VAEConfig, WanVAE

HOST = torch.device("meta")  # stands for host memory: fake tensors there are not counted
GPU_DTYPE = run_dtype(torch.device("cuda"))  # the encoders' and frozen weights' dtype on a GPU


@dataclass
class Measurement:
    """The peak of one measured run, with bytes by memory.LABELS at the moment of the peak."""

    peak: int
    breakdown: dict
    peak_op: str             # the op whose output made the peak ("... (backward)" inside one)
    flops: int = 0
    flops_by_part: dict = field(default_factory=dict)


@dataclass
class StepMeasurement(Measurement):
    strategy: str = ""
    checkpointing: bool = True
    batch: int = 1
    latent_frames: int = 1
    tokens: int = 0                  # batch x tokens per sample
    saved_activations: int = 0       # activations alive when the backward starts
    trainable_parameters: int = 0
    total_parameters: int = 0


def meta_module(build):
    """A module's structure without values. Built outside the fake mode: initialising meta
    tensors costs nothing, fake ones a Python call per op."""
    with torch.device("meta"):
        return build()


def materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Give every parameter an uninitialised tensor (fake, inside a fake mode) of dtype on
    device, as load_base_model / load_vae / load_clip leave them: one dtype throughout."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                           requires_grad=p.requires_grad)
    return module


def training_inputs(config: WanConfig, batch: int, latent_frames: int, latent_height: int, latent_width: int,
                    device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A micro-batch as model_inputs() puts it on the device: (inputs, sigma, noise)."""
    inputs = batch_from_random_inputs(random_inputs(config, batch, latent_frames, latent_height, latent_width,
                                                    device=device))
    return inputs, torch.rand(batch, device=device), torch.randn_like(inputs["latents"])


def build_tables(config: WanConfig, latent_frames: int, latent_height: int, latent_width: int, device) -> None:
    """The RoPE and action tables the first step builds and every later step reuses."""
    video_rope_table(latent_frames, latent_height // 2, latent_width // 2, config.head_dim, device)
    action_tables(config.action_config, latent_frames, device)


@contextmanager
def flops_of(tracker: MemoryTracker, parts: dict, name: str):
    before = tracker.flops
    yield
    parts[name] = tracker.flops - before


def _measurement(tracker: MemoryTracker, **extra) -> dict:
    return dict(peak=tracker.peak, breakdown=dict(tracker.peak_by_label), peak_op=tracker.peak_op,
                flops=tracker.flops, **extra)


def measure_training(config: WanConfig, settings: dict, latent_frames: int, latent_height: int, latent_width: int,
                     recipe: TrainingRecipe | None = None, count_flops: bool = False, with_preview: bool = False,
                     vae_config: VAEConfig | None = None) -> tuple[StepMeasurement, Measurement | None]:
    """The steady-state peak of one optimizer step at settings' strategy, batch,
    checkpointing and precision: the optimizer state exists (it has stepped before) and,
    with GRAD_ACCUM_STEPS >= 2, so do the gradients of the earlier micro-batches.

    FLOPs (with count_flops) are those of one micro-batch. with_preview: then, with the
    weights and optimizer state still resident, the epoch preview (validation runs the same
    no-grad forward): one sampling step of a clip, then the VAE loaded for its decode.
    Returns (the step, the preview or None).
    """
    recipe = recipe or TrainingRecipe()
    grid = (latent_frames, latent_height, latent_width)
    model = meta_module(lambda: WanModel(config))
    vae = meta_module(lambda: WanVAE(vae_config or VAEConfig())) if with_preview else None
    with fake_tensors(top_mode=MemoryTracker(IMITATED_DEVICE, count_flops=count_flops)) as tracker:
        model, trainable, optimizer, ema = _training_state(model, settings, recipe, tracker)
        inputs, sigma, noise = training_inputs(config, settings["BATCH_SIZE"], *grid, IMITATED_DEVICE)
        build_tables(config, *grid, IMITATED_DEVICE)
        if settings["GRAD_ACCUM_STEPS"] >= 2:  # what the step's earlier micro-batches leave
            for p in trainable.values():
                p.grad = torch.zeros_like(p)
            tracker.track([p.grad for p in trainable.values()], memory.GRADIENTS)
        reached = set()

        def gradient_made(p):
            reached.add(p)
            tracker.track(p.grad, memory.GRADIENTS)

        hooks = [p.register_post_accumulate_grad_hook(gradient_made) for p in trainable.values()]
        tracker.reset_peak()
        with tracker.phase(memory.ACTIVATIONS):
            recipe.micro_batch(model, optimizer, inputs, sigma, noise, imitated_autocast(settings["MIXED_PRECISION"] == "bf16"),
                               1.0 / (settings["BATCH_SIZE"] * settings["GRAD_ACCUM_STEPS"]))
        saved = (tracker.at_backward_start or tracker.by_label)[memory.ACTIVATIONS]
        micro_batch_flops = tracker.flops
        # Parameters the backward never reaches (the action modules' unused norm weights) get
        # no gradient in a real run, so no optimizer state either: uncount what the warm-up
        # gave them (they lived through the whole step, so the peak's moment stays).
        unreached = [p for p in trainable.values() if p not in reached]
        tracker.forget([p.grad for p in unreached] + [t for p in unreached for t in optimizer.state.get(p, {}).values()])
        for p in unreached:
            p.grad = None
        with tracker.phase(memory.OPTIMIZER_STEP):
            recipe.clip_gradients(optimizer, trainable, settings)
            recipe.optimizer_step(optimizer, ema, trainable, updates_done=1)
        for hook in hooks:
            hook.remove()
        step = StepMeasurement(
            **_measurement(tracker), strategy=settings["TRAINING_STRATEGY"],
            checkpointing=settings["GRADIENT_CHECKPOINTING"], batch=settings["BATCH_SIZE"],
            latent_frames=latent_frames, tokens=settings["BATCH_SIZE"] * latent_frames * tokens_per_latent_frame(
                latent_height, latent_width), saved_activations=saved,
            trainable_parameters=sum(p.numel() for p in trainable.values()),
            total_parameters=sum(p.numel() for p in model.parameters()))
        step.flops = micro_batch_flops
        preview = _preview_during_training(model, vae, config, settings, grid, tracker) if with_preview else None
    return step, preview


def _training_state(model: WanModel, settings: dict, recipe: TrainingRecipe, tracker: MemoryTracker):
    """What one rank holds between steps, made as the trainer makes it and labelled:
    (model, trainable, optimizer, EMA or None). The optimizer has stepped once."""
    model = materialise(model, IMITATED_DEVICE, GPU_DTYPE if settings["MIXED_PRECISION"] == "bf16" else torch.float32)
    trainable = recipe.prepare(model, settings)
    model.set_gradient_checkpointing(settings["GRADIENT_CHECKPOINTING"])
    model.train()
    recipe.offload(model, settings, HOST)
    optimizer = recipe.make_optimizer(trainable, settings, IMITATED_DEVICE, HOST, imitating_cuda=True)
    ema = recipe.make_ema(trainable, settings, HOST)
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker.track(list(model.parameters()), memory.WEIGHTS)
    tracker.track(recipe.optimizer_tensors(optimizer, ema), memory.OPTIMIZER_STATE)
    return model, trainable, optimizer, ema


def _preview_during_training(model: WanModel, vae: WanVAE, config: WanConfig, settings: dict, grid: tuple,
                             tracker: MemoryTracker) -> Measurement:
    """epoch_preview after a step: one sampling step of a clip, then the VAE loaded and decoding."""
    tracker.reset_peak()
    model.eval()
    clip, _, _ = training_inputs(config, 1, *grid, IMITATED_DEVICE)
    parts = {}
    with tracker.phase(memory.ACTIVATIONS):
        with flops_of(tracker, parts, "sampling step"):
            latents = sample_latents(
                model, clip["cond_concat"], clip["visual_context"], clip["keyboard"][0].to(HOST),
                clip["mouse"][0].to(HOST), 1, settings["TIMESTEP_SHIFT"], torch.Generator().manual_seed(0),
                imitated_autocast(settings["MIXED_PRECISION"] == "bf16"))
        vae = materialise(vae, IMITATED_DEVICE, GPU_DTYPE).requires_grad_(False).eval()
        tracker.track(list(vae.parameters()), memory.WEIGHTS)
        with flops_of(tracker, parts, "decode"):
            decode_frames(vae, latents)
    return Measurement(**_measurement(tracker), flops_by_part=parts)


def measure_cache_build(settings: dict, vae_config: VAEConfig | None = None,
                        clip_config: CLIPVisionConfig | None = None) -> Measurement:
    """The latent-cache build's peak: the VAE and CLIP (bf16) encoding one clip of
    SEQUENCE_LENGTH frames (its latents, its first-frame latent and CLIP tokens)."""
    device = IMITATED_DEVICE
    vae = meta_module(lambda: WanVAE(vae_config or VAEConfig()))
    clip = meta_module(lambda: CLIPVisionTower(clip_config or CLIPVisionConfig()))
    with fake_tensors(top_mode=MemoryTracker(device, count_flops=True)) as tracker:
        vae = materialise(vae, device, GPU_DTYPE).requires_grad_(False).eval()
        clip = materialise(clip, device, GPU_DTYPE).eval().requires_grad_(False)
        tracker.track(list(vae.parameters()) + list(clip.parameters()), memory.WEIGHTS)
        tracker.reset_peak()
        video = torch.empty(1, 3, settings["SEQUENCE_LENGTH"], settings["VIDEO_HEIGHT"], settings["VIDEO_WIDTH"],
                            device=HOST)
        with tracker.phase(memory.ACTIVATIONS):
            encode_clip_batch(vae, clip, video, CACHE_DTYPES[settings["CACHE_DTYPE"]])
        return Measurement(**_measurement(tracker))


def measure_preview(config: WanConfig, settings: dict, vae_config: VAEConfig | None = None,
                    clip_config: CLIPVisionConfig | None = None) -> Measurement:
    """generate_preview.py's peak: the bf16 model, VAE and CLIP resident; one window of
    WINDOW_FRAMES frames (its conditioning encoded, one sampling step, the decode), as
    generate_frames runs it (whose 8-bit round trip of the last frame is host-side numpy).
    FLOPs are those of that window with one sampling step."""
    device = IMITATED_DEVICE
    model = meta_module(lambda: WanModel(config))
    vae = meta_module(lambda: WanVAE(vae_config or VAEConfig()))
    clip = meta_module(lambda: CLIPVisionTower(clip_config or CLIPVisionConfig()))
    frames = settings["WINDOW_FRAMES"]
    with fake_tensors(top_mode=MemoryTracker(device, count_flops=True)) as tracker:
        model = materialise(model, device, GPU_DTYPE).eval().requires_grad_(False)
        vae = materialise(vae, device, GPU_DTYPE).requires_grad_(False).eval()
        clip = materialise(clip, device, GPU_DTYPE).eval().requires_grad_(False)
        tracker.track([*model.parameters(), *vae.parameters(), *clip.parameters()], memory.WEIGHTS)
        tracker.reset_peak()
        first_frame = torch.empty(3, settings["VIDEO_HEIGHT"], settings["VIDEO_WIDTH"], device=HOST)
        keyboard = torch.zeros(frames, config.action_config.keyboard_dim_in, device=HOST)
        mouse = torch.zeros(frames, config.action_config.mouse_dim_in, device=HOST)
        parts = {}
        with tracker.phase(memory.ACTIVATIONS):  # generate_frames' window, with one sampling step
            with flops_of(tracker, parts, "conditioning"):
                image = first_frame[None].to(device=vae.device, dtype=vae.dtype)
                cond_concat = build_cond_concat(vae, image, frames).float()
                visual_context = build_visual_context(clip, image).float()
            with flops_of(tracker, parts, "sampling step"):
                latents = sample_latents(model, cond_concat, visual_context, keyboard, mouse, 1,
                                                     settings["TIMESTEP_SHIFT"], torch.Generator().manual_seed(0),
                                                     imitated_autocast(True))
            with flops_of(tracker, parts, "decode"):
                decode_frames(vae, latents)
        return Measurement(**_measurement(tracker), flops_by_part=parts)


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Frames and pixels -> (latent frames, latent height, latent width), checked."""
    return latent_frame_count(frames), *latent_size(height, width)

