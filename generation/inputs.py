"""Where generation starts: a recording's frames and actions from a given frame on."""

from pathlib import Path

from generation.errors import GenerationError
from recordings.errors import DataError
from recordings.input_csv import CSV_NAME
from recordings.recording import Recording, find_recordings, load_recording
from recordings.settings import DataSettings


def recording_range(folder, first: int, num_frames: int, settings: DataSettings) -> Recording:
    """The recording, checked to hold frames first .. first + num_frames - 1 without a gap."""
    folder = Path(folder)
    if not (folder / CSV_NAME).is_file():
        found = ""
        if folder.is_dir():
            try:
                found = "; recordings in it: " + ", ".join(
                    str(p) for p in find_recordings(folder, settings.frame_name)[0][:10])
            except DataError:
                pass
        raise GenerationError(f"RECORDING={folder} is not a recording (a folder with frame files and "
                              f"{CSV_NAME}){found}")
    recording = load_recording(folder, None, settings)
    last = first + num_frames - 1
    if not any(seg.first <= first and last <= seg.last for seg in recording.segments):
        runs = ", ".join(f"{seg.first}-{seg.last}" for seg in recording.segments)
        need = f"frame {first}" if num_frames == 1 else f"frames {first}-{last} without a gap (NUM_FRAMES={num_frames})"
        usable = set(recording.usable_frames)
        gap = next((f for f in range(first, last + 1) if f not in usable), first)
        raise GenerationError(f"{folder}: START_FRAME={first} needs {need}, but its runs of consecutive frames "
                              f"are {runs} ({recording.describe_gap(gap)})")
    return recording
