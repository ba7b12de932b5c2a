"""Take a model to FastVideo, or bring one from it: Matrix-Game 2.0 in FastVideo's layout.

    python convert_fastvideo.py                                        # export the fine-tuned model below
    python convert_fastvideo.py --STUDENT_DIR=distill/long_tune/student --FASTVIDEO_DIR=fastvideo_student/transformer
    python convert_fastvideo.py --DIRECTION=import --FASTVIDEO_DIR=Matrix-Game-2.0-Base-Diffusers \\
        --OUTPUT_DIR=models/from_fastvideo                             # a FastVideo model, for our scripts
    python convert_fastvideo.py --demo                                 # export the demo's model and read it back
    python convert_fastvideo.py --help                                 # every setting, its value and meaning

FastVideo (https://github.com/hao-ai-lab/FastVideo) runs, fine-tunes and distils
Matrix-Game 2.0 from Diffusers-style model folders; the part of such a folder that training
changes is transformer/ (config.json + safetensors in Diffusers' tensor names).

export: a fine-tuned model (BASE_MODEL_DIR with CHECKPOINT over it: any file
finetune_base_model.py writes, a LoRA file merged on the way) or a distilled streaming
student (STUDENT_DIR) -> FASTVIDEO_DIR, a transformer folder FastVideo loads (put it in
place of the transformer/ folder of a copy of FastVideo's own model folder; see
FINETUNING_GUIDE.md, "Taking a model to FastVideo").
import: a FastVideo transformer folder (or the model folder around it) -> OUTPUT_DIR, a
base-model folder (BASE_MODEL_DIR of our scripts) or, for FastVideo's causal model, a
streaming model folder (play_world.py's MODEL_DIR, a distillation's STUDENT_DIR).

Only names change (wan/fastvideo_layout.py); every tensor is checked against the model the
config describes, and one taken there and back is the same to the bit.
"""

import shutil
import sys
from pathlib import Path

import torch

import convert_unreal_data as data
from cli.settings import ScriptSettings, ShowHelp, check_choices, raise_for_problems
from demo_world.setup import DEMO_DIR, TRAINING_DEMO_SETTINGS
from generation.finetuned import FINAL_FILE, load_model
from wan.fastvideo_layout import export_fastvideo, read_fastvideo, save_ours
from wan.files import check_output_folder
from wan.loading import CheckpointError, find_weight_files, load_streaming_model, open_safetensors

# -----------------------------------------------------------------------------
# Settings: edit them here, or override any of them with --NAME=value.
DIRECTION = "export"                     # "export": our model -> FastVideo's layout; "import": FastVideo's -> ours
# export: a fine-tuned model, or a streaming student
BASE_MODEL_DIR = "models/base_model"     # the base model folder the fine-tuning started from
CHECKPOINT = f"checkpoints/{FINAL_FILE}"  # the fine-tuned file over it ("": the base model alone)
KEYBOARD_KEYS = data.KEYBOARD_KEYS       # the keyboard columns the checkpoint was trained with
STUDENT_DIR = ""                         # a streaming model folder to export instead (a distillation stage's student/)
# both
FASTVIDEO_DIR = "fastvideo/transformer"  # export: the transformer folder written; import: the one read (or the FastVideo model folder around it)
# import
OUTPUT_DIR = "models/from_fastvideo"     # the model folder written: a base-model folder, or a streaming model folder for a causal model
KIND = "auto"                            # "auto": config.json's _class_name decides (Causal...: streaming); "base" or "streaming" to choose
# -----------------------------------------------------------------------------

SETTINGS = ScriptSettings.of(globals())
DIRECTIONS, KINDS = ("export", "import"), ("auto", "base", "streaming")
DEMO_SETTINGS = {"BASE_MODEL_DIR": TRAINING_DEMO_SETTINGS["BASE_MODEL_DIR"],
                 "CHECKPOINT": f"{TRAINING_DEMO_SETTINGS['CHECKPOINT_DIR']}/{FINAL_FILE}",
                 "FASTVIDEO_DIR": f"{DEMO_DIR}/fastvideo/transformer", "OUTPUT_DIR": f"{DEMO_DIR}/from_fastvideo"}
FLAGS = {"--demo": "export the model of `python finetune_base_model.py --demo` to demo_run/fastvideo/transformer "
                   "and import it back into demo_run/from_fastvideo, checking every tensor"}


def parse_settings(argv) -> tuple[dict, bool]:
    return SETTINGS.parse_checked(argv, FLAGS, {"--demo": DEMO_SETTINGS}, check_settings)


def check_settings(s: dict) -> None:
    problems = check_choices(s, {"DIRECTION": DIRECTIONS, "KIND": KINDS})
    for name in (("FASTVIDEO_DIR",) if s["DIRECTION"] == "export" else ("OUTPUT_DIR",)):
        try:
            check_output_folder(s[name], name)
        except FileExistsError as error:
            problems.append(str(error))
    raise_for_problems(problems)


def recorded_keys(folder) -> tuple:
    """The keyboard columns a streaming model folder of ours records (its metadata), or ()."""
    for file in sorted(set(find_weight_files(Path(folder)).values())):
        with open_safetensors(file) as f:
            keys = (f.metadata() or {}).get("keyboard_keys", "")
        if keys:
            return tuple(keys.split(","))
    return ()


def export(s: dict) -> str:
    """Our model -> FastVideo's transformer folder."""
    cpu = torch.device("cpu")
    if s["STUDENT_DIR"]:
        model = load_streaming_model(s["STUDENT_DIR"], device=cpu)
        what, streaming, keys = f"the streaming model {s['STUDENT_DIR']}", True, recorded_keys(s["STUDENT_DIR"])
    else:
        loaded = load_model(s["BASE_MODEL_DIR"], s["CHECKPOINT"], s["KEYBOARD_KEYS"], cpu, torch.float32)
        model, what, streaming, keys = loaded.model, loaded.description, False, loaded.keyboard_keys
    metadata = {"source": what, **({"keyboard_keys": ",".join(keys)} if keys else {})}
    folder = export_fastvideo(model.state_dict(), model.config, streaming, s["FASTVIDEO_DIR"], metadata)
    kind = "CausalMatrixGame2WanModel (streaming)" if streaming else "MatrixGame2WanModel (bidirectional)"
    return (f"wrote {folder} ({kind}, {sum(1 for _ in model.state_dict())} tensors) from {what}. In FastVideo: put "
            f"it in place of the transformer/ folder of a copy of FastVideo's Matrix-Game 2.0 model folder "
            "(FINETUNING_GUIDE.md, 'Taking a model to FastVideo')")


def import_(s: dict) -> str:
    """FastVideo's transformer folder -> our base-model or streaming model folder."""
    state, config, streaming, metadata = read_fastvideo(s["FASTVIDEO_DIR"], s["KIND"])
    kept = {k: metadata[k] for k in ("keyboard_keys",) if k in metadata}  # what our loaders read
    folder = save_ours(state, config, streaming, s["OUTPUT_DIR"], {"source": f"FastVideo {s['FASTVIDEO_DIR']}", **kept})
    use = (f"play it: python play_world.py --MODEL_DIR={folder}; distil it further: --STUDENT_DIR={folder}"
           if streaming else f"use it as BASE_MODEL_DIR={folder} (fine-tuning, previews, a distillation's teacher)")
    return (f"wrote {folder}: a {'streaming' if streaming else 'base'} model ({len(state)} tensors, keyboard width "
            f"{config.action_config.keyboard_dim_in}) from {s['FASTVIDEO_DIR']}; {use}")


def demo(s: dict) -> str:
    """Export the demo's model, import it back, and compare every tensor."""
    lines = [export(s)]
    lines.append(import_(dict(s, FASTVIDEO_DIR=s["FASTVIDEO_DIR"], KIND="auto")))
    cpu = torch.device("cpu")
    original = load_model(s["BASE_MODEL_DIR"], s["CHECKPOINT"], s["KEYBOARD_KEYS"], cpu, torch.float32).model
    back = load_model(s["OUTPUT_DIR"], "", s["KEYBOARD_KEYS"], cpu, torch.float32).model
    theirs = back.state_dict()
    same = all(torch.equal(t, theirs[n]) for n, t in original.state_dict().items())
    lines.append(f"round trip: {len(theirs)} tensors, " + ("every one equal to the bit" if same else "SOME DIFFER"))
    if not same:
        raise CheckpointError("\n".join(lines))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings, is_demo = parse_settings(argv)
        if is_demo:
            for name in ("FASTVIDEO_DIR", "OUTPUT_DIR"):  # the demo's own folders are written afresh (not yours)
                if settings[name] == DEMO_SETTINGS[name]:
                    shutil.rmtree(settings[name], ignore_errors=True)
            print(demo(settings))
        else:
            print(export(settings) if settings["DIRECTION"] == "export" else import_(settings))
    except ShowHelp as text:
        print(text)
        return 0
    except (ValueError, OSError) as error:  # SettingsError, CheckpointError, GenerationError, disk full
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
