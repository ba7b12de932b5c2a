"""Unreal recordings -> validated training clips with aligned keyboard and mouse tensors.

A recording is a folder of frame_0001.png, frame_0002.png, ... and an input.csv with one
row per frame: the keys held, the time in seconds, the frame number, and optionally the
mouse deltas. DATA_DIR is one recording or a folder of recordings at any depth. Other
recorders' layouts - file names, column names, separators, encodings, numbering, dropped
frames - are read as they are or with the layout settings below; the report says which.

    python convert_unreal_data.py [DATA_DIR] [--NAME=value ...]   # check the data, print the report
    python convert_unreal_data.py [DATA_DIR] --cache              # ... then build the latent cache
    python convert_unreal_data.py --demo DIR                      # write the synthetic demo recording
    python convert_unreal_data.py --help                          # every setting, its value and meaning

The settings below are the data settings of every script: the training and preview
scripts take their defaults from here. The work is done by the `recordings` package
(parsing, clips, the split, the report) and `latents` (the cache).
"""

import argparse
import sys

from cli.settings import ScriptSettings, SettingsError, ShowHelp
from demo_world.recording import DEMO_FRAMES, DEMO_SEED, write_demo_recording
from demo_world.world import DEMO_HEIGHT, DEMO_WIDTH
from latents.cache import CacheError, build_latent_cache
from recordings.errors import DataError
from recordings.input_csv import CSV_NAME
from recordings.report import check_data
from recordings.settings import DataSettings
from wan import shapes
from wan.clip import DEFAULT_CLIP_PATH
from wan.vae import DEFAULT_VAE_PATH

# -----------------------------------------------------------------------------
# Settings: edit them here, or override any of them with --NAME=value.
DATA_DIR = "data"           # one recording, or a folder of recordings at any depth
# Your recorder's layout (FINETUNING_GUIDE.md, "The recording format"); the defaults read
# frame_0001.png ... (any padding, any first number) and input.csv with our column names or
# the usual other ones (Keys, Timestamp, FrameNumber, MouseDeltaX, ...), or none.
FRAME_NAME = "frame_%04d.png"  # frame file names, one number placeholder (%d, %05d or ####; any padding), e.g. "shot.%05d.png"
CSV_COLUMNS = {}            # our column -> your header's name or column number (1 = first), e.g. {"key": "Keys", "frame": "FrameNumber"}
CSV_SEPARATOR = "auto"      # "auto" (detected), ",", ";", "tab" or "|"
CSV_ENCODING = "auto"       # "auto": UTF-8 (with or without a BOM) or UTF-16 with a BOM; else e.g. "cp1252", "utf-16-le"
CSV_FRAME_OFFSET = 0        # the file of CSV frame n is number n + CSV_FRAME_OFFSET (1: the CSV counts from 0, the files from 1)
SEQUENCE_LENGTH = 57        # frames per clip; must be 4k+1 (the VAE's time compression)
CLIP_STRIDE = None          # frames between clip starts; None: SEQUENCE_LENGTH // 2
KEYBOARD_KEYS = ("W", "S", "A", "D")  # forward, back, left, right: the base model's columns
# Your bindings -> our keys. Matching is case-insensitive; a name may be several letters
# (Unreal calls the arrow keys Up, Down, Left, Right). Map a key to None to name it as a
# key of yours that is not one of ours (it is then counted as unmapped, never read as letters).
KEY_MAP = {"UP": "W", "DOWN": "S", "LEFT": "A", "RIGHT": "D"}
# The CSV's mouse columns are taken as camera rotation per frame in degrees (mouse_x: yaw,
# positive turns right; mouse_y: pitch, positive looks up). 0.05 maps a 2 deg/frame turn to
# 0.1, the size of the base model's own camera turns.
MOUSE_SCALE = 0.05
INVERT_MOUSE_Y = False      # True if your exporter's mouse_y is positive for looking down
SKIP_BAD_FRAMES = False     # True: an unreadable frame becomes a gap (counted) instead of an error
VAL_FRACTION = 0.1          # share of clips held out for validation
VAL_BLOCK_CLIPS = 8         # validation holds out runs of up to this many consecutive clips
SPLIT_SEED = 0              # which runs are held out
VIDEO_HEIGHT = shapes.VIDEO_HEIGHT  # frames are centre-cropped to this aspect and resized
VIDEO_WIDTH = shapes.VIDEO_WIDTH    # (352x640: the base model's size; sides multiples of 16)
# The latent cache (--cache): every clip encoded once by the VAE and CLIP
CACHE_DIR = "latent_cache"  # keyed by content: several datasets and settings can share it
CACHE_DTYPE = "bf16"        # "bf16" (half the disk) or "fp32"
VAE_PATH = str(DEFAULT_VAE_PATH)    # the Wan2.1 VAE (Wan2.1_VAE.pth)
CLIP_PATH = str(DEFAULT_CLIP_PATH)  # the CLIP image encoder (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)
# -----------------------------------------------------------------------------

SETTINGS = ScriptSettings.of(globals())
FLAGS = {"--cache": "after the check, encode every clip into the latent cache CACHE_DIR with the VAE (VAE_PATH) "
                    "and CLIP (CLIP_PATH); clips already cached are reused",
         "--demo DIR": "write the demo recording into DIR (new or empty) and exit; with --frames N, --height H, "
                       f"--width W (multiples of 16; default {DEMO_WIDTH}x{DEMO_HEIGHT}), --seed S"}
USAGE = "[DATA_DIR] [--NAME=value ...]"


def data_settings(settings: dict) -> DataSettings:
    """The data settings of a script's settings (every script that reads recordings calls this)."""
    return DataSettings.from_settings({**SETTINGS.defaults, **settings})


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_unreal_data.py", add_help=False)
    parser.add_argument("data_dir", nargs="?")
    parser.add_argument("--demo", metavar="DIR")
    parser.add_argument("--frames", type=int, default=DEMO_FRAMES)
    parser.add_argument("--height", type=int, default=DEMO_HEIGHT)
    parser.add_argument("--width", type=int, default=DEMO_WIDTH)
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        settings, flags, rest = SETTINGS.parse(argv, FLAGS, usage=USAGE, other_arguments=True)
    except ShowHelp as text:
        print(text)
        return 0
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args = _argument_parser().parse_args(rest)
    try:
        if args.demo:
            actions = write_demo_recording(args.demo, args.frames, args.height, args.width, args.seed, progress=True)
            print(f"wrote {len(actions)} frames of {args.width}x{args.height} and {CSV_NAME} to {args.demo}; "
                  f"check it with: python convert_unreal_data.py {args.demo}")
            return 0
        report = check_data(args.data_dir or settings["DATA_DIR"], data_settings(settings), decode_frames=True,
                            progress=True)
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.format())
    if report.problems:
        return 1
    if "--cache" in flags:
        try:
            cache_report = build_latent_cache(
                report.split.used, settings["CACHE_DIR"], settings["VAE_PATH"], settings["CLIP_PATH"],
                settings["VIDEO_HEIGHT"], settings["VIDEO_WIDTH"], dtype=settings["CACHE_DTYPE"])
        except (OSError, ValueError, CacheError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(cache_report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
