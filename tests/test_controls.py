"""The one line on whether a run's model learned the controls."""

from training.controls import (LEARNED_GAIN, STARTED_GAIN, WRONG_GAIN, controls_learned, controls_verdict,
                               describe_controls, last_gain)


def entry(epoch, gain=None, **more):
    return {"epoch": epoch, "train_loss": 1.0, **({"action_gain": gain} if gain is not None else {}), **more}


def test_the_verdict_follows_the_gain_thresholds():
    assert "(learned)" in controls_verdict(LEARNED_GAIN)
    assert "(learned)" in controls_verdict(1.08)
    assert "a little" in controls_verdict(STARTED_GAIN)
    assert "a little" in controls_verdict((STARTED_GAIN + LEARNED_GAIN) / 2)
    assert "not learned yet" in controls_verdict(1.0)
    assert "not learned yet" in controls_verdict(1.0005)
    assert "not learned yet" in controls_verdict((WRONG_GAIN + 1) / 2)
    assert "worse with the true keys" in controls_verdict(WRONG_GAIN)
    assert "worse with the true keys" in controls_verdict(0.9)
    assert WRONG_GAIN < 1 < STARTED_GAIN < LEARNED_GAIN


def test_one_line_with_the_last_gain_and_where_it_started():
    line = describe_controls([entry(1, 1.0004), entry(2, 1.03), entry(3, 1.0812)])
    assert "\n" not in line
    assert line.startswith("controls: action gain 1.0812 (epoch 1: 1.0004) - predictions depend on the keys")
    assert line.endswith("(learned)")
    assert describe_controls([entry(1, 1.0005)]) == ("controls: action gain 1.0005 - predictions barely depend on "
                                                     "the keys: not learned yet")


def test_epochs_without_a_gain_are_skipped_and_none_at_all_says_why():
    assert describe_controls([entry(1), entry(2, 1.05), entry(3)]).startswith("controls: action gain 1.0500 - ")
    validated = [entry(1, val_loss=0.5), entry(2, val_loss=0.4)]  # validated, but one clip: no gain
    assert describe_controls(validated) == ("controls: not measured - the action gain needs 2 or more validation "
                                            "clips (raise VAL_FRACTION)")
    assert describe_controls(validated, validation_clips=1) == (
        "controls: not measured - the action gain needs 2 or more validation clips and this run has 1 (raise "
        "VAL_FRACTION)")
    assert describe_controls([], validation_clips=0).endswith("this run has 0 (raise VAL_FRACTION)")


def test_before_the_first_validation_it_says_so_not_that_clips_are_missing():
    """17 validation clips, VAL_EVERY_EPOCHS=20, 3 epochs done: nothing is measured yet."""
    assert describe_controls([entry(1), entry(2), entry(3)], validation_clips=17, next_validation=20) == (
        "controls: not measured yet - validation has not run (the first is after epoch 20: VAL_EVERY_EPOCHS)")
    assert describe_controls([], validation_clips=17) == "controls: not measured yet - validation has not run"


def test_the_latest_preview_scores_are_added():
    history = [entry(1, 1.001, preview_score=0.1, preview_shuffled_score=0.1, preview_truth_score=0.9),
               entry(2, 1.02), entry(3, 1.04, preview_score=0.62, preview_shuffled_score=0.21,
                                     preview_truth_score=0.94)]
    line = describe_controls(history)
    assert line.endswith("; preview (epoch 3) follows the true keys 0.62, another clip's keys 0.21, "
                         "ground truth 0.94")
    older = [entry(1, 1.0, preview_score=None, preview_truth_score=0.5)]  # no score: nothing to add
    assert "preview" not in describe_controls(older)
    no_control = [entry(1, 1.0, preview_score=0.3, preview_truth_score=None)]
    assert describe_controls(no_control).endswith("follows the true keys 0.30, ground truth n/a")


def test_learned_means_the_last_measured_gain_reaches_the_threshold():
    assert controls_learned([entry(1, LEARNED_GAIN), entry(2)])
    assert not controls_learned([entry(1, 1.2), entry(2, 1.001)])
    assert not controls_learned([entry(1), entry(2)])
    assert last_gain([entry(1, 1.02), entry(2, 1.03), entry(3)]) == 1.03
    assert last_gain([]) is None


def test_a_learned_gain_beside_a_preview_that_does_not_follow_its_keys_is_not_called_learned():
    """The demo's case: the gain says learned, the preview scores better with another clip's keys."""
    history = [entry(1, 1.0254, preview_score=0.10, preview_shuffled_score=0.12, preview_truth_score=0.7)]
    line = describe_controls(history)
    assert "(learned)" not in line
    assert line.startswith("controls: action gain 1.0254 - predictions depend on the keys and mouse, but the "
                           "preview does not follow them yet")
    following = [entry(1, 1.0254, preview_score=0.40, preview_shuffled_score=0.12, preview_truth_score=0.7)]
    assert "(learned)" in describe_controls(following)
    not_learned = [entry(1, 1.0005, preview_score=0.1, preview_shuffled_score=0.2)]  # the gain's verdict stands
    assert "not learned yet" in describe_controls(not_learned)
