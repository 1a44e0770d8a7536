"""Image paths that lead outside the data folder (`../`, absolute paths, symlinks to elsewhere) are skipped and
counted like unreadable files unless `allow_outside_paths` (`--allow-outside-paths`) is given: in the data set,
`clipcond train clip`, `clipcond data convert`, `clipcond index` and the evaluation commands."""

import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import TINY_CLIP_ARGS
from PIL import Image

from clipcond import cli
from clipcond.data.convert import main as convert_main
from clipcond.data.folders import ImageCaptionDataset
from clipcond.evaluation.clip import main as eval_clip
from clipcond.evaluation.judged import load_reference_images
from clipcond.image_cache import image_list_identity
from clipcond.index import ImageIndex
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


def test_convert_leaves_outside_images_out(tree, tmp_path, capsys):
    assert convert_main([str(tree), "--output-dir", str(tmp_path / "shards")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 3 and summary["skipped_outside"] == 3
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["clipcond"]["skipped_outside"] == 3
    secret = (tmp_path / "secret.png").read_bytes()
    with tarfile.open(tmp_path / "shards" / "000000.tar") as tar:
        members = tar.getnames()
        assert not any(tar.extractfile(m).read() == secret for m in members if m.endswith(".png"))
    assert sorted(m for m in members if m.endswith(".png")) == ["000000.png", "000004.png", "000005.png"]

    argv = [str(tree), "--output-dir", str(tmp_path / "all"), "--allow-outside-paths"]
    assert convert_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 6


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


def test_index_skips_links_out_of_the_folder(tiny_clip_run, tmp_path, capsys, caplog):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    _save(folder / "a.png", RED)
    (folder / "sub" / "same.png").symlink_to(folder / "a.png")  # a link inside stays indexed
    (folder / "out.png").symlink_to(_save(tmp_path / "secret.png", BLUE))
    out = tmp_path / "idx"
    argv = ["index", "--model", str(tiny_clip_run), str(folder), "--output", str(out), "--no-progress"]
    with caplog.at_level(logging.WARNING, logger="clipcond.index"):
        assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 images indexed: 2 added" in printed and "0 unreadable skipped, 1 outside the folder skipped" in printed
    assert any("out.png" in r.getMessage() and "outside the data folder" in r.getMessage() for r in caplog.records)
    assert ImageIndex.load(out).paths == ["a.png", "sub/same.png"]

    assert cli.main([*argv, "--allow-outside-paths"]) == 0  # checked again on update: now added
    assert "3 images indexed: 1 added, 0 changed, 0 removed, 2 unchanged" in capsys.readouterr().out
    assert ImageIndex.load(out).paths == ["a.png", "out.png", "sub/same.png"]


def test_eval_clip_and_reference_images_count_outside_paths(tiny_clip_run, shapes_data, tmp_path, capsys):
    data, _ = _shapes_copy(shapes_data, tmp_path, split="test")
    rows = [json.loads(line) for line in (data / "test" / "metadata.jsonl").open()]
    argv = ["--model", str(tiny_clip_run), "--data", str(data), "--device", "cpu", "--no-progress"]
    assert eval_clip([*argv, "--output-dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_unreadable_images"] == 3 and metrics["num_images"] == 36 - 3
    assert eval_clip([*argv, "--output-dir", str(tmp_path / "eval_all"), "--allow-outside-paths"]) == 0
    assert json.loads(capsys.readouterr().out)["num_unreadable_images"] == 0

    # the reference images of `clipcond eval generation` and `eval unclip`: the single-object images
    labelled = [i for i, row in enumerate(rows) if row["label"]]
    images, skipped = load_reference_images(str(data), "test", 32)
    outside = [str(data / "test" / rows[i]["file_name"]) for i in labelled if i < 3]
    assert outside and skipped == outside and images.shape[0] == len(labelled) - len(outside)
    images, skipped = load_reference_images(str(data), "test", 32, allow_outside_paths=True)
    assert images.shape[0] == len(labelled) and skipped == []


def test_embedding_cache_key_follows_the_choice(tree, tmp_path):
    skipped = image_list_identity(ImageCaptionDataset(tree))
    read = image_list_identity(ImageCaptionDataset(tree, allow_outside_paths=True))
    assert skipped[0] == read[0] and skipped[1] == [(tmp_path / "secret.png").as_posix(), "outside"]
    assert read[1] == [(tmp_path / "secret.png").as_posix(), *_stat(tmp_path / "secret.png")]


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


@pytest.mark.parametrize(
    "command",
    [
        ["train", "clip"],
        ["train", "decoder"],
        ["train", "prior"],
        ["index"],
        ["data", "convert"],
        ["eval", "clip"],
        ["eval", "prior"],
        ["eval", "generation"],
        ["eval", "unclip"],
    ],
)
def test_every_command_reading_a_data_folder_offers_the_flag(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    assert "--allow-outside-paths" in capsys.readouterr().out
