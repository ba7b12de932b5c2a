"""Will these settings fit my GPU, and how long will an epoch take? Answered without a GPU.

    plan = plan_training(settings)       # the training script's setting names (+ GPU_MEMORY_GB, NUM_CLIPS)
    print(plan.format())
    plan = plan_preview(settings)        # generate_preview.py's setting names (+ GPU_MEMORY_GB)

The training step, the latent-cache encoding and the preview are run for real on fake
tensors (planning/measure.py), so the numbers follow the code as it changes. The step's
peak is measured once per strategy and checkpointing setting at the requested clip; the
parts of a peak that grow with the tokens of a micro-batch (activations, backward
temporaries, inputs) grow linearly with them - every op in the model is linear in tokens
at a fixed frame size, attention included, since the fused kernels hold no L x L matrix -
while weights, optimizer state, gradients and autocast's weight copies stay. That line
says where the longest clip and the largest batch that fit GPU_MEMORY_GB lie; for your
settings both answers are then measured (at the answer and one above it) and moved until
the measurement agrees (largest_fitting), so the answers printed are checked ones.
Memory sizes are GiB throughout (planning/cards.py: a "24 GB" card holds 24 GiB).
"""

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from cli.settings import check_choices
from planning import memory
from planning.cards import CARDS, UTILISATION, card_bytes, seconds_at_peak
from planning.measure import (Measurement, StepMeasurement, latent_grid, measure_cache_build, measure_preview,
                              measure_training)
from generation.bidirectional import window_spans
from training.precision import MIXED_PRECISIONS
from training.recipe import TrainingRecipe
from wan.config import WanConfig, base_config
from wan.loading import CheckpointError, find_config_file
from wan.model import STRATEGIES
from wan.shapes import check_frame_count, check_image_size, tokens_per_latent_frame, video_frame_count

GIB = 2**30
MARGIN_FRACTION = 0.10     # the caching allocator's reserve and fragmentation
MARGIN_FIXED_GIB = 0.75    # the CUDA context (~0.3-0.5 GiB), cuBLAS/cuDNN workspaces, attention scratch
NOT_COUNTED = ("not counted: the CUDA context, the caching allocator's reserve and fragmentation, cuBLAS/cuDNN "
               "workspaces, attention kernels' scratch memory")
PLANNER_DEFAULTS = {"GPU_MEMORY_GB": 24, "NUM_CLIPS": 1000}
FIXED_LABELS = (memory.WEIGHTS, memory.OPTIMIZER_STATE, memory.GRADIENTS, memory.WEIGHT_COPIES)
MAX_LATENT_FRAMES = 256    # the search's longest clip, 1021 frames (RoPE covers 1024 positions per axis)
MAX_BATCH = 64


def with_margin(nbytes: float) -> float:
    return nbytes * (1 + MARGIN_FRACTION) + MARGIN_FIXED_GIB * GIB


def gib(nbytes: float) -> float:
    return nbytes / GIB


def largest_peak(capacity: float) -> float:
    """The largest measured peak whose with_margin fits capacity bytes."""
    return (capacity - MARGIN_FIXED_GIB * GIB) / (1 + MARGIN_FRACTION)


# -----------------------------------------------------------------------------
# Settings

def resolve_settings(settings: dict) -> dict:
    """The planner's own defaults (GPU_MEMORY_GB, NUM_CLIPS) under the script's settings (None:
    not given); checked."""
    s = {**PLANNER_DEFAULTS, **{n: v for n, v in settings.items() if v is not None or n not in PLANNER_DEFAULTS}}
    problems = []
    try:
        check_image_size(s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"])
    except (ValueError, TypeError) as error:
        problems.append(f"VIDEO_HEIGHT/VIDEO_WIDTH: {error}")
    for name in ("GPU_MEMORY_GB",):
        if not isinstance(s[name], (int, float)) or isinstance(s[name], bool) or not s[name] > 0:
            problems.append(f"{name}={s[name]!r}: must be a positive number (the card's memory, \"24 GB\" = 24 GiB)")
    for name in ("NUM_CLIPS", "BATCH_SIZE", "GRAD_ACCUM_STEPS", "LAST_LAYERS", "NUM_EPOCHS", "PREVIEW_STEPS",
                 "NUM_STEPS", "WINDOW_FRAMES", "SEQUENCE_LENGTH"):
        if name in s and (not isinstance(s[name], int) or isinstance(s[name], bool) or s[name] < 1):
            problems.append(f"{name}={s[name]!r}: must be a whole number >= 1")
    for name in ("SEQUENCE_LENGTH", "WINDOW_FRAMES"):
        if name in s and isinstance(s[name], int) and s[name] >= 1:
            try:
                check_frame_count(s[name], name)
            except ValueError as error:
                problems.append(str(error))
    problems += check_choices(s, {name: allowed for name, allowed in (("TRAINING_STRATEGY", STRATEGIES),
                                                                      ("MIXED_PRECISION", MIXED_PRECISIONS))
                                  if name in s})
    if problems:
        raise ValueError("bad settings for the plan:\n  " + "\n  ".join(problems))
    return s


def model_config(settings: dict) -> tuple[WanConfig, str]:
    """BASE_MODEL_DIR's config JSON, or the public base config when the folder has none;
    with the keyboard width of KEYBOARD_KEYS. Returns (config, where it came from)."""
    folder = Path(settings["BASE_MODEL_DIR"])
    if folder.is_dir() and any(folder.glob("*.json")):
        try:
            path = find_config_file(folder)
            config, source = WanConfig.from_json(path), str(path)
        except (CheckpointError, ValueError) as error:
            raise ValueError(f"BASE_MODEL_DIR={settings['BASE_MODEL_DIR']!r}: {error}") from error
    else:
        config, source = base_config(), f"the public base config ({folder} has no config JSON)"
    return config.with_keyboard_dim(len(settings["KEYBOARD_KEYS"])), source


# -----------------------------------------------------------------------------
# The line through a measured peak

@dataclass
class TokenLine:
    """One strategy/checkpointing setting's step peak as fixed + per_token x tokens."""

    measured: StepMeasurement

    @property
    def fixed(self) -> int:
        return sum(self.measured.breakdown.get(label, 0) for label in FIXED_LABELS)

    @property
    def per_token(self) -> float:
        return (self.measured.peak - self.fixed) / self.measured.tokens

    def peak(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    def most_tokens(self, capacity: float) -> int:
        """The most tokens per micro-batch whose peak, with the margin, fits capacity bytes."""
        room = largest_peak(capacity) - self.fixed
        return max(0, math.floor(room / self.per_token)) if self.per_token > 0 else 10**12


@dataclass
class Fit:
    line: TokenLine
    fits: bool                 # the measured settings, with the margin
    longest_frames: int        # at batch 1; 0: none
    largest_batch: int         # at the requested clip; 0: none
    checked: bool = False      # both answers measured (largest_fitting), not only read off the line


@dataclass
class Checked:
    """An answer measured where it lies: the largest value whose measured peak fits."""

    what: str                  # "the longest clip at batch 1" / "the largest BATCH_SIZE at ... frames"
    value: int                 # frames or clips; 0: not even the smallest fits
    peak: int                  # measured at value (0 when none fits)
    line_value: int            # where the line put it
    measurements: int


def largest_fitting(guess: int, limit: int, peak_at, capacity: float, slope: float) -> tuple[int, int, int]:
    """The largest whole x in 1..limit whose measured peak (peak_at(x), growing with x), with
    the margin, fits capacity bytes: (x or 0, its peak or 0, measurements). Searched from the
    line's guess: each next x is where the line through the two measurements nearest the
    limit (at first: slope bytes per unit of x) reaches it, kept strictly between the largest
    x known to fit and the smallest known not to, so the answer is always measured and so is
    the value above it."""
    room = largest_peak(capacity)
    measured = {}
    fitting, failing = 0, limit + 1
    x = min(max(guess, 1), limit)
    while failing - fitting > 1:
        measured[x] = peak_at(x)
        if measured[x] <= room:
            fitting = x
        else:
            failing = x
        if failing - fitting <= 1:
            break
        near = sorted(measured, key=lambda k: abs(measured[k] - room))[:2]
        if len(near) == 2 and near[0] != near[1] and measured[near[0]] != measured[near[1]]:
            slope = (measured[near[1]] - measured[near[0]]) / (near[1] - near[0])
        estimate = near[0] + (room - measured[near[0]]) / slope if slope > 0 else (fitting + failing) / 2
        x = min(max(math.floor(estimate), fitting + 1), failing - 1)
    return fitting, measured.get(fitting, 0), len(measured)


# -----------------------------------------------------------------------------
# The training plan

@dataclass
class TrainingPlan:
    settings: dict
    config_source: str
    step: StepMeasurement
    training_preview: Measurement
    cache_build: Measurement
    fits: list
    checks: list               # Checked answers: your settings' longest clip and largest batch (and the advice's)
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.step.peak

    @property
    def step_flops(self) -> int:
        return self.step.flops * self.settings["GRAD_ACCUM_STEPS"]

    def format(self) -> str:
        s, step = self.settings, self.step
        frames, height, width = s["SEQUENCE_LENGTH"], s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"]
        accum = s["GRAD_ACCUM_STEPS"]
        bf16 = s["MIXED_PRECISION"] == "bf16"
        lines = [
            f"GPU plan (fake tensors on the CPU, nothing allocated; {self.seconds:.0f} s)",
            f"model: {self.config_source}; {step.total_parameters / 1e6:,.1f}M parameters, "
            f"{step.trainable_parameters / 1e6:,.1f}M trained ({_strategy(s)})",
            f"clip: {frames} frames at {width}x{height} = {step.latent_frames} latent frames x "
            f"{step.tokens // step.batch // step.latent_frames} tokens = {step.tokens // step.batch:,} tokens; "
            f"BATCH_SIZE {s['BATCH_SIZE']}, GRAD_ACCUM_STEPS {accum}"
            + (" (gradients kept between micro-batches)" if accum >= 2 else "")
            + f", gradient checkpointing {'on' if s['GRADIENT_CHECKPOINTING'] else 'off'}, "
            + ("bf16 autocast (float32 masters of the trained tensors, frozen ones bf16)" if bf16 else "float32")
            + ", fused AdamW" + (f", EMA {s['EMA_DECAY']}" if s["EMA_DECAY"] > 0 else ""),
            "",
            "Training step (steady state: optimizer state present"
            + (", gradients of the earlier micro-batches present)" if accum >= 2 else ")"),
            f"predicted peak GPU memory: {gib(step.peak):.2f} GiB",
            f"  = {step.peak / 1e9:.2f} GB; with a margin of {MARGIN_FRACTION:.0%} + {MARGIN_FIXED_GIB} GiB: "
            f"{gib(with_margin(step.peak)):.2f} GiB",
            f"  at the peak ({where_peak(step.peak_op)}):",
        ]
        lines += _breakdown(step.breakdown)
        lines += [f"  the forward leaves {gib(step.saved_activations):.2f} GiB of activations for the backward",
                  f"  {NOT_COUNTED}; the margin stands for them", ""]
        for title, m in (("Latent-cache build (VAE + CLIP encode one clip, bf16)", self.cache_build),
                         ("Validation / preview during training (weights + optimizer state resident; one no-grad "
                          "sampling step, then the VAE decode)", self.training_preview)):
            lines.append(f"{title}: peak {gib(m.peak):.2f} GiB ({gib(with_margin(m.peak)):.2f} GiB with the margin),"
                         f" {where_peak(m.peak_op)}")
        lines += ["", *self._time_lines(), "", *self._fit_lines()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def _time_lines(self) -> list[str]:
        s = self.settings
        batch, accum, clips = s["BATCH_SIZE"], s["GRAD_ACCUM_STEPS"], s["NUM_CLIPS"]
        micro_batches = math.ceil(clips / batch)
        steps = math.ceil(micro_batches / accum)
        lines = [f"FLOPs: {self.step.flops / 1e12:,.1f} TFLOP per micro-batch (recomputation included), "
                 f"{self.step_flops / 1e12:,.1f} TFLOP per optimizer step ({accum} micro-batch(es))",
                 f"Time floor at each card's dense bf16 peak (100% utilisation; real runs reach "
                 f"{UTILISATION[0]:.0%}-{UTILISATION[1]:.0%} of it), "
                 f"{clips:,} clips (NUM_CLIPS) = {steps:,} optimizer steps per epoch",
                 f"  {'card':<10} {'memory':>7} {'TFLOP/s':>8} {'fits':>5} {'s/step':>8} {'min/epoch':>10} "
                 f"{'h/run':>7}"]
        needed = with_margin(self.step.peak)
        for card in CARDS:
            per_step = seconds_at_peak(self.step_flops, card)
            epoch = micro_batches * seconds_at_peak(self.step.flops, card)
            lines.append(f"  {card.name:<10} {card.memory_gb:>4g}GiB {card.bf16_tflops:>8.0f} "
                         f"{'yes' if needed <= card_bytes(card.memory_gb) else 'no':>5} {per_step:>8.2f} "
                         f"{epoch / 60:>10.1f} {epoch * s['NUM_EPOCHS'] / 3600:>7.1f}")
        lines.append(f"  (h/run: NUM_EPOCHS={s['NUM_EPOCHS']}; validation and previews come on top)")
        return lines

    def _fit_lines(self) -> list[str]:
        s = self.settings
        card = s["GPU_MEMORY_GB"]
        lines = [f"On a {card:g} GiB card (GPU_MEMORY_GB), with the margin - the step's peak at {s['SEQUENCE_LENGTH']} "
                 f"frames, the longest clip at BATCH_SIZE 1, the largest BATCH_SIZE at {s['SEQUENCE_LENGTH']} frames:",
                 f"  {'TRAINING_STRATEGY':<18} {'checkpointing':<13} {'peak':>10} {'+margin':>10} {'fits':>5} "
                 f"{'longest clip':>13} {'largest batch':>14}"]
        for fit in self.fits:
            m = fit.line.measured
            mine = m.strategy == s["TRAINING_STRATEGY"] and m.checkpointing == s["GRADIENT_CHECKPOINTING"]
            about = "" if fit.checked else "~"
            lines.append(
                f"{'*' if mine else ' '} {m.strategy:<18} {'on' if m.checkpointing else 'off':<13} "
                f"{gib(m.peak):>6.2f} GiB {gib(with_margin(m.peak)):>6.2f} GiB "
                f"{'yes' if fit.fits else 'no':>5} "
                + (f"{about + str(fit.longest_frames):>6} frames" if fit.longest_frames else f"{'-':>13}")
                + (f" {about + str(fit.largest_batch):>14}" if fit.largest_batch else f" {'-':>14}"))
        lines.append("  (* your settings; GRAD_ACCUM_STEPS as set. Their longest clip and largest batch are measured, "
                     "below; ~: where the line through each measured peak puts them (capped at "
                     f"{video_frame_count(MAX_LATENT_FRAMES)} frames and {MAX_BATCH}).)")
        mine = next((f for f in self.fits if f.line.measured is self.step), None)
        fitting = [f"{f.line.measured.strategy} with checkpointing {'on' if f.line.measured.checkpointing else 'off'}"
                   for f in self.fits if f.fits]
        if mine is not None:
            longest = max(self.fits, key=lambda f: (f.longest_frames, f.checked))
            otherwise = (f"the longest clip that fits: {longest.longest_frames} frames ({longest.line.measured.strategy}"
                         f", checkpointing {'on' if longest.line.measured.checkpointing else 'off'})"
                         if longest.longest_frames else "no clip fits this card")
            lines.append(f"  -> your settings {'fit' if mine.fits else 'do not fit'} a {card:g} GiB card; at "
                         f"{s['SEQUENCE_LENGTH']} frames " + (f"these fit: {', '.join(fitting)}" if fitting
                                                              else f"nothing fits; {otherwise}"))
        for check in self.checks:
            found = (f"{check.value}" + (" frames" if "clip" in check.what else "") + f": measured "
                     f"{gib(check.peak):.2f} GiB, {gib(with_margin(check.peak)):.2f} GiB with the margin" if check.value
                     else "none fits")
            lines.append(f"  checked: {check.what}, {found} (the line said {check.line_value or 'none'}; "
                         f"{check.measurements} measurements, the next size up measured too)")
        return lines


def _strategy(s: dict) -> str:
    return s["TRAINING_STRATEGY"] + (f", last {s['LAST_LAYERS']} blocks" if s["TRAINING_STRATEGY"] == "last_layers"
                                     else "")


def where_peak(op: str) -> str:
    if not op:
        return "before the run"
    return ("in the backward, at " + op.replace(" (backward)", "")) if op.endswith("(backward)") else f"at {op}"


def _breakdown(breakdown: dict) -> list[str]:
    return [f"    {label:<28} {gib(breakdown[label]):>7.2f} GiB" for label in memory.LABELS
            if breakdown.get(label, 0) > 0]


def fit_card(line: TokenLine, settings: dict, tokens_per_frame: int, latent_frames: int) -> Fit:
    """The line's answers (Fit.checked False; check_fit measures them)."""
    capacity = card_bytes(settings["GPU_MEMORY_GB"])
    most = line.most_tokens(capacity)
    longest = min(MAX_LATENT_FRAMES, most // tokens_per_frame)
    batch = min(MAX_BATCH, most // (tokens_per_frame * latent_frames))
    return Fit(line, with_margin(line.measured.peak) <= capacity,
               video_frame_count(longest) if longest >= 1 else 0, batch)


def check_fit(fit: Fit, measure, settings: dict, grid: tuple, tokens_per_frame: int) -> tuple[Fit, list]:
    """The fit with its longest clip and largest batch measured (largest_fitting), and the
    two Checked records. measure(settings, latent_frames, height, width) -> StepMeasurement
    (the fit's strategy and checkpointing are set here)."""
    m = fit.line.measured
    mine = dict(settings, TRAINING_STRATEGY=m.strategy, GRADIENT_CHECKPOINTING=m.checkpointing)
    latent_frames, height, width = grid
    capacity = card_bytes(settings["GPU_MEMORY_GB"])
    line_frames = (fit.longest_frames - 1) // 4 + 1 if fit.longest_frames else 0
    frames, frames_peak, count = largest_fitting(
        line_frames, MAX_LATENT_FRAMES, lambda f: measure(dict(mine, BATCH_SIZE=1), f, height, width).peak, capacity,
        fit.line.per_token * tokens_per_frame)
    longest = Checked("the longest clip at batch 1", video_frame_count(frames) if frames else 0, frames_peak,
                      fit.longest_frames, count)
    batch, batch_peak, count = largest_fitting(
        fit.largest_batch, MAX_BATCH, lambda b: measure(dict(mine, BATCH_SIZE=b), latent_frames, height, width).peak,
        capacity, fit.line.per_token * tokens_per_frame * latent_frames)
    largest = Checked(f"the largest BATCH_SIZE at {settings['SEQUENCE_LENGTH']} frames", batch, batch_peak,
                      fit.largest_batch, count)
    return Fit(fit.line, fit.fits, longest.value, largest.value, checked=True), [longest, largest]


def plan_training(settings: dict, recipe: TrainingRecipe | None = None, config: WanConfig | None = None,
                  encoders: tuple | None = None, search: bool = True) -> TrainingPlan:
    """Plan the training the settings describe (all of the training script's settings) on one
    GPU of GPU_MEMORY_GB, with NUM_CLIPS training clips.

    recipe: how the step is run (training/recipe.py; default: the trainer's). config /
    encoders (a VAEConfig, CLIPVisionConfig pair): instead of BASE_MODEL_DIR's config and
    the real encoders (tests use tiny ones). search=False measures only your own settings
    (and checks no answer).
    """
    started = time.perf_counter()
    s = resolve_settings(settings)
    notes = [f"{name} not given: {value} assumed (--{name}=... sets it)" for name, value in PLANNER_DEFAULTS.items()
             if settings.get(name) is None]
    if config is None:
        config, source = model_config(s)
    else:
        source = "the given config"
    vae_config, clip_config = encoders or (None, None)
    latent_frames, latent_height, latent_width = latent_grid(s["SEQUENCE_LENGTH"], s["VIDEO_HEIGHT"],
                                                             s["VIDEO_WIDTH"])
    per_frame = tokens_per_latent_frame(latent_height, latent_width)
    grid = (latent_frames, latent_height, latent_width)
    step, preview = measure_training(config, s, *grid, recipe=recipe, count_flops=True, with_preview=True,
                                     vae_config=vae_config)
    cache_build = measure_cache_build(s, vae_config, clip_config)
    fits, checks = [], []
    if search:
        for strategy in STRATEGIES:
            for checkpointing in (True, False):
                if (strategy, checkpointing) == (s["TRAINING_STRATEGY"], s["GRADIENT_CHECKPOINTING"]):
                    measured = step
                else:
                    other = dict(s, TRAINING_STRATEGY=strategy, GRADIENT_CHECKPOINTING=checkpointing)
                    measured, _ = measure_training(config, other, *grid, recipe=recipe)
                fits.append(fit_card(TokenLine(measured), s, per_frame, latent_frames))

        def measure(settings_at, frames, height, width):
            return measure_training(config, settings_at, frames, height, width, recipe=recipe)[0]

        mine = next(i for i, f in enumerate(fits) if f.line.measured is step)
        fits[mine], checks = check_fit(fits[mine], measure, s, grid, per_frame)
        while not any(f.fits for f in fits):  # the advice names the longest clip of any row: checked too
            advised = max(range(len(fits)), key=lambda i: (fits[i].longest_frames, fits[i].checked))
            if fits[advised].checked:
                break
            fits[advised], more = check_fit(fits[advised], measure, s, grid, per_frame)
            checks.append(dataclasses.replace(more[0], what=f"{more[0].what} ({fits[advised].line.measured.strategy}, "
                                              f"checkpointing {'on' if fits[advised].line.measured.checkpointing else 'off'})"))
    else:
        fits.append(fit_card(TokenLine(step), s, per_frame, latent_frames))
    return TrainingPlan(s, source, step, preview, cache_build, fits, checks, time.perf_counter() - started, notes)


# -----------------------------------------------------------------------------
# The preview plan (generate_preview.py)

@dataclass
class PreviewPlan:
    settings: dict
    config_source: str
    window: Measurement
    seconds: float = 0.0

    def format(self) -> str:
        s, m = self.settings, self.window
        windows = len(window_spans(s["NUM_FRAMES"], s["WINDOW_FRAMES"]))
        models = 2 if s.get("COMPARE") else 1
        step = m.flops_by_part.get("sampling step", 0)
        per_window = m.flops_by_part.get("conditioning", 0) + s["NUM_STEPS"] * step + m.flops_by_part.get("decode", 0)
        total = per_window * windows * models
        fits = with_margin(m.peak) <= card_bytes(s["GPU_MEMORY_GB"])
        lines = [f"GPU plan for generate_preview.py (fake tensors on the CPU, nothing allocated; {self.seconds:.0f} s)",
                 f"model: {self.config_source}; bf16 weights, VAE and CLIP resident; windows of {s['WINDOW_FRAMES']} "
                 f"frames at {s['VIDEO_WIDTH']}x{s['VIDEO_HEIGHT']}",
                 f"predicted peak GPU memory: {gib(m.peak):.2f} GiB",
                 f"  = {m.peak / 1e9:.2f} GB; with a margin of {MARGIN_FRACTION:.0%} + {MARGIN_FIXED_GIB} GiB: "
                 f"{gib(with_margin(m.peak)):.2f} GiB; {where_peak(m.peak_op)}",
                 *_breakdown(m.breakdown), f"  {NOT_COUNTED}",
                 f"  {'fits' if fits else 'does not fit'} a {s['GPU_MEMORY_GB']:g} GiB card (GPU_MEMORY_GB)",
                 f"FLOPs: {total / 1e12:,.1f} TFLOP for {windows} window(s) x {models} model(s): "
                 f"{step / 1e12:,.2f} per sampling step x NUM_STEPS={s['NUM_STEPS']}, "
                 f"{m.flops_by_part.get('conditioning', 0) / 1e12:,.2f} for the conditioning, "
                 f"{m.flops_by_part.get('decode', 0) / 1e12:,.2f} for the decode",
                 f"  {'card':<10} {'memory':>7} {'fits':>5} {'seconds (floor)':>16}"]
        for card in CARDS:
            lines.append(f"  {card.name:<10} {card.memory_gb:>4g}GiB "
                         f"{'yes' if with_margin(m.peak) <= card_bytes(card.memory_gb) else 'no':>5} "
                         f"{seconds_at_peak(total, card):>16.1f}")
        return "\n".join(lines)


def plan_preview(settings: dict, config: WanConfig | None = None, encoders: tuple | None = None) -> PreviewPlan:
    """Plan generate_preview.py's run (all of its settings)."""
    started = time.perf_counter()
    s = resolve_settings(settings)
    if config is None:
        config, source = model_config(s)
    else:
        source = "the given config"
    window = measure_preview(config, s, *(encoders or (None, None)))
    return PreviewPlan(s, source, window, time.perf_counter() - started)
