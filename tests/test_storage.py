"""`clipcond.storage`: strict JSON written atomically, disk-full errors that say so and leave no scratch behind."""

import errno
import json
import math

import pytest
import torch

from clipcond import storage
from clipcond.storage import DiskFullError, save_tensors_atomic, write_json_atomic, writing


def test_write_json_atomic_refuses_non_finite_numbers_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "record.json"
    write_json_atomic(path, {"loss": 0.5})
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json_atomic(path, {"loss": math.nan})
    assert json.loads(path.read_text()) == {"loss": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_errors_without_an_errno_on_a_full_disk_become_disk_full_errors(tmp_path, monkeypatch):
    scratch = tmp_path / ".x.tmp"
    monkeypatch.setattr(storage, "free_bytes", lambda path: 0)
    with pytest.raises(DiskFullError) as caught, writing(tmp_path / "x", needed=3 * 1024 * 1024, scratch=[scratch]):
        scratch.write_bytes(b"part")
        raise RuntimeError("unexpected pos 12770112 vs 12770004")  # torch's zip writer on a full disk
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value).startswith(f"no space left on device while writing {tmp_path / 'x'} (3.0 MB needed, 0.0")
    assert not scratch.exists()


def test_other_errors_pass_through_and_still_remove_the_scratch(tmp_path):
    scratch = tmp_path / ".x.tmp"
    with pytest.raises(PermissionError), writing(tmp_path / "x", scratch=[scratch]):
        scratch.mkdir()
        raise PermissionError("read-only")
    assert not scratch.exists()


def test_tensors_on_a_real_full_disk(small_filesystem):
    big = {"w": torch.zeros(1024, 1024)}  # 4 MB on a 2 MB file system
    save_tensors_atomic({"w": torch.ones(4)}, small_filesystem / "t.safetensors")
    with pytest.raises(DiskFullError, match=r"while writing .*t.safetensors \(4.0 MB needed"):
        save_tensors_atomic(big, small_filesystem / "t.safetensors")
    assert [p.name for p in small_filesystem.iterdir()] == ["t.safetensors"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(small_filesystem / "t.safetensors")["w"], torch.ones(4))
