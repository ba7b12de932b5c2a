import os

import pytest
import torch
from safetensors.torch import load_file

from wan import files


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "out" / "info.txt"
    files.write_text_atomic(target, "first")
    files.write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["info.txt"]


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = files.write_text_atomic(tmp_path / "info.txt", "x")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_crash_during_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.pt"
    files.torch_save_atomic({"step": 1}, target)

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        files.write_atomic(target, crash)
    assert torch.load(target)["step"] == 1
    assert os.listdir(tmp_path) == ["state.pt"]


def test_safetensors_round_trip_with_metadata(tmp_path):
    base = torch.arange(6.0).view(2, 3)
    path = files.save_safetensors_atomic({"a": base.t(), "b": base[0]}, tmp_path / "w.safetensors", {"step": 7})
    loaded = load_file(path)
    assert torch.equal(loaded["a"], base.t()) and torch.equal(loaded["b"], base[0])
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert f.metadata() == {"step": "7"}
