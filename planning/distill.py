"""Will distillation fit my GPUs, and what will it cost? Each stage's training step run on
fake tensors, as the fine-tuning plan does (planning/plan.py), with the three models it
holds; its FLOPs priced on the cards studios rent (planning/cards.py).

    plan = plan_distillation(settings)   # distill_streaming_model.py's setting names (+ GPU_MEMORY_GB, GPUS)
    print(plan.format())

Stage A holds the causal student (trained: float32 weights, gradients, AdamW state, EMA)
and the teacher for validation (frozen, bf16); its step is one block-causal forward and
backward. Stage B holds the student, the teacher and the critic (trained like the
student); its heaviest step is a generator iteration: a rollout with gradients at the exit
steps (with checkpointing: replayed block by block after the loss), teacher and critic
scores, the student's backward, then the critic's fresh rollout, forward and backward
while the student's gradients wait for the optimizer step. Stage C holds the same and its
stream (the VAE for the anchors, the KV cache); its step makes the stream's next new
latent frames from the cache, decodes and re-encodes the anchor, and scores a
STREAM_CHUNK_LATENTS window (no fresh rollout for the critic).

Several GPUs: FSDP shards each model's weights, gradients and optimizer state (and the
EMA) across them; activations and the temporaries of the step are per GPU. So a GPU
holds (weights + optimizer state + gradients) / N + the rest - a lower bound that
leaves out FSDP's gathered copy of the block being computed (one block: ~0.1 GB at
1.8B) and the all-gather buffers, which the margin stands for.

Cost: the FLOPs of each kind of iteration (stages B and C: a generator iteration and a
critic-only one, by part), summed over the stage's steps as the script runs them, at each
card's dense bf16 peak: a floor per GPU, the same on any number of GPUs (each trains its
own clips), so GPU-hours are GPUs x hours.
"""

import time
from dataclasses import dataclass, field

import torch

from planning import memory
from planning.cards import UTILISATION, card_bytes, card_named, seconds_at_peak
from planning.imitation import IMITATED_DEVICE, fake_tensors, imitated_autocast
from planning.measure import HOST, GPU_DTYPE, Measurement, flops_of, materialise, meta_module, training_inputs
from planning.memory import MemoryTracker
from planning.plan import (MARGIN_FIXED_GIB, MARGIN_FRACTION, NOT_COUNTED, gib, model_config, where_peak,
                           with_margin)
from training import diffusion_forcing as df
from training.dmd import (DistillationModels, RolloutSettings, critic_loss, critic_micro_batch, generator_loss,
                          generator_micro_batch, is_generator_step)
from training.rollout import Conditions, FewStepSchedule, SampleNoise
from training.long_tuning import StreamPlan, advance, new_stream
from training.recipe import Savers
from training.roles import RECIPE, describe_savers, offload_frozen, prepare_role, role_optimizer, student_ema
from wan.causal import CausalWanModel
from wan.config import WanConfig
from wan.model import WanModel
from wan.shapes import latent_frame_count, latent_size, tokens_per_latent_frame
from wan.vae import VAEConfig, WanVAE

SHARDED = (memory.WEIGHTS, memory.OPTIMIZER_STATE, memory.GRADIENTS)
GPU_COUNTS = (1, 2, 4, 8)
PLANNER_DEFAULTS = {"GPU_MEMORY_GB": 80, "GPUS": 1}
COST_CARDS = ("H100 SXM", "A100 80GB", "L40S", "RTX 4090")  # the cards the plan prices (of planning/cards.py's)


def cost_cards() -> list:
    return [card_named(name) for name in COST_CARDS]


def per_gpu(measured: Measurement, gpus: int) -> float:
    """Bytes per GPU with FSDP over `gpus` GPUs: the sharded labels divided, the rest not."""
    sharded = sum(measured.breakdown.get(label, 0) for label in SHARDED)
    return measured.peak - sharded + sharded / gpus


def _trained(model, settings: dict, role: str, tracker: MemoryTracker) -> tuple[dict, object]:
    """The role made as the script makes it (training/roles.py: its strategy, float32 masters
    of what it trains, the savers' offloads to the uncounted HOST, its optimizer stepped once
    so that its state exists), tracked as weights and optimizer state."""
    trainable = prepare_role(model, settings, role)
    model.set_gradient_checkpointing(settings["GRADIENT_CHECKPOINTING"])
    model.train()
    offload_frozen(model, settings, HOST)
    optimizer = role_optimizer(trainable, settings, role, IMITATED_DEVICE, HOST, imitating_cuda=True)
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker.track(list(model.parameters()), memory.WEIGHTS)
    tracker.track(RECIPE.optimizer_tensors(optimizer, None), memory.OPTIMIZER_STATE)
    return trainable, optimizer


def _teacher(config: WanConfig, settings: dict, tracker: MemoryTracker):
    """The frozen teacher in the run's dtype (its blocks on the host with OFFLOAD_FROZEN), tracked."""
    teacher = materialise(meta_module(lambda: WanModel(config)), IMITATED_DEVICE, _dtype(settings))
    teacher.requires_grad_(False).eval()
    offload_frozen(teacher, settings, HOST)
    tracker.track(list(teacher.parameters()), memory.WEIGHTS)
    return teacher


def _student_ema(trainable: dict, settings: dict, tracker: MemoryTracker):
    """The student's EMA as the run keeps it from EMA_START_STEP on (on the host with
    OFFLOAD_OPTIMIZER), tracked; the caller keeps it alive."""
    ema = student_ema(trainable, settings, HOST)
    if ema is not None:
        tracker.track(list(ema.shadow.values()), memory.OPTIMIZER_STATE)
    return ema


def _dtype(settings: dict) -> torch.dtype:
    """The run's dtype of loaded weights (bf16 under bf16); trained tensors become float32."""
    return GPU_DTYPE if settings["MIXED_PRECISION"] == "bf16" else torch.float32


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
    settings = dict(settings, STAGE="causal_init")
    bf16 = settings["MIXED_PRECISION"] == "bf16"
    student = meta_module(lambda: CausalWanModel(student_config(config, settings)))
    with fake_tensors(top_mode=MemoryTracker(IMITATED_DEVICE, count_flops=True)) as tracker:
        student = materialise(student, IMITATED_DEVICE, _dtype(settings))
        trainable, optimizer = _trained(student, settings, "student", tracker)
        # the EMA and the teacher (for validation) stay alive to the end, as in the run
        ema, teacher = _student_ema(trainable, settings, tracker), _teacher(config, settings, tracker)  # noqa: F841
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
    """Stages B and C resident: the student with its optimizer (and the EMA), the critic with
    its optimizer, the frozen teacher, each as the run makes it with its savers, all tracked;
    made inside the caller's fake mode."""

    def __init__(self, config: WanConfig, settings: dict, tracker: MemoryTracker):
        bf16 = settings["MIXED_PRECISION"] == "bf16"
        student = meta_module(lambda: CausalWanModel(student_config(config, settings)))
        critic = meta_module(lambda: WanModel(config))
        self.student = materialise(student, IMITATED_DEVICE, _dtype(settings))
        self.student_trainable, self.student_optimizer = _trained(self.student, settings, "student", tracker)
        self.ema = _student_ema(self.student_trainable, settings, tracker)
        self.critic = materialise(critic, IMITATED_DEVICE, _dtype(settings))
        self.critic_trainable, self.critic_optimizer = _trained(self.critic, settings, "critic", tracker)
        self.teacher = _teacher(config, settings, tracker)
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
    clipping and both optimizer steps. FLOPs by part: "generator" (the student's half) and
    "critic" (the critic's half, all that a critic-only iteration runs)."""
    settings = dict(settings, STAGE="dmd")
    batch = settings["BATCH_SIZE"]
    with fake_tensors(top_mode=MemoryTracker(IMITATED_DEVICE, count_flops=True)) as tracker:
        roles = ThreeModels(config, settings, tracker)
        conditions = conditions_for(config, batch, grid)
        last_step = len(roles.rollout_settings.schedule) - 1
        tracker.reset_peak()
        parts = {}
        with tracker.phase(memory.ACTIVATIONS):
            with flops_of(tracker, parts, "generator"):
                generator_micro_batch(roles.models, conditions, SampleNoise(0, "generator", list(range(batch)),
                                                                            IMITATED_DEVICE),
                                      last_step, roles.rollout_settings, roles.autocast, 1.0)
            with flops_of(tracker, parts, "critic"):
                critic_micro_batch(roles.models, conditions, SampleNoise(0, "critic", list(range(batch)),
                                                                         IMITATED_DEVICE),
                                   last_step, roles.rollout_settings, roles.autocast, 1.0)
        measured = roles.step(tracker)
        measured.flops_by_part = parts
        return measured


def measure_long_tune(config: WanConfig, settings: dict, grid: tuple) -> Measurement:
    """Stage C's generator iterations: the three models, two AdamW, the EMA, the VAE and the
    stream's KV cache resident; a sequence's first iteration (STREAM_CHUNK_LATENTS new
    latent frames with gradients at the last step of every block, the window's scores and
    both backwards) and a later one (fewer new frames from the cache, but the anchor's VAE
    decode and encode while their graphs wait); clipping and both optimizer steps after
    each. The peak is the heavier's; the FLOPs per step the mean over a sequence, and by
    part: "<first|later>:<rollout|generator|critic>" (a critic-only iteration runs the
    rollout and the critic's part)."""
    settings = dict(settings, STAGE="long_tune")
    bf16 = settings["MIXED_PRECISION"] == "bf16"
    plan = StreamPlan.of(settings)
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
        parts = {}
        for iteration, kind in ((0, "first"), (1, "later")):
            with tracker.phase(memory.ACTIVATIONS):
                with flops_of(tracker, parts, f"{kind}:rollout"):
                    window = advance(roles.student, stream, plan, iteration, noise, schedule, len(schedule) - 1,
                                     roles.autocast, True)
                with flops_of(tracker, parts, f"{kind}:generator"):
                    generator_loss(roles.models, window.latents, window.conditions(stream), noise,
                                   roles.rollout_settings, roles.autocast, 1.0, window.mask)
                with flops_of(tracker, parts, f"{kind}:critic"):
                    critic_loss(roles.models, window.latents, window.conditions(stream), noise,
                                roles.rollout_settings, roles.autocast, 1.0, window.mask)
            _step(tracker, [(roles.student_trainable, roles.student_optimizer),
                            (roles.critic_trainable, roles.critic_optimizer)])
        measured = roles.step(tracker)
        measured.flops_by_part = parts
        n = plan.iterations_per_sequence
        iteration_flops = {kind: sum(parts[f"{kind}:{part}"] for part in ("rollout", "generator", "critic"))
                           for kind in ("first", "later")}
        measured.flops = (iteration_flops["first"] + (n - 1) * iteration_flops["later"]) / n
        return measured


# -----------------------------------------------------------------------------
# What a stage costs

STEPS_SETTING = {"causal_init": "DF_STEPS", "dmd": "DMD_STEPS", "long_tune": "LONG_TUNE_STEPS"}


def iteration_flops(stage: str, m: Measurement, settings: dict, step: int) -> float:
    """FLOPs per GPU of the stage's optimizer step `step` (from 0): stage A's step; stages B
    and C a generator iteration on every GENERATOR_EVERY-th step, else a critic-only one
    (stage C's by its place in the stream's sequence); GRAD_ACCUM_STEPS micro-batches."""
    generator = is_generator_step(step, settings["GENERATOR_EVERY"])
    if stage == "causal_init":
        flops = m.flops
    elif stage == "dmd":
        flops = m.flops_by_part["critic"] + (m.flops_by_part["generator"] if generator else 0)
    else:
        kind = "first" if step % StreamPlan.of(settings).iterations_per_sequence == 0 else "later"
        parts = ("rollout", "critic") + (("generator",) if generator else ())
        flops = sum(m.flops_by_part[f"{kind}:{part}"] for part in parts)
    return flops * settings["GRAD_ACCUM_STEPS"]


def run_flops(stage: str, m: Measurement, settings: dict) -> float:
    """FLOPs per GPU of the stage's whole run (its STEPS_SETTING steps), validation aside."""
    return sum(iteration_flops(stage, m, settings, step) for step in range(settings[STEPS_SETTING[stage]]))


def fewest_gpus(m: Measurement, memory_gb: float) -> int | None:
    """The fewest of GPU_COUNTS GPUs whose per-GPU peak, with the margin, fits memory_gb."""
    return next((n for n in GPU_COUNTS if with_margin(per_gpu(m, n)) <= card_bytes(memory_gb)), None)


@dataclass
class DistillationPlan:
    settings: dict
    config_source: str
    tokens: int                          # per clip
    latent_frames: int
    stages: dict                         # stage -> Measurement
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    TITLES = {"causal_init": "Stage A (causal_init): student + EMA + AdamW, the teacher for validation; one "
                             "diffusion-forcing step",
              "dmd": "Stage B (dmd): student + EMA + AdamW, critic + AdamW, teacher; a generator iteration (rollout, "
                     "scores, both backwards)",
              "long_tune": "Stage C (long_tune), windows of {STREAM_CHUNK_LATENTS} latent frames in streams of "
                           "{STREAM_MAX_LATENTS}: stage B's models + the VAE + the stream's KV cache; a sequence's "
                           "first generator iteration and a later one (new frames from the cache, the anchor, "
                           "scores, both backwards)"}

    def peak(self, stage: str) -> float:
        """Bytes per GPU of the stage at GPUS GPUs: the plan's first figure."""
        return per_gpu(self.stages[stage], self.settings["GPUS"])

    def format(self) -> str:
        s = self.settings
        bf16 = s["MIXED_PRECISION"] == "bf16"
        lines = [
            f"Distillation GPU plan (fake tensors on the CPU, nothing allocated; {self.seconds:.0f} s)",
            f"model: {self.config_source}; clip: {s['SEQUENCE_LENGTH']} frames at {s['VIDEO_WIDTH']}x"
            f"{s['VIDEO_HEIGHT']} = {self.latent_frames} latent frames, {self.tokens:,} tokens; BATCH_SIZE "
            f"{s['BATCH_SIZE']} x GRAD_ACCUM_STEPS {s['GRAD_ACCUM_STEPS']} per GPU; student window "
            f"{s['LOCAL_ATTN_SIZE']} (sink {s['SINK_SIZE']}), {len(s['DENOISING_STEPS'])} steps; "
            + ("bf16 autocast, float32 masters of the trained models, the teacher bf16" if bf16 else "float32")
            + "; gradient checkpointing " + ("on (the whole-sequence forwards block by block, the student's rollouts "
                                             "replayed block by block)" if s["GRADIENT_CHECKPOINTING"] else "off")
            + (f"; EMA {s['EMA_DECAY']}" if s["EMA_DECAY"] > 0 else "") + f"; memory savers: {describe_savers(s)}",
            f"Each stage's peak per GPU with FSDP over GPUS={s['GPUS']} GPU(s) first, then over 1, 2, 4 and 8 (weights, "
            f"gradients and optimizer state sharded, the rest not), against a {s['GPU_MEMORY_GB']:g} GiB card "
            "(GPU_MEMORY_GB)",
        ]
        for stage in self.stages:
            lines += ["", self.TITLES[stage].format(**s), *self._stage_lines(stage)]
        lines += ["", *self._recipe_lines(), "", *self._card_lines()]
        lines += [f"  {NOT_COUNTED}; the margin stands for them; with several GPUs also FSDP's gathered block and "
                  "its communication buffers"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def _stage_lines(self, stage: str) -> list[str]:
        s, m = self.settings, self.stages[stage]
        card, gpus = s["GPU_MEMORY_GB"], s["GPUS"]
        peak = self.peak(stage)
        counts = sorted({*GPU_COUNTS, gpus})
        lines = [f"predicted peak GPU memory: {gib(peak):.2f} GiB",
                 f"  on each of {gpus} GPU(s); with a margin of {MARGIN_FRACTION:.0%} + {MARGIN_FIXED_GIB} GiB: "
                 f"{gib(with_margin(peak)):.2f} GiB, {'fits' if with_margin(peak) <= card_bytes(card) else 'does not fit'} "
                 f"a {card:g} GiB card; the peak {where_peak(m.peak_op)}",
                 f"  {'GiB per GPU, FSDP over':<28}" + "".join(f"{f'{n} GPU' + ('s' if n > 1 else ''):>9}"
                                                              for n in counts)]
        for label in memory.LABELS:
            if m.breakdown.get(label, 0) > 0:
                shared = 1 if label not in SHARDED else None
                lines.append(f"    {label:<26}" + "".join(f"{gib(m.breakdown[label] / (shared or n)):>9.2f}"
                                                         for n in counts))
        lines.append(f"    {'peak':<26}" + "".join(f"{gib(per_gpu(m, n)):>9.2f}" for n in counts))
        lines.append(f"    {'with the margin':<26}" + "".join(f"{gib(with_margin(per_gpu(m, n))):>9.2f}"
                                                              for n in counts))
        lines.append(f"    {f'fits {card:g} GiB?':<26}" + "".join(
            f"{'yes' if with_margin(per_gpu(m, n)) <= card_bytes(card) else 'no':>9}" for n in counts))
        steps_name = STEPS_SETTING[stage]
        first = iteration_flops(stage, m, s, s["GENERATOR_EVERY"] - 1)
        if stage == "causal_init":
            kinds = f"{first / 1e12:,.1f} TFLOP per step"
        else:
            kinds = (f"{first / 1e12:,.1f} TFLOP per generator iteration, "
                     f"{iteration_flops(stage, m, s, 0) / 1e12:,.1f} per critic-only one")
        total = run_flops(stage, m, s)
        mean = total / s[steps_name]
        lines.append(f"  per GPU: {kinds} (mean {mean / 1e12:,.1f}, recomputation included); time floor per "
                     "iteration " + ", ".join(f"{c.name} {seconds_at_peak(mean, c):.2f} s" for c in cost_cards()))
        lines.append(f"  {steps_name}={s[steps_name]}: " + ", ".join(
            f"{c.name} {seconds_at_peak(total, c) / 3600:.2f} h" for c in cost_cards())
            + " (x the GPUs for GPU-hours)")
        return lines

    def _recipe_lines(self) -> list[str]:
        s = self.settings
        low, high = UTILISATION
        steps = ", ".join(f"{STEPS_SETTING[stage]}={s[STEPS_SETTING[stage]]}" for stage in self.stages)
        what = "The whole recipe" if len(self.stages) == len(STEPS_SETTING) else "The planned stages (PLAN_STAGES)"
        lines = [f"{what} ({steps}): its time floor at each card's dense bf16 peak (real runs reach "
                 f"{low:.0%}-{high:.0%} of it: {1 / high:.1f}-{1 / low:.1f}x these), validation aside, stages B and C "
                 "costed with the exit at the last denoising step (an upper bound); more GPUs train more clips per "
                 "step in the same hours",
                 f"  {'card':<22} {'hours':>7} {'fewest GPUs that fit every stage':>34} {'GPU-hours there':>16}"]
        totals = [run_flops(stage, m, s) for stage, m in self.stages.items()]
        for card in cost_cards():
            hours = sum(seconds_at_peak(f, card) for f in totals) / 3600
            counts = [fewest_gpus(m, card.memory_gb) for m in self.stages.values()]
            n = None if None in counts else max(counts)
            lines.append(f"  {f'{card.name} ({card.memory_gb:g} GiB)':<22} {hours:>7.2f} {n or 'none of 1-8':>34} "
                         + (f"{hours * n:>16.2f}" if n else f"{'-':>16}"))
        return lines

    def _card_lines(self) -> list[str]:
        s = self.settings
        lines = ["Which card: the fewest GPUs (of 1, 2, 4, 8) that fit each stage with the margin, and the stage's "
                 "GPU-hours there (time floor)",
                 f"  {'stage':<12}" + "".join(f"{f'{c.name} ({c.memory_gb:g} GiB)':>26}" for c in cost_cards())]
        for stage, m in self.stages.items():
            cells = []
            for card in cost_cards():
                n = fewest_gpus(m, card.memory_gb)
                hours = seconds_at_peak(run_flops(stage, m, s), card) / 3600
                cells.append(f"{n} GPU{'s' if n > 1 else ''}, {hours * n:.2f} GPU-h" if n else "does not fit on 8")
            lines.append(f"  {stage:<12}" + "".join(f"{c:>26}" for c in cells))
        return lines


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
    savers = Savers.of(s)
    notes = ["OPTIMIZER=adamw_8bit, OFFLOAD_OPTIMIZER and OFFLOAD_FROZEN are one GPU's savers (several GPUs shard "
             "with FSDP and refuse them): only the 1-GPU column is a run's"] \
        if savers.optimizer != "adamw" or savers.offload_optimizer or savers.offload_frozen else []
    return DistillationPlan(s, source, tokens, frames, measured, time.perf_counter() - started, notes)
