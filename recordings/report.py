"""The data check and its report: every recording parsed and validated, the clips and the
split, and a printable summary of what was found (keys, mouse, gaps, problems)."""

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from recordings.clips import Split, index_clips, resolve_clip_stride, split_train_val
from recordings.errors import DataError
from recordings.input_csv import CSV_NAME, LINES_SHOWN, KeyParser
from recordings.recording import find_recordings, load_recording
from recordings.settings import DataSettings
from wan.shapes import check_frame_count, check_image_size


LISTED = 10  # items listed per report section before "... and N more"


@dataclass
class DataReport:
    """What check_data found: the usable recordings, their clips and split, every problem."""

    data_dir: str
    settings: dict               # NAME -> value the check ran with
    recordings: list             # [Recording] that loaded without problems
    clips: list                  # [ClipRef] of those recordings
    split: Split
    problems: list               # every problem, each naming its file (and line)
    decoded: bool                # every frame fully decoded (else headers only)

    def raise_for_problems(self) -> None:
        if self.problems:
            raise DataError(self.problems)

    def format(self) -> str:
        recordings = self.recordings
        lines = [f"Data check of {self.data_dir}: {len(recordings)} recording(s) usable"
                 f"{f', {len(self.problems)} problem(s)' if self.problems else ''}; frames "
                 f"{'fully decoded' if self.decoded else 'checked by header only'}",
                 "  settings: " + " ".join(f"{k}={_show(v)}" for k, v in self.settings.items())]

        clips_per_recording = Counter(c.recording for c in self.clips)
        lines.append("Recordings:")
        for r in recordings[:50]:
            sizes = ", ".join(f"{w}x{h}" for (w, h) in r.frame_sizes)
            lines.append(f"  {r.name}: {len(r.usable_frames):,} frames in {len(r.segments)} segment(s), "
                         f"{sizes or 'no readable frames'}, {'mouse' if r.mouse_raw is not None else 'no mouse'}"
                         f" columns, {clips_per_recording[r.name]:,} clips")
        if len(recordings) > 50:
            lines.append(f"  ... and {len(recordings) - 50} more")

        sizes = sum((r.frame_sizes for r in recordings), Counter())
        usable = sum(len(r.usable_frames) for r in recordings)
        height, width = self.settings["VIDEO_HEIGHT"], self.settings["VIDEO_WIDTH"]
        resolutions = ", ".join(f"{w}x{h} ({n:,})" for (w, h), n in sizes.most_common()) or "none"
        lines.append(f"Frames: {usable:,} usable of {sum(len(r.frame_files) for r in recordings):,} files; "
                     f"resolution(s) {resolutions}"
                     + (" - already" if set(sizes) == {(width, height)} else " -> centre-cropped to")
                     + f" {width}:{height} and resized to {width}x{height} (W x H)")

        lines += self._layout_lines()
        gaps = [(r.name, a, b) for r in recordings for a, b in r.missing_ranges()]
        lines.append(f"Gaps: {len(gaps)} ({sum(b - a + 1 for _, a, b in gaps):,} frame numbers missing or "
                     "unreadable; clips never span one)")
        lines += _listed(f"  {name}: {_frames(a, b)}" for name, a, b in gaps)
        dropped = [(r, a, b) for r in recordings for a, b in r.dropped_ranges()]
        if dropped:
            lines.append(f"Dropped frames ({CSV_NAME} rows without a frame file; gaps): "
                         f"{sum(len(r.dropped_frames) for r in recordings):,} in {len(dropped)} range(s)")
            lines += _listed(f"  {r.name}: {_frames(a, b)} ({CSV_NAME} "
                             f"{_lines([r.dropped_frames[f] for f in range(a, b + 1)])})" for r, a, b in dropped)
        bad = [problem for r in recordings for problem in r.bad_frames.values()]
        if bad or self.settings.get("SKIP_BAD_FRAMES"):
            lines.append(f"Unreadable frames skipped (SKIP_BAD_FRAMES): {len(bad)}")
            lines += _listed(f"  {problem}" for problem in bad)
        lines.append(f"Frames without a CSV row (no keys pressed): "
                     f"{sum(r.frames_without_row for r in recordings):,}")
        for title, attribute in (("Repeated identical CSV rows (used once)", "duplicate_lines"),
                                 ("CSV rows out of frame order (sorted)", "out_of_order_lines")):
            found = [(r.name, getattr(r, attribute)) for r in recordings if getattr(r, attribute)]
            if found:
                lines.append(f"{title}: {sum(len(at) for _, at in found):,}")
                lines += _listed(f"  {name}: {CSV_NAME} line{'s' if len(at) > 1 else ''} "
                                 f"{', '.join(map(str, at[:LINES_SHOWN]))}{', ...' if len(at) > LINES_SHOWN else ''}"
                                 for name, at in found)
        notes = [f"  {r.name}: {note}" for r in recordings for note in r.notes]
        if notes:
            lines.append(f"Check: {len(notes)}")
            lines += _listed(notes)
        ignored = [f"{r.name}/{f}" for r in recordings for f in r.ignored_files]
        if ignored:
            lines.append(f"Ignored image files (not named like FRAME_NAME): {len(ignored)}")
            lines += _listed(f"  {f}" for f in ignored)

        unmapped = sum((r.unmapped_keys for r in recordings), Counter())
        examples = {k: f"{r.name}: {e}" for r in reversed(recordings) for k, e in r.unmapped_examples.items()}
        lines.append(f"Unmapped keys (not in KEYBOARD_KEYS or KEY_MAP; ignored): {len(unmapped) or 'none'}")
        lines += _listed(f"  {key}: {n:,} rows, e.g. {examples[key]}" for key, n in unmapped.most_common())

        keys = [str(k).upper() for k in self.settings["KEYBOARD_KEYS"]]
        held = np.concatenate([r.keyboard[r.rows(r.usable_frames)] for r in recordings]) \
            if recordings else np.zeros((0, len(keys)), np.float32)
        total = max(len(held), 1)
        lines.append("Keys held (frames): " + ", ".join(
            f"{k} {int(n):,} ({100 * n / total:.1f}%)" for k, n in zip(keys, held.sum(0))))
        codes, counts = np.unique(held.astype(np.int64) @ (1 << np.arange(len(keys))), return_counts=True)
        combos = sorted(zip(counts, codes), reverse=True)
        lines.append("Key combinations: " + (", ".join(
            f"{''.join(k for i, k in enumerate(keys) if code >> i & 1) or 'none'} {n:,}" for n, code in combos)
            or "none"))
        lines += self._mouse_lines()

        stride = self.settings.get("CLIP_STRIDE")
        length = self.settings.get("SEQUENCE_LENGTH")
        covered = sum(b - a + 1 for _, a, b in _frame_ranges(self.clips))
        lines.append(f"Clips: {len(self.clips):,} of {length} frames, one every {stride} frames; "
                     f"{usable - covered:,} usable frames in no clip (segments or tails shorter than a clip)")
        split = self.split
        lines.append(f"Split: {len(split.train):,} train, {len(split.val):,} validation, {len(split.dropped):,} "
                     "dropped (they would share frames with validation clips)"
                     + (f"; no validation: {split.note}" if split.note else ""))
        lines += _listed(f"  validation: {r} frames {a}-{b}" for r, a, b in _frame_ranges(split.val))

        lines.append(f"Problems: {len(self.problems) or 'none'}")
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)

    def _layout_lines(self) -> list[str]:
        """How the recordings were read, one line per distinct layout, with its recordings."""
        lines = ["Layout (as found; FRAME_NAME, CSV_COLUMNS, CSV_SEPARATOR, CSV_ENCODING, CSV_FRAME_OFFSET adapt it):"]
        for what, attribute in ((CSV_NAME, "csv_layout"), ("frame files", "numbering")):
            groups = {}
            for r in self.recordings:
                groups.setdefault(getattr(r, attribute), []).append(r.name)
            for text, names in sorted(groups.items(), key=lambda item: -len(item[1])):
                lines.append(f"  {what}: {text} - {len(names)} recording(s): {', '.join(names[:5])}"
                             + (" ..." if len(names) > 5 else ""))
        return lines if len(lines) > 1 else []

    def _mouse_lines(self) -> list[str]:
        with_mouse = [r for r in self.recordings if r.mouse_raw is not None]
        without = [r.name for r in self.recordings if r.mouse_raw is None]
        lines = []
        if without:
            lines.append(f"Mouse: zero for {len(without)} recording(s) without mouse_x,mouse_y columns: "
                         + ", ".join(without[:LISTED]) + (" ..." if len(without) > LISTED else ""))
        if not with_mouse:
            return lines or ["Mouse: no recordings"]
        if not any(r.usable_frames for r in with_mouse):
            return lines + ["Mouse: no usable frames in the recordings with mouse columns"]
        raw = np.concatenate([r.mouse_raw[r.rows(r.usable_frames)] for r in with_mouse])
        scaled = np.concatenate([r.mouse[r.rows(r.usable_frames)] for r in with_mouse])
        lines.append(f"Mouse ({len(with_mouse)} recording(s) with columns; scaled by MOUSE_SCALE into the "
                     "model's (pitch, yaw)):")
        for column, (name, model_name, model_column) in enumerate(
                [("mouse_x", "yaw", 1), ("mouse_y", "pitch", 0)]):
            values, model = raw[:, column], np.abs(scaled[:, model_column])
            moving = values != 0
            lines.append(f"  {name}: moving in {100 * moving.mean():.1f}% of frames, range "
                         f"{values.min():g}..{values.max():g} -> {model_name} |value| p99 "
                         f"{np.percentile(model, 99):.3g}, max {model.max():.3g}")
        peak = np.abs(scaled).max()
        if peak > 1 or (peak > 0 and np.percentile(np.abs(scaled[scaled != 0]), 99) < 0.01):
            lines.append("  check MOUSE_SCALE: the base model's own camera turns are about 0.1 per frame")
        return lines


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _frames(first: int, last: int) -> str:
    return f"frame{'s' if last > first else ''} {first}{f'-{last}' if last > first else ''}"


def _lines(lines: list[int]) -> str:
    """'line 7', 'lines 101-106' (consecutive), or the first few."""
    if len(lines) == 1:
        return f"line {lines[0]}"
    if lines == list(range(lines[0], lines[0] + len(lines))):
        return f"lines {lines[0]}-{lines[-1]}"
    return "lines " + ", ".join(map(str, lines[:LINES_SHOWN])) + (", ..." if len(lines) > LINES_SHOWN else "")


def _listed(items) -> list[str]:
    items = list(items)
    more = [f"  ... and {len(items) - LISTED} more"] if len(items) > LISTED else []
    return items[:LISTED] + more


def _frame_ranges(clips) -> list[tuple[str, int, int]]:
    """Merge the frame ranges of clips into (recording, first, last) runs."""
    ranges = []
    for clip in sorted(clips, key=lambda c: (c.recording, c.first_frame)):
        if ranges and ranges[-1][0] == clip.recording and clip.first_frame <= ranges[-1][2] + 1:
            ranges[-1] = (clip.recording, ranges[-1][1], max(ranges[-1][2], clip.last_frame))
        else:
            ranges.append((clip.recording, clip.first_frame, clip.last_frame))
    return ranges


def check_data(data_dir, settings: DataSettings, decode_frames: bool = False,
               progress: bool = False) -> DataReport:
    """Find, parse and validate every recording, index the clips and split them.

    Bad settings or a missing DATA_DIR raise DataError; problems in the data are collected in
    the report (call raise_for_problems() before training on it).
    """
    s = settings
    try:
        check_frame_count(s.sequence_length, "SEQUENCE_LENGTH")
    except ValueError as error:
        raise DataError(str(error)) from None
    stride = resolve_clip_stride(s.sequence_length, s.clip_stride)
    try:
        check_image_size(s.video_height, s.video_width)
    except ValueError as error:
        raise DataError(str(error)) from None
    KeyParser(s.keyboard_keys, s.key_map)
    s.check_layout()
    if not isinstance(s.mouse_scale, (int, float)) or not math.isfinite(s.mouse_scale):
        raise DataError(f"MOUSE_SCALE must be a finite number, got {s.mouse_scale!r}")

    folders, problems = find_recordings(data_dir, s.frame_name)
    recordings = []
    for folder in folders:
        try:
            recordings.append(load_recording(folder, data_dir, s, decode_frames=decode_frames, progress=progress))
        except DataError as error:
            problems.extend(error.problems)
    clips = index_clips(recordings, s.sequence_length, stride)
    if recordings and not clips:
        longest = max((segment.length for r in recordings for segment in r.segments), default=0)
        problems.append(f"{data_dir}: no clip fits: the longest run of consecutive frames has {longest} "
                        f"frames, SEQUENCE_LENGTH is {s.sequence_length}")
    split = split_train_val(clips, s.val_fraction, s.split_seed, s.val_block_clips)
    shown = {**s.as_settings(), "CLIP_STRIDE": stride, "KEYBOARD_KEYS": tuple(s.keyboard_keys),
             "KEY_MAP": dict(s.key_map), "CSV_COLUMNS": dict(s.csv_columns)}
    return DataReport(str(data_dir), shown, recordings, clips, split, problems, decode_frames)
