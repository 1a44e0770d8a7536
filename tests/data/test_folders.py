import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcond.data.convert import main as convert_main
from clipcond.data.folders import ImageCaptionDataset, collate_image_text, to_rgb
from clipcond.data.shapes import COLOURS, write_shapes_dataset
from clipcond.data.webdataset import ShardedImageCaptionDataset
from clipcond.image_files import read_images


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, num_images=50, num_test_images=18, seed=0)
    return root


def _save(path: Path, size=(20, 10), colour=(200, 10, 10)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _write_jsonl(folder: Path, rows: list[dict]) -> Path:
    path = folder / "metadata.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_imagefolder_root_with_splits(shapes_root):
    train = ImageCaptionDataset(shapes_root)
    test = ImageCaptionDataset(shapes_root, split="test")
    assert len(train) == 32 and len(test) == 18
    assert train.metadata_path == shapes_root / "train" / "metadata.jsonl" and train.root == shapes_root
    assert train.info is not None and train.info["held_out"] == test.info["held_out"]
    assert len(train.captions) == len(train.labels) == len(train.records) == 32
    assert sorted(label for label in test.labels) == sorted(test.info["classes"])  # 18 singles, one per class
    item = test[0]
    assert set(item) == {"pixel_values", "text", "label", "index", "skipped"}
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.uint8
    assert item["text"] == test.captions[0] and item["label"] == test.labels[0] and item["index"] == 0
    assert item["skipped"] == []
    record = test.records[0]
    assert record["label"] == item["label"]
    # The pixels are the PNG's, in (C, H, W).
    png = np.array(Image.open(shapes_root / "test" / record["file_name"]))
    assert torch.equal(item["pixel_values"], torch.from_numpy(png).permute(2, 0, 1))
    # A split folder given directly still finds the root's dataset_info.json.
    assert ImageCaptionDataset(shapes_root / "test").info == test.info


def test_sources_without_splits_answer_train(shapes_root, tmp_path):
    # A split folder, or a CSV, passed with the training script's default split="train" is the training set.
    assert len(ImageCaptionDataset(shapes_root / "test", split="train")) == 18
    _save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("path,caption\na.png,a red box\n")
    assert ImageCaptionDataset(tmp_path / "pairs.csv", split="train").captions == ["a red box"]
    with pytest.raises(ValueError, match=r"split='test' was given, but data source .*pairs\.csv is a single file"):
        ImageCaptionDataset(tmp_path / "pairs.csv", split="test")
    with pytest.raises(FileNotFoundError, match=r"no split 'test' in .*itself has metadata\.jsonl: pass split=None"):
        ImageCaptionDataset(shapes_root / "test", split="test")


def test_missing_split_lists_available(shapes_root):
    with pytest.raises(FileNotFoundError, match=r"no split 'val'.*splits found: test, train"):
        ImageCaptionDataset(shapes_root, split="val")


def test_the_validation_split_named_or_defaulted(shapes_root, tmp_path, caplog):
    """`--validation-split`: a split of --data; the default skips validation where the data has no such split; a
    split the user named that is not there is an error naming the flag, the value and the folders there."""
    from argparse import Namespace

    from clipcond.data.open import validation_split

    assert validation_split(Namespace(data=str(shapes_root), validation_split="test")) == "test"
    assert validation_split(Namespace(data=str(shapes_root), validation_split="none")) is None
    (tmp_path / "train").mkdir()
    with caplog.at_level(logging.INFO):
        assert validation_split(Namespace(data=str(tmp_path), validation_split="test")) is None
    assert "no split 'test'" in caplog.text
    with pytest.raises(
        ValueError, match=r"`--validation-split` 'tset' is not a folder of `--data` '.*' \(its folders: "
    ):
        validation_split(Namespace(data=str(shapes_root), validation_split="tset"))
    shards = str(tmp_path / "{000000..000001}.tar")  # shards have no splits: off by default, a named one refused
    assert validation_split(Namespace(data=shards, validation_split="test")) is None
    with pytest.raises(ValueError, match=r"`--validation-split` 'val': `--data` .* is WebDataset shards"):
        validation_split(Namespace(data=shards, validation_split="val"))


def test_a_trainer_refuses_a_validation_split_that_is_not_there(shapes_root, tmp_path):
    from clipcond.train.vae import main

    argv = ["--data", str(shapes_root), "--output-dir", str(tmp_path / "vae"), "--model", "test"]
    with pytest.raises(ValueError, match=r"`--validation-split` 'tset' is not a folder .*its folders: test, train\)"):
        main([*argv, "--resolution", "16", "--max-train-steps", "1", "--validation-split", "tset"])


def test_csv_file_relative_and_absolute_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    _save(tmp_path / "imgs" / "a.png", size=(40, 20))
    absolute = _save(tmp_path / "b.jpg", size=(16, 32), colour=(0, 0, 250))
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(f'path,caption\nimgs/a.png,a red thing\n{absolute},"a blue, tall thing"\n')
    ds = ImageCaptionDataset(csv_path, resolution=8)
    assert ds.captions == ["a red thing", "a blue, tall thing"] and ds.labels == ["", ""]
    assert ds.root == tmp_path and ds.info is None
    batch = collate_image_text([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["pixel_values"].dtype == torch.uint8
    assert batch["text"] == ds.captions and batch["label"] == ["", ""]
    assert batch["index"].tolist() == [0, 1] and batch["index"].dtype == torch.long and batch["skipped"] == []
    # Native size without a resolution.
    assert ImageCaptionDataset(csv_path)[0]["pixel_values"].shape == (3, 20, 40)


def test_metadata_csv_in_folder_and_column_selection(tmp_path):
    _save(tmp_path / "x.png")
    (tmp_path / "metadata.csv").write_text("img,desc,label\nx.png,a red box,red box\n")
    ds = ImageCaptionDataset(tmp_path, caption_column="desc", image_column="img")
    assert ds.captions == ["a red box"] and ds.labels == ["red box"] and ds[0]["label"] == "red box"
    with pytest.raises(
        ValueError, match=r"caption column 'nope' is not in .*metadata\.csv; available columns: img, desc, label"
    ):
        ImageCaptionDataset(tmp_path, caption_column="nope", image_column="img")
    with pytest.raises(ValueError, match=r"image column 'file_name' .*available columns: img, desc, label"):
        ImageCaptionDataset(tmp_path, caption_column="desc")


def test_resize_and_centre_crop(tmp_path):
    # 60 x 20: a red, a green and a blue third, side by side.
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:40] = (0, 255, 0)
    pixels[:, 40:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "bands.png")
    _write_jsonl(tmp_path, [{"file_name": "bands.png", "text": "three bands"}])

    cropped = ImageCaptionDataset(tmp_path, resolution=10)[0]["pixel_values"]
    assert cropped.shape == (3, 10, 10)
    assert (cropped[1] > 200).all() and (cropped[0] < 30).all()  # only the green middle survives the crop

    squashed = ImageCaptionDataset(tmp_path, resolution=12, center_crop=False)[0]["pixel_values"]
    assert squashed.shape == (3, 12, 12)
    assert squashed[0, 6, 0] > 200 and squashed[2, 6, -1] > 200  # red on the left, blue on the right


def test_missing_source_and_metadata(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ImageCaptionDataset(missing)
    with pytest.raises(FileNotFoundError, match=r"no metadata file in .*metadata\.jsonl or metadata\.csv"):
        ImageCaptionDataset(tmp_path)


@pytest.mark.parametrize("caption", [None, "", "   "])
def test_empty_caption_names_file_and_line(tmp_path, caption):
    _save(tmp_path / "a.png")
    row = {"file_name": "a.png", "text": caption}
    if caption is None:
        del row["text"]
    _write_jsonl(tmp_path, [{"file_name": "a.png", "text": "fine"}, row])
    with pytest.raises(ValueError, match=r"metadata\.jsonl: line 2 has no caption in column 'text'"):
        ImageCaptionDataset(tmp_path)


def test_empty_caption_in_csv_names_row(tmp_path):
    _save(tmp_path / "a.png")
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("path,caption\na.png,fine\na.png,  \n")
    with pytest.raises(ValueError, match=r"data\.csv: row 3 has no caption in column 'caption'"):
        ImageCaptionDataset(csv_path)


def test_missing_image_names_file_and_line(tmp_path):
    _save(tmp_path / "a.png")
    _write_jsonl(tmp_path, [{"file_name": "a.png", "text": "ok"}, {"file_name": "gone.png", "text": "lost"}])
    with pytest.raises(FileNotFoundError, match=r"line 2 names image 'gone\.png'.*does not exist"):
        ImageCaptionDataset(tmp_path)


def test_corrupt_images_are_skipped_and_reported(tmp_path, caplog):
    for name, colour in (("a.png", (255, 0, 0)), ("d.png", (0, 0, 255))):
        _save(tmp_path / name, size=(8, 8), colour=colour)
    (tmp_path / "b.png").write_bytes(b"this is not an image")
    good = (tmp_path / "a.png").read_bytes()
    (tmp_path / "c.png").write_bytes(good[: len(good) // 2])  # truncated
    _write_jsonl(tmp_path, [{"file_name": n, "text": f"image {n}"} for n in ("a.png", "b.png", "c.png", "d.png")])
    ds = ImageCaptionDataset(tmp_path)

    with caplog.at_level(logging.WARNING, logger="clipcond.data.folders"):
        item = ds[1]
        again = ds[2]
    assert item["index"] == 3 and item["text"] == "image d.png"
    assert item["skipped"] == [str(tmp_path / "b.png"), str(tmp_path / "c.png")]
    assert again["index"] == 3 and again["skipped"] == [str(tmp_path / "c.png")]
    assert item["pixel_values"][2, 0, 0] == 255  # the blue substitute
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == 2  # once per file, not once per access
    batch = collate_image_text([ds[0], item, again])
    assert batch["skipped"] == [str(tmp_path / n) for n in ("b.png", "c.png", "c.png")]
    assert len(set(batch["skipped"])) == 2


def test_every_image_unreadable(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    _write_jsonl(tmp_path, [{"file_name": "a.png", "text": "broken"}])
    with pytest.raises(ValueError, match=r"none of the 1 images listed in .*metadata\.jsonl could be read"):
        ImageCaptionDataset(tmp_path)[0]


def test_collate_rejects_mixed_sizes(tmp_path):
    _save(tmp_path / "a.png", size=(8, 8))
    _save(tmp_path / "b.png", size=(9, 8))
    _write_jsonl(tmp_path, [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": "b"}])
    ds = ImageCaptionDataset(tmp_path)
    with pytest.raises(ValueError, match="different sizes"):
        collate_image_text([ds[0], ds[1]])
    assert collate_image_text([ImageCaptionDataset(tmp_path, resolution=8)[i] for i in (0, 1)])[
        "pixel_values"
    ].shape == (2, 3, 8, 8)


def test_shapes_colours_survive_loading(shapes_root):
    ds = ImageCaptionDataset(shapes_root, split="test")
    i = ds.labels.index("green square")
    obj = ds.records[i]["objects"][0]
    x0, y0, x1, y1 = obj["bbox"]
    pixel = ds[i]["pixel_values"][:, int((y0 + y1) / 2), int((x0 + x1) / 2)]
    assert tuple(pixel.tolist()) == COLOURS["green"]


def test_cached_images_match_the_files_and_keep_skipping(shapes_root, tmp_path, caplog):
    plain = ImageCaptionDataset(shapes_root, split="test", resolution=16)
    cached = ImageCaptionDataset(shapes_root, split="test", resolution=16, cache_images=True)
    assert cached.cache_images() == len(cached) * 3 * 16 * 16  # bytes held; a second call decodes nothing
    for i in (0, 5, 17):
        assert torch.equal(cached[i]["pixel_values"], plain[i]["pixel_values"])
    cached[0]["pixel_values"].zero_()  # items are copies: the cache is unchanged
    assert torch.equal(cached[0]["pixel_values"], plain[0]["pixel_values"])

    _save(tmp_path / "a.png", size=(8, 8), colour=(255, 0, 0))
    (tmp_path / "b.png").write_bytes(b"this is not an image")
    _write_jsonl(tmp_path, [{"file_name": n, "text": n} for n in ("a.png", "b.png")])
    with caplog.at_level(logging.WARNING, logger="clipcond.data.folders"):
        ds = ImageCaptionDataset(tmp_path, cache_images=True)  # warns once, while caching
        item = ds[1]
    assert item["index"] == 0 and item["skipped"] == [str(tmp_path / "b.png")]
    assert sum("skipping unreadable image" in r.getMessage() for r in caplog.records) == 1


def _grey(mode: str, value) -> Image.Image:
    dtype = {"I;16": np.uint16, "I;16B": ">u2", "I": np.int32, "F": np.float32, "L": np.uint8}[mode]
    image = Image.fromarray(np.full((2, 3), value, dtype=dtype))
    assert image.mode == mode
    return image


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("I;16", 40000, 156),  # 40000 / 257 = 155.6; Pillow's convert("RGB") clips it to 255
        ("I;16", 65535, 255),
        ("I;16B", 40000, 156),
        ("I", 40000, 156),
        ("I", -7, 0),
        ("I", 70000, 255),
        ("F", 0.5, 128),
        ("F", 1.5, 255),
        ("F", -0.2, 0),
        ("F", float("nan"), 0),
        ("L", 40, 40),  # 8-bit modes are converted as before
    ],
)
def test_wide_greyscale_modes_scale_to_8_bit(mode, value, expected):
    rgb = to_rgb(_grey(mode, value))
    assert rgb.mode == "RGB" and rgb.size == (3, 2)
    assert np.array_equal(np.asarray(rgb), np.full((2, 3, 3), expected, dtype=np.uint8))


def test_eight_bit_images_convert_as_pillow_does():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 4), dtype=np.uint8)
    rgba = Image.fromarray(pixels[..., :4], "RGBA")
    palette = Image.fromarray(pixels[..., 0]).quantize(8)
    for image in (rgba, palette, Image.fromarray(pixels[..., 0]), Image.fromarray(pixels[..., :3])):
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def test_16_bit_png_reads_as_its_grey_in_folders_and_shards(tmp_path):
    source = tmp_path / "data"
    source.mkdir()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(source / "deep.png")
    assert Image.open(source / "deep.png").mode == "I;16"
    _write_jsonl(source, [{"file_name": "deep.png", "text": "a grey square"}])
    item = ImageCaptionDataset(source)[0]
    assert item["pixel_values"].unique().tolist() == [156]  # 40000 / 257, not 255
    assert np.asarray(read_images([str(source / "deep.png")])[0]).max() == 156  # `clipcond vary --image`

    convert_main([str(source), "--output-dir", str(tmp_path / "shards")])
    streamed = next(iter(ShardedImageCaptionDataset(tmp_path / "shards" / "000000.tar")))
    assert streamed["pixel_values"].unique().tolist() == [156]


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.csv"])
def test_metadata_that_is_not_utf8_names_file_and_line(tmp_path, name):
    _save(tmp_path / "a.png")
    if name.endswith(".jsonl"):
        lines = [json.dumps({"file_name": "a.png", "text": t}, ensure_ascii=False) for t in ("fine", "ok", "café")]
    else:
        lines = ["file_name,text", "a.png,fine", "a.png,café", "a.png,ok"]
    (tmp_path / name).write_bytes("\n".join(lines).encode("latin-1"))  # é is the byte 0xe9
    column = lines[2].index("é") + 1  # the third line, in either file
    with pytest.raises(ValueError, match=rf"{name}: line 3 is not UTF-8 \(byte 0xe9 at column {column}: "):
        ImageCaptionDataset(tmp_path)


def test_metadata_with_a_byte_order_mark(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes("path,caption\na.png,a red box\n".encode("utf-8-sig"))
    assert ImageCaptionDataset(tmp_path).captions == ["a red box"]
