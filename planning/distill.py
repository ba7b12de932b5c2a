"""Will distillation fit my GPUs? Each stage's training step run on fake tensors, as the
fine-tuning plan does (planning/plan.py), with the three models it holds.

    plan = plan_distillation(settings)   # distill_streaming_model.py's setting names (+ GPU_MEMORY_GB)
    print(plan.format())

Stage A holds the causal student (trained: float32 weights, gradients, AdamW state, EMA)
and the teacher for validation (frozen, bf16); its step is one block-causal forward and
backward. Stage B holds the student, the teacher and the critic (trained like the
student); its heaviest step is a generator iteration: a rollout whose exit steps keep
their graphs, teacher and critic scores, the student's backward, then the critic's fresh
rollout, forward and backward while the student's gradients wait for the optimizer step.
Stage C holds the same and its stream (the VAE for the anchors, the KV cache); its step
makes the stream's next new latent frames from the cache, decodes and re-encodes the
anchor while their graphs wait, and scores a STREAM_CHUNK_LATENTS window (no fresh
rollout for the critic).

Several GPUs: FSDP shards each model's weights, gradients and optimizer state (and the
EMA) across them; activations and the temporaries of the step are per GPU. So a GPU
holds (weights + optimizer state + gradients) / N + the rest - a lower bound that
leaves out FSDP's gathered copy of the block being computed (one block: ~0.1 GB at
1.8B) and the all-gather buffers, which the margin stands for.
"""

import time
from dataclasses import dataclass, field

import torch

from planning import memory
from planning.cards import CARDS
from planning.imitation import IMITATED_DEVICE, fake_tensors, imitated_autocast
from planning.measure import GPU_DTYPE, Measurement, materialise, meta_module, training_inputs
from planning.memory import MemoryTracker
from planning.plan import GIB, MARGIN_FIXED_GIB, MARGIN_FRACTION, NOT_COUNTED, gib, model_config, with_margin
from training import diffusion_forcing as df
from training.dmd import (DistillationModels, RolloutSettings, critic_loss, critic_micro_batch, generator_loss,
                          generator_micro_batch)
from training.ema import EMA
from training.optim import build_adamw
from training.rollout import Conditions, FewStepSchedule, SampleNoise
from training.flow_matching import prepare_trainable
from training.long_tuning import StreamPlan, advance, new_stream
from wan.causal import CausalWanModel
from wan.config import WanConfig
from wan.model import WanModel
from wan.shapes import latent_frame_count, latent_size, tokens_per_latent_frame
from wan.vae import VAEConfig, WanVAE

SHARDED = (memory.WEIGHTS, memory.OPTIMIZER_STATE, memory.GRADIENTS)
GPU_COUNTS = (1, 2, 4, 8)
PLANNER_DEFAULTS = {"GPU_MEMORY_GB": 80}


def per_gpu(measured: Measurement, gpus: int) -> float:
    """Bytes per GPU with FSDP over `gpus` GPUs: the sharded labels divided, the rest not."""
    sharded = sum(measured.breakdown.get(label, 0) for label in SHARDED)
    return measured.peak - sharded + sharded / gpus


def _trained(model, settings: dict, tracker: MemoryTracker, lr: float) -> tuple[dict, object]:
    """Float32 masters of every tensor, AdamW (stepped once, so its state exists) - as the
    script trains student and critic - tracked as weights and optimizer state."""
    trainable = prepare_trainable(model, "full", 0)
    optimizer = build_adamw(trainable, lr, settings["WEIGHT_DECAY"], torch.device("cuda"), settings["ADAM_BETAS"])
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker.track(list(model.parameters()), memory.WEIGHTS)
    tracker.track([t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)],
                  memory.OPTIMIZER_STATE)
    return trainable, optimizer


def _count_gradients(trainable: dict, tracker: MemoryTracker) -> list:
    return [p.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, memory.GRADIENTS))
            for p in trainable.values()]


def _step(tracker: MemoryTracker, optimizers: list) -> None:
    with tracker.phase(memory.OPTIMIZER_STEP):
        for trainable, optimizer in optimizers:
            torch.nn.utils.clip_grad_norm_([p for p in trainable.values() if p.grad is not None], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _measurement(tracker: MemoryTracker) -> Measurement:
    return Measurement(tracker.peak, dict(tracker.peak_by_label), tracker.peak_op, tracker.flops)


def student_config(config: WanConfig, settings: dict) -> WanConfig:
    return config.with_window(settings["LOCAL_ATTN_SIZE"], settings["SINK_SIZE"])


def measure_causal_init(config: WanConfig, settings: dict, grid: tuple) -> Measurement:
    """Stage A's steady-state step: student + EMA + AdamW, the bf16 teacher resident, one
    diffusion-forcing micro-batch of BATCH_SIZE clips, clipping and the optimizer step."""
    bf16 = settings["MIXED_PRECISION"] == "bf16"
    student = meta_module(lambda: CausalWanModel(student_config(config, settings)))
    teacher = meta_module(lambda: WanModel(config))
    with fake_tensors(top_mode=MemoryTracker(IMITATED_DEVICE, count_flops=True)) as tracker:
        student = materialise(student, IMITATED_DEVICE, torch.float32)
        student.set_gradient_checkpointing(settings["GRADIENT_CHECKPOINTING"])
        trainable, optimizer = _trained(student, settings, tracker, settings["DF_LEARNING_RATE"])
        ema = EMA(trainable, settings["EMA_DECAY"]) if settings["EMA_DECAY"] > 0 else None  # alive to the end
        if ema is not None:
            tracker.track(list(ema.shadow.values()), memory.OPTIMIZER_STATE)
        teacher = materialise(teacher, IMITATED_DEVICE, GPU_DTYPE if bf16 else torch.float32)
        tracker.track(list(teacher.requires_grad_(False).parameters()), memory.WEIGHTS)
        inputs, _, noise = training_inputs(config, settings["BATCH_SIZE"], *grid, IMITATED_DEVICE)
        levels = torch.zeros(settings["BATCH_SIZE"], grid[0], dtype=torch.long)
        hooks = _count_gradients(trainable, tracker)
        tracker.reset_peak()
        with tracker.phase(memory.ACTIVATIONS):
            df.micro_batch(student, inputs, levels, noise, settings["DF_SHIFT"], df.bell_weights(settings["DF_SHIFT"], settings["DF_WEIGHTING"]),
                           imitated_autocast(bf16), 1.0)
        _step(tracker, [(trainable, optimizer)])
        for hook in hooks:
            hook.remove()
        return _measurement(tracker)


class ThreeModels:
    """Stages B and C resident: the float32 student with AdamW (and the EMA), the float32
    critic with AdamW, the frozen teacher (bf16 under bf16), all tracked; made inside the
    caller's fake mode."""

    def __init__(self, config: WanConfig, settings: dict, tracker: MemoryTracker):
        bf16 = settings["MIXED_PRECISION"] == "bf16"
        student = meta_module(lambda: CausalWanModel(student_config(config, settings)))
        teacher, critic = meta_module(lambda: WanModel(config)), meta_module(lambda: WanModel(config))
        self.student = materialise(student, IMITATED_DEVICE, torch.float32)
        self.student.set_gradient_checkpointing(settings["GRADIENT_CHECKPOINTING"])
        self.student_trainable, self.student_optimizer = _trained(self.student, settings, tracker,
                                                                  settings["GENERATOR_LR"])
        self.ema = EMA(self.student_trainable, settings["EMA_DECAY"]) if settings["EMA_DECAY"] > 0 else None
        if self.ema is not None:
            tracker.track(list(self.ema.shadow.values()), memory.OPTIMIZER_STATE)
        self.critic = materialise(critic, IMITATED_DEVICE, torch.float32)
        self.critic.set_gradient_checkpointing(settings["GRADIENT_CHECKPOINTING"])
        self.critic_trainable, self.critic_optimizer = _trained(self.critic, settings, tracker, settings["CRITIC_LR"])
        self.teacher = materialise(teacher, IMITATED_DEVICE, GPU_DTYPE if bf16 else torch.float32)
        tracker.track(list(self.teacher.requires_grad_(False).eval().parameters()), memory.WEIGHTS)
        self.models = DistillationModels(self.student, self.teacher, self.critic)
        self.rollout_settings = RolloutSettings(FewStepSchedule.of(settings["DENOISING_STEPS"],
                                                                   settings["TIMESTEP_SHIFT"]),
                                                settings["TIMESTEP_SHIFT"], settings["SCORE_MIN_TIMESTEP"],
                                                settings["SCORE_MAX_TIMESTEP"], GPU_DTYPE if bf16 else None)
        self.autocast = imitated_autocast(bf16)
        self.hooks = (_count_gradients(self.student_trainable, tracker)
                      + _count_gradients(self.critic_trainable, tracker))

    def step(self, tracker: MemoryTracker) -> Measurement:
        """Clipping and both optimizer steps; the step's measurement."""
        _step(tracker, [(self.student_trainable, self.student_optimizer),
                        (self.critic_trainable, self.critic_optimizer)])
        for hook in self.hooks:
            hook.remove()
        return _measurement(tracker)


def conditions_for(config: WanConfig, batch: int, grid: tuple) -> Conditions:
    made, _, _ = training_inputs(config, batch, *grid, IMITATED_DEVICE)
    return Conditions(made["cond_concat"], made["visual_context"], made["keyboard"], made["mouse"])


def measure_dmd(config: WanConfig, settings: dict, grid: tuple) -> Measurement:
    """Stage B's generator iteration (the heavier kind): the three models, two AdamW and the
    EMA resident; a rollout with gradients at the last denoising step of every block, the
    scores, the student's backward; a fresh rollout and the critic's forward and backward;
    clipping and both optimizer steps."""
    batch = settings["BATCH_SIZE"]
    with fake_tensors(top_mode=MemoryTracker(IMITATED_DEVICE, count_flops=True)) as tracker:
        roles = ThreeModels(config, settings, tracker)
        conditions = conditions_for(config, batch, grid)
        last_step = len(roles.rollout_settings.schedule) - 1
        tracker.reset_peak()
        with tracker.phase(memory.ACTIVATIONS):
            generator_micro_batch(roles.models, conditions, SampleNoise(0, "generator", list(range(batch)),
                                                                        IMITATED_DEVICE),
                                  last_step, roles.rollout_settings, roles.autocast, 1.0)
            critic_micro_batch(roles.models, conditions, SampleNoise(0, "critic", list(range(batch)), IMITATED_DEVICE),
                               last_step, roles.rollout_settings, roles.autocast, 1.0)
        return roles.step(tracker)


def measure_long_tune(config: WanConfig, settings: dict, grid: tuple) -> Measurement:
    """Stage C's generator iterations: the three models, two AdamW, the EMA, the VAE and the
    stream's KV cache resident; a sequence's first iteration (STREAM_CHUNK_LATENTS new
    latent frames with gradients at the last step of every block, the window's scores and
    both backwards) and a later one (fewer new frames from the cache, but the anchor's VAE
    decode and encode while their graphs wait); clipping and both optimizer steps after
    each. The peak is the heavier's; the FLOPs per step the mean over a sequence."""
    bf16 = settings["MIXED_PRECISION"] == "bf16"
    plan = StreamPlan(settings["STREAM_CHUNK_LATENTS"], settings["STREAM_OVERLAP_LATENTS"],
                      settings["STREAM_MAX_LATENTS"])
    batch = settings["BATCH_SIZE"]
    vae = meta_module(lambda: WanVAE(VAEConfig()))
    with fake_tensors(top_mode=MemoryTracker(IMITATED_DEVICE, count_flops=True)) as tracker:
        roles = ThreeModels(config, settings, tracker)
        vae = materialise(vae, IMITATED_DEVICE, GPU_DTYPE if bf16 else torch.float32).requires_grad_(False)
        tracker.track(list(vae.parameters()), memory.WEIGHTS)
        stream = new_stream(roles.student, conditions_for(config, batch, (plan.max_latents, *grid[1:])), vae,
                            roles.rollout_settings.cache_dtype)
        tracker.track([t for layer in stream.cache.layers for kv in layer.rolling() for t in (kv.k, kv.v)],
                      memory.INPUTS)
        noise, schedule = SampleNoise(0, "long_tune", list(range(batch)), IMITATED_DEVICE), roles.rollout_settings.schedule
        tracker.reset_peak()
        flops = [tracker.flops]
        for iteration in (0, 1):
            with tracker.phase(memory.ACTIVATIONS):
                window = advance(roles.student, stream, plan, iteration, noise, schedule, len(schedule) - 1,
                                 roles.autocast, True)
                generator_loss(roles.models, window.latents, window.conditions(stream), noise, roles.rollout_settings,
                               roles.autocast, 1.0, window.mask)
                critic_loss(roles.models, window.latents, window.conditions(stream), noise, roles.rollout_settings,
                            roles.autocast, 1.0, window.mask)
            _step(tracker, [(roles.student_trainable, roles.student_optimizer),
                            (roles.critic_trainable, roles.critic_optimizer)])
            flops.append(tracker.flops)
        first, later = flops[1] - flops[0], flops[2] - flops[1]
        measured = roles.step(tracker)
        n = plan.iterations_per_sequence
        return Measurement(measured.peak, measured.breakdown, measured.peak_op, (first + (n - 1) * later) / n)


@dataclass
class DistillationPlan:
    settings: dict
    config_source: str
    tokens: int                          # per clip
    latent_frames: int
    stages: dict                         # stage -> Measurement
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    def format(self) -> str:
        s = self.settings
        card = s["GPU_MEMORY_GB"]
        bf16 = s["MIXED_PRECISION"] == "bf16"
        lines = [
            f"Distillation GPU plan (fake tensors on the CPU, nothing allocated; {self.seconds:.0f} s)",
            f"model: {self.config_source}; clip: {s['SEQUENCE_LENGTH']} frames at {s['VIDEO_WIDTH']}x"
            f"{s['VIDEO_HEIGHT']} = {self.latent_frames} latent frames, {self.tokens:,} tokens; BATCH_SIZE "
            f"{s['BATCH_SIZE']}; student window {s['LOCAL_ATTN_SIZE']} (sink {s['SINK_SIZE']}), "
            f"{len(s['DENOISING_STEPS'])} steps; "
            + ("bf16 autocast, float32 masters of the trained models, the teacher bf16" if bf16 else "float32")
            + f"; gradient checkpointing {'on' if s['GRADIENT_CHECKPOINTING'] else 'off'}"
            + (f"; EMA {s['EMA_DECAY']} on the GPU" if s["EMA_DECAY"] > 0 else ""),
        ]
        titles = {"causal_init": "Stage A (causal_init): student + EMA + AdamW, the teacher for validation; one "
                                 "diffusion-forcing step",
                  "dmd": "Stage B (dmd): student + EMA + AdamW, critic + AdamW, teacher; a generator iteration "
                         "(rollout, scores, both backwards)",
                  "long_tune": f"Stage C (long_tune), windows of {s['STREAM_CHUNK_LATENTS']} latent frames in streams "
                               f"of {s['STREAM_MAX_LATENTS']}: stage B's models + the VAE + the stream's KV cache; a "
                               "sequence's first generator iteration and a later one (new frames from the cache, the "
                               "anchor, scores, both backwards)"}
        for stage, m in self.stages.items():
            lines += ["", titles[stage], f"  peak on one GPU: {gib(m.peak):.2f} GiB ({gib(with_margin(m.peak)):.2f} "
                      f"GiB with a margin of {MARGIN_FRACTION:.0%} + {MARGIN_FIXED_GIB} GiB)"]
            lines += [f"    {label:<28} {gib(m.breakdown[label]):>7.2f} GiB" for label in memory.LABELS
                      if m.breakdown.get(label, 0) > 0]
            lines.append(f"  {m.flops / 1e12:,.1f} TFLOP per step per clip")
        lines += ["", f"Per GPU with FSDP over N GPUs (weights, gradients and optimizer state sharded), with the margin; "
                      f"fits a {card:g} GB card (GPU_MEMORY_GB)?",
                  "  " + f"{'GPUs':>5}" + "".join(f"{stage:>22}" for stage in self.stages)]
        for gpus in GPU_COUNTS:
            cells = []
            for m in self.stages.values():
                need = with_margin(per_gpu(m, gpus))
                cells.append(f"{gib(need):>9.1f} GiB {'fits' if need <= card * GIB else 'no':>5}")
            lines.append("  " + f"{gpus:>5}" + "".join(f"{c:>22}" for c in cells))
        lines += ["", "Time floor per step at each card's dense bf16 peak (real runs reach 30-60% of it), "
                      f"BATCH_SIZE {s['BATCH_SIZE']} x GRAD_ACCUM_STEPS {s['GRAD_ACCUM_STEPS']} clips per GPU:"]
        steps = {"causal_init": s["DF_STEPS"], "dmd": s["DMD_STEPS"], "long_tune": s["LONG_TUNE_STEPS"]}
        lines.append(f"  {'card':<10}" + "".join(f"{stage + ' s/step':>20}{'h/run':>8}" for stage in self.stages))
        for c in CARDS:
            row = f"  {c.name:<10}"
            for stage, m in self.stages.items():
                per_step = m.flops * s["GRAD_ACCUM_STEPS"] / (c.bf16_tflops * 1e12)
                row += f"{per_step:>20.2f}{per_step * steps[stage] / 3600:>8.1f}"
            lines.append(row)
        lines.append("  (stages B and C's steps are costed as generator iterations, an upper bound: four in five "
                     "are critic-only; the per-step time does not shrink with more GPUs, the clips per step grow)")
        lines += [f"  {NOT_COUNTED}; the margin stands for them"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def plan_distillation(settings: dict, config: WanConfig | None = None,
                      stages=("causal_init", "dmd", "long_tune")) -> DistillationPlan:
    """Plan the distillation the settings describe (all of distill_streaming_model.py's
    settings; config: instead of BASE_MODEL_DIR's, as tests do)."""
    started = time.perf_counter()
    s = {**PLANNER_DEFAULTS, **settings}
    source = "the given config"
    if config is None:
        config, source = model_config(s)
    frames = latent_frame_count(s["SEQUENCE_LENGTH"])
    grid = (frames, *latent_size(s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"]))
    measure = {"causal_init": measure_causal_init, "dmd": measure_dmd, "long_tune": measure_long_tune}
    measured = {stage: measure[stage](config, s, grid) for stage in stages}
    tokens = frames * tokens_per_latent_frame(*grid[1:])
    return DistillationPlan(s, source, tokens, frames, measured, time.perf_counter() - started)
