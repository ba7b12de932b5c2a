"""Has the model learned the controls? One line from a run's history that a user can read.

The evidence is the action gain of validation (validation loss with another clip's
actions / with the true ones, training/flow_matching.validate): 1 means the predictions
do not depend on the keys and mouse at all. Where the run made previews, the line adds
their action-following scores with the true keys and with another clip's keys
(generation/previews.epoch_preview): a model that follows the keys scores clearly higher
with the true ones.
"""

from video.action_score import format_share

# A model whose action modules output nothing scores exactly 1; one that uses the actions
# weakly or not yet consistently stays within a few thousandths of it.
LEARNED_GAIN = 1.01      # from here on the keys change the predictions clearly
STARTED_GAIN = 1.002     # below this the dependence is within what noise in the weights gives
WRONG_GAIN = 0.998       # below this the true keys make the predictions worse than other keys


def controls_verdict(gain: float) -> str:
    """The meaning of an action gain in words."""
    if gain >= LEARNED_GAIN:
        return "predictions depend on the keys and mouse (learned)"
    if gain >= STARTED_GAIN:
        return "predictions depend on the keys a little: learning has started, train longer"
    if gain > WRONG_GAIN:
        return "predictions barely depend on the keys: not learned yet"
    return ("predictions are worse with the true keys than with another clip's: the model uses the keys in a way "
            "that does not hold on the validation clips (too little data or too many epochs, or actions that do "
            "not match the frames: check KEY_MAP and MOUSE_SCALE)")


def measured_gains(history: list[dict]) -> list[tuple[int, float]]:
    """(epoch, action gain) of every epoch that measured one (it needs 2+ validation clips)."""
    return [(entry["epoch"], entry["action_gain"]) for entry in history if entry.get("action_gain") is not None]


def last_gain(history: list[dict]) -> float | None:
    """The action gain of the last epoch that measured one, or None."""
    gains = measured_gains(history)
    return gains[-1][1] if gains else None


def controls_learned(history: list[dict]) -> bool:
    gain = last_gain(history)
    return gain is not None and gain >= LEARNED_GAIN


def describe_controls(history: list[dict]) -> str:
    """One line on whether the run's model follows the controls, from its per-epoch history
    (entries as training writes them: epoch, action_gain, preview_score, preview_shuffled_score)."""
    gains = measured_gains(history)
    if not gains:
        return "controls: not measured - the action gain needs 2 or more validation clips (raise VAL_FRACTION)"
    (first_epoch, first), (last_epoch, last) = gains[0], gains[-1]
    line = f"controls: action gain {last:.4f}"
    if last_epoch != first_epoch:
        line += f" (epoch {first_epoch}: {first:.4f})"
    line += f" - {controls_verdict(last)}"
    previews = [entry for entry in history if entry.get("preview_score") is not None]
    if previews:
        latest = previews[-1]
        line += (f"; preview (epoch {latest['epoch']}) follows the true keys {format_share(latest['preview_score'])}"
                 + (f", another clip's keys {format_share(latest['preview_shuffled_score'])}"
                    if "preview_shuffled_score" in latest else "")
                 + (f", ground truth {format_share(latest['preview_truth_score'])}"
                    if "preview_truth_score" in latest else ""))
    return line
