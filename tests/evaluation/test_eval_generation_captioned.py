"""`clipcond eval generation` on a user's imagefolder: CLIP score, Fréchet distance in the CLIP's image space and a
grid of real beside drawn images, with the data's own captions as prompts."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipcond.evaluation.captioned import (
    CAPTIONED_HEADLINE_KEYS,
    CAPTIONED_KEYS,
    CLIP_SCORE_WEIGHT,
    clip_score_100,
    evaluate_captioned,
    load_caption_set,
    paired_cosine,
)
from clipcond.evaluation.frechet import with_inception_keys
from clipcond.evaluation.generation import main
from clipcond.evaluation.inception import load_inception
from clipcond.models.clip import load_clip

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

FRUITS = ["apple", "pear", "plum", "lemon", "fig", "lime"]
TINTS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 200)}


def _write_split(folder, rows, seed):
    """Images with a tinted disc on noise, one per (caption, tint); metadata.jsonl with `text` captions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = []
    for i, (caption, tint) in enumerate(rows):
        image = rng.integers(0, 80, size=(40, 48, 3), dtype=np.uint8)  # not square, not the CLIP's size
        yy, xx = np.mgrid[:40, :48]
        disc = (yy - 20) ** 2 + (xx - 24) ** 2 < rng.integers(60, 200)
        image[disc] = TINTS[tint]
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """A user's data set: train/ and test/ with photos-like captions, no dataset_info.json; the test split repeats
    one caption (distinct captions are the prompts)."""
    root = tmp_path_factory.mktemp("imagefolder")
    rows = [(f"a photo of a {tint} {fruit}", tint) for fruit in FRUITS for tint in TINTS]
    _write_split(root / "train", rows, seed=0)
    test = rows[::2] + [rows[0]]  # 9 distinct captions, one of them twice
    _write_split(root / "test", test, seed=1)
    return root


def test_clip_score_100_is_100_times_the_positive_cosine():
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]]), dim=-1)
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]]), dim=-1)
    torch.testing.assert_close(paired_cosine(image, text), torch.tensor([1.0, 0.0, -1.0, 0.6], dtype=torch.float64))
    score = clip_score_100(image, text)
    torch.testing.assert_close(score, torch.tensor([100.0, 0.0, 0.0, 60.0], dtype=torch.float64))
    assert CLIP_SCORE_WEIGHT == 100.0
    with pytest.raises(ValueError, match="paired"):
        clip_score_100(image, text[:3])


def test_caption_set_takes_distinct_captions_in_a_seeded_order(imagefolder):
    captions = load_caption_set(str(imagefolder), "test", 32)
    assert len(captions.prompts) == len(set(captions.prompts)) == 9
    assert captions.images.shape == (9, 3, 32, 32) and captions.images.dtype == torch.uint8
    assert load_caption_set(str(imagefolder), "test", 32).prompts == captions.prompts
    assert load_caption_set(str(imagefolder), "test", 32, seed=1).prompts != captions.prompts
    assert len(load_caption_set(str(imagefolder), "test", 32, max_prompts=3).prompts) == 3
    with pytest.raises(FileNotFoundError, match="no readable split 'val'.*--split"):
        load_caption_set(str(imagefolder), "val", 32)


def _copying_and_grey_generators(captions):
    """Two `generate` callables: one draws each caption's own real image, the other one grey image for any."""
    real_of = dict(zip(captions.prompts, captions.images, strict=True))

    def copy_real(prompts, guidance_scale, generators):
        return torch.stack([real_of[p] for p in prompts])

    def grey(prompts, guidance_scale, generators):
        return torch.full((len(prompts), 3, 32, 32), 128, dtype=torch.uint8)

    return copy_real, grey


def test_a_generator_that_draws_the_real_images_scores_as_the_data(imagefolder, tiny_clip_run):
    """Drawing each caption's own real image gives the real images' CLIP score and a Fréchet distance of 0; drawing
    one grey image for every caption is far from them."""
    run = load_clip(tiny_clip_run)
    captions = load_caption_set(str(imagefolder), "test", run.image_size)
    copy_real, grey = _copying_and_grey_generators(captions)
    options = {"prompts": captions.prompts, "real_images": captions.images, "clip_run": run, "guidance_scales": [1.0]}
    copied = evaluate_captioned(copy_real, **options)
    assert copied["clip_score"] == pytest.approx(copied["clip_score_real"], abs=1e-9)
    assert copied["clip_score_100"] == pytest.approx(copied["clip_score_100_real"], abs=1e-7)
    assert copied["fd_clip"] == pytest.approx(0.0, abs=1e-6)
    assert copied["fd_clip_floor"] is None  # no floor images given
    flat = evaluate_captioned(grey, **options)
    assert flat["fd_clip"] > 10 * max(copied["fd_clip"], 1e-3)
    assert list(copied) == [*CAPTIONED_HEADLINE_KEYS, "guidance", "settings"]
    assert list(copied["guidance"]["1.0"]) == list(CAPTIONED_KEYS)
    with pytest.raises(ValueError, match="3 images for 9 prompts"):
        evaluate_captioned(copy_real, **{**options, "real_images": captions.images[:3]})


def test_command_on_a_users_imagefolder(pipeline_run, tiny_clip_run, imagefolder, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(pipeline_run), "--data", str(imagefolder), "--num-inference-steps", "2"]
    argv += ["--device", "cpu", "--no-progress", "--guidance-scales", "1,3", "--output-dir", str(out)]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in CAPTIONED_HEADLINE_KEYS:
        assert metrics[key] is not None, key
    assert -1.0 <= metrics["clip_score"] <= 1.0 and metrics["fd_clip"] >= 0.0  # a cosine, as on the shapes data
    assert 0.0 <= metrics["clip_score_100"] <= 100.0
    assert metrics["clip_score_100"] >= 100.0 * metrics["clip_score"] - 1e-9  # max(cos, 0) >= cos
    prompts = json.loads((out / "prompts.json").read_text())
    assert len(prompts) == len(set(prompts)) == 9 and all(p.startswith("a photo of a ") for p in prompts)
    assert metrics["num_images"] == 9 and metrics["settings"]["num_images_per_prompt"] == 1
    assert metrics["settings"]["floor_split"] == "train" and metrics["settings"]["num_floor_images"] == 9
    assert metrics["settings"]["clip"] == str(tiny_clip_run)
    assert list(metrics["guidance"]) == ["1.0", "3.0"]
    # without --inception-weights: no Inception figures, the keys absent
    assert (
        list(metrics) == [*CAPTIONED_HEADLINE_KEYS, "guidance", "settings"] and "inception" not in metrics["settings"]
    )
    assert list(metrics["guidance"]["3.0"]) == list(CAPTIONED_KEYS)
    for key in ("1.0", "3.0"):
        assert len(list((out / "images" / f"guidance_{key}").glob("prompt_*_0.png"))) == 9
        grid = Image.open(out / f"grid_guidance_{key}.png")
        assert grid.width > grid.height / 9  # 9 rows of (real, drawn)
    # the same seeds give the same images: a second run reproduces the figures
    assert main([*argv, "--output-dir", str(tmp_path / "again")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["fd_clip"] == metrics["fd_clip"] and again["clip_score"] == metrics["clip_score"]


def test_inception_distance_of_the_real_images_is_zero(imagefolder, tiny_clip_run, inception_weights):
    """With Inception features, a generator that draws the real images is at FID ~0 from them, one that draws grey
    images far; the Inception figures sit beside the CLIP ones."""
    run = load_clip(tiny_clip_run)
    captions = load_caption_set(str(imagefolder), "test", run.image_size, max_prompts=4)
    copy_real, grey = _copying_and_grey_generators(captions)
    options = {"prompts": captions.prompts, "real_images": captions.images, "clip_run": run, "guidance_scales": [1.0]}
    inception = load_inception(inception_weights)
    copied = evaluate_captioned(copy_real, **options, inception=inception, floor_images=captions.images)
    assert list(copied) == [*with_inception_keys(CAPTIONED_HEADLINE_KEYS, True), "guidance", "settings"]
    assert list(copied["guidance"]["1.0"]) == list(with_inception_keys(CAPTIONED_KEYS, True))
    assert copied["fd_inception"] == pytest.approx(0.0, abs=1e-3)
    assert copied["fd_inception_floor"] == pytest.approx(0.0, abs=1e-3)  # the floor images are the reference here
    flat = evaluate_captioned(grey, **options, inception=inception)
    assert flat["fd_inception"] > 1.0 and flat["fd_inception_floor"] is None


def test_command_with_inception_weights_reports_fid(pipeline_run, imagefolder, inception_weights, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(pipeline_run), "--data", str(imagefolder), "--num-inference-steps", "2", "--max-prompts"]
    argv += ["4", "--device", "cpu", "--no-progress", "--guidance-scales", "3", "--output-dir", str(out)]
    assert main([*argv, "--inception-weights", str(inception_weights)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert list(metrics) == [*with_inception_keys(CAPTIONED_HEADLINE_KEYS, True), "guidance", "settings"]
    assert list(metrics["guidance"]["3.0"]) == list(with_inception_keys(CAPTIONED_KEYS, True))
    for key in ("fd_inception", "fd_inception_floor", "fd_clip", "fd_clip_floor"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0.0, key
    assert metrics["settings"]["inception"]["weights"] == str(inception_weights)
    assert metrics["settings"]["inception"]["blocks"] == "torchvision"


def test_command_on_tux_paint_stamps_measures_captions_not_shapes(pipeline_run, tmp_path, capsys):
    """`clipcond data tuxpaint` writes a dataset_info.json too (name "tuxpaint-stamps"): the command must prompt with
    its captions (`evaluate_captioned`), not judge its topics as colour-shape classes."""
    from clipcond.data.shapes import is_shapes_data
    from clipcond.data.tuxpaint import write_tuxpaint_dataset

    stamps = tmp_path / "stamps"
    for i, (topic, colour) in enumerate([("animals", (200, 0, 0)), ("food", (0, 150, 0))] * 3):
        path = stamps / topic / f"stamp{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".txt").write_text(f"A {topic} stamp number {i}.\n", encoding="utf-8")
        stamp = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
        stamp.paste(Image.new("RGBA", (10 + 2 * i, 10), (*colour, 255)), (2, 2))
        stamp.save(path.with_suffix(".png"))
    data = tmp_path / "tuxpaint"
    info = write_tuxpaint_dataset(stamps, data, resolution=16, test_fraction=0.5)
    assert info["name"] == "tuxpaint-stamps" and not is_shapes_data(info)

    out = tmp_path / "eval"
    argv = ["--model", str(pipeline_run), "--data", str(data), "--num-inference-steps", "2", "--device", "cpu"]
    assert main([*argv, "--no-progress", "--guidance-scales", "1", "--output-dir", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert list(metrics) == [*CAPTIONED_HEADLINE_KEYS, "guidance", "settings"]
    assert "judge" not in metrics and "classes" not in metrics["settings"]
    prompts = json.loads((out / "prompts.json").read_text())
    assert len(prompts) >= 2 and all(p.startswith("A ") and "stamp number" in p for p in prompts)
    assert metrics["num_images"] == len(prompts) and (out / "grid_guidance_1.0.png").is_file()


def test_max_prompts_below_two_is_refused_as_the_flag(pipeline_run, imagefolder, tmp_path):
    """One prompt cannot give a Fréchet distance: the flag is refused before any load, not blamed on the data."""
    argv = ["--model", str(pipeline_run), "--data", str(imagefolder), "--output-dir", str(tmp_path / "eval")]
    for value in ("1", "0"):
        with pytest.raises(ValueError, match=rf"`--max-prompts` must be >= 2 .*got {value}$"):
            main([*argv, "--max-prompts", value])
    assert not (tmp_path / "eval").exists()
    with pytest.raises(ValueError, match="`max_prompts` must be >= 2"):
        load_caption_set(str(imagefolder), "test", 32, max_prompts=1)
