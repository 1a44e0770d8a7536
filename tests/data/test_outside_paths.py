"""Image paths that lead outside the data folder (`../`, absolute paths, symlinks to elsewhere) are skipped and
counted like unreadable files unless `allow_outside_paths` (`--allow-outside-paths`) is given: in the data set and
`clipcond train clip`."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import TINY_CLIP_ARGS
from PIL import Image

from clipcond.conditioning import image_list_identity
from clipcond.data.folders import ImageCaptionDataset
from clipcond.train.clip import main as train_clip

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _save(path: Path, colour) -> Path:
    Image.new("RGB", (8, 8), colour).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    """`data/` with two red images, a link inside to one of them and a link out; a blue `secret.png` beside it."""
    secret = _save(tmp_path / "secret.png", BLUE)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _save(data / "a.png", RED)
    _save(data / "b.png", RED)
    (data / "sub" / "same.png").symlink_to(Path("..", "a.png"))  # inside -> inside: fine
    (data / "link.png").symlink_to(secret)
    names = ["a.png", "../secret.png", str(secret), "link.png", "sub/same.png", "b.png"]
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in names))
    return data


def test_outside_paths_are_skipped_and_counted(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="clipcond.data.folders"):
        ds = ImageCaptionDataset(tree)
    assert len(ds) == 6 and ds.outside == [1, 2, 3]
    [warning] = [r.getMessage() for r in caplog.records]
    assert "skipping 3 of 6 images" in warning and "outside the data folder" in warning
    assert "line 2: '../secret.png' -> " in warning and "--allow-outside-paths" in warning

    item = ds[1]  # the next readable item, the link that stays inside, takes the place of the three
    assert item["index"] == 4 and item["skipped"] == [str(ds.image_paths[i]) for i in (1, 2, 3)]
    assert item["pixel_values"][:, 0, 0].tolist() == list(RED)
    for i in range(len(ds)):  # the blue file outside is never served
        assert ds[i]["pixel_values"][:, 0, 0].tolist() == list(RED)
    assert ImageCaptionDataset(tree, cache_images=True)[2]["index"] == 4  # the same with cached pixels


def test_outside_paths_are_read_when_allowed(tree):
    ds = ImageCaptionDataset(tree, allow_outside_paths=True)
    assert ds.outside == []
    for i in (1, 2, 3):
        item = ds[i]
        assert item["index"] == i and item["skipped"] == [] and item["pixel_values"][:, 0, 0].tolist() == list(BLUE)


def test_a_missing_file_inside_is_still_an_error(tree):
    with open(tree / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "gone.png", "text": "gone"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"line 7 names image 'gone\.png'"):
        ImageCaptionDataset(tree)


def test_a_symlink_loop_is_a_missing_file_not_a_crash(tmp_path):
    _save(tmp_path / "a.png", RED)
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,red\nloop.png,loop\n")
    with pytest.raises(FileNotFoundError, match=r"row 3 names image 'loop\.png'"):
        ImageCaptionDataset(tmp_path)


def test_a_csv_with_absolute_paths_inside_its_folder(tmp_path):
    inside = _save(tmp_path / "a.png", RED)
    (tmp_path / "pairs.csv").write_text(f"path,caption\n{inside},red\n{_save(tmp_path.parent / 'x.png', BLUE)},blue\n")
    ds = ImageCaptionDataset(tmp_path / "pairs.csv")
    assert ds.outside == [1] and ds[0]["index"] == 0


def test_embedding_cache_key_follows_the_choice(tree, tmp_path):
    skipped = image_list_identity(ImageCaptionDataset(tree))
    read = image_list_identity(ImageCaptionDataset(tree, allow_outside_paths=True))
    assert skipped[0] == read[0] and skipped[1] == [(tmp_path / "secret.png").as_posix(), "outside"]
    assert read[1] == [(tmp_path / "secret.png").as_posix(), *_stat(tmp_path / "secret.png")]


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _shapes_copy(shapes_data, tmp_path, split="train") -> tuple[Path, Path]:
    """A copy of `shapes_data` whose first three rows of `split` lead outside it: by `../`, absolute, symlink."""
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    metadata = data / split / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    secret = tmp_path / "secret.png"
    shutil.copy(data / split / rows[0]["file_name"], secret)
    (data / split / "link.png").symlink_to(secret)
    for row, name in zip(rows, ["../../secret.png", str(secret), "link.png"]):
        row["file_name"] = name
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data, secret


def test_train_clip_skips_and_counts_outside_paths(shapes_data, tmp_path, capsys, caplog):
    data, _ = _shapes_copy(shapes_data, tmp_path)
    # 15 steps x 16 > 240 images: every file is read
    argv = ["--data", str(data), *TINY_CLIP_ARGS, "--max-train-steps", "15", "--validation-steps", "0"]
    argv += ["--checkpointing-steps", "0"]
    with caplog.at_level(logging.WARNING, logger="clipcond.data.folders"):
        assert train_clip([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_files"] == 3
    assert any("outside the data folder" in r.getMessage() for r in caplog.records)
    record = json.loads((tmp_path / "run" / "clipcond_run.json").read_text())
    assert record["args"]["allow_outside_paths"] is False

    with pytest.raises(ValueError, match=r"3 of the 240 training images could not be read.*--allow-outside-paths"):
        train_clip([*argv, "--output-dir", str(tmp_path / "strict"), "--max-skipped-fraction", "0.01"])

    assert train_clip([*argv, "--output-dir", str(tmp_path / "allowed"), "--allow-outside-paths"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_files"] == 0
