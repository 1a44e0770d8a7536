"""`clipcond demo --quick`: every stage runs, the samples and the report are written, and a second run reuses
finished stages."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipcond import cli
from clipcond.data.shapes import class_names
from clipcond.demo import default_sample_dtype, default_train_precision, main, stale_runs
from clipcond.evaluation.generation import image_file, image_seed


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# The numpy-2 `__array__` copy DeprecationWarning of diffusers' DPM-Solver, which the samples are drawn with.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def test_quick_demo_writes_report_and_reuses_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output-dir", str(out), "--quick"]) == 0
    report = json.loads((out / "report.json").read_text())
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-2])["report"] == str(out / "report.md")
    assert str(out / "report.md") in printed[-1]
    assert report["quick"] is True
    stages = {"startup", "data", "clip", "clip_eval", "probe", "decoder", "samples", "generation_eval"}  # + imports
    assert set(report["seconds"]) == stages and set(report["timings"]) == stages
    assert all(t["wall"] >= 0 and t["cpu"] >= 0 for t in report["timings"].values())
    assert not report["timings"]["startup"]["reused"]  # a fresh demo counts its imports too
    # the report's CLIP figures are the evaluation's, written once, and the markdown shows them
    assert report["clip_eval"] == json.loads((out / "clip" / "eval" / "metrics.json").read_text())
    assert report["decoder"]["steps"] == 4 and report["decoder"]["model"] == "test"
    precision = default_train_precision()  # the demo's default: bf16 where it is fast, fp32 elsewhere
    assert report["clip"]["mixed_precision"] == precision == report["decoder"]["mixed_precision"]
    assert (out / "clip" / "eval" / "confusion_matrix.png").is_file()
    # the CLIP's minimal-pair probes: their report folder and a section of the demo's report
    probe = json.loads((out / "probe" / "probes.json").read_text())
    assert set(probe["clip"]) == {"count", "relation", "binding", "position", "size"}
    assert probe["clip"]["binding"]["all"]["n"] == 8 and report["probe"]["clip"] == probe["clip"]
    assert "## Compositional probes (CLIP)" in (out / "report.md").read_text()
    clip_record = json.loads((out / "clip" / "clipcond_run.json").read_text())
    assert probe["settings"]["clip_content_hash"] == clip_record["content_hash"]  # checked before it is reused

    # samples: every colour-shape prompt (held-out ones included), as `clipcond generate` writes them
    prompts = [f"a {name}" for name in class_names(json.loads((out / "data" / "dataset_info.json").read_text()))]
    records = [json.loads(line) for line in (out / "samples" / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts  # one image per prompt in quick mode
    assert [r["seed"] for r in records] == [image_seed(0, prompt, 0) for prompt in prompts]
    assert all((out / "samples" / r["file_name"]).is_file() for r in records)
    assert (out / "samples" / "grid.png").is_file()
    # they are the evaluation's images at the default guidance, and `clipcond generate` redraws one from its record
    record = records[5]
    assert record["dtype"] == default_sample_dtype() == report["generation"]["settings"]["dtype"]  # the demo's dtype
    evaluated = image_file(out / "decoder" / "eval_generation", record["guidance_scale"], record["prompt"], 0)
    assert np.array_equal(pixels(out / "samples" / record["file_name"]), pixels(evaluated))
    argv = ["--model", record["model"], "--prompt", record["prompt"], "--seed", str(record["seed"])]
    argv += [
        "--num-images",
        "1",
        "--scheduler",
        record["scheduler"],
        "--guidance-scale",
        str(record["guidance_scale"]),
        "--dtype",
        record["dtype"],
    ]
    argv += ["--num-inference-steps", str(record["num_inference_steps"]), "--output-dir", str(tmp_path / "again")]
    assert cli.main(["generate", *argv]) == 0
    assert np.abs(pixels(tmp_path / "again" / "00000.png") - pixels(evaluated)).max() <= 1

    # the judged evaluation at guidance 1 and the default, seen and held-out apart
    generation = report["generation"]
    assert set(generation["guidance"]) == {"1.0", str(float(generation["guidance_scale"]))}
    for figures in generation["guidance"].values():
        for key in ("colour_accuracy_seen", "shape_accuracy_heldout", "both_accuracy_seen", "clip_score", "fd_clip"):
            assert figures[key] is not None
    md = (out / "report.md").read_text()
    assert md.startswith("# clipcond demo report")
    assert f"| {100 * report['clip_eval']['zero_shot_top1_seen']:.1f}% |" in md
    assert "![samples](samples/grid.png)" in md and "held-out" in md
    shown = {"no": "fp32"}.get(precision, precision)
    assert "CLIP `test`, contrastive: 4 steps of batch 16" in md and f"precision {shown}" in md
    assert "Recipe: quick (on cpu)" in md and report["recipe"] == "quick"
    ema = report["decoder"]["ema"]  # warm-up: 1 - 4^(-2/3) after the quick run's 4 steps, under the 0.999 bound
    assert ema["last_decay"] == pytest.approx(1 - 4 ** (-2 / 3), abs=1e-6) and ema["decay"] == 0.999
    assert f"EMA (decay {ema['last_decay']:.4f} at the end, at most 0.9990)" in md

    assert report["uninterrupted"] and len({t["run"] for t in report["timings"].values()}) == 1
    # its runs follow the quick recipe; the cpu recipe would have trained them otherwise, and says how
    assert stale_runs(out, "quick") == []
    stale = stale_runs(out, "cpu")
    assert "decoder: trained with space_to_depth=1, the 'cpu' recipe gives '2'" in stale
    assert "decoder: trained with max_train_steps=4, the 'cpu' recipe gives '2400'" in stale
    assert not any(line.startswith("clip:") for line in stale)  # the cpu recipe adds nothing to the CLIP's
    stamps = {p: (out / p).stat().st_mtime_ns for p in ("clip/model.safetensors", "decoder/model_index.json")}
    stamps["samples/grid.png"] = (out / "samples" / "grid.png").stat().st_mtime_ns
    assert main(["--output-dir", str(out), "--quick"]) == 0  # finished stages are skipped, not redone
    assert {p: (out / p).stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "report.json").read_text())
    assert all(t["reused"] for t in again["timings"].values())  # ... and keep the times they took when they ran
    assert again["seconds"] == report["seconds"] and again["uninterrupted"]  # still the times of one command

    (out / "samples" / "grid.png").unlink()  # as if the first command had been killed before its samples
    assert main(["--output-dir", str(out), "--quick"]) == 0
    patched = json.loads((out / "report.json").read_text())
    assert not patched["timings"]["samples"]["reused"] and not patched["uninterrupted"]


def test_sample_dtype_option(monkeypatch):
    from clipcond import demo
    from clipcond.demo import parse_args

    # bf16 by default only where it is fast; fp32 (and fp32 training) where the CPU emulates it
    for fast, dtype, precision in ((True, "bf16", "bf16"), (False, "fp32", "no")):
        monkeypatch.setattr(demo, "fast_bf16", lambda device, fast=fast: fast)
        assert parse_args([]).sample_dtype == dtype and demo.default_train_precision() == precision
    assert parse_args(["--sample-dtype", "fp32"]).sample_dtype == "fp32"
    monkeypatch.setattr(demo, "fast_bf16", lambda device: False)
    assert parse_args(["--sample-dtype", "bf16"]).sample_dtype == "bf16"  # asked for: kept
    with pytest.raises(SystemExit):
        parse_args(["--sample-dtype", "fp64"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`--sample-dtype fp16` needs a CUDA device"):
            parse_args(["--sample-dtype", "fp16"])


def test_recipe_follows_the_device(monkeypatch):
    """`--recipe auto` is the GPU recipe where CUDA is, the trainers' CPU recipe elsewhere; each picks its judged
    images per prompt, and `--quick` wins over both."""
    from clipcond.demo import parse_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = parse_args([])
    assert (cpu.recipe, cpu.eval_images_per_prompt) == ("cpu", 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    gpu = parse_args([])
    assert (gpu.recipe, gpu.eval_images_per_prompt, gpu.sample_dtype) == ("gpu", 32, "bf16")
    assert parse_args(["--recipe", "cpu"]).recipe == "cpu"
    assert parse_args(["--quick"]).recipe == "quick"
    assert parse_args(["--eval-images-per-prompt", "12"]).eval_images_per_prompt == 12


@pytest.mark.parametrize("recipe", ["cpu", "gpu", "quick"])
def test_recipe_arguments_reach_each_trainer(recipe, tmp_path, monkeypatch):
    """Every stage of a recipe passes arguments its trainer accepts, and `--clip-steps` and the like still set the
    step count after them (after the cpu decoders' own step counts too). The cpu decoders denoise pixel blocks."""
    from clipcond import demo
    from clipcond.train import clip, decoder, prior

    seen = {}

    def fake_main(name, parse):
        def main(argv):
            seen[name] = parse(argv)
            raise SystemExit  # stop before training; the arguments are what is tested

        return main

    trainers = {"clip": clip, "decoder": decoder, "prior": prior, "unclip_decoder": decoder}
    steps_flags = ["--decoder-steps", "7", "--unclip-decoder-steps", "5"]
    args = demo.parse_args([*steps_flags, *(["--quick"] if recipe == "quick" else ["--recipe", recipe])])
    for stage, trainer in trainers.items():
        monkeypatch.setattr(trainer, "main", fake_main(stage, trainer.parse_args))
        base = ["--data", str(tmp_path), "--output-dir", str(tmp_path / stage)]
        if stage != "clip":
            base += ["--clip", str(tmp_path)]
        if stage == "unclip_decoder":  # as `_stage_unclip_decoder` passes it
            base += ["--conditioning", "image-embedding"]
        steps = {"decoder": args.decoder_steps, "unclip_decoder": args.unclip_decoder_steps}.get(stage)
        with pytest.raises(SystemExit):
            demo._train_unless_done(args, stage, trainer, tmp_path / stage, base, steps=steps, precision="bf16")
        extra = demo.RECIPES[recipe][stage]
        if "--train-batch-size" in extra:
            assert seen[stage].train_batch_size == int(extra[extra.index("--train-batch-size") + 1])
    # --quick keeps its budget; otherwise the steps flags win over the recipe's own counts
    assert seen["decoder"].max_train_steps == (4 if recipe == "quick" else 7)
    assert seen["unclip_decoder"].max_train_steps == (4 if recipe == "quick" else 5)
    assert seen["unclip_decoder"].conditioning == "image-embedding"
    if recipe == "gpu":
        assert seen["clip"].max_train_steps == int(demo.RECIPES["gpu"]["clip"][3])
    for stage in ("decoder", "unclip_decoder"):
        assert seen[stage].space_to_depth == (2 if recipe == "cpu" else 1)


def test_a_resumed_training_is_not_an_uninterrupted_demo():
    from clipcond.demo import uninterrupted

    timings = {"data": {"run": "a"}, "clip": {"run": "a"}}
    assert uninterrupted({"timings": timings, "clip": {"resumed_from": None}})
    assert not uninterrupted({"timings": timings, "clip": {"resumed_from": "clip/checkpoints/checkpoint-100"}})
    assert not uninterrupted({"timings": {"data": {"run": "a"}, "clip": {"run": "b"}}, "clip": {"resumed_from": None}})
    assert not uninterrupted({"timings": {"data": {}}, "clip": {"resumed_from": None}})  # before runs were recorded


def test_quick_latent_demo_adds_the_vae_and_a_latent_decoder_that_exports(tmp_path, capsys):
    """--latent: the shapes data at 64 px, a VAE judged on its reconstructions, a latent decoder judged as the pixel
    one is, a report section and headline for them; a second run reuses them; the decoder exports to stock SD."""
    from clipcond import export_stable_diffusion

    out = tmp_path / "demo"
    assert main(["--output-dir", str(out), "--quick", "--latent"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "data_64" / "dataset_info.json").read_text())["resolution"] == 64
    assert (
        report["vae"]["scaling_factor"] > 0
        and report["vae"]["latent_size"] * report["vae"]["downsampling_factor"] == 64
    )
    vae_eval = report["vae_eval"]
    assert vae_eval["num_images"] == len(class_names(None)) and vae_eval["psnr"] > 0
    assert set(vae_eval["judged_reconstructions"]) == {"colour_accuracy", "shape_accuracy", "both_accuracy"}
    assert (out / "vae" / "eval" / "reconstructions.png").is_file()
    assert report["latent_generation"]["settings"]["model"] == str(out / "latent_decoder")
    run_record = json.loads((out / "latent_decoder" / "clipcond_run.json").read_text())
    assert run_record["model_space"]["space"] == "latents" and run_record["conditioning"]["mask_text_padding"] is False
    md = (out / "report.md").read_text()
    assert "## Latent path" in md and "![reconstructions](vae/eval/reconstructions.png)" in md
    lines = capsys.readouterr().out.splitlines()
    headline = json.loads(next(line for line in lines if line.startswith('{"report"')))
    assert headline["latent"]["vae_psnr"] == round(vae_eval["psnr"], 2)

    assert main(["--output-dir", str(out), "--quick", "--latent"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert all(again["timings"][name]["reused"] for name in ("vae", "vae_eval", "latent_decoder"))
    assert export_stable_diffusion.main([str(out / "latent_decoder"), str(tmp_path / "stock")]) == 0
