"""UnCLIPTextToImagePipeline (prior + image-embedding decoder) on tiny seeded components (CPU, 2 steps): guidance per
stage, determinism, batch = single, prompt interpolation, one-folder save/load, a latent decoder, pairing runs by
their CLIP."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from clipcond.lineage import content_hash
from clipcond.models.clip import load_text_tower, load_vision_tower
from clipcond.models.image_embedding import ImageEmbeddingTokens, decoder_condition
from clipcond.models.prior import create_prior, prior_config, set_embedding_statistics
from clipcond.models.unet import create_unet, unet_config
from clipcond.models.vae import create_vae, vae_config
from clipcond.pipelines import ImageVariationPipeline, PriorPipeline, UnCLIPTextToImagePipeline
from clipcond.text_encoding import context_length

SIZE = 16
STEPS = 2
PRIOR_STEPS = 3  # another count than the decoder's, to tell the stages apart
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


@pytest.fixture(scope="module")
def towers(tiny_clip_run):
    text_encoder, tokenizer = load_text_tower(tiny_clip_run)
    image_encoder, _, _ = load_vision_tower(tiny_clip_run)
    return text_encoder, tokenizer, image_encoder


def make_prior_pipeline(text_encoder, tokenizer) -> PriorPipeline:
    torch.manual_seed(0)
    config = prior_config(
        "test",
        embedding_dim=text_encoder.config.projection_dim,
        num_embeddings=context_length(text_encoder, tokenizer),
    )
    prior = create_prior(config).eval()
    dim = config["embedding_dim"]  # a fresh PriorTransformer has clip_std = 0: give it a standardisation
    set_embedding_statistics(prior, 0.1 * torch.randn(dim), 0.5 + torch.rand(dim))
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False)
    return PriorPipeline(prior=prior, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def make_decoder(image_encoder, vae=None, space_to_depth: int = 1) -> ImageVariationPipeline:
    """A decoder of SIZE px images: in pixel space (as `space_to_depth` blocks), or with `vae` (one downsampling) on
    its latents."""
    dim = image_encoder.config.projection_dim
    torch.manual_seed(1)
    space = {"sample_size": SIZE // space_to_depth, "in_channels": 3 * space_to_depth**2}
    if vae is not None:
        space = {"sample_size": SIZE // 2, "in_channels": 4}
    unet = create_unet(unet_config("test", **space, cross_attention_dim=dim, image_embedding_dim=dim))
    return ImageVariationPipeline(
        unet=unet.eval(),
        scheduler=DDPMScheduler(),
        image_encoder=image_encoder,
        embedding_tokens=ImageEmbeddingTokens(dim, 2, dim).eval(),
        vae=vae,
        space_to_depth=space_to_depth,
    )


def make_unclip(towers, vae=None) -> UnCLIPTextToImagePipeline:
    text_encoder, tokenizer, image_encoder = towers
    prior = make_prior_pipeline(text_encoder, tokenizer)
    decoder = make_decoder(image_encoder, vae)
    pipe = UnCLIPTextToImagePipeline(
        prior=prior.prior,
        prior_scheduler=prior.scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        **decoder.components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(towers):
    return make_unclip(towers)


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def run(pipe, prompt="a red circle", seeds=(0,), **kwargs):
    kwargs = {"num_inference_steps": STEPS, "prior_num_inference_steps": PRIOR_STEPS, "output_type": "np", **kwargs}
    return pipe(prompt, generator=generators(*seeds), **kwargs).images


class Calls:
    """Batch sizes (and chosen inputs) of each forward of a module."""

    def __init__(self, module, key):
        self.batches, self.inputs = [], []
        self.key = key
        module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.batches.append(args[0].shape[0])
        self.inputs.append(kwargs.get(self.key))


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("prior_guidance, decoder_guidance", [(4.0, 3.0), (1.0, 3.0), (4.0, 1.0), (1.0, 1.0)], ids=str)
def test_guidance_per_stage(pipe, prior_guidance, decoder_guidance):
    prior_calls, unet_calls = Calls(pipe.prior, "proj_embedding"), Calls(pipe.unet, "class_labels")
    run(
        pipe,
        ["a red circle", "a blue square"],
        seeds=(0, 1, 2, 3),
        num_images_per_prompt=2,
        prior_guidance_scale=prior_guidance,
        guidance_scale=decoder_guidance,
    )
    assert prior_calls.batches == [8 if prior_guidance > 1 else 4] * PRIOR_STEPS
    assert unet_calls.batches == [8 if decoder_guidance > 1 else 4] * STEPS
    if decoder_guidance > 1:  # the decoder's unconditional half is the zero vector
        assert all(torch.equal(labels[:4], torch.zeros_like(labels[:4])) for labels in unet_calls.inputs)


def test_the_decoder_reads_the_prior_s_embeddings(pipe):
    unet_calls = Calls(pipe.unet, "class_labels")
    run(pipe, ["a red circle", "a blue square"], seeds=(0, 1), guidance_scale=1.0)
    embeds = pipe.prior_pipeline(
        ["a red circle", "a blue square"],
        num_inference_steps=PRIOR_STEPS,
        generator=generators(0, 1),
        output_type="pt",
    ).image_embeds
    torch.testing.assert_close(embeds.norm(dim=1), torch.ones(2))
    for labels in unet_calls.inputs:
        torch.testing.assert_close(labels, decoder_condition(embeds))


def test_output_shapes_and_determinism(pipe):
    out = pipe("a red circle", num_inference_steps=STEPS, prior_num_inference_steps=PRIOR_STEPS)
    assert len(out.images) == 1 and out.images[0].size == (SIZE, SIZE)
    first = run(pipe, ["a red circle", "a blue square"], seeds=(5, 6))
    assert first.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, run(pipe, ["a red circle", "a blue square"], seeds=(5, 6)))
    assert np.abs(first - run(pipe, ["a red circle", "a blue square"], seeds=(7, 8))).max() > 0.05
    result = pipe("a red circle", num_inference_steps=STEPS, prior_num_inference_steps=1, return_dict=False)
    assert isinstance(result, tuple) and len(result) == 1


def test_batch_equals_single_with_per_image_generators(pipe):
    batch = run(pipe, ["a red circle", "a blue square"], seeds=(0, 1, 2, 3), num_images_per_prompt=2)
    prompts = ["a red circle", "a red circle", "a blue square", "a blue square"]
    one_by_one = [run(pipe, prompt, seeds=(k,)) for k, prompt in enumerate(prompts)]
    np.testing.assert_allclose(batch, np.concatenate(one_by_one), atol=5e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prior_num_inference_steps": 0}, "`prior_num_inference_steps` must be an integer >= 1, got 0"),
        ({"prior_guidance_scale": -1}, "`prior_guidance_scale` must be a number >= 0"),
        ({"prior_guidance_scale": float("nan")}, r"`prior_guidance_scale` must be a number >= 0 \(finite; .*got nan"),
        ({"guidance_scale": float("inf")}, r"`guidance_scale` must be a number >= 0 \(finite; .*got inf"),
        ({"num_inference_steps": 0}, "`num_inference_steps` must be an integer >= 1, got 0"),
        ({"noise_level": 2}, "trained without noise augmentation"),
        ({"generator": generators(0, 1)}, "list of 2 generators"),
    ],
)
def test_bad_inputs_are_named(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", **kwargs)


# ------------------------------------------------------------------------------------------- interpolation


def test_prompt_interpolation_endpoints_are_the_plain_generations(pipe):
    # Both stages sample with DDPM, which draws noise at every step: the ends must still match.
    out = pipe.interpolate(
        prompt=["a red circle", "a blue square"],
        num_frames=3,
        num_inference_steps=STEPS,
        prior_num_inference_steps=PRIOR_STEPS,
        generator=torch.Generator().manual_seed(11),
        output_type="np",
    )
    assert out.t == [0.0, 0.5, 1.0] and out.images.shape == (3, SIZE, SIZE, 3)
    for frame, prompt in ((0, "a red circle"), (-1, "a blue square")):
        plain = pipe(
            prompt,
            num_inference_steps=STEPS,
            prior_num_inference_steps=PRIOR_STEPS,
            generator=torch.Generator().manual_seed(11),
            output_type="np",
        ).images[0]
        np.testing.assert_allclose(out.images[frame], plain, atol=5e-4)
    assert np.abs(out.images[0] - out.images[-1]).max() > 0.01
    with pytest.raises(ValueError, match="give exactly one of `prompt`"):
        pipe.interpolate(num_frames=3)
    with pytest.raises(ValueError, match="`prompt` must be two strings"):
        pipe.interpolate(prompt=["a red circle"], num_frames=3)


def test_image_interpolation_goes_through_the_decoder(pipe):
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = pipe.interpolate(image=pixels, num_frames=3, num_inference_steps=STEPS, generator=torch.Generator())
    assert len(out.images) == 3 and out.t == [0.0, 0.5, 1.0]


# ------------------------------------------------------------------------------------------------ save/load


def test_one_folder_save_and_load(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    for name in ("prior", "prior_scheduler", "text_encoder", "tokenizer", "unet", "scheduler", "image_encoder"):
        assert (tmp_path / name).is_dir() and index[name][0] is not None, name
    assert index["embedding_tokens"] == ["clipcond.models.image_embedding", "ImageEmbeddingTokens"]
    loaded = UnCLIPTextToImagePipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(pipe, seeds=(3,)), run(loaded, seeds=(3,)))


def test_a_latent_decoder_decodes_through_its_vae_after_the_prior(towers, tmp_path):
    """The decoder stage of a latent decoder: its VAE's decodings at the VAE's resolution, kept by save/load."""
    torch.manual_seed(0)
    vae = create_vae(vae_config("test", sample_size=SIZE)).eval()
    pipe = make_unclip(towers, vae)
    assert pipe.decoder_pipeline.vae is vae
    latents = run(pipe, seeds=(3,), output_type="latent")
    assert latents.shape == (1, 4, SIZE // 2, SIZE // 2)
    images = run(pipe, seeds=(3,))
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    np.testing.assert_allclose(images, (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pipe.save_pretrained(tmp_path)
    loaded = UnCLIPTextToImagePipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images, run(loaded, seeds=(3,)))


# -------------------------------------------------------------------------------------------- pairing runs


@pytest.fixture
def runs(towers, tiny_clip_run, tmp_path):
    """A prior run and a decoder run as the training commands leave them: a pipeline folder with a run record."""
    text_encoder, tokenizer, image_encoder = towers
    clip_hash = content_hash(tiny_clip_run)
    folders = {}
    for kind, pipe in (
        ("prior", make_prior_pipeline(text_encoder, tokenizer)),
        ("decoder", make_decoder(image_encoder)),
    ):
        folder = tmp_path / kind
        pipe.save_pretrained(folder)
        record = {"kind": f"clipcond-{kind}", "clip": {"path": str(tiny_clip_run), "content_hash": clip_hash}}
        (folder / "clipcond_run.json").write_text(json.dumps(record))
        folders[kind] = folder
    return folders


def _set_clip_hash(folder, value):
    record = json.loads((folder / "clipcond_run.json").read_text())
    record["clip"]["content_hash"] = value
    (folder / "clipcond_run.json").write_text(json.dumps(record))


def test_from_runs_pairs_runs_of_one_clip(runs, pipe):
    paired = UnCLIPTextToImagePipeline.from_runs(runs["prior"], runs["decoder"], local_files_only=True)
    paired.set_progress_bar_config(disable=True)
    assert set(paired.components) == set(pipe.components)
    assert run(paired, seeds=(0,)).shape == (1, SIZE, SIZE, 3)


def test_from_runs_keeps_the_decoders_pixel_blocks(towers, runs, tmp_path):
    """A decoder trained on 2x2 pixel blocks pairs with the prior into a pipeline whose samples are blocks and whose
    images are those blocks rearranged back, kept by save/load."""
    blocks = make_decoder(towers[2], space_to_depth=2)
    blocks.save_pretrained(tmp_path / "blocks")
    (tmp_path / "blocks" / "clipcond_run.json").write_text((runs["decoder"] / "clipcond_run.json").read_text())
    paired = UnCLIPTextToImagePipeline.from_runs(runs["prior"], tmp_path / "blocks", local_files_only=True)
    paired.set_progress_bar_config(disable=True)
    assert paired.config.space_to_depth == paired.decoder_pipeline.config.space_to_depth == 2
    samples = run(paired, seeds=(3,), output_type="latent")
    assert samples.shape == (1, 12, SIZE // 2, SIZE // 2)
    images = run(paired, seeds=(3,))
    expected = (torch.nn.functional.pixel_shuffle(samples.float(), 2) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    np.testing.assert_allclose(images, expected.numpy(), atol=1e-6)
    paired.save_pretrained(tmp_path / "paired")
    loaded = UnCLIPTextToImagePipeline.from_pretrained(tmp_path / "paired", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images, run(loaded, seeds=(3,)))


def test_from_runs_refuses_another_clip_unless_told(runs, caplog):
    _set_clip_hash(runs["decoder"], "f" * 64)
    with pytest.raises(
        ValueError, match=r"CLIP with content hash [0-9a-f]{12}\.\.\., but the decoder .* on ffffffffffff"
    ):
        UnCLIPTextToImagePipeline.from_runs(runs["prior"], runs["decoder"], local_files_only=True)
    with caplog.at_level(logging.WARNING, logger="clipcond.pipelines.unclip"):
        paired = UnCLIPTextToImagePipeline.from_runs(
            runs["prior"], runs["decoder"], allow_clip_mismatch=True, local_files_only=True
        )
    assert "allowed by allow_clip_mismatch" in caplog.text and paired.unet is not None

    (runs["prior"] / "clipcond_run.json").unlink()
    with pytest.raises(ValueError, match="cannot check which CLIP the prior .* holds no clipcond_run.json"):
        UnCLIPTextToImagePipeline.from_runs(runs["prior"], runs["decoder"], local_files_only=True)
    with pytest.raises(FileNotFoundError, match="the decoder run .* holds no model_index.json"):
        UnCLIPTextToImagePipeline.from_runs(runs["prior"], runs["prior"] / "prior")


def test_a_clip_of_another_width_is_refused(towers):
    text_encoder, tokenizer, _ = towers
    prior = make_prior_pipeline(text_encoder, tokenizer)
    other = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=48,
        )
    )
    decoder = make_decoder(other)
    with pytest.raises(ValueError, match="the prior predicts 32-wide CLIP image embeddings, but .* makes 48-wide"):
        UnCLIPTextToImagePipeline(
            prior=prior.prior,
            prior_scheduler=prior.scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            **decoder.components,
        )
