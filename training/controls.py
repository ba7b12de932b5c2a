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


def preview_follows_the_keys(entry: dict) -> bool | None:
    """Whether a preview scored higher with its own keys than with another clip's (None:
    no control was generated)."""
    other = entry.get("preview_shuffled_score")
    return None if other is None or entry.get("preview_score") is None else entry["preview_score"] > other


def not_measured(history: list[dict], validation_clips: int | None, next_validation: int | None) -> str:
    """Why there is no action gain yet: too few validation clips, or no validation so far."""
    if validation_clips is not None and validation_clips < 2:
        return (f"not measured - the action gain needs 2 or more validation clips and this run has "
                f"{validation_clips} (raise VAL_FRACTION)")
    if any(entry.get("val_loss") is not None for entry in history):
        return "not measured - the action gain needs 2 or more validation clips (raise VAL_FRACTION)"
    return ("not measured yet - validation has not run"
            + (f" (the first is after epoch {next_validation}: VAL_EVERY_EPOCHS)" if next_validation else ""))


def describe_controls(history: list[dict], validation_clips: int | None = None,
                      next_validation: int | None = None) -> str:
    """One line on whether the run's model follows the controls, from its per-epoch history
    (entries as training writes them: epoch, val_loss, action_gain, preview_score,
    preview_shuffled_score). validation_clips and next_validation (the epoch after which the
    next validation runs), where given, say why nothing is measured yet. The verdict is the
    gain's, unless the latest preview contradicts a "learned": a preview that scores as well
    with another clip's keys as with its own does not follow them, whatever the gain says."""
    gains = measured_gains(history)
    if not gains:
        return "controls: " + not_measured(history, validation_clips, next_validation)
    (first_epoch, first), (last_epoch, last) = gains[0], gains[-1]
    line = f"controls: action gain {last:.4f}"
    if last_epoch != first_epoch:
        line += f" (epoch {first_epoch}: {first:.4f})"
    previews = [entry for entry in history if entry.get("preview_score") is not None]
    latest = previews[-1] if previews else None
    if latest is not None and last >= LEARNED_GAIN and preview_follows_the_keys(latest) is False:
        line += (" - predictions depend on the keys and mouse, but the preview does not follow them yet (it scores "
                 "as well with another clip's keys): learned by the predictions, not yet by the videos")
    else:
        line += f" - {controls_verdict(last)}"
    if latest is not None:
        line += (f"; preview (epoch {latest['epoch']}) follows the true keys {format_share(latest['preview_score'])}"
                 + (f", another clip's keys {format_share(latest['preview_shuffled_score'])}"
                    if "preview_shuffled_score" in latest else "")
                 + (f", ground truth {format_share(latest['preview_truth_score'])}"
                    if "preview_truth_score" in latest else ""))
    return line
