"""`clipcond data tuxpaint` on a small stamps folder made here, laid out as Debian's tuxpaint-stamps-default."""

import json
import shutil

import pytest
from PIL import Image

from clipcond.data import tuxpaint
from clipcond.data.folders import ImageCaptionDataset
from clipcond.evaluation.judged import shapes_info

SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40">'
    '<rect x="10" y="10" width="20" height="20" fill="#0000ff"/></svg>'
)


def _stamp(root, relative, caption, colour=(200, 0, 0), image="png"):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if caption is not None:
        path.with_suffix(".txt").write_text(f"{caption}\nfr.utf8=Une traduction.\n", encoding="utf-8")
    if image == "png":
        stamp = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # transparent, with an opaque block off-centre
        stamp.paste(Image.new("RGBA", (10, 10), (*colour, 255)), (2, 2))
        stamp.save(path.with_suffix(".png"))
    elif image == "svg":
        path.with_suffix(".svg").write_text(SVG, encoding="utf-8")
    elif image == "corrupt":
        path.with_suffix(".png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")


@pytest.fixture
def stamps(tmp_path):
    root = tmp_path / "stamps"
    for i in range(5):
        _stamp(root, f"animals/birds/bird{i}", f"A bird number {i}.")
    for i in range(3):
        _stamp(root, f"food/fruit/fruit{i}", f"A fruit number {i}.", colour=(0, 150, 0))
    _stamp(root, "food/fruit/blank", "   ")  # an empty description
    _stamp(root, "food/fruit/lost", "A stamp whose image is missing.", image=None)
    _stamp(root, "food/fruit/broken", "A broken image.", image="corrupt")
    _stamp(root, "space/planet", "A planet drawn in SVG.", image="svg")
    return root


def _convert(stamps, out, *extra):
    assert tuxpaint.main([str(out), "--stamps", str(stamps), "--resolution", "16", *extra]) == 0
    return json.loads((out / "dataset_info.json").read_text())


def test_converts_stamps_to_imagefolder_with_english_captions_and_topic_labels(stamps, tmp_path, monkeypatch):
    monkeypatch.setattr(tuxpaint.shutil, "which", lambda name: None)  # no rsvg-convert: the SVG stamp is skipped
    info = _convert(stamps, tmp_path / "out")
    train = ImageCaptionDataset(tmp_path / "out", split="train")
    test = ImageCaptionDataset(tmp_path / "out", split="test")
    assert len(train) + len(test) == 8
    assert info["classes"] == ["animals", "food"]
    assert {len(train), len(test)} == {6, 2}  # one test stamp of each label (10% rounds to 0, at least 1)
    assert sorted(test.labels) == ["animals", "food"]
    captions = set(train.captions) | set(test.captions)
    assert "A bird number 0." in captions and not any("utf8" in c for c in captions)
    assert info["skipped"]["empty_caption"] == ["food/fruit/blank"]
    assert info["skipped"]["no_image"] == ["food/fruit/lost"]
    assert info["skipped"]["svg_without_rsvg_convert"] == ["space/planet"]
    assert len(info["skipped"]["unreadable"]) == 1 and info["skipped"]["unreadable"][0].startswith("food/fruit/broken")


def test_stamp_is_composited_on_white_cropped_and_centred(stamps, tmp_path):
    _convert(stamps, tmp_path / "out")
    row = json.loads((tmp_path / "out" / "train" / "metadata.jsonl").read_text().splitlines()[0])
    image = Image.open(tmp_path / "out" / "train" / row["file_name"])
    assert image.size == (16, 16) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency became white, not black
    red, green, blue = image.getpixel((8, 8))  # the opaque block, off-centre in the stamp, is now in the middle
    assert red > 150 and green < 60 and blue < 60


def test_same_stamps_and_seed_give_same_split_and_other_seeds_others(stamps, tmp_path):
    def test_split(name, seed):
        _convert(stamps, tmp_path / name, "--seed", str(seed))
        return (tmp_path / name / "test" / "metadata.jsonl").read_text()

    assert test_split("a", 1) == test_split("b", 1)
    assert len({test_split(f"seed{seed}", seed) for seed in range(6)}) > 1


@pytest.mark.skipif(shutil.which("rsvg-convert") is None, reason="needs rsvg-convert (Debian's librsvg2-bin)")
def test_svg_only_stamp_is_rasterised_with_rsvg_convert(stamps, tmp_path):
    info = _convert(stamps, tmp_path / "out", "--test-fraction", "0")
    assert "svg_without_rsvg_convert" not in info["skipped"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "train" / "metadata.jsonl").read_text().splitlines()]
    planet = next(row for row in rows if row["stamp"] == "space/planet")
    red, green, blue = Image.open(tmp_path / "out" / "train" / planet["file_name"]).getpixel((8, 8))
    assert blue > 200 and red < 60 and green < 60


def test_bad_arguments_name_the_flag(stamps, tmp_path):
    with pytest.raises(FileNotFoundError, match="`--stamps` .*missing.*tuxpaint-stamps-default"):
        tuxpaint.main([str(tmp_path / "out"), "--stamps", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no stamp"):
        tuxpaint.main([str(tmp_path / "out"), "--stamps", str(empty)])
    with pytest.raises(ValueError, match="`--test-fraction` must be in \\[0, 1\\), got 1.0"):
        tuxpaint.main([str(tmp_path / "out"), "--stamps", str(stamps), "--test-fraction", "1"])
    _convert(stamps, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _convert(stamps, tmp_path / "out")


def test_shapes_evaluations_refuse_the_stamps_by_name(stamps, tmp_path):
    _convert(stamps, tmp_path / "out")
    with pytest.raises(ValueError, match="holds the data set 'tuxpaint-stamps'.*clipcond data shapes"):
        shapes_info(tmp_path / "out")


def test_a_full_disk_names_the_image_and_writes_no_dataset_info(stamps, tmp_path, capsys, full_disk_at_image):
    from clipcond import cli

    full_disk_at_image("00001.png")
    out = tmp_path / "out"
    argv = ["data", "tuxpaint", str(out), "--stamps", str(stamps), "--resolution", "16"]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert f"no space left on device while writing {out / 'train' / '00001.png'} (" in error
    assert not (out / "dataset_info.json").exists()
    assert sorted(p.name for p in (out / "train").iterdir()) == ["00000.png"]  # no half image
