"""`clipcond train vae` at test scale: the run folder that stock diffusers loads, the measured scaling factor, the
validation grid and PSNR, the loss, resume after SIGKILL, fine-tuning from a folder, and errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kill_at_step
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors.torch import load_file

from clipcond.data.folders import ImageCaptionDataset
from clipcond.loss import AutoencoderKLLoss
from clipcond.models.vae import create_vae, load_vae, to_model_range, vae_config
from clipcond.train.vae import (
    GRID_COLUMNS,
    AutoencoderTraining,
    evenly_spaced_pixels,
    main,
    reconstruct,
    reconstruction_metrics,
)

STEPS = 4  # checkpoints and validation every 2 steps
RESOLUTION = 16
VALIDATION_IMAGES = 10  # a full grid row of GRID_COLUMNS and a partial one
FAST_ARGS = [
    *("--model", "test", "--resolution", str(RESOLUTION), "--train-batch-size", "4", "--lr-warmup-steps", "1"),
    *("--seed", "0", "--validation-max-images", str(VALIDATION_IMAGES), "--scaling-factor-images", "24"),
]
RESUME_ARGS = ["--max-train-steps", str(STEPS), "--checkpointing-steps", "2", "--validation-steps", "2"]


def _argv(data, out, *extra, model_args=FAST_ARGS):
    return ["--data", str(data), "--output-dir", str(out), *model_args, *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for name in a:  # stated tolerance: bit-identical on one CPU process
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def vae_run(shapes_data, tmp_path_factory):
    """One short run through the CLI; also the uninterrupted run of the resume test."""
    from accelerate.state import AcceleratorState, GradientState

    from clipcond.cli import main as cli_main

    out = tmp_path_factory.mktemp("vae_run")
    assert cli_main(["train", "vae", *_argv(shapes_data, out, *RESUME_ARGS)]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


# ----------------------------------------------------------------------------------------------- the run


def test_run_folder_is_a_stock_autoencoder_with_the_measured_scaling_factor(vae_run, shapes_data):
    record = json.loads((vae_run / "clipcond_run.json").read_text())
    assert record["kind"] == "clipcond-vae"
    vae = AutoencoderKL.from_pretrained(vae_run)  # stock diffusers, nothing of clipcond
    factor = vae.config.scaling_factor
    assert factor == record["vae"]["scaling_factor"]
    assert factor != AutoencoderKL().config.scaling_factor  # not diffusers' default (SD's 0.18215)
    assert record["vae"]["scaling_factor_measured"] and record["vae"]["scaling_factor_images"] == 24
    # measured anew from the saved weights: 1 / std of posterior samples of the same training images
    dataset = ImageCaptionDataset(shapes_data, split="train", resolution=RESOLUTION)
    pixels = to_model_range(evenly_spaced_pixels(dataset, 24))
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1234))
    assert factor == pytest.approx(1 / latents.std().item(), rel=0.05)  # other noise: close, not equal
    # so the diffusion model's inputs have about unit variance
    assert (latents * factor).std().item() == pytest.approx(1.0, rel=0.05)
    # each checkpoint's usable copy carries the factor measured at its step
    pretrained = AutoencoderKL.from_pretrained(vae_run / "checkpoints" / f"checkpoint-{STEPS}" / "pretrained")
    assert pretrained.config.scaling_factor == factor
    assert record["vae"]["downsampling_factor"] == 2 and record["vae"]["latent_size"] == RESOLUTION // 2
    assert record["summary"]["steps"] == STEPS


def test_stock_diffusers_loads_the_folder_without_clipcond(vae_run):
    """The folder needs nothing of clipcond: a Python that cannot import it loads the VAE and its factor."""
    code = (
        "import sys; sys.modules['clipcond'] = None\n"  # any import of clipcond now fails
        "from diffusers import AutoencoderKL\n"
        f"print(AutoencoderKL.from_pretrained({str(vae_run)!r}).config.scaling_factor)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    record = json.loads((vae_run / "clipcond_run.json").read_text())
    assert float(out.stdout.strip().splitlines()[-1]) == record["vae"]["scaling_factor"]


def test_validation_writes_a_grid_and_the_psnr_of_the_saved_vae(vae_run, shapes_data):
    record = json.loads((vae_run / "clipcond_run.json").read_text())
    for step in (2, STEPS):
        metrics = json.loads((vae_run / "validation" / f"step-{step}.json").read_text())
        assert metrics["split"] == "test" and metrics["num_images"] == VALIDATION_IMAGES
    final = json.loads((vae_run / "validation" / f"step-{STEPS}.json").read_text())
    assert record["summary"]["psnr"] == pytest.approx(final["psnr"], abs=1e-4)
    # the figure is the saved VAE's on the first test images
    vae = AutoencoderKL.from_pretrained(vae_run)
    test = ImageCaptionDataset(shapes_data, split="test", resolution=RESOLUTION)
    originals = torch.stack([test[i]["pixel_values"] for i in range(VALIDATION_IMAGES)])
    again = reconstruction_metrics(originals, reconstruct(vae, originals, batch_size=4))
    assert again["psnr"] == pytest.approx(final["psnr"], abs=1e-4)
    # originals over reconstructions: two rows of tiles per GRID_COLUMNS images
    grid = Image.open(vae_run / "validation" / f"step-{STEPS}.png")
    rows = 2 * -(-VALIDATION_IMAGES // GRID_COLUMNS)
    assert grid.height > grid.width * rows / GRID_COLUMNS * 0.9


def test_psnr_of_known_errors():
    originals = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    reconstructions = torch.ones(2, 3, 4, 4)
    reconstructions[1] -= 0.1  # MSE 0.01: 20 dB
    metrics = reconstruction_metrics(originals, reconstructions[1:].expand(2, -1, -1, -1))
    assert metrics["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert metrics["l1"] == pytest.approx(0.1, abs=1e-6)


# ----------------------------------------------------------------------------------------------- the loss


def test_kl_divergence_is_diffusers_posterior_kl():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    expected = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).kl()  # (B,)
    torch.testing.assert_close(AutoencoderKLLoss.kl_divergence(mean, logvar), expected)


def test_loss_weights_the_kl_per_pixel_value():
    torch.manual_seed(0)
    target, reconstruction = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mean, logvar = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    plain, logs = AutoencoderKLLoss("mse", kl_weight=0.0)(reconstruction, target, mean, logvar)
    torch.testing.assert_close(plain, ((reconstruction - target) ** 2).mean())
    weighted, _ = AutoencoderKLLoss("mse", kl_weight=0.5)(reconstruction, target, mean, logvar)
    torch.testing.assert_close(weighted - plain, 0.5 * logs["train/kl"] / (3 * 8 * 8))
    with pytest.raises(ValueError, match="`reconstruction` must be one of"):
        AutoencoderKLLoss("lpips")


def test_the_autoencoder_fits_a_fixed_batch(shapes_data):
    torch.manual_seed(0)
    dataset = ImageCaptionDataset(shapes_data, split="train", resolution=RESOLUTION)
    pixels = to_model_range(torch.stack([dataset[i]["pixel_values"] for i in range(8)]))
    model = AutoencoderTraining(create_vae(vae_config("test", sample_size=RESOLUTION)))
    loss_fn = AutoencoderKLLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        noise = torch.randn(8, 4, RESOLUTION // 2, RESOLUTION // 2)
        reconstruction, mean, logvar = model(pixels, noise)
        loss, _ = loss_fn(reconstruction, pixels, mean, logvar)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


# --------------------------------------------------------------------------------------------- resume

KILL = [kill_at_step.PATH, "clipcond.train.vae", "VaeStage"]  # runs the stage, SIGKILLed after a step


def test_resume_after_sigkill_matches_uninterrupted_run(vae_run, shapes_data, tmp_path):
    """Killed after step 3, resumed from checkpoint 2: the weights and scaling factor of the uninterrupted run, whose
    validation and checkpoint exports (the factor measured each time) must not have disturbed its training."""
    killed = tmp_path / "killed"
    env = {**os.environ, "CLIPCOND_KILL_AT_STEP": "3"}
    cmd = [sys.executable, *KILL, *_argv(shapes_data, killed, *RESUME_ARGS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "diffusion_pytorch_model.safetensors").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-2"]

    main(_argv(shapes_data, killed, *RESUME_ARGS, "--resume-from-checkpoint", "latest"))
    record = json.loads((killed / "clipcond_run.json").read_text())
    straight = json.loads((vae_run / "clipcond_run.json").read_text())
    assert record["summary"]["resumed_from"].endswith("checkpoint-2")
    _assert_same(_weights(killed), _weights(vae_run))
    name = "model.safetensors"
    _assert_same(
        load_file(killed / "checkpoints" / f"checkpoint-{STEPS}" / name),
        load_file(vae_run / "checkpoints" / f"checkpoint-{STEPS}" / name),
    )
    assert record["vae"]["scaling_factor"] == straight["vae"]["scaling_factor"]
    assert record["summary"]["psnr"] == straight["summary"]["psnr"]


# ------------------------------------------------------------------------------------------- fine-tuning


def test_init_vae_starts_from_the_folder(vae_run, shapes_data, tmp_path):
    """From a pipeline folder holding the VAE in vae/ (SD's layout); a learning rate so small that one step leaves
    the weights where they started, far from a fresh VAE's."""
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(vae_run / name, pipeline / "vae" / name)
    out = tmp_path / "fine"
    fast = [a for a in FAST_ARGS if a not in ("--model", "test")]
    main(_argv(shapes_data, out, "--init-vae", str(pipeline), "--max-train-steps", "1", "--learning-rate", "1e-12",
               "--scaling-factor", "0.5", model_args=fast))  # fmt: skip
    start, after = _weights(vae_run), _weights(out)
    for name in start:
        torch.testing.assert_close(after[name], start[name], rtol=0, atol=1e-6, msg=name)
    fresh = create_vae(vae_config("test", sample_size=RESOLUTION)).state_dict()
    assert any(not torch.allclose(fresh[k], after[k], atol=1e-3) for k in after)
    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["vae"]["init_vae"] == str(pipeline) and record["vae"]["preset"] is None
    # a fixed --scaling-factor is stored as given
    assert AutoencoderKL.from_pretrained(out).config.scaling_factor == 0.5
    assert record["vae"]["scaling_factor_measured"] is False


# ------------------------------------------------------------------------------------------------ errors


def _unet_folder(folder: Path) -> Path:
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
        cross_attention_dim=8,
    )
    unet.save_pretrained(folder)
    return folder


def _bin_only_folder(folder: Path) -> Path:
    create_vae(vae_config("test", sample_size=8)).save_pretrained(folder, safe_serialization=False)
    return folder


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda tmp, data: tmp / "nowhere", FileNotFoundError, "`--init-vae` folder '.*nowhere' does not exist"),
        (
            lambda tmp, data: data,
            ValueError,
            "`--init-vae` '.*' is not an AutoencoderKL folder: it has no config.json",
        ),
        (
            lambda tmp, data: _unet_folder(tmp / "unet"),
            ValueError,
            "`--init-vae` '.*unet' is not an AutoencoderKL folder: its config.json names _class_name "
            "'UNet2DConditionModel'",
        ),
        (
            lambda tmp, data: _bin_only_folder(tmp / "bin"),
            ValueError,
            "`--init-vae` '.*bin' has no diffusion_pytorch_model.safetensors",
        ),
    ],
    ids=["missing", "no-config", "a-unet", "pickle-only"],
)
def test_bad_init_vae_is_named(shapes_data, tmp_path, make, error, match):
    path = make(tmp_path, shapes_data)
    fast = [a for a in FAST_ARGS if a not in ("--model", "test")]
    with pytest.raises(error, match=match):
        main(_argv(shapes_data, tmp_path / "o", "--init-vae", str(path), model_args=fast))
    assert not (tmp_path / "o").exists()  # refused before anything was written
    with pytest.raises(error, match=match):
        load_vae(path, flag="--init-vae")


def test_bad_init_vae_through_the_cli_is_one_line(shapes_data, tmp_path, capsys):
    from clipcond.cli import main as cli_main

    argv = ["--data", str(shapes_data), "--output-dir", str(tmp_path / "o"), "--init-vae", str(tmp_path / "none")]
    assert cli_main(["train", "vae", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"clipcond train vae: error: `--init-vae` folder {str(tmp_path / 'none')!r} does not exist"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--kl-weight", "-1"], "`--kl-weight` must be >= 0, got -1.0"),
        (["--scaling-factor", "big"], "`--scaling-factor` must be 'measure' or a number > 0, got 'big'"),
        (["--scaling-factor", "0"], "`--scaling-factor` must be 'measure' or a number > 0, got '0'"),
        (["--validation-max-images", "0"], "`--validation-max-images` must be >= 1, got 0"),
        (["--init-vae", "somewhere"], "`--model` 'test' and `--init-vae` 'somewhere' both choose"),
        (["--model", "huge"], "`model` must be one of"),
    ],
)
def test_bad_arguments_are_named(shapes_data, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        main(_argv(shapes_data, tmp_path / "o", *extra))


def test_resolution_must_fit_the_downsampling():
    with pytest.raises(ValueError, match=r"`resolution` \(18\) must be divisible by 4"):
        vae_config("tiny", sample_size=18)


def test_help(capsys):
    from clipcond.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "vae", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "clipcond train vae" in text and "--init-vae" in text and "--scaling-factor" in text


def test_a_vae_that_does_not_divide_the_resolution_is_named():
    from clipcond.models.vae import check_fits_resolution, create_vae, vae_config

    vae = create_vae(vae_config("test", sample_size=16))  # downsamples x2
    check_fits_resolution(vae, 16, "--vae", "runs/vae")
    with pytest.raises(ValueError, match=r"`--resolution` 15 is not divisible by 2, .* `--vae` 'runs/vae'"):
        check_fits_resolution(vae, 15, "--vae", "runs/vae")


def test_downsampling_factor_of_a_vae_or_its_config():
    """Any autoencoder with `block_out_channels` in its config (AutoencoderKL, VQModel, ...), or the config alone."""
    from types import SimpleNamespace

    from clipcond.models.vae import downsampling_factor

    assert downsampling_factor({"block_out_channels": [8, 16, 32]}) == 4
    assert downsampling_factor(SimpleNamespace(config={"block_out_channels": [8, 16]})) == 2
