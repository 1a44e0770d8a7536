"""`clipcond eval generation`: the Fréchet distance, `evaluate_generation` with fake generators of known accuracy,
and the command on a tiny random pipeline."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipcond import cli
from clipcond.data.shapes import COLOURS, DEFAULT_HELD_OUT, ShapeObject, class_names, render_scene
from clipcond.evaluation import generation
from clipcond.evaluation.frechet import with_inception_keys
from clipcond.evaluation.generation import (
    DEFAULT_GUIDANCE_SCALE,
    GROUP_KEYS,
    HEADLINE_KEYS,
    evaluate_generation,
    frechet_distance,
    frechet_distance_from_stats,
    image_seed,
    main,
)
from clipcond.pipeline_loading import DEFAULT_SAMPLER

CLASSES = class_names(None)  # the 18 colour-shape pairs
HELD_OUT = list(DEFAULT_HELD_OUT)
DEFAULT = str(DEFAULT_GUIDANCE_SCALE)  # the key of the default guidance's figures
# The numpy-2 `__array__` copy DeprecationWarning of diffusers' DPM-Solver.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def fake_generator(wrong=lambda colour, shape, guidance: False, calls=None):
    """A `generate` callable that draws ground-truth renders of the prompt "a <colour> <shape>", at a position and
    size drawn from each image's generator; with the next colour instead where `wrong(colour, shape, guidance)`."""
    names = list(COLOURS)

    def generate(prompts, guidance_scale, generators):
        images = []
        for prompt, generator in zip(prompts, generators):
            colour, shape = prompt.split()[-2:]
            if wrong(colour, shape, guidance_scale):
                colour = names[(names.index(colour) + 1) % len(names)]
            u = torch.rand(3, generator=generator).tolist()
            if calls is not None:
                calls.append((prompt, guidance_scale, u[0]))
            size = "small" if u[0] < 0.5 else "large"
            obj = ShapeObject(colour, shape, size, "centre", dx=(u[1] - 0.5) * 0.3, dy=(u[2] - 0.5) * 0.3)
            images.append(np.asarray(render_scene([obj], 32)))
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)

    return generate


def run(judge, generate, **kwargs):
    options = {"classes": CLASSES, "held_out": HELD_OUT, "judge": judge, "num_images_per_prompt": 2, "batch_size": 16}
    return evaluate_generation(generate, **{**options, **kwargs})


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    # rotating both Gaussians by the same orthogonal matrix keeps the distance (the covariances stop being diagonal)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rotated = frechet_distance_from_stats(q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2, q @ np.diag(var2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_samples():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5]
    y = rng.normal(size=(4000, 3)) * [2.0, 1.0, 0.5] + [1.0, 0.0, 0.0]
    expected = 1.0 + (1 - 2) ** 2 + (2 - 1) ** 2  # |mu|^2 + sum (sd1 - sd2)^2
    assert frechet_distance(x, y) == pytest.approx(expected, abs=0.15)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    features = torch.randn(10, 32)  # fewer samples than dimensions: singular covariances still work
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features, features + 1) == pytest.approx(32.0, rel=1e-6)
    # fewer images than dimensions: the distance from the samples is the one from the covariances
    a, b = rng.normal(size=(7, 40)), rng.normal(size=(9, 40)) * 1.5 + 0.3
    from_stats = frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(from_stats, rel=1e-6) and from_stats > 1.0
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(x[:1], y)
    with pytest.raises(ValueError, match="widths 3 and 2"):
        frechet_distance(x, y[:, :2])


# ---------------------------------------------------------------- evaluate_generation


def test_perfect_and_wrong_generators(judge, tmp_path):
    perfect = run(judge, fake_generator())
    for group in ("", "_seen", "_heldout"):
        assert perfect[f"both_accuracy{group}"] >= 0.95
    wrong = run(judge, fake_generator(wrong=lambda c, s, g: True))
    assert wrong["colour_accuracy"] <= 0.05 and wrong["both_accuracy"] <= 0.05
    assert wrong["shape_accuracy"] >= 0.95  # the shape is still right
    red_circle = wrong["guidance"][DEFAULT]["per_class"]["red circle"]
    assert red_circle["judged"] == {"green circle": 2} and red_circle["colour_accuracy"] == 0.0


def test_one_object_prompts_drawn_twice_are_wrong(judge):
    """A generator that draws every prompt's object twice gets the colour of every image "right" by a forced
    choice; the judge calls those images "several", and the figures count them as wrong."""

    def twice(prompts, guidance_scale, generators):
        images = []
        for prompt in prompts:
            colour, shape = prompt.split()[-2:]
            pair = [ShapeObject(colour, shape, "small", position) for position in ("left", "right")]
            images.append(np.asarray(render_scene(pair, 32)))
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)

    metrics = run(judge, twice)
    assert metrics["colour_accuracy"] <= 0.1 and metrics["both_accuracy"] <= 0.1
    outcomes = metrics["guidance"][DEFAULT]["outcomes"]["all"]
    assert outcomes["several"] >= 0.9
    per_class = metrics["guidance"][DEFAULT]["per_class"]["red circle"]
    assert max(per_class["judged"], key=per_class["judged"].get) == "several"


def test_a_generator_that_ignores_the_seed_has_no_diversity(judge):
    seeded = run(judge, fake_generator(), num_images_per_prompt=3)
    same = fake_generator()

    def ignores_seed(prompts, guidance_scale, generators):
        return same(prompts, guidance_scale, [torch.Generator().manual_seed(0) for _ in prompts])

    collapsed = run(judge, ignores_seed, num_images_per_prompt=3)
    for metrics in (seeded, collapsed):
        figures = metrics["guidance"][DEFAULT]["diversity"]
        assert figures["clip"] is None and figures["clip_real"] is None  # no CLIP given
    assert seeded["guidance"][DEFAULT]["diversity"]["pixels"] > 0.05
    assert collapsed["guidance"][DEFAULT]["diversity"]["pixels"] == 0.0
    # the real images' figure does not depend on the generator
    assert (
        collapsed["guidance"][DEFAULT]["diversity"]["pixels_real"]
        == seeded["guidance"][DEFAULT]["diversity"]["pixels_real"]
        > 0.05
    )


def test_seen_and_heldout_are_reported_apart(judge):
    metrics = run(judge, fake_generator(wrong=lambda c, s, g: f"{c} {s}" in HELD_OUT))
    assert metrics["both_accuracy_seen"] >= 0.95 and metrics["both_accuracy_heldout"] <= 0.05
    n_held = len(HELD_OUT) / len(CLASSES)
    assert metrics["both_accuracy"] == pytest.approx(metrics["both_accuracy_seen"] * (1 - n_held), abs=0.03)
    per_class = metrics["guidance"][DEFAULT]["per_class"]
    assert [name for name, figures in per_class.items() if figures["heldout"]] == [c for c in CLASSES if c in HELD_OUT]
    # without a held-out list every class is seen, and the held-out figures are None
    no_held = run(judge, fake_generator(), held_out=None, guidance_scales=[2.0])
    assert no_held["both_accuracy_heldout"] is None and no_held["both_accuracy_seen"] == no_held["both_accuracy"]


def test_guidance_scales_are_grouped_with_the_same_seeds(judge):
    calls = []
    metrics = run(judge, fake_generator(wrong=lambda c, s, g: g < 2, calls=calls), guidance_scales=[1, 3])
    assert list(metrics["guidance"]) == ["1.0", "3.0"] and metrics["guidance_scale"] == 3.0
    assert metrics["guidance"]["1.0"]["colour_accuracy"] <= 0.05 and metrics["colour_accuracy"] >= 0.95
    for key in set(HEADLINE_KEYS) & set(GROUP_KEYS):
        assert metrics[key] == metrics["guidance"]["3.0"][key]
    # image k of a prompt starts from the same noise at every guidance scale, and images differ from each other
    by_scale = {g: [(p, u) for p, scale, u in calls if scale == g] for g in (1.0, 3.0)}
    assert by_scale[1.0] == by_scale[3.0] and len({u for _, u in by_scale[1.0]}) == len(by_scale[1.0])
    assert image_seed(0, "a red circle", 0) != image_seed(0, "a red circle", 1) != image_seed(1, "a red circle", 1)
    # a headline scale that is not listed is added
    again = run(judge, fake_generator(), guidance_scales=[1.0], guidance_scale=5.0, num_images_per_prompt=1)
    assert list(again["guidance"]) == ["1.0", "5.0"] and again["guidance_scale"] == 5.0


def test_json_keys_clip_figures_and_outputs(judge, tiny_clip_run, shapes_data, tmp_path):
    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.models.clip import load_clip

    clip_run = load_clip(tiny_clip_run)
    dataset = ImageCaptionDataset(shapes_data, split="test", resolution=32)
    reference = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset)) if dataset[i]["label"]])
    out = tmp_path / "eval"
    metrics = run(judge, fake_generator(), clip_run=clip_run, reference_images=reference, output_dir=out)

    assert tuple(metrics)[: len(HEADLINE_KEYS)] == HEADLINE_KEYS
    assert tuple(metrics)[len(HEADLINE_KEYS) :] == ("guidance", "judge", "settings")
    for figures in metrics["guidance"].values():
        assert (
            tuple(figures) == (*GROUP_KEYS, "per_class", "diversity", "outcomes") and len(figures["per_class"]) == 18
        )
        assert set(figures["diversity"]) == {"pixels", "clip", "pixels_real", "clip_real"}
        assert all(value > 0 for value in figures["diversity"].values())  # seeds move the renders
        assert list(figures["outcomes"]) == ["all", "seen", "heldout"]
        assert figures["outcomes"]["all"]["object"] >= 0.9  # ground-truth renders: one object each
    json.dumps(metrics, allow_nan=False)  # plain JSON: no NaN, no tensors
    for key in ("clip_score", "clip_score_seen", "clip_score_heldout"):
        assert -1.0 <= metrics[key] <= 1.0
    assert 0.0 <= metrics["clip_top1"] <= 1.0
    assert math.isfinite(metrics["fd_clip"]) and metrics["fd_clip"] >= 0
    assert math.isfinite(metrics["fd_clip_floor"]) and metrics["fd_clip_floor"] >= 0
    assert metrics["judge"]["clean_both_accuracy"] >= 0.98
    assert metrics["settings"]["num_reference_images"] == 18 and metrics["settings"]["held_out"] == HELD_OUT

    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in ("1.0", DEFAULT):
        with Image.open(out / f"grid_guidance_{key}.png") as grid:
            assert grid.height > 18 * 36 and grid.width > 2 * 36  # 18 rows of 2 framed images
        assert (out / f"accuracy_guidance_{key}.png").is_file()
        assert len(list((out / "images" / f"guidance_{key}").glob("*.png"))) == 36
    with Image.open(out / "images" / f"guidance_{DEFAULT}" / "a_red_circle_0.png") as image:
        assert image.size == (32, 32)


def test_an_earlier_evaluation_leaves_no_outputs_beside_a_new_one(judge, tmp_path):
    """Run again into the same folder with another guidance scale and fewer images: only this run's grids, heatmaps
    and images remain, and files the evaluation did not write stay."""
    out = tmp_path / "eval"
    run(judge, fake_generator(), guidance_scales=[1.0, 5.0], guidance_scale=5.0, output_dir=out)
    (out / "notes.txt").write_text("mine")
    (out / "images" / "mine.png").write_bytes(b"not an evaluation's")
    run(judge, fake_generator(), guidance_scales=[3.0], num_images_per_prompt=1, output_dir=out)

    assert sorted(p.name for p in out.glob("*_guidance_*.png")) == [
        "accuracy_guidance_3.0.png",
        "grid_guidance_3.0.png",
    ]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["guidance_3.0", "mine.png"]
    assert len(list((out / "images" / "guidance_3.0").glob("*.png"))) == 18  # one image a prompt, not two
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt_template": "a {color} {shape}"}, "only the fields"),
        ({"prompt_template": "a {shape}"}, "both"),
        ({"classes": ["red circle", "pink circle"]}, "pink circle"),
        ({"held_out": ["red circle"], "classes": ["blue circle", "blue square"]}, "not among the classes"),
        ({"guidance_scales": [0.5, 3.0]}, ">= 1"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ],
)
def test_bad_arguments(judge, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(judge, fake_generator(), **kwargs)


def test_generator_output_is_checked(judge):
    def float_images(prompts, guidance_scale, generators):
        return torch.zeros(len(prompts), 3, 32, 32)

    with pytest.raises(ValueError, match="uint8"):
        run(judge, float_images)

    def too_few(prompts, guidance_scale, generators):
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    with pytest.raises(ValueError, match="for 16 prompts"):
        run(judge, too_few)


# ---------------------------------------------------------------- the command


def test_command_on_a_tiny_pipeline(pipeline_run, tiny_clip_run, shapes_data, judge, monkeypatch, capsys):
    # The judge of the fixture (a smaller training budget than the command's default), instead of training one here.
    monkeypatch.setattr(generation, "load_or_train_judge", lambda resolution, **kwargs: judge)
    argv = ["--model", str(pipeline_run), "--data", str(shapes_data), "--num-inference-steps", "2"]
    argv += ["--num-images-per-prompt", "1", "--device", "cpu", "--no-progress", "--batch-size", "18"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)  # stdout holds the JSON object and nothing else
    out = pipeline_run / "eval_generation"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert list(metrics["guidance"]) == ["1.0", DEFAULT] and metrics["guidance_scale"] == DEFAULT_GUIDANCE_SCALE
    assert metrics["num_images"] == 18 and metrics["settings"]["scheduler"] == DEFAULT_SAMPLER
    assert metrics["settings"]["dtype"] == "fp32"
    assert metrics["settings"]["clip"] == str(tiny_clip_run) and metrics["settings"]["model"] == str(pipeline_run)
    for key in HEADLINE_KEYS:
        assert metrics[key] is not None, key
    assert len(list((out / "images" / "guidance_1.0").glob("*.png"))) == 18
    assert (out / f"grid_guidance_{DEFAULT}.png").is_file()
    # without --inception-weights: no Inception figures, the keys absent
    assert tuple(metrics)[: len(HEADLINE_KEYS) + 1] == (*HEADLINE_KEYS, "guidance")
    assert "fd_inception" not in metrics["guidance"]["1.0"] and "inception" not in metrics["settings"]

    # --dtype bf16: the pipeline samples in bf16 (recorded), and the figures are computed as in fp32; one UNet pass
    # (one step, no guidance), as bf16 is emulated, and slow, on a CPU without bf16 units
    bf16_out = pipeline_run / "eval_bf16"
    bf16_argv = ["--guidance-scales", "1", "--num-inference-steps", "1", "--dtype", "bf16"]
    assert main([*argv, *bf16_argv, "--output-dir", str(bf16_out)]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["settings"]["dtype"] == "bf16" and list(bf16["guidance"]) == ["1.0"]
    assert all(bf16[key] is not None for key in HEADLINE_KEYS)


def test_command_with_inception_weights(
    pipeline_run, shapes_data, judge, inception_weights, monkeypatch, tmp_path, capsys
):
    """`--inception-weights` adds FID beside the CLIP-space FD, and its floor (ground-truth renders) beside
    `fd_clip_floor`."""
    monkeypatch.setattr(generation, "load_or_train_judge", lambda resolution, **kwargs: judge)
    argv = ["--model", str(pipeline_run), "--data", str(shapes_data), "--num-inference-steps", "2"]
    argv += ["--num-images-per-prompt", "1", "--guidance-scales", "3", "--device", "cpu", "--no-progress"]
    argv += ["--batch-size", "18", "--output-dir", str(tmp_path / "eval")]
    assert main([*argv, "--inception-weights", str(inception_weights)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    keys = with_inception_keys(HEADLINE_KEYS, True)
    assert tuple(metrics)[: len(keys)] == keys and keys.index("fd_inception") == keys.index("fd_clip") + 1
    assert keys[-2:] == ("fd_clip_floor", "fd_inception_floor")
    assert tuple(metrics["guidance"]["3.0"])[: len(GROUP_KEYS) + 1] == with_inception_keys(GROUP_KEYS, True)
    for key in ("fd_inception", "fd_inception_floor"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0.0, key
    # an untrained UNet draws noise: further from the reference than ground-truth renders are
    assert metrics["fd_inception"] > metrics["fd_inception_floor"]
    assert metrics["settings"]["inception"]["blocks"] == "torchvision"


def test_command_user_errors(pipeline_run, shapes_data, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="--model"):
        main(["--model", str(tmp_path / "missing"), "--data", str(shapes_data)])
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        main(["--model", str(tmp_path), "--data", str(shapes_data)])
    plain = tmp_path / "plain"
    (plain / "train").mkdir(parents=True)
    (plain / "train" / "metadata.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="has no readable split 'test'.*--split"):  # other data: its captions
        main(["--model", str(pipeline_run), "--data", str(plain)])
    with pytest.raises(ValueError, match="--guidance-scales"):
        main(["--model", str(pipeline_run), "--data", str(shapes_data), "--guidance-scales", "1,x"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`--dtype fp16` needs a CUDA device"):
            main(["--model", str(pipeline_run), "--data", str(shapes_data), "--device", "cpu", "--dtype", "fp16"])
    # through the dispatcher: one line and exit status 2
    assert cli.main(["eval", "generation", "--model", str(tmp_path / "missing"), "--data", str(shapes_data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipcond eval generation: error:")


def test_clip_path_resolution(pipeline_run, tiny_clip_run, tmp_path):
    path, recorded_hash = generation.resolve_clip_path(pipeline_run, None)
    assert path == tiny_clip_run and recorded_hash is None
    assert generation.resolve_clip_path(pipeline_run, str(tiny_clip_run)) == (tiny_clip_run, None)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="--clip"):
        generation.resolve_clip_path(run, None)
    (run / "clipcond_run.json").write_text(json.dumps({"clip": {"path": "nowhere/clip"}}))
    with pytest.raises(FileNotFoundError, match="nowhere/clip"):
        generation.resolve_clip_path(run, None)


def test_another_clip_is_an_error_unless_allowed(
    pipeline_run, tiny_clip_run, shapes_data, judge, tmp_path, monkeypatch
):
    """CLIP score and FD in another CLIP's embedding space are not the decoder's: refused, or recorded when allowed."""
    import shutil

    from clipcond.lineage import content_hash

    monkeypatch.setattr(generation, "load_or_train_judge", lambda resolution, **kwargs: judge)
    run = tmp_path / "run"
    shutil.copytree(pipeline_run, run, ignore=shutil.ignore_patterns("eval*"))
    record = {"clip": {"path": str(tiny_clip_run), "content_hash": content_hash(tiny_clip_run)}}
    (run / "clipcond_run.json").write_text(json.dumps(record))
    other = tmp_path / "other_clip"
    shutil.copytree(tiny_clip_run, other, ignore=shutil.ignore_patterns("checkpoints", "cache", "eval"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "note": "another CLIP"}))  # another content hash
    argv = ["--model", str(run), "--data", str(shapes_data), "--clip", str(other), "--num-inference-steps", "1"]
    argv += ["--num-images-per-prompt", "1", "--device", "cpu", "--no-progress", "--guidance-scales", "2"]
    with pytest.raises(ValueError, match="is not the CLIP the decoder was trained on.*--allow-clip-mismatch"):
        main(argv)
    assert main([*argv, "--allow-clip-mismatch"]) == 0
    assert json.loads((run / "eval_generation" / "metrics.json").read_text())["settings"]["clip_mismatch"] is True


def test_untrained_unet_samples_are_not_judged_objects(pipeline_run, judge):
    """What a UNet that learnt nothing draws must not score: the judge calls it blank, several or unrecognisable."""
    from clipcond.evaluation.judge_check import judge_images, untrained_unet_samples
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(pipeline_run, local_files_only=True)
    unet = pipe.unet
    images = untrained_unet_samples(pipe, n=24, seed=0, num_inference_steps=4)
    assert pipe.unet is unet and images.shape == (24, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, untrained_unet_samples(pipe, n=24, seed=0, num_inference_steps=4))
    figures = judge_images(judge, images, "unrecognisable")
    assert figures["outcomes"]["object"] <= 0.1, figures
