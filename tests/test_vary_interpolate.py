"""The DALL-E 2 commands in-process on tiny saved run folders: `clipcond generate --prior`, `clipcond vary`,
`clipcond interpolate`, and their errors."""

import json

import numpy as np
import pytest
from PIL import Image

from clipcond import cli
from clipcond.interpolate import main as interpolate_main
from clipcond.pipeline_loading import DEFAULT_SAMPLER
from clipcond.pipelines import ImageVariationPipeline
from clipcond.pipelines.inputs import DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE
from clipcond.vary import main as vary_main

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

SIZE = 16
FAST = ["--num-inference-steps", "2", "--device", "cpu"]
PRIOR_FAST = ["--prior-num-inference-steps", "2"]


@pytest.fixture(scope="module")
def runs(unclip_runs):
    return unclip_runs


@pytest.fixture(scope="module")
def sources(shapes_data):
    return [str(p) for p in sorted((shapes_data / "test").glob("*.png"))[:2]]


def _refuse(constant):
    raise ValueError(f"images.jsonl holds {constant}, which is not JSON")


def read_records(folder) -> list[dict]:
    """The records of images.jsonl, read as strict JSON (NaN and Infinity refused)."""
    lines = (folder / "images.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=_refuse) for line in lines]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------------ generate


def test_generate_through_the_prior(runs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(runs["decoder"]), "--prior", str(runs["prior"]), "--prompt", "a red circle"]
    args += ["--prompt", "a blue square", "--num-images", "2", "--batch-size", "3", "--prior-guidance-scale", "2"]
    assert cli.main(["generate", *args, "--output-dir", str(out), *FAST, *PRIOR_FAST]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{k:05d}.png" for k in range(4)] + ["grid.png"]
    records = read_records(out)
    assert records[0] == {
        "file_name": "00000.png",
        "prompt": "a red circle",
        "negative_prompt": None,
        "seed": 0,
        "num_inference_steps": 2,
        "guidance_scale": DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
        "scheduler": DEFAULT_SAMPLER,
        "model": str(runs["decoder"]),
        "dtype": "fp32",
        "prior": str(runs["prior"]),
        "prior_guidance_scale": 2.0,
        "prior_num_inference_steps": 2,
        "noise_level": 0,
        "guidance_start": 0.4,
        "guidance_end": 1.0,
    }
    assert "4 images (2 prompts x 2)" in capsys.readouterr().out

    # the saved one-folder pipeline draws the same images without --prior; image 3 alone is image 3 of the batch
    again = tmp_path / "again"
    single = ["--model", str(runs["unclip"]), "--prompt", "a blue square", "--seed", "3", "--num-images", "1"]
    assert (
        cli.main(["generate", *single, "--prior-guidance-scale", "2", "--output-dir", str(again), *FAST, *PRIOR_FAST])
        == 0
    )
    assert np.abs(pixels(again / "00000.png") - pixels(out / "00003.png")).max() <= 1


def test_generate_errors(runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["generate", "--model", str(runs["decoder"]), "--prompt", "a", "--output-dir", out]) == 2
    assert "is an image-embedding decoder: to generate from text, pair it with a prior" in capsys.readouterr().err
    args = ["--model", str(runs["prior"]), "--prior", str(runs["prior"]), "--prompt", "a", "--output-dir", out]
    assert cli.main(["generate", *args]) == 2
    assert "`--prior` pairs a prior with an image-embedding decoder run" in capsys.readouterr().err

    # a prior of another CLIP is refused, unless --allow-clip-mismatch
    other = tmp_path / "other_prior"
    other.mkdir()
    for path in runs["prior"].iterdir():
        (other / path.name).symlink_to(path)
    (other / "clipcond_run.json").unlink()
    (other / "clipcond_run.json").write_text(json.dumps({"clip": {"content_hash": "0" * 64}}))
    args = ["--model", str(runs["decoder"]), "--prior", str(other), "--prompt", "a", "--num-images", "1"]
    assert cli.main(["generate", *args, "--output-dir", out, *FAST, *PRIOR_FAST]) == 2
    assert "content hash 000000000000..., but the decoder" in capsys.readouterr().err
    assert cli.main(["generate", *args, "--allow-clip-mismatch", "--output-dir", out, *FAST, *PRIOR_FAST]) == 0


# ---------------------------------------------------------------------------------------------------- vary


def test_vary_writes_variations_grid_and_records(runs, sources, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(runs["decoder"]), *sources, "--num-images", "2", "--seed", "5", "--batch-size", "3"]
    assert cli.main(["vary", *args, "--output-dir", str(out), *FAST]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{k:05d}.png" for k in range(4)] + ["grid.png"]
    assert Image.open(out / "00000.png").size == (SIZE, SIZE)
    records = read_records(out)
    assert [r["source"] for r in records] == [sources[0], sources[0], sources[1], sources[1]]
    assert [r["seed"] for r in records] == [5, 6, 7, 8]
    assert records[0]["noise_level"] == 0 and records[0]["model"] == str(runs["decoder"])
    assert (records[0]["guidance_start"], records[0]["guidance_end"]) == (0.4, 1.0)
    grid = Image.open(out / "grid.png")  # 2 rows x 3 tiles (the source, then 2 variations) of >= 96 px
    assert 3 * 96 < grid.width < 4 * 96 + 40 and 2 * 96 < grid.height < 3 * 96 + 40
    assert "4 variations (2 images x 2)" in capsys.readouterr().out

    # variation 3 alone (its source, its seed) is variation 3 of the batch; an unCLIP folder's decoder is the same
    again = tmp_path / "again"
    assert (
        vary_main(
            [
                "--model",
                str(runs["unclip"]),
                sources[1],
                "--num-images",
                "1",
                "--seed",
                "8",
                "--output-dir",
                str(again),
                *FAST,
            ]
        )
        == 0
    )
    assert np.abs(pixels(again / "00000.png") - pixels(out / "00003.png")).max() <= 1


def test_vary_keeps_the_batches_drawn_before_a_failure(runs, sources, tmp_path, monkeypatch):
    calls = []
    original = ImageVariationPipeline.__call__

    def failing_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("pipeline call 2 failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImageVariationPipeline, "__call__", failing_second)
    out = tmp_path / "out"
    args = ["--model", str(runs["decoder"]), *sources, "--num-images", "2", "--batch-size", "3"]
    with pytest.raises(RuntimeError, match="pipeline call 2 failed"):
        vary_main([*args, "--output-dir", str(out), *FAST])
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "images.jsonl"]
    assert [r["source"] for r in read_records(out)] == [sources[0], sources[0], sources[1]]


def test_vary_names_a_bad_image(runs, sources, tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing.png")
    assert cli.main(["vary", "--model", str(runs["decoder"]), sources[0], missing, "--output-dir", out]) == 2
    assert f"IMAGE {missing!r} does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert cli.main(["vary", "--model", str(runs["decoder"]), str(broken), "--output-dir", out]) == 2
    assert f"IMAGE {str(broken)!r} cannot be read as an image" in capsys.readouterr().err
    assert cli.main(["vary", "--model", str(runs["prior"]), sources[0], "--output-dir", out, *FAST]) == 2
    assert "holds a PriorPipeline, which does not read images" in capsys.readouterr().err
    interval = ["--guidance-start", "0.9", "--guidance-end", "0.5"]
    assert cli.main(["vary", "--model", str(runs["decoder"]), sources[0], *interval, "--output-dir", out]) == 2
    err = capsys.readouterr().err
    assert "`--guidance-start` and `--guidance-end` must be fractions" in err and "got 0.9 and 0.5" in err


# --------------------------------------------------------------------------------------------- interpolate


def test_interpolate_prompts_ends_are_the_generations(runs, tmp_path):
    out = tmp_path / "row"
    args = [
        "--model",
        str(runs["decoder"]),
        "--prior",
        str(runs["prior"]),
        "--prompts",
        "a red circle",
        "a blue square",
    ]
    assert interpolate_main([*args, "--steps", "3", "--seed", "4", "--output-dir", str(out), *FAST, *PRIOR_FAST]) == 0
    records = read_records(out)
    assert [r["t"] for r in records] == [0.0, 0.5, 1.0]
    assert records[0]["prompts"] == ["a red circle", "a blue square"] and records[0]["prior"] == str(runs["prior"])
    assert Image.open(out / "grid.png").width > 3 * 96
    for frame, prompt in (("00000.png", "a red circle"), ("00002.png", "a blue square")):
        single = tmp_path / prompt.replace(" ", "_")
        gen = ["--model", str(runs["unclip"]), "--prompt", prompt, "--seed", "4", "--num-images", "1"]
        assert cli.main(["generate", *gen, "--output-dir", str(single), *FAST, *PRIOR_FAST]) == 0
        assert np.abs(pixels(single / "00000.png") - pixels(out / frame)).max() <= 1


def test_interpolate_images(runs, sources, tmp_path):
    out = tmp_path / "row"
    assert (
        interpolate_main(
            ["--model", str(runs["decoder"]), "--images", *sources, "--steps", "4", "--output-dir", str(out), *FAST]
        )
        == 0
    )
    records = read_records(out)
    assert [round(r["t"], 4) for r in records] == [0.0, 0.3333, 0.6667, 1.0] and records[0]["images"] == sources
    # the first frame is the variation of the first image with the same seed
    single = tmp_path / "single"
    assert (
        vary_main(
            ["--model", str(runs["decoder"]), sources[0], "--num-images", "1", "--output-dir", str(single), *FAST]
        )
        == 0
    )
    assert np.abs(pixels(single / "00000.png") - pixels(out / "00000.png")).max() <= 1


def test_interpolate_errors(runs, sources, tmp_path, capsys):
    out = str(tmp_path / "row")
    args = ["interpolate", "--model", str(runs["decoder"]), "--prompts", "a", "b", "--output-dir", out]
    assert cli.main(args) == 2
    assert "`--prompts` need a prior" in capsys.readouterr().err
    assert (
        cli.main(
            ["interpolate", "--model", str(runs["decoder"]), "--images", sources[0], "nope.png", "--output-dir", out]
        )
        == 2
    )
    assert "--images file 'nope.png' does not exist" in capsys.readouterr().err
    assert (
        cli.main(
            ["interpolate", "--model", str(runs["decoder"]), "--images", *sources, "--steps", "1", "--output-dir", out]
        )
        == 2
    )
    assert "`--steps` must be >= 2" in capsys.readouterr().err
