"""`clipcond export stable-diffusion`: a latent, unmasked text-to-image run runs in stock StableDiffusionPipeline, in a
process where clipcond cannot be imported, and draws the images the run's own pipeline draws."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from test_text_to_image import make_pipeline, make_vae, tokenizer  # noqa: F401 (tokenizer: a fixture)
from without_clipcond import run_without_clipcond

from clipcond import export_stable_diffusion
from clipcond.pipelines import TextToImagePipeline

PROMPTS = ["a red circle", "a blue square"]
STEPS = 3
GUIDANCE = 3.0

STOCK = """
import json, sys
import numpy as np, torch
from diffusers import StableDiffusionPipeline
folder, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[5]
steps, guidance = int(sys.argv[3]), float(sys.argv[4])
pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
np.save(out, images)
"""


def _run_folder(tokenizer, tmp_path, mask_text_padding=False, vae=True, scheduler=None):  # noqa: F811
    scheduler = scheduler or DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    pipe = make_pipeline(tokenizer, scheduler=scheduler, vae=make_vae() if vae else None)
    pipe.register_to_config(mask_text_padding=mask_text_padding)
    if vae:
        pipe.vae.register_to_config(scaling_factor=0.7)  # not diffusers' default: the export must carry it
    run = tmp_path / "run"
    pipe.save_pretrained(run)
    return run


def _ours(run) -> np.ndarray:
    pipe = TextToImagePipeline.from_pretrained(run, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator, output_type="np")[0]


def test_stock_stable_diffusion_draws_the_runs_images_without_clipcond(tokenizer, tmp_path):  # noqa: F811
    run = _run_folder(tokenizer, tmp_path)
    out = tmp_path / "stock"
    assert export_stable_diffusion.main([str(run), str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 0.7
    assert json.loads((out / "text_encoder" / "config.json").read_text())["architectures"] == ["CLIPTextModel"]

    images = tmp_path / "stock.npy"
    run_without_clipcond(STOCK, out, json.dumps(PROMPTS), STEPS, GUIDANCE, images)
    stock = np.load(images)
    ours = _ours(run)
    assert stock.shape == ours.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(stock, ours, atol=1e-5)
    assert np.abs(stock[0] - stock[1]).max() > 1e-3  # the prompts matter: not a blank comparison


def test_unmasked_padding_changes_what_the_unet_reads(tokenizer, tmp_path):  # noqa: F811
    masked = _ours(_run_folder(tokenizer, tmp_path / "masked", mask_text_padding=True))
    unmasked = _ours(_run_folder(tokenizer, tmp_path / "unmasked", mask_text_padding=False))
    assert np.abs(masked - unmasked).max() > 1e-4


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mask_text_padding": True}, "masks the captions' padding; train it with `--no-mask-text-padding`"),
        ({"vae": False}, "it denoises pixels; train it on a VAE's latents"),
        ({"scheduler": DDPMScheduler(clip_sample=True)}, "clips the predicted sample to \\+-1.0"),
    ],
)
def test_runs_stock_diffusers_would_run_differently_are_refused(tokenizer, tmp_path, options, match):  # noqa: F811
    run = _run_folder(tokenizer, tmp_path, **options)
    with pytest.raises(ValueError, match=f"cannot run in stock StableDiffusionPipeline: .*{match}"):
        export_stable_diffusion.main([str(run), str(tmp_path / "stock")])
    assert not (tmp_path / "stock").exists()


def test_missing_run_other_pipelines_and_existing_output_are_refused(tokenizer, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="`RUN` .*nothing' does not exist"):
        export_stable_diffusion.main([str(tmp_path / "nothing"), str(tmp_path / "stock")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="`RUN` .*holds no model_index.json"):
        export_stable_diffusion.main([str(tmp_path / "empty"), str(tmp_path / "stock")])
    variation = tmp_path / "variation"
    variation.mkdir()
    (variation / "model_index.json").write_text(json.dumps({"_class_name": "ImageVariationPipeline"}))
    with pytest.raises(ValueError, match="`RUN` .*holds ImageVariationPipeline, not a text-to-image decoder"):
        export_stable_diffusion.main([str(variation), str(tmp_path / "stock")])
    run = _run_folder(tokenizer, tmp_path)
    (tmp_path / "stock").mkdir()
    with pytest.raises(FileExistsError, match="`OUT` .*exists"):
        export_stable_diffusion.main([str(run), str(tmp_path / "stock")])
