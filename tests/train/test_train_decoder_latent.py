"""`clipcond train decoder --vae VAE` at test scale, for text and image-embedding conditioning alike: latents cached
once as posteriors, a sample drawn each step, the run folder a pipeline that decodes through the VAE, the sampling
commands and `clipcond eval unclip` on it, resume after SIGKILL, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kill_at_step
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from without_clipcond import assert_stock_diffusers_draws_the_same, run_without_clipcond

from clipcond import latents as latents_module
from clipcond.data.folders import ImageCaptionDataset
from clipcond.latents import LatentCache
from clipcond.lineage import content_hash
from clipcond.models.vae import create_vae, set_scaling_factor, vae_config
from clipcond.pipeline_loading import pipeline_class_name
from clipcond.pipelines import ImageVariationPipeline, TextToImagePipeline
from clipcond.train.decoder import main
from clipcond.train.model_space import LatentSpace

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

RESOLUTION = 16
SCALING_FACTOR = 0.7  # not diffusers' default: the run must carry the VAE's own
STEPS = 4
FAST_ARGS = [
    *("--model", "test", "--resolution", str(RESOLUTION), "--train-batch-size", "4", "--lr-warmup-steps", "1"),
    *("--seed", "0", "--validation-inference-steps", "1", "--validation-images-per-prompt", "1"),
]
RESUME_ARGS = ["--max-train-steps", str(STEPS), "--checkpointing-steps", "2", "--validation-steps", "2"]
# What each --conditioning adds; its validation grid's (columns, rows): a prompt per row, or a source image and its
# variation per row.
CONDITIONINGS = {
    "text": ["--validation-prompts", "a red circle", "a blue square"],
    "image-embedding": ["--conditioning", "image-embedding", "--validation-sources", "2"],
}
VALIDATION_GRID = {"text": (1, 2), "image-embedding": (2, 2)}


def _argv(clip, data, vae, out, *extra, conditioning="text"):
    return [
        *("--clip", str(clip), "--data", str(data), "--vae", str(vae), "--output-dir", str(out)),
        *FAST_ARGS,
        *CONDITIONINGS[conditioning],
        *extra,
    ]


def _trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights that training wrote into a pipeline folder: the UNet's, and the embedding tokens' if any."""
    weights = {}
    for component in ("unet", "embedding_tokens"):
        file = folder / component / "diffusion_pytorch_model.safetensors"
        if file.is_file():
            weights.update({f"{component}.{k}": v for k, v in load_file(file).items()})
    return weights


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    """A `test`-preset VAE (downsampling x2: 16 px -> 4 x 8 x 8 latents) in SD's vae/ layout."""
    torch.manual_seed(0)
    vae = create_vae(vae_config("test", sample_size=RESOLUTION))
    set_scaling_factor(vae, SCALING_FACTOR)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(CONDITIONINGS))
def conditioning(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def latent_run(conditioning, shapes_data, tiny_clip_run, vae_folder, tmp_path_factory):
    """One short run through the CLI per conditioning, counting the VAE encoder's passes over the data; also the
    uninterrupted run of the resume test."""
    from clipcond.cli import main as cli_main

    out = tmp_path_factory.mktemp(f"latent_decoder_{conditioning}")
    calls = {"n": 0}
    encode = latents_module.encode_posteriors

    def count(*args, **kwargs):
        calls["n"] += 1
        return encode(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latents_module, "encode_posteriors", count)
        argv = _argv(tiny_clip_run, shapes_data, vae_folder, out, *RESUME_ARGS, conditioning=conditioning)
        assert cli_main(["train", "decoder", *argv]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert calls["n"] == 1
    return out


def test_stock_diffusers_draws_the_latent_run_without_clipcond(latent_run, conditioning, tmp_path):
    if conditioning == "text":
        call = {"prompt": ["a red circle"], "num_inference_steps": 2, "output_type": "np", "seed": 0}
        assert_stock_diffusers_draws_the_same(latent_run, TextToImagePipeline, tmp_path, **call)
    else:
        image = torch.randint(0, 256, (1, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8)
        call = {"image": image, "num_inference_steps": 2, "output_type": "np", "seed": 0}
        assert_stock_diffusers_draws_the_same(latent_run, ImageVariationPipeline, tmp_path, **call)


def test_run_folder_is_a_latent_pipeline(latent_run, conditioning, vae_folder):
    record = json.loads((latent_run / "clipcond_run.json").read_text())
    model_index = json.loads((latent_run / "model_index.json").read_text())
    pipeline = {"text": "TextToImagePipeline", "image-embedding": "ImageVariationPipeline"}[conditioning]
    assert pipeline_class_name(latent_run) == pipeline and model_index["vae"] == ["diffusers", "AutoencoderKL"]
    space = record["model_space"]
    assert space["space"] == "latents" and space["sample_size"] == RESOLUTION // 2
    assert space["vae"]["scaling_factor"] == SCALING_FACTOR
    assert space["vae"]["content_hash"] == content_hash(vae_folder)
    # the UNet denoises 4-channel 8 x 8 latents; the pipeline holds the VAE unchanged, scaling factor included
    unet = UNet2DConditionModel.from_pretrained(latent_run / "unet")
    assert unet.config.in_channels == 4 and unet.config.out_channels == 4 and unet.config.sample_size == 8
    weights = "diffusion_pytorch_model.safetensors"
    assert (latent_run / "vae" / weights).read_bytes() == (vae_folder / weights).read_bytes()
    assert AutoencoderKL.from_pretrained(latent_run / "vae").config.scaling_factor == SCALING_FACTOR
    scheduler = json.loads((latent_run / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is False  # latents have no [-1, 1] bound
    columns, rows = VALIDATION_GRID[conditioning]  # grids of decoded images, not of 8 x 8 latents
    assert image_size(latent_run / "validation" / f"step-{STEPS}.png") == (columns * RESOLUTION, rows * RESOLUTION)


def test_sampling_commands_decode_through_the_vae(latent_run, conditioning, shapes_data, tmp_path):
    """`clipcond generate` (text), `clipcond vary` and `clipcond interpolate --images` (image embeddings) draw
    images at the decoder's resolution: pixels decoded from 8 x 8 latents, whatever the size of the sources (the
    data's 32 px, the CLIP's input)."""
    from clipcond.generate import main as generate
    from clipcond.interpolate import main as interpolate
    from clipcond.vary import main as vary

    common = ["--model", str(latent_run), "--num-inference-steps", "2", "--seed", "0"]
    if conditioning == "text":
        runs = {"generate": (generate, ["--prompt", "a red circle", "--num-images", "2"])}
    else:
        sources = [str(p) for p in sorted((shapes_data / "test").glob("*.png"))[:2]]
        assert image_size(Path(sources[0])) == (32, 32)
        runs = {
            "vary": (vary, [*sources, "--num-images", "2"]),
            "interpolate": (interpolate, ["--images", *sources, "--steps", "3"]),
        }
    for name, (command, argv) in runs.items():
        out = tmp_path / name
        assert command([*common, *argv, "--output-dir", str(out)]) == 0
        images = [p for p in out.glob("*.png") if p.name != "grid.png"]
        assert len(images) >= 2 and {image_size(p) for p in images} == {(RESOLUTION, RESOLUTION)}, name


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


@pytest.mark.parametrize("conditioning", ["image-embedding"], indirect=True)
def test_eval_unclip_runs_on_a_latent_decoder(latent_run, shapes_data, tiny_clip_run, tmp_path, monkeypatch, capsys):
    """`clipcond eval unclip` and `clipcond generate --prior` pair the latent image-embedding decoder with a prior;
    the images judged and written are what its VAE decodes."""
    from clipcond.demo import QUICK_JUDGE
    from clipcond.evaluation import judge as judge_module
    from clipcond.evaluation import unclip
    from clipcond.generate import main as generate
    from clipcond.train.prior import main as train_prior

    prior = tmp_path / "prior"
    prior_argv = ["--clip", str(tiny_clip_run), "--data", str(shapes_data), "--output-dir", str(prior)]
    prior_argv += ["--model", "test", "--train-batch-size", "8", "--max-train-steps", "1", "--validation-steps", "0"]
    prior_argv += ["--checkpointing-steps", "0"]
    assert train_prior(prior_argv) == 0
    capsys.readouterr()  # the prior's summary line
    samples = tmp_path / "samples"
    generate(["--model", str(latent_run), "--prior", str(prior), "--prompt", "a red circle", "--num-images", "2"]
             + ["--num-inference-steps", "1", "--prior-num-inference-steps", "1", "--output-dir", str(samples)])  # fmt: skip
    sizes = {image_size(p) for p in samples.glob("*.png") if p.name != "grid.png"}
    assert sizes == {(RESOLUTION, RESOLUTION)}
    capsys.readouterr()
    # a judge that only has to run, instead of training the command's default one here
    config = judge_module.JudgeTrainingConfig(**QUICK_JUDGE)
    quick_judge = judge_module.load_or_train_judge(32, cache_dir=tmp_path / "judge", config=config)
    monkeypatch.setattr(judge_module, "load_or_train_judge", lambda resolution, **kwargs: quick_judge)
    judged_sizes, score = set(), quick_judge.score

    def recording_score(images, *args, **kwargs):
        judged_sizes.add(tuple(images.shape[1:]))
        return score(images, *args, **kwargs)

    monkeypatch.setattr(quick_judge, "score", recording_score)
    out = tmp_path / "eval"
    argv = ["--decoder", str(latent_run), "--prior", str(prior), "--data", str(shapes_data), "--output-dir", str(out)]
    argv += ["--sources-per-class", "1", "--variations-per-source", "1", "--images-per-prompt", "1"]
    argv += ["--num-inference-steps", "1", "--prior-num-inference-steps", "1", "--prior-max-captions", "4"]
    assert unclip.main([*argv, "--device", "cpu", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["variations"]["num_images"] == 18 and metrics["text_to_image"]["num_images"] == 18
    # the judge read the decoded images (and the 32 px sources), not 8 x 8 latents
    assert judged_sizes == {(3, RESOLUTION, RESOLUTION), (3, 32, 32)}
    assert 0 < metrics["variations"]["distance"]["to_source"]["pixels"] < 1


def test_the_cache_holds_the_vae_posteriors(latent_run, shapes_data, vae_folder):
    record = json.loads((latent_run / "clipcond_run.json").read_text())
    cache_file = Path(record["model_space"]["latent_cache"]["path"])
    tensors = load_file(cache_file)
    vae = AutoencoderKL.from_pretrained(vae_folder)
    dataset = ImageCaptionDataset(shapes_data, split="train", resolution=RESOLUTION)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(6)]).float() / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    # stored in fp16: its rounding is the tolerance
    torch.testing.assert_close(tensors["mean"][:6].float(), posterior.mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(tensors["std"][:6].float(), posterior.std, rtol=1e-3, atol=1e-3)
    assert tensors["mean"].shape == (len(dataset), 4, 8, 8)


def test_a_step_draws_a_scaled_posterior_sample(latent_run, vae_folder, tmp_path):
    record = json.loads((latent_run / "clipcond_run.json").read_text())
    cache_file = Path(record["model_space"]["latent_cache"]["path"])
    tensors = load_file(cache_file)
    cache = LatentCache(tensors["mean"], tensors["std"], tensors["item_indices"], "k", cache_file, [])
    space = LatentSpace(AutoencoderKL.from_pretrained(vae_folder), cache, RESOLUTION, str(vae_folder))
    batch = {"latent_row": torch.tensor([3, 0, 5])}
    sample = space.sample(batch, torch.Generator().manual_seed(7), torch.device("cpu"))
    noise = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    mean, std = cache.lookup(batch["latent_row"])
    torch.testing.assert_close(sample, (mean + std * noise) * SCALING_FACTOR)
    again = space.sample(batch, torch.Generator().manual_seed(8), torch.device("cpu"))
    assert not torch.equal(sample, again)  # a new sample each step, not the mean


KILL = [kill_at_step.PATH, "clipcond.train.decoder", "DecoderStage"]  # runs the stage, SIGKILLed after a step


def test_resume_after_sigkill_matches_uninterrupted_run(
    latent_run, conditioning, shapes_data, tiny_clip_run, vae_folder, tmp_path
):
    killed = tmp_path / "killed"
    argv = _argv(tiny_clip_run, shapes_data, vae_folder, killed, *RESUME_ARGS, conditioning=conditioning)
    env = {**os.environ, "CLIPCOND_KILL_AT_STEP": "3"}
    proc = subprocess.run([sys.executable, *KILL, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-2"]
    main([*argv, "--resume-from-checkpoint", "latest"])
    a, b = _trained_weights(killed), _trained_weights(latent_run)
    assert a.keys() == b.keys()
    assert any(k.startswith("embedding_tokens.") for k in a) == (conditioning == "image-embedding")
    for key in a:  # stated tolerance: bit-identical on one CPU process
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_unreadable_images_count_against_the_limit(shapes_data, tiny_clip_run, vae_folder, tmp_path, capsys):
    """The latent cache stands the next readable image in for an unreadable one; the run counts those files as the
    pixel path counts the ones it meets, and stops past `--max-skipped-fraction`."""
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    for name in ("00003.png", "00010.png"):
        (data / "train" / name).write_bytes(b"not a png")
    fast = ["--max-train-steps", "1", "--validation-steps", "0", "--checkpointing-steps", "0"]
    assert main(_argv(tiny_clip_run, data, vae_folder, tmp_path / "run", *fast)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped_files"] == 2
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(ValueError, match=r"2 of the 240 training images could not be read \(0.8%\).*00003.png"):
        main(_argv(tiny_clip_run, data, vae_folder, tmp_path / "strict", *fast, "--max-skipped-fraction", "0.005"))


def test_bad_vae_is_named(shapes_data, tiny_clip_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="`--vae` folder '.*nowhere' does not exist"):
        main(_argv(tiny_clip_run, shapes_data, tmp_path / "nowhere", tmp_path / "o"))
    with pytest.raises(ValueError, match="`--vae` '.*' is not an AutoencoderKL folder: its config.json names "):
        main(_argv(tiny_clip_run, shapes_data, tiny_clip_run, tmp_path / "o"))


def test_the_preset_levels_do_not_judge_a_pretrained_unet(vae_folder):
    """With `--init-unet` the UNet's own levels apply (checked when it loads), not the `--model` preset's."""
    from argparse import Namespace

    from clipcond.train.model_space import check_space_fits

    args = Namespace(vae=str(vae_folder), space_to_depth=1, model="test", init_unet=None)
    with pytest.raises(ValueError, match="leaves the UNet 9 x 9 samples"):
        check_space_fits(args, 18)
    check_space_fits(Namespace(**{**vars(args), "init_unet": "a-unet-folder"}), 18)


@pytest.mark.parametrize(
    ("resolution", "message"),
    [
        ("17", r"`--resolution` 17 is not divisible by 2, the downsampling factor of `--vae`"),
        ("18", r"`--vae .*` leaves the UNet 9 x 9 samples of `--resolution 18` images, but a `--model test` UNet "),
    ],
)
def test_latents_that_do_not_fit_the_unet_are_refused_before_encoding(
    shapes_data, tiny_clip_run, vae_folder, tmp_path, resolution, message
):
    with pytest.raises(ValueError, match=message):
        main(_argv(tiny_clip_run, shapes_data, vae_folder, tmp_path / "o", "--resolution", resolution))
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing encoded: no text or latent cache


def test_resume_refuses_another_vae(latent_run, conditioning, shapes_data, tiny_clip_run, tmp_path):
    """A checkpoint trained on one VAE's latents does not continue on another's, nor on pixels."""
    torch.manual_seed(1)
    other = create_vae(vae_config("test", sample_size=RESOLUTION))
    other.save_pretrained(tmp_path / "other")
    checkpoint = str(latent_run / "checkpoints" / "checkpoint-2")
    resume = ["--resume-from-checkpoint", checkpoint]
    with pytest.raises(ValueError, match="trained on the latents of the VAE with content hash .* but `--vae` gives a"):
        main(_argv(tiny_clip_run, shapes_data, tmp_path / "other", tmp_path / "o", *resume, conditioning=conditioning))
    argv = _argv(tiny_clip_run, shapes_data, "X", tmp_path / "p", conditioning=conditioning)
    pixel_argv = [a for a in argv if a not in ("--vae", "X")]
    with pytest.raises(ValueError, match=r"but `--vae` gives none \(pixels\)"):
        main([*pixel_argv, "--resume-from-checkpoint", checkpoint])


STOCK_SD = """
import sys
import numpy as np, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)
pipe.set_progress_bar_config(disable=True)
generator = torch.Generator().manual_seed(0)
images = pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=3.0, output_type="np",
              generator=generator).images
np.save(sys.argv[2], images)
"""


def test_a_trained_sd_style_run_exports_to_stock_stable_diffusion(shapes_data, tiny_clip_run, vae_folder, tmp_path):
    """`train decoder --vae --no-mask-text-padding`, then `clipcond export stable-diffusion`: stock diffusers, in a
    process without clipcond, draws what the run's own pipeline draws with the run's saved scheduler."""
    from clipcond import export_stable_diffusion

    run = tmp_path / "run"
    argv = _argv(tiny_clip_run, shapes_data, vae_folder, run, "--max-train-steps", "2", "--validation-steps", "0")
    assert main([*argv, "--checkpointing-steps", "0", "--no-mask-text-padding"]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert export_stable_diffusion.main([str(run), str(tmp_path / "stock")]) == 0

    run_without_clipcond(STOCK_SD, tmp_path / "stock", tmp_path / "stock.npy")
    pipe = TextToImagePipeline.from_pretrained(run, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(
        ["a red circle", "a blue square"],
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    np.testing.assert_allclose(np.load(tmp_path / "stock.npy"), ours, atol=1e-5)
