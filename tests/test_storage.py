"""`clipcond.storage`: strict JSON written atomically, disk-full errors that say so and leave no scratch behind."""

import errno
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipcond import storage
from clipcond.storage import (
    DiskFullError,
    new_folder,
    save_image_atomic,
    save_tensors_atomic,
    write_json_atomic,
    writing,
)


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


def test_an_image_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that dies half way (here an interrupt after half a file) leaves the earlier image as it was."""
    path = save_image_atomic(Image.new("RGB", (4, 4), "red"), tmp_path / "step-10.png")

    def half_then_interrupted(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image_atomic(Image.new("RGB", (4, 4), "blue"), path)
    monkeypatch.undo()
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["step-10.png"]  # no scratch file left beside it
    save_image_atomic(Image.new("RGB", (4, 4), "blue"), path)
    assert Image.open(path).getpixel((0, 0)) == (0, 0, 255)


def test_a_full_disk_names_the_image_not_its_scratch_file(tmp_path, monkeypatch):
    def no_space(self, fp, *args, **kwargs):  # as the OS reports it: naming the file being written, the scratch
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", no_space)
    path = tmp_path / "grid.png"
    with pytest.raises(DiskFullError, match=rf"while writing {path} \(") as raised:
        save_image_atomic(Image.new("RGB", (4, 4)), path)
    assert raised.value.filename == str(path) and list(tmp_path.iterdir()) == []


def test_a_new_folder_appears_whole_or_not_at_all(tmp_path):
    with new_folder(tmp_path / "out") as scratch:
        (scratch / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists()  # written beside it, renamed at the end
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError, match="half way"), new_folder(tmp_path / "failed") as scratch:
        (scratch / "a.txt").write_text("a")
        raise RuntimeError("half way")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_tensors_on_a_real_full_disk(small_filesystem):
    big = {"w": torch.zeros(1024, 1024)}  # 4 MB on a 2 MB file system
    save_tensors_atomic({"w": torch.ones(4)}, small_filesystem / "t.safetensors")
    with pytest.raises(DiskFullError, match=r"while writing .*t.safetensors \(4.0 MB needed"):
        save_tensors_atomic(big, small_filesystem / "t.safetensors")
    assert [p.name for p in small_filesystem.iterdir()] == ["t.safetensors"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(small_filesystem / "t.safetensors")["w"], torch.ones(4))


# ------------------------------------------------------------------ each writer on a full disk (injected errors)


def _partial_then_full(path, *args, **kwargs):
    """What torch's and safetensors' writers do on a full disk: part of a file, then an error without an errno."""
    with open(path, "wb") as f:
        f.write(b"\0" * 10)
    raise RuntimeError("basic_ios::clear: iostream error")


@pytest.fixture
def no_space(monkeypatch):
    monkeypatch.setattr(storage, "free_bytes", lambda path: 0)


def test_tensors_on_a_full_disk_injected(tmp_path, no_space, monkeypatch):
    import safetensors.torch

    save_tensors_atomic({"w": torch.ones(4)}, tmp_path / "cache.safetensors")
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_then_full)
    with pytest.raises(DiskFullError, match=r"while writing .*cache.safetensors \(0.0 KB needed, 0.0 KB free\)"):
        save_tensors_atomic({"w": torch.zeros(4)}, tmp_path / "cache.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"]


def test_an_index_save_on_a_full_disk_keeps_the_index(tiny_clip_run, shapes_data, tmp_path, no_space, monkeypatch):
    import safetensors.torch

    from clipcond.index import ImageIndex
    from clipcond.models.clip import load_clip

    index = ImageIndex.build(shapes_data / "test", load_clip(tiny_clip_run))
    index.save(tmp_path / "idx")
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_then_full)
    with pytest.raises(DiskFullError, match=r"while writing .*idx/embeddings.safetensors"):
        index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["embeddings.safetensors", "files.jsonl"]
    assert len(ImageIndex.load(tmp_path / "idx")) == len(index)


def test_shards_on_a_full_disk(shapes_data, tmp_path, no_space, monkeypatch):
    from clipcond.data import convert
    from clipcond.data.folders import ImageCaptionDataset

    def full(tar, name, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "_add", full)
    with pytest.raises(DiskFullError, match=r"while writing .*000000.tar"):
        convert.convert_to_webdataset(ImageCaptionDataset(shapes_data, split="test"), tmp_path / "shards")
    assert list((tmp_path / "shards").iterdir()) == []


def test_the_judge_cache_on_a_full_disk(judge, tmp_path, no_space, monkeypatch):
    from clipcond.evaluation import judge as judge_module

    monkeypatch.setattr(judge_module, "save_file", _partial_then_full)
    with pytest.raises(DiskFullError, match=r"while writing .*cached-judge"):
        judge_module.save_judge(judge, tmp_path / "cached-judge")
    assert list(tmp_path.iterdir()) == []
