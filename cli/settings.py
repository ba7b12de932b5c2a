"""The scripts' settings: the block at the top of each script, `--NAME=value` overrides,
and `--help`, which lists every setting with its value and its comment.

A script's settings are the upper-case names assigned between its two marker lines

    # -----------------------------------------------------------------------------
    # Settings: edit them here, or override any of them with --NAME=value.
    ...
    # -----------------------------------------------------------------------------

Each one's description is the comment at the end of its line, or else the comment lines
right above it; a comment line above a setting that has its own comment heads a group.
"""

import ast
import io
import math
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

from generation.action_scripts import MAX_SCRIPT_ROWS
from recordings.layout import LAYOUT_RULES, MAX_FRAME_NUMBER
from runs.logbook import tensorboard_installed
from wan.config import FRAMES_PER_BLOCK
from wan.device import pick_device
from wan.flow import NUM_TRAIN_TIMESTEPS
from wan.lora import TARGET_GROUPS, TARGET_LAYERS
from wan.shapes import PIXELS_PER_TOKEN_SIDE, VAE_TIME_STRIDE, check_frame_count, latent_frame_count

BLOCK_START = "# Settings: edit them here"
BLOCK_END = "# ---"
HELP_FLAGS = ("--help", "-h")


class SettingsError(ValueError):
    """A bad command line or setting; the message names the setting and what was expected."""


class ShowHelp(Exception):
    """--help was given: the message is the help text (print it and exit with 0)."""


def parse_overrides(argv, namespace_dict) -> tuple[dict, list[str]]:
    """Split `--NAME=value` overrides of upper-case constants from the other arguments.

    Each value is coerced to the type of the constant's current value in namespace_dict:
    int, float, bool (true/false/1/0/yes/no), str, tuple (comma-separated), or None-able
    (a None default takes None/none, else an int, a float or a string). Returns
    (overrides, other_args); namespace_dict is not changed. Raises ValueError for an
    unknown name (listing the valid ones) or a value of the wrong type.
    """
    valid = sorted(n for n, v in namespace_dict.items() if n.isupper() and _overridable(v))
    overrides, rest = {}, []
    for arg in argv:
        match = re.fullmatch(r"--([A-Z][A-Z0-9_]*)(=(.*))?", arg, re.DOTALL)
        if not match:
            rest.append(arg)
            continue
        name, value = match.group(1), match.group(3)
        if name not in valid:
            known = "" if name not in namespace_dict else f" ({name} cannot be set from the command line)"
            raise SettingsError(f"unknown setting --{name}{known}; valid names: {', '.join(valid)}")
        if value is None:
            raise SettingsError(f"--{name} needs a value: --{name}=VALUE")
        overrides[name] = _coerce(name, value, namespace_dict[name])
    return overrides, rest


def _overridable(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, tuple))


def _coerce(name: str, text: str, default):
    def bad(kind: str):
        return SettingsError(f"--{name}={text}: {name} is {kind} (now {default!r})")

    text = text.strip()
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise bad("a bool: true/false, 1/0, yes/no")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise bad("an int") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise bad("a float") from None
    if isinstance(default, str):
        return text
    if isinstance(default, tuple):
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        element = type(default[0]) if default else str
        if element in (int, float):
            try:
                return tuple(element(item) for item in items)
            except ValueError:
                raise bad(f"a comma-separated list of {element.__name__}s") from None
        return items
    if text.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class ScriptSettings:
    """A script's settings block: names in order, default values, descriptions, group headings."""

    script: Path
    names: tuple
    descriptions: dict           # name -> one line
    headings: dict               # name -> the group heading shown above it
    module_globals: dict         # the script's namespace, where the current values live

    @classmethod
    def of(cls, script_globals: dict) -> "ScriptSettings":
        """Read the settings block of the script whose module globals these are."""
        script = Path(script_globals["__file__"])
        names, descriptions, headings = read_settings_block(script.read_text(encoding="utf-8"), script.name)
        return cls(script, tuple(names), descriptions, headings, script_globals)

    @property
    def defaults(self) -> dict:
        """NAME -> the value in the script now (the block's value unless something changed it)."""
        return {name: self.module_globals[name] for name in self.names}

    def parse_checked(self, argv, flags: dict[str, str], presets: dict[str, dict], check) -> tuple[dict, bool]:
        """A front-door script's settings: parse (defaults, the presets of the flags given,
        --NAME=value), then the script's own check(settings). Returns (settings, --demo given)."""
        settings, given, _ = self.parse(argv, flags, presets)
        check(settings)
        return settings, "--demo" in given

    def parse(self, argv, flags: dict[str, str] | None = None, presets: dict[str, dict] | None = None,
              usage: str = "", other_arguments: bool = False) -> tuple[dict, set[str], list[str]]:
        """argv -> (settings, flags given, other arguments).

        settings = defaults, then the preset of every flag given that has one (e.g. --demo),
        then --NAME=value overrides. flags maps each accepted --flag to its help line;
        other arguments are an error unless positional. --help/-h raises ShowHelp.
        """
        flags, presets = dict(flags or {}), dict(presets or {})
        argv = list(argv)
        given = {a for a in argv if a in flags}
        defaults = self.defaults
        overrides, rest = parse_overrides([a for a in argv if a not in flags and a not in HELP_FLAGS], defaults)
        settings = dict(defaults)
        for flag in given:
            settings.update(presets.get(flag, {}))
        settings.update(overrides)
        if any(a in HELP_FLAGS for a in argv):
            raise ShowHelp(self.help_text(settings, flags, usage))
        if rest and not other_arguments:
            raise SettingsError(f"unexpected argument(s) {' '.join(rest)}; use --NAME=value with one of the "
                                f"settings (--help lists them)"
                                + (f", or {', '.join(flags)}" if flags else ""))
        return settings, given, rest

    def help_text(self, values: dict, flags: dict[str, str], usage: str = "") -> str:
        name = self.script.name
        lines = [f"usage: python {name} " + (usage or "[--NAME=value ...]")
                 + "".join(f" [{flag}]" for flag in flags) + " [--help]"]
        if flags:
            lines += ["", "options:"] + [f"  {flag:<12} {text}" for flag, text in flags.items()]
        lines += ["", f"settings (edit them at the top of {name}, or override any with --NAME=value; "
                      "values shown as this command line sets them):"]
        for setting in self.names:
            if setting in self.headings:
                lines.append(f"  # {self.headings[setting]}")
            lines.append(f"  {setting} = {values[setting]!r}")
            lines.append(f"      {self.descriptions.get(setting, '')}")
        return "\n".join(lines)


def read_settings_block(source: str, where: str = "script") -> tuple[list[str], dict, dict]:
    """(names, descriptions, group headings) of the settings block in a script's source."""
    lines = source.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(BLOCK_START))
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(BLOCK_END))
    except StopIteration:
        raise ValueError(f"{where}: no settings block (a line starting {BLOCK_START!r} and a closing "
                         f"{BLOCK_END!r} line)") from None
    comments = {}  # 1-based line -> comment text, for comments after code on that line
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.line.strip() != token.string:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    names, descriptions, headings = [], {}, {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and start < node.lineno - 1 < end):
            continue
        for target in node.targets:
            for name in _assigned_names(target):
                names.append(name)
                above = _comment_lines_above(lines, node.lineno - 1, start)
                if node.lineno in comments:
                    descriptions[name] = comments[node.lineno]
                    if above:
                        headings[name] = " ".join(above)
                else:
                    descriptions[name] = " ".join(above)
    return names, descriptions, headings


def _assigned_names(target) -> list[str]:
    elements = target.elts if isinstance(target, ast.Tuple) else [target]
    return [e.id for e in elements if isinstance(e, ast.Name) and e.id.isupper()]


def _comment_lines_above(lines: list[str], index: int, stop: int) -> list[str]:
    """The whole-line comments right above lines[index] (not past the block's first line)."""
    found = []
    i = index - 1
    while i > stop and lines[i].lstrip().startswith("#"):
        found.insert(0, lines[i].lstrip().lstrip("#").strip())
        i -= 1
    return found


# -----------------------------------------------------------------------------
# The range of every numeric setting, for every script, in one place. A rule returns what
# is expected of a value it refuses, or None.

def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: int, most: int | None = None):
    """A whole number from low (to most, when given: every size, length and count has one)."""
    def rule(value):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be a whole number, at least {low}" + (f" and at most {most:,}" if most is not None else "")
        if value < low:
            return f"must be at least {low}"
        if most is not None and value > most:
            return f"must be at most {most:,}"
    return rule


def whole_in(low: int, high: int):
    def rule(value):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"must be a whole number in [{low}, {high}]"
    return rule


def positive(value):
    if not _number(value) or value <= 0:
        return "must be a positive number"


def positive_at_most(most: float):
    def rule(value):
        if not _number(value) or not 0 < value <= most:
            return f"must be a positive number, at most {most:,}"
    return rule


def in_range(low: float, high: float, high_included: bool = True):
    def rule(value):
        if not _number(value) or value < low or (value > high if high_included else value >= high):
            return f"must be in [{low}, {high}{']' if high_included else ')'}"
    return rule


def finite(value):
    if not _number(value):
        return "must be a finite number"


def frame_count(value):
    if not isinstance(value, int) or isinstance(value, bool):
        return "must be a whole number of frames, 4k+1 (1, 5, 9, ..., 57, ...)"
    if value > MAX_CLIP_FRAMES:
        return f"has {value:,} frames; at most {MAX_CLIP_FRAMES:,} (4k+1) are made or trained at once"
    try:
        check_frame_count(value, "")
    except (ValueError, TypeError) as error:
        return str(error).strip()


def side(value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % PIXELS_PER_TOKEN_SIDE \
            or value > MAX_SIDE:
        return f"must be a positive multiple of {PIXELS_PER_TOKEN_SIDE} pixels, at most {MAX_SIDE:,}"


def items_at_most(most: int, what: str = "items"):
    """A list setting (comma-separated on the command line) of at most `most` entries."""
    def rule(value):
        if isinstance(value, (tuple, list)) and len(value) > most:
            return f"has {len(value):,} {what}; at most {most} are usable"
    return rule


def two_betas(value):
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_number(b) and 0 <= b < 1 for b in value)):
        return "two numbers in [0, 1)"


def optional(rule):
    return lambda value: None if value is None else rule(value)


def tensorboard(value):
    if not isinstance(value, bool):
        return "must be true or false"
    if value and not tensorboard_installed():
        return "the tensorboard package is not installed (pip install tensorboard), or set TENSORBOARD=false"


def device(value):
    try:
        pick_device(value)
    except ValueError as error:
        return str(error)  # already says DEVICE=...


# The bounds of every size, length and count: what the real model (Matrix-Game 2.0: 30 blocks
# of width 1536, trained on 57-frame clips at 352x640) or a machine can use, with the reason.
# tests/test_hardening.py checks that every whole-number and list setting of the five
# scripts has one, so a new unbounded setting fails there.
#
# Frames made or trained at once (SEQUENCE_LENGTH, WINDOW_FRAMES, NUM_FRAMES): 1025 frames
# (257 latent frames, 41 s). The planner puts one such clip of the cheapest run
# (action_only, gradient checkpointing, 352x640) at 85 GB, beyond an 80 GB card, and a
# preview holds each panel whole (2.8 GB of float32 pixels at 352x640).
MAX_CLIP_FRAMES = 1025
MAX_CLIP_LATENTS = latent_frame_count(MAX_CLIP_FRAMES)  # 257: streams and windows in latent frames
# A side of 2048 px: 57 frames of 2048x2048 are 245,760 tokens, more than the 1025-frame
# clip above (226,160 at 352x640); the base model was trained at 640 px wide.
MAX_SIDE = 2048
MAX_MODEL_BLOCKS = 30         # the real model's transformer blocks (LAST_LAYERS)
MAX_LORA_RANK = 1536          # the model's width: a rank beyond it is no longer low (use TRAINING_STRATEGY=full)
MAX_BATCH = 64                # clips per micro-batch per GPU: far beyond what an 80 GB card holds (--plan)
MAX_ACCUMULATION = 1024       # micro-batches per optimizer step
MAX_EPOCHS = 10_000           # passes over the data (and the epoch intervals)
# optimizer steps of a run (and step intervals): the public recipe's longest stage is 60k
# steps; metrics.csv keeps a row per step in memory
MAX_STEPS = 1_000_000
MAX_SAMPLING_STEPS = NUM_TRAIN_TIMESTEPS  # Euler steps: the sampler's grid has 1000 timesteps
MAX_STUDENT_STEPS = 50        # a student's DENOISING_STEPS (the students use 3 or 4; 50: the base model's sampling)
MAX_KEYS = 64                 # keyboard columns (the official models have 2 to 7)
MAX_WORKERS = 64              # DataLoader processes, each holding a copy of the dataset
MAX_VAL_BLOCK_CLIPS = 10_000  # consecutive clips held out together: over 3 hours of 57-frame clips at stride 28
# training clips per epoch (--plan's NUM_CLIPS): 10 million 57-frame clips at stride 28 are
# 130 days of recordings at 25 fps
MAX_CLIPS = 10_000_000
MAX_VALIDATION_CLIPS = 256    # clips (and noises) validated: every one costs a teacher video kept in memory
MAX_SEED = 2**32 - 1          # seeds become torch generator seeds as SEED x 100003 + epoch (below 2^63)
MAX_GPU_MEMORY_GB = 1024      # --plan's card: beyond any single GPU
# Headless play: an hour of video at 25 fps (7,500 blocks of 12 frames); the stream takes
# constant memory, but its time and its file grow with it: longer runs belong in several files.
MAX_PLAY_FRAMES = MAX_SCRIPT_ROWS
MAX_PLAY_BLOCKS = MAX_PLAY_FRAMES // (VAE_TIME_STRIDE * FRAMES_PER_BLOCK)
# A frame number (START_FRAME, CLIP_STRIDE): the recordings' own bound (a year at 25 fps).
MAX_FRAME = MAX_FRAME_NUMBER

SETTING_RULES = {
    # data
    "SEQUENCE_LENGTH": frame_count, "CLIP_STRIDE": optional(at_least(1, MAX_FRAME)), "MOUSE_SCALE": finite,
    "VAL_FRACTION": in_range(0, 1, high_included=False), "VAL_BLOCK_CLIPS": at_least(1, MAX_VAL_BLOCK_CLIPS),
    "SPLIT_SEED": at_least(0, MAX_SEED), "VIDEO_HEIGHT": side, "VIDEO_WIDTH": side,
    "KEYBOARD_KEYS": items_at_most(MAX_KEYS, "keys"),
    **LAYOUT_RULES,  # FRAME_NAME, CSV_COLUMNS, CSV_SEPARATOR, CSV_ENCODING, CSV_FRAME_OFFSET: recordings/layout.py
    # training
    "LAST_LAYERS": at_least(0, MAX_MODEL_BLOCKS), "BATCH_SIZE": at_least(1, MAX_BATCH),
    "GRAD_ACCUM_STEPS": at_least(1, MAX_ACCUMULATION), "NUM_EPOCHS": at_least(1, MAX_EPOCHS),
    "LEARNING_RATE": positive, "MIN_LR_RATIO": in_range(0, 1), "WEIGHT_DECAY": in_range(0, 1),
    "WARMUP_STEPS": at_least(0, MAX_STEPS), "MAX_GRAD_NORM": positive,
    "EMA_DECAY": in_range(0, 1, high_included=False), "TIMESTEP_SHIFT": positive, "MIN_SIGMA": in_range(0, 1),
    "MAX_SIGMA": in_range(0, 1), "VAL_SIGMAS": at_least(1, MAX_SAMPLING_STEPS), "NUM_WORKERS": at_least(0, MAX_WORKERS),
    "SAVE_EVERY_EPOCHS": at_least(0, MAX_EPOCHS), "VAL_EVERY_EPOCHS": at_least(1, MAX_EPOCHS),
    "SAVE_EVERY_STEPS": at_least(0, MAX_STEPS), "LOG_EVERY_STEPS": at_least(1, MAX_STEPS),
    "TENSORBOARD": tensorboard, "NUM_CLIPS": optional(at_least(1, MAX_CLIPS)),
    "SEED": at_least(0, MAX_SEED), "PREVIEW_EVERY_EPOCHS": at_least(0, MAX_EPOCHS),
    "PREVIEW_STEPS": at_least(1, MAX_SAMPLING_STEPS),
    "LORA_RANK": at_least(1, MAX_LORA_RANK), "LORA_ALPHA": positive, "LORA_DROPOUT": in_range(0, 1, high_included=False),
    "LORA_TARGETS": items_at_most(len(TARGET_GROUPS) + len(TARGET_LAYERS), "targets"),
    # previews and play
    "START_FRAME": at_least(0, MAX_FRAME), "NUM_FRAMES": frame_count, "WINDOW_FRAMES": frame_count,
    "NUM_STEPS": at_least(1, MAX_SAMPLING_STEPS), "DEVICE": device, "GPU_MEMORY_GB": positive_at_most(MAX_GPU_MEMORY_GB),
    "PORT": at_least(0, 65535), "MOUSE_SENSITIVITY": positive, "MOUSE_LIMIT": positive,
    "NUM_BLOCKS": at_least(0, MAX_PLAY_BLOCKS), "DENOISING_STEPS": items_at_most(MAX_STUDENT_STEPS, "steps"),
    # distillation
    "LOCAL_ATTN_SIZE": at_least(1, MAX_CLIP_LATENTS), "SINK_SIZE": at_least(0, MAX_CLIP_LATENTS),
    "EMA_START_STEP": at_least(0, MAX_STEPS), "ADAM_BETAS": two_betas,
    "DF_STEPS": at_least(1, MAX_STEPS), "DF_LEARNING_RATE": positive, "DF_SHIFT": positive, "DF_MIN_SIGMA": in_range(0, 1),
    "DF_MAX_SIGMA": in_range(0, 1), "DMD_STEPS": at_least(1, MAX_STEPS), "GENERATOR_EVERY": at_least(1, MAX_STEPS),
    "GENERATOR_LR": positive, "CRITIC_LR": positive, "SCORE_MIN_TIMESTEP": in_range(0, 1000),
    "SCORE_MAX_TIMESTEP": in_range(0, 1000), "VAL_EVERY_STEPS": at_least(1, MAX_STEPS),
    "VAL_CLIPS": at_least(1, MAX_VALIDATION_CLIPS), "VAL_SAMPLES": at_least(1, MAX_VALIDATION_CLIPS),
    "TEACHER_STEPS": at_least(1, MAX_SAMPLING_STEPS), "EXPORT_EVERY_STEPS": at_least(0, MAX_STEPS),
    "STREAM_CHUNK_LATENTS": at_least(1, MAX_CLIP_LATENTS), "STREAM_OVERLAP_LATENTS": at_least(1, MAX_CLIP_LATENTS),
    "STREAM_MAX_LATENTS": at_least(1, MAX_CLIP_LATENTS), "LONG_TUNE_STEPS": at_least(1, MAX_STEPS),
    "GPUS": whole_in(1, 64), "LORA_ROLES": items_at_most(2, "roles"),  # student and critic (training/roles.py)
    "PLAN_STAGES": items_at_most(3, "stages"),  # distillation's A, B and C
}


def check_ranges(settings: dict) -> list[str]:
    """'NAME=value: what is expected' for every setting whose value breaks its rule."""
    problems = []
    for name, value in settings.items():
        rule = SETTING_RULES.get(name)
        problem = rule(value) if rule else None
        if problem:
            if problem.startswith(name):  # the rule's own words name the setting
                problems.append(problem)
            elif problem.startswith("has "):
                problems.append(f"{name} {problem}")
            else:
                problems.append(f"{name}={value!r}: {problem}")
    return problems


def check_choices(settings: dict, choices: dict) -> list[str]:
    """'NAME=value: choose one of ...' for every setting of choices ({name: allowed values})
    whose value is not one of them."""
    return [f"{name}={settings[name]!r}: choose one of {', '.join(map(str, allowed))}"
            for name, allowed in choices.items() if settings[name] not in allowed]


def raise_for_problems(problems: list[str]) -> None:
    """One SettingsError listing every problem, or nothing."""
    if problems:
        raise SettingsError("bad settings:\n  " + "\n  ".join(problems))
