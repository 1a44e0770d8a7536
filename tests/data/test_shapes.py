import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcond import cli
from clipcond.data import shapes
from clipcond.data.shapes import (
    BACKGROUND,
    COLOURS,
    DEFAULT_HELD_OUT,
    SHAPES,
    Scene,
    ShapeObject,
    caption_scene,
    class_names,
    load_dataset_info,
    render_scene,
    write_shapes_dataset,
)

N_PAIRS = len(COLOURS) * len(SHAPES)
METADATA_KEYS = {"file_name", "text", "label", "kind", "num_objects", "objects", "relation", "heldout"}


def _records(root: Path, split: str) -> list[dict]:
    lines = (root / split / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes")
    info = write_shapes_dataset(root, num_images=150, num_test_images=2 * N_PAIRS + 6, seed=0)
    return root, info


def test_layout_and_info(dataset):
    root, info = dataset
    assert info == json.loads((root / "dataset_info.json").read_text())
    assert info["format_version"] == shapes.FORMAT_VERSION
    assert info["colours"] == {name: list(rgb) for name, rgb in COLOURS.items()}
    assert info["shapes"] == list(SHAPES) and info["background"] == list(BACKGROUND)
    assert info["held_out"] == list(DEFAULT_HELD_OUT) and info["resolution"] == 32 and info["seed"] == 0
    assert info["splits"]["train"]["num_images"] == 150 - 42 and info["splits"]["test"]["num_images"] == 42
    for split in ("train", "test"):
        records = _records(root, split)
        assert len(records) == info["splits"][split]["num_images"]
        assert len(list((root / split).glob("*.png"))) == len(records)
        for record in records:
            assert set(record) == METADATA_KEYS
            assert record["num_objects"] == len(record["objects"]) in (1, 2)
            with Image.open(root / split / record["file_name"]) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
        kinds = Counter(r["kind"] for r in records)
        assert {k: info["splits"][split][k] for k in kinds} == dict(kinds)
    # About half the training images are single objects (single_fraction=0.5), the rest relations and counts.
    train_kinds = Counter(r["kind"] for r in _records(root, "train"))
    assert train_kinds["single"] == 54 and train_kinds["relation"] > train_kinds["count"] > 0


def test_labels_and_relations(dataset):
    root, _ = dataset
    for split in ("train", "test"):
        for record in _records(root, split):
            objects = record["objects"]
            if record["kind"] == "single":
                assert record["label"] == f"{objects[0]['colour']} {objects[0]['shape']}"
                assert record["relation"] is None
            else:
                assert record["label"] == ""
                pairs = {(o["colour"], o["shape"]) for o in objects}
                assert len(pairs) == (1 if record["kind"] == "count" else 2)
                assert (record["relation"] is None) == (record["kind"] == "count")


def test_held_out_pairs_only_in_test(dataset):
    root, _ = dataset
    held = set(DEFAULT_HELD_OUT)
    for record in _records(root, "train"):
        assert not record["heldout"]
        assert not any(f"{o['colour']} {o['shape']}" in held for o in record["objects"])
        assert not any(pair in record["text"] for pair in held), record["text"]
    test = _records(root, "test")
    assert held <= {r["label"] for r in test}
    for record in test:
        assert record["heldout"] == any(f"{o['colour']} {o['shape']}" in held for o in record["objects"])
    # Every colour and every shape still appears in training.
    train_objects = [o for r in _records(root, "train") for o in r["objects"]]
    assert {o["colour"] for o in train_objects} == set(COLOURS)
    assert {o["shape"] for o in train_objects} == set(SHAPES)


def test_test_split_balanced_over_all_classes(dataset):
    root, info = dataset
    singles = Counter(r["label"] for r in _records(root, "test") if r["kind"] == "single")
    assert set(singles) == set(class_names(info)) and len(singles) == N_PAIRS
    assert len(set(singles.values())) == 1  # the same number of images per class
    assert any(r["num_objects"] == 2 for r in _records(root, "test"))


def test_captions_name_every_object_and_nothing_else(dataset):
    root, _ = dataset
    for split in ("train", "test"):
        for record in _records(root, split):
            text = record["text"]
            words = re.findall(r"[a-z]+", text)
            assert len(words) <= 16, text
            for obj in record["objects"]:
                noun = obj["shape"] + ("s" if record["kind"] == "count" else "")
                assert re.search(rf"\b{obj['colour']} {noun}\b", text), (text, obj)
            named_colours = {w for w in words if w in COLOURS}
            named_shapes = {w.rstrip("s") for w in words if w.rstrip("s") in SHAPES}
            assert named_colours == {o["colour"] for o in record["objects"]}, text
            assert named_shapes == {o["shape"] for o in record["objects"]}, text


def test_geometry_inside_apart_and_consistent_with_relation(dataset):
    root, _ = dataset
    for record in _records(root, "train") + _records(root, "test"):
        boxes = [o["bbox"] for o in record["objects"]]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        if len(boxes) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, boxes  # no overlap
            centre_a, centre_b = ((ax0 + ax1) / 2, (ay0 + ay1) / 2), ((bx0 + bx1) / 2, (by0 + by1) / 2)
            relation = record["relation"]
            if relation == "left of":
                assert centre_a[0] < centre_b[0]
            elif relation == "right of":
                assert centre_a[0] > centre_b[0]
            elif relation == "above":
                assert centre_a[1] < centre_b[1]
            elif relation == "below":
                assert centre_a[1] > centre_b[1]


def test_rendered_colour_matches_colours(dataset):
    root, _ = dataset
    checked = 0
    for record in _records(root, "test"):
        if record["kind"] != "single":
            continue
        obj = record["objects"][0]
        x0, y0, x1, y1 = obj["bbox"]
        # A pixel well inside the shape: the triangle's centroid lies 2/3 of the way down its bounding square.
        x, y = int((x0 + x1) / 2), int(y0 + (y1 - y0) * (2 / 3 if obj["shape"] == "triangle" else 1 / 2))
        pixels = np.array(Image.open(root / "test" / record["file_name"]))
        assert tuple(pixels[y, x]) == COLOURS[obj["colour"]], (record, pixels[y, x])
        assert tuple(pixels[0, 0]) == BACKGROUND or tuple(pixels[-1, -1]) == BACKGROUND
        checked += 1
    assert checked >= N_PAIRS


def test_render_scene_nominal_objects():
    image = render_scene([ShapeObject("blue", "square", "large", "centre")], 32)
    pixels = np.array(image)
    assert image.size == (32, 32)
    assert tuple(pixels[16, 16]) == COLOURS["blue"] and tuple(pixels[1, 1]) == BACKGROUND
    # The square spans 0.4 of the side around the centre: 12.8 px, so about 10 full pixels plus two blended edges.
    row = pixels[16]
    assert (row == COLOURS["blue"]).all(axis=1).sum() in (11, 12, 13)
    two = render_scene(
        Scene(
            (ShapeObject("red", "circle", "small", "left"), ShapeObject("yellow", "triangle", "small", "right")),
            "left of",
        ),
        64,
    )
    pixels = np.array(two)
    assert two.size == (64, 64)
    assert tuple(pixels[32, 16]) == COLOURS["red"] and tuple(pixels[36, 48]) == COLOURS["yellow"]


def test_caption_scene_varies_with_rng_and_is_reproducible():
    scene = Scene((ShapeObject("orange", "circle", "small", "top"),))
    captions = {caption_scene(scene, random.Random(i)) for i in range(50)}
    assert len(captions) > 10
    assert all("orange circle" in c and "a orange" not in c for c in captions)
    assert caption_scene(scene, random.Random(3)) == caption_scene(scene, random.Random(3))


def test_deterministic_for_a_seed(dataset, tmp_path):
    root, _ = dataset
    write_shapes_dataset(tmp_path / "same", num_images=150, num_test_images=2 * N_PAIRS + 6, seed=0)
    assert _tree_bytes(tmp_path / "same") == _tree_bytes(root)
    write_shapes_dataset(tmp_path / "other", num_images=150, num_test_images=2 * N_PAIRS + 6, seed=1)
    other = _tree_bytes(tmp_path / "other")
    assert other.keys() == _tree_bytes(root).keys()
    assert other["train/metadata.jsonl"] != _tree_bytes(root)["train/metadata.jsonl"]
    assert other["train/00000.png"] != (root / "train" / "00000.png").read_bytes()


def test_unplaced_captions_drop_only_the_relation(dataset, tmp_path):
    """`--unplaced-share`: a share of the relation captions say "A and B" where they said "A left of B"; the
    images, every other caption and the metadata are those of the same arguments without it."""
    root, _ = dataset
    out = tmp_path / "unplaced"
    argv = [str(out), "--num-images", "150", "--num-test-images", str(2 * N_PAIRS + 6), "--unplaced-share", "0.5"]
    assert shapes.main(argv) == 0
    assert load_dataset_info(out)["unplaced_share"] == 0.5 and "unplaced_share" not in load_dataset_info(root)
    before, after = _tree_bytes(root), _tree_bytes(out)
    assert {k: v for k, v in after.items() if k.endswith(".png")} == {
        k: v for k, v in before.items() if k.endswith(".png")
    }
    unplaced = placed = 0
    for split in ("train", "test"):
        for old, new in zip(_records(root, split), _records(out, split), strict=True):
            assert {**new, "text": None} == {**old, "text": None}
            if new["text"] == old["text"]:
                placed += old["kind"] == "relation"
                continue
            assert old["kind"] == "relation"
            phrase = next(p for p in shapes.RELATION_PHRASES[old["relation"]][::-1] if f" {p} " in old["text"])
            assert new["text"] == old["text"].replace(f" {phrase} ", " and ", 1)
            unplaced += 1
    assert unplaced > 10 and placed > 10  # about half of each split's relation scenes


def test_resolution_64_and_custom_held_out(tmp_path):
    info = write_shapes_dataset(
        tmp_path, num_images=60, num_test_images=N_PAIRS, resolution=64, seed=2, held_out="Yellow Square, red circle"
    )
    assert info["held_out"] == ["yellow square", "red circle"] and info["resolution"] == 64
    with Image.open(tmp_path / "train" / "00000.png") as image:
        assert image.size == (64, 64)
    for record in _records(tmp_path, "train"):
        assert "yellow square" not in record["text"] and "red circle" not in record["text"]
        assert all(0 <= v <= 64 for o in record["objects"] for v in o["bbox"])
    assert Counter(r["label"] for r in _records(tmp_path, "test")) == Counter(class_names(info))


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        write_shapes_dataset(tmp_path, num_images=40, num_test_images=N_PAIRS)
    write_shapes_dataset(tmp_path, num_images=40, num_test_images=N_PAIRS, overwrite=True)
    write_shapes_dataset(tmp_path, num_images=30, num_test_images=N_PAIRS, overwrite=True)
    assert len(_records(tmp_path, "train")) == 12 and len(list((tmp_path / "train").glob("*.png"))) == 12
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"held_out": "red hexagon"}, "red hexagon"),
        ({"held_out": "red circle,red square,red triangle"}, "colour 'red'"),
        ({"held_out": [f"{c} circle" for c in COLOURS]}, "shape 'circle'"),
        ({"num_test_images": 5}, "at least 18"),
        ({"resolution": 8}, "resolution=8"),
        ({"single_fraction": 1.5}, "single_fraction=1.5"),
        ({"unplaced_share": -0.1}, "unplaced_share=-0.1 must lie in"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_shapes_dataset(tmp_path, **{"num_images": 40, "num_test_images": N_PAIRS, **kwargs})
    assert not any(tmp_path.iterdir())  # nothing written


def test_load_dataset_info_and_class_names(dataset, tmp_path):
    root, info = dataset
    assert load_dataset_info(root) == info
    assert load_dataset_info(root / "train") == info  # a split folder finds its parent's
    assert load_dataset_info(tmp_path) is None
    assert class_names(None) == class_names(info) == [f"{c} {s}" for c in COLOURS for s in SHAPES]
    assert class_names({"colours": {"red": [1, 2, 3]}, "shapes": ["circle"]}) == ["red circle"]


def test_cli_main(tmp_path, capsys):
    out = tmp_path / "data"
    argv = [str(out), "--num-images", "40", "--num-test-images", "18", "--resolution", "16", "--held-out", ""]
    assert shapes.main(argv) == 0
    summary = capsys.readouterr().out
    assert "22 train + 18 test images" in summary and str(out) in summary and "held out: none" in summary
    assert load_dataset_info(out)["held_out"] == []
    with pytest.raises(FileExistsError, match=str(out)):
        shapes.main(argv)
    # Through the `clipcond` command the same error is one line on stderr and exit status 2.
    assert cli.main(["data", "shapes", *argv]) == 2
    assert "clipcond data shapes: error:" in capsys.readouterr().err
    assert shapes.main([*argv, "--overwrite"]) == 0
    assert shapes.parse_args([str(out)]).held_out == ",".join(DEFAULT_HELD_OUT)


def test_a_full_disk_names_the_image_and_leaves_no_complete_looking_data_set(
    tmp_path, capsys, monkeypatch, full_disk_at_image
):
    full_disk_at_image("00002.png")
    out = tmp_path / "data"
    argv = ["data", "shapes", str(out), "--num-images", "40", "--num-test-images", "18", "--resolution", "16"]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert f"no space left on device while writing {out / 'train' / '00002.png'} (" in error
    assert not (out / "dataset_info.json").exists() and load_dataset_info(out) is None
    assert sorted(p.name for p in (out / "train").iterdir()) == ["00000.png", "00001.png"]  # no half image
    monkeypatch.undo()
    assert cli.main([*argv, "--overwrite"]) == 0
    assert len(_records(out, "train")) == 22
