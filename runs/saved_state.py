"""What a saved training state must hold before a run continues from it, for every trainer.

torch.load(weights_only=True) guarantees the state runs no code, not that it is the state
a trainer wrote: one edited by hand, from another version or damaged could lack a field,
hold a string where a step count belongs, a tensor of another shape, a schedule with other
fields, NaN weights or a step count of 10^12. Each trainer names its fields with an
Expect (what is expected of the value, and what is wrong with one that is not), and
check_saved_state refuses the whole state at once, naming the file and every field,
before any of it is loaded. The fields every trainer writes (settings, global_step,
history) are checked when the run folder opens the state (runs/folder.py), the rest by
each trainer once its model is built (finetune_base_model.py restore(),
distill_streaming_model.py restore()).
"""

import math
from dataclasses import MISSING, dataclass, fields as dataclass_fields, replace
from typing import Callable

import torch

from runs.errors import TrainingError

MAX_SAVED_STEPS = 10**9  # optimizer steps a saved run may have done: decades at a step per second


@dataclass(frozen=True)
class Expect:
    what: str                                             # what the field holds, said when it is wrong
    problem: Callable[[object], str | None] = lambda value: None  # what is wrong with a value, or None
    optional: bool = False                                # states of earlier versions may lack it


def check_saved_state(state: dict, path, expected: dict[str, Expect],
                      relations: tuple[Callable[[dict], str | None], ...] = ()) -> None:
    """Raise a TrainingError naming path and every field of `expected` that state lacks or
    holds wrongly; then, if each field is right, every relation between fields that fails."""
    problems = []
    for name, expect in expected.items():
        if name not in state:
            if not expect.optional:
                problems.append(f"{name}: missing; expected {expect.what}")
            continue
        problem = expect.problem(state[name])
        if problem:
            problems.append(f"{name}: {problem}; expected {expect.what}")
    if not problems:
        problems = [problem for problem in (relation(state) for relation in relations) if problem]
    if problems:
        raise TrainingError(
            f"cannot resume from {path}: it is not a state this run can continue ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
            + f"\nRestore the file from a backup, or start a new run in another CHECKPOINT_DIR (or remove "
              f"{path.name if hasattr(path, 'name') else path} to start over in this one)")


# -----------------------------------------------------------------------------
# Expectations

def _got(value) -> str:
    text = repr(value)
    return f"got {type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole_number(low: int, high: int) -> Expect:
    def problem(value):
        if not _whole(value):
            return _got(value)
        if not low <= value <= high:
            return f"got {value:,}"
    return Expect(f"a whole number from {low:,} to {high:,}", problem)


def number_in(low: float, high: float) -> Expect:
    return Expect(f"a finite number in [{low:g}, {high:g}]",
                  lambda value: None if _finite(value) and low <= value <= high else _got(value))


def of_type(kind: type, what: str) -> Expect:
    return Expect(what, lambda value: None if isinstance(value, kind) else _got(value))


def list_of(kind: type, what: str) -> Expect:
    def problem(value):
        if not isinstance(value, list):
            return _got(value)
        wrong = next((i for i, item in enumerate(value) if not isinstance(item, kind)), None)
        if wrong is not None:
            return f"entry {wrong} {_got(value[wrong])}"
    return Expect(what, problem)


def sequence(what: str, *items: Expect) -> Expect:
    """A list of exactly these values, each as its Expect says."""
    def problem(value):
        if not isinstance(value, list) or len(value) != len(items):
            return _got(value)
        wrong = next((i for i, (item, expect) in enumerate(zip(value, items)) if expect.problem(item)), None)
        if wrong is not None:
            return f"entry {wrong} {_got(value[wrong])} ({items[wrong].what})"
    return Expect(what, problem)


def nullable(expect: Expect) -> Expect:
    return replace(expect, what=f"{expect.what}, or None",
                   problem=lambda value: None if value is None else expect.problem(value))


def optional(expect: Expect) -> Expect:
    return replace(expect, optional=True)


def absent_or_none(what: str) -> Expect:
    """A field this run has no use for (e.g. the critic of a stage without one): None."""
    return Expect(f"None ({what})", lambda value: None if value is None else _got(value), optional=True)


def _tensor_problem(name: str, tensor, shape) -> str | None:
    if type(tensor) is not torch.Tensor:
        return f"{name} {_got(tensor)}"
    if shape is not None and list(tensor.shape) != list(shape):
        return f"{name} has shape {list(tensor.shape)}, this run's model {list(shape)}"
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        return f"{name} holds {int((~torch.isfinite(tensor)).sum()):,} non-finite values (NaN or inf)"
    return None


def tensors_like(targets: dict, what: str) -> Expect:
    """A dict of exactly targets' names, each a tensor of the target's (whole) shape, finite."""
    def problem(value):
        if not isinstance(value, dict):
            return _got(value)
        missing = [n for n in targets if n not in value]
        extra = [n for n in value if n not in targets]
        if missing or extra:
            return (f"{len(missing)} of this run's tensors missing ({', '.join(map(str, missing[:3]))}"
                    f"{' ...' if len(missing) > 3 else ''}), {len(extra)} not in this run's model "
                    f"({', '.join(map(str, extra[:3]))}{' ...' if len(extra) > 3 else ''})")
        found = [p for p in (_tensor_problem(n, value[n], targets[n].shape) for n in targets) if p]
        return "; ".join(found[:3]) + (f" (and {len(found) - 3} more)" if len(found) > 3 else "") if found else None
    return Expect(f"{what}: {len(targets)} finite tensors of this run's shapes", problem)


def optimizer_state_for(targets: dict, what: str) -> Expect:
    """An optimizer's saved state (torch's state_dict layout, by parameter name): "state" a
    dict of per-parameter dicts, "param_groups" a list of dicts; every tensor finite, and a
    moment of a parameter of this run (a plain tensor of one or more dimensions) of its shape."""
    def problem(value):
        if not isinstance(value, dict) or not isinstance(value.get("state"), dict) \
                or not isinstance(value.get("param_groups"), list) \
                or not all(isinstance(group, dict) for group in value["param_groups"]):
            return _got(value)
        for name, entry in value["state"].items():
            if not isinstance(entry, dict):
                return f"state of {name} {_got(entry)}"
            target = targets.get(name)
            for key, item in entry.items():
                if not torch.is_tensor(item):
                    if not (_finite(item) or isinstance(item, (bool, str)) or item is None):
                        return f"{key} of {name} {_got(item)}"
                    continue
                plain_moment = type(item) is torch.Tensor and item.dim() > 0 and target is not None
                found = _tensor_problem(f"{key} of {name}", item, target.shape if plain_moment else None) \
                    if type(item) is torch.Tensor else None
                if found:
                    return found
    return Expect(f"{what} (its state and param_groups, finite)", problem)


def schedule_state(schedule_class) -> Expect:
    """A learning-rate schedule's saved fields (training/schedule.py LRSchedule: warm-up,
    total steps, floor, and where a resume re-planned it), in range."""
    names = [f.name for f in dataclass_fields(schedule_class)]
    required = [f.name for f in dataclass_fields(schedule_class) if f.default is MISSING]
    parts = {"warmup": whole_number(0, MAX_SAVED_STEPS), "total": whole_number(1, MAX_SAVED_STEPS),
             "min_ratio": number_in(0, 1), "anchor_step": whole_number(0, MAX_SAVED_STEPS),
             "anchor_factor": number_in(0, 1)}

    def problem(value):
        if not isinstance(value, dict):
            return _got(value)
        unknown = [str(k)[:40] for k in value if k not in names]
        if unknown:
            return f"fields a schedule does not have: {', '.join(unknown[:5])}"
        for name in required:
            if name not in value:
                return f"no {name}"
        for name, item in value.items():
            wrong = parts.get(name, Expect("")).problem(item)
            if wrong:
                return f"{name} {wrong} ({parts[name].what})"
    return Expect(f"the learning-rate schedule ({', '.join(names)})", problem)


# -----------------------------------------------------------------------------
# What every trainer's state holds

COMMON_FIELDS = {
    "settings": of_type(dict, "the run's settings, a dict"),
    "global_step": whole_number(0, MAX_SAVED_STEPS),
    "history": list_of(dict, "a list of one dict per validation or epoch"),
}


def check_common_fields(state: dict, path) -> None:
    """The fields every trainer writes and the run folder reads: settings (the resume check
    compares them), global_step, history."""
    check_saved_state(state, path, COMMON_FIELDS)


def step_within_schedule(state: dict) -> str | None:
    """A relation: the steps done cannot pass the steps the saved schedule plans."""
    schedule = state.get("schedule")
    if isinstance(schedule, dict) and state["global_step"] > schedule["total"]:
        return (f"global_step: {state['global_step']:,} steps done, beyond the {schedule['total']:,} the saved "
                "schedule plans (its total)")
    return None
