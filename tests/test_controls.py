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
    line = describe_controls([entry(1), entry(2)])
    assert "not measured" in line and "validation clips" in line
    assert "not measured" in describe_controls([])


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
