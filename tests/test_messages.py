"""Messages that say what is true: the run header's device wording and warm-up warning,
--plan's NUM_CLIPS in --help, action scripts' length, the distillation's next commands."""

import pytest
import torch

import distill_streaming_model as ds
import finetune_base_model as fb
import generate_preview as gp
import play_world as pw
from planning.plan import resolve_settings
from training.schedule import LRSchedule, warmup_warning


@pytest.mark.parametrize("device,words", [("cpu", "none (float32 AdamW on the CPU)"),
                                          ("cuda", "none (float32 AdamW on the GPU)")])
def test_the_savers_line_names_the_device_the_optimizer_runs_on(device, words):
    s, _ = fb.parse_settings([])
    assert fb.describe_savers(s, torch.device(device)) == words


def test_a_warm_up_as_long_as_the_run_is_a_warning_with_the_learning_rate_it_reaches():
    """The issue's case: 3 steps with WARMUP_STEPS=50 train at 1/51..3/51 of the peak."""
    line = warmup_warning(50, 3, 1e-5)
    assert line == ("warning: WARMUP_STEPS=50 is not shorter than this run's 3 optimizer steps: the learning rate "
                    "never reaches its peak 1e-05 (it ends at 5.9e-07, 6% of it). Lower WARMUP_STEPS (e.g. to 1, a "
                    "tenth of the run) or train longer")
    assert LRSchedule(50, 3, 0.1).factor(2) == pytest.approx(3 / 51)  # what the warning quotes
    assert warmup_warning(50, 51, 1e-5) is None and warmup_warning(0, 3, 1e-5) is None
    assert warmup_warning(10, 10, 2e-5, "WARMUP_STEPS").startswith("warning: WARMUP_STEPS=10 is not shorter")


def test_num_clips_is_a_setting_of_the_plan_and_the_plan_says_how_to_set_it():
    help_text = fb.SETTINGS.help_text(fb.SETTINGS.defaults, fb.FLAGS)
    assert "NUM_CLIPS = None" in help_text and "--plan: training clips per epoch" in help_text
    s, _ = fb.parse_settings(["--NUM_CLIPS=250"])
    assert resolve_settings(s)["NUM_CLIPS"] == 250
    assert resolve_settings(fb.parse_settings([])[0])["NUM_CLIPS"] == 1000  # None: the planner's own default
    with pytest.raises(ValueError, match="NUM_CLIPS=0: must be at least 1"):
        fb.parse_settings(["--NUM_CLIPS=0"])


def test_tensorboard_is_on_where_the_package_is_installed_and_its_setting_is_checked(monkeypatch):
    import cli.settings

    assert fb.TENSORBOARD is True and ds.TENSORBOARD is True  # installed here (requirements.txt)
    monkeypatch.setattr(cli.settings, "tensorboard_installed", lambda: False)
    with pytest.raises(ValueError, match=r"TENSORBOARD=True: the tensorboard package is not installed"):
        fb.parse_settings(["--TENSORBOARD=true"])
    assert fb.parse_settings(["--TENSORBOARD=false"])[0]["TENSORBOARD"] is False


def test_the_action_script_help_says_its_syntax_and_length():
    help_text = gp.SETTINGS.help_text(gp.SETTINGS.defaults, gp.FLAGS)
    actions = help_text[help_text.index("ACTIONS = "):].splitlines()[1]
    for words in ("mouse(pitch,yaw)", "idle", "*count", "one row per frame, the first frame's included",
                  "NUM_FRAMES rows"):
        assert words in actions, words
    play_help = pw.SETTINGS.help_text(pw.SETTINGS.defaults, pw.FLAGS)
    assert "W*20: 2 blocks, 21 frames" in play_help


def test_a_headless_script_s_length_is_explained_by_the_blocks(capsys):
    """W*20 makes 21 frames: whole blocks of 12 frames, the first 9."""
    s, _ = pw.parse_settings(["--headless", "--ACTIONS=W*20", "--KEYBOARD_KEYS=W,S,A,D"])
    actions = pw.headless_actions(s, s["KEYBOARD_KEYS"])
    rows = sum(len(keyboard) for keyboard, _ in actions.blocks(True))
    assert (actions.num_blocks, rows) == (2, 21)
    assert capsys.readouterr().out.strip() == (
        "note: ACTIONS gives 20 rows, one per frame; the model makes whole blocks (the first 9 frames, each later one "
        "12), so 2 blocks show 21 frames (the last row held for 1 more)")


def test_the_distillation_says_what_to_run_next_with_its_own_paths():
    lines = ds.what_next("dmd", "/runs/my distill/dmd", "/runs/my distill/dmd/student")
    assert lines == ["play it: python play_world.py --MODEL_DIR='/runs/my distill/dmd/student'",
                     "next stage (with your other settings as in this run): python distill_streaming_model.py "
                     "--STAGE=long_tune --STUDENT_DIR='/runs/my distill/dmd/student' "
                     "--CHECKPOINT_DIR='/runs/my distill/long_tune'"]
    assert ds.what_next("long_tune", "c", "c/student") == ["play it: python play_world.py --MODEL_DIR=c/student"]
