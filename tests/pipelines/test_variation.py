"""ImageVariationPipeline (the unCLIP decoder) on tiny seeded components (CPU, 2 steps): the condition vector and its
tokens, guidance, determinism, batch = single, interpolation, slerp, width checks, latent space, save/load."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from clipcond.models.clip import load_vision_tower
from clipcond.models.clip_pixels import normalize_pixels
from clipcond.models.image_embedding import (
    ImageEmbeddingTokens,
    decoder_condition,
    has_cross_attention,
    make_noising_scheduler,
    standardise,
    unet_inputs,
    without_cross_attention,
)
from clipcond.models.unet import create_unet, unet_config
from clipcond.models.vae import create_vae, set_scaling_factor, vae_config
from clipcond.pipelines import ImageVariationPipeline, slerp
from clipcond.pipelines.interpolation import interpolation_times

SIZE = 16  # the decoder's images; the CLIP reads 32 px
STEPS = 2
TOKENS = 4
WIDTH = 24  # cross-attention width of the tokens (another width than the CLIP's 32, to tell them apart)
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


@pytest.fixture(scope="module")
def vision(tiny_clip_run):
    encoder, mean, std = load_vision_tower(tiny_clip_run)
    return encoder, mean, std


def make_decoder(
    encoder, num_tokens: int = TOKENS, noise: bool = False, scheduler=None, vae=None, space_to_depth: int = 1
) -> ImageVariationPipeline:
    """A decoder of SIZE px images: in pixel space (as `space_to_depth` blocks), or with `vae` on its latents."""
    dim = encoder.config.projection_dim
    space = {"sample_size": SIZE // space_to_depth, "in_channels": 3 * space_to_depth**2}
    if vae is not None:
        space = {"sample_size": SIZE // 2, "in_channels": 4}
    config = unet_config("test", **space, cross_attention_dim=WIDTH, image_embedding_dim=2 * dim if noise else dim)
    if num_tokens == 0:
        config = without_cross_attention(config)
    torch.manual_seed(0)
    unet = create_unet(config).eval()
    tokens = ImageEmbeddingTokens(dim, num_tokens, WIDTH).eval() if num_tokens else None
    pipe = ImageVariationPipeline(
        unet=unet,
        scheduler=scheduler or DDPMScheduler(num_train_timesteps=1000),
        image_encoder=encoder,
        embedding_tokens=tokens,
        image_noising_scheduler=make_noising_scheduler() if noise else None,
        vae=vae,
        space_to_depth=space_to_depth,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_vae() -> AutoencoderKL:
    """A `test`-preset VAE: one downsampling (SIZE px -> SIZE / 2 latents, 4 channels), a scaling factor of its own."""
    torch.manual_seed(0)
    vae = create_vae(vae_config("test", sample_size=SIZE)).eval()
    set_scaling_factor(vae, 0.7)
    return vae


@pytest.fixture
def pipe(vision):
    return make_decoder(vision[0])


@pytest.fixture
def noisy_pipe(vision):
    """No tokens (a UNet without cross-attention), noise augmentation on."""
    return make_decoder(vision[0], num_tokens=0, noise=True)


@pytest.fixture(scope="module")
def images(shapes_data):
    """Two test images of the shapes data as uint8 (2, 3, 32, 32) and as PIL images."""
    files = sorted((shapes_data / "test").glob("*.png"))[:2]
    pil = [Image.open(f).convert("RGB") for f in files]
    return torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pil]), pil


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def run(pipe, image=None, seeds=(0,), **kwargs):
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe(image, generator=generators(*seeds), **kwargs).images


class UNetCalls:
    def __init__(self, unet):
        self.calls = []
        unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], kwargs["class_labels"], kwargs.get("encoder_hidden_states")))


# ------------------------------------------------------------------------------------ the condition vector


def test_condition_vector_and_tokens_shapes(pipe, noisy_pipe):
    dim = pipe.embedding_dim
    assert dim == 32  # the `test` CLIP's projection width
    assert pipe.unet.config.class_embed_type == "projection"
    assert pipe.unet.class_embedding.linear_1.in_features == dim
    assert noisy_pipe.unet.class_embedding.linear_1.in_features == 2 * dim
    tokens = pipe.embedding_tokens
    assert tokens.proj.weight.shape == (TOKENS * WIDTH, dim)
    embeds = torch.nn.functional.normalize(torch.randn(3, dim), dim=-1)
    condition = decoder_condition(embeds)
    torch.testing.assert_close(condition, embeds * math.sqrt(dim))
    torch.testing.assert_close(condition.pow(2).mean(dim=1), torch.ones(3))  # RMS 1 per coordinate
    inputs = unet_inputs(condition, tokens)
    assert inputs["class_labels"].shape == (3, dim) and inputs["encoder_hidden_states"].shape == (3, TOKENS, WIDTH)
    # each token is layer-normed; the unconditional (zero) input gives zero tokens
    torch.testing.assert_close(inputs["encoder_hidden_states"].mean(-1), torch.zeros(3, TOKENS), atol=1e-5, rtol=0)
    assert torch.equal(
        unet_inputs(torch.zeros(2, dim), tokens)["encoder_hidden_states"], torch.zeros(2, TOKENS, WIDTH)
    )
    assert unet_inputs(condition, None)["encoder_hidden_states"] is None


def test_noise_augmentation_follows_the_schedule():
    scheduler = make_noising_scheduler()
    embeds = torch.randn(2, 8)
    noise = torch.randn(2, 8)
    levels = torch.tensor([0, 700])
    condition = decoder_condition(embeds, noising_scheduler=scheduler, noise_level=levels, noise=noise)
    assert condition.shape == (2, 16)
    abar = scheduler.alphas_cumprod[levels].view(2, 1)
    expected = abar.sqrt() * standardise(embeds) + (1 - abar).sqrt() * noise
    torch.testing.assert_close(condition[:, :8], expected)
    level_embedding = get_timestep_embedding(levels, 8, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(condition[:, 8:], level_embedding)
    assert (condition[0, :8] - standardise(embeds)[0]).abs().max() < 0.05  # level 0: almost clean
    with pytest.raises(ValueError, match="`noise_level` must be 0 for a decoder trained without noise augmentation"):
        decoder_condition(embeds, noise_level=5)


def test_without_cross_attention_keeps_the_heads_and_needs_no_context():
    config = without_cross_attention(unet_config("tiny", sample_size=32, cross_attention_dim=8, image_embedding_dim=8))
    assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
    assert config["up_block_types"] == ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    unet = create_unet(config)
    assert not has_cross_attention(unet)
    heads = [m.heads for name, m in unet.named_modules() if type(m).__name__ == "Attention"]
    assert heads and set(heads) == {unet_config("tiny", sample_size=32, cross_attention_dim=8)["attention_head_dim"]}
    out = unet(torch.randn(1, 3, 32, 32), 10, encoder_hidden_states=None, class_labels=torch.randn(1, 8)).sample
    assert out.shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ sampling


def test_output_types_and_shapes(pipe, images):
    pixels, pil = images
    out = pipe(pil, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and out.images[0].size == (SIZE, SIZE)
    varied = run(pipe, pixels, seeds=(0, 1, 2, 3, 4, 5), num_images_per_prompt=3)
    assert varied.shape == (6, SIZE, SIZE, 3) and varied.min() >= 0 and varied.max() <= 1
    result = pipe(pixels[0], num_inference_steps=STEPS, output_type="pt", return_dict=False)
    assert isinstance(result, tuple) and result[0].shape == (1, 3, SIZE, SIZE)


def test_image_inputs_agree(pipe, images, vision):
    pixels, pil = images
    encoder, mean, std = vision
    embeds = pipe.encode_image(pil)
    torch.testing.assert_close(embeds, pipe.encode_image(pixels))  # PIL and uint8 tensors alike
    # as the training cache embeds them: normalize_pixels at the encoder's resolution, image_embeds, normalised
    expected = encoder(pixel_values=normalize_pixels(pixels, mean, std)).image_embeds
    torch.testing.assert_close(embeds, torch.nn.functional.normalize(expected, dim=-1))
    np.testing.assert_allclose(run(pipe, pil, seeds=(3, 4)), run(pipe, image_embeds=embeds, seeds=(3, 4)), atol=1e-6)


def test_deterministic_under_a_generator(pipe, images):
    pixels = images[0][:1]
    first = run(pipe, pixels, seeds=(7,))
    np.testing.assert_array_equal(first, run(pipe, pixels, seeds=(7,)))
    single = pipe(pixels, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7), output_type="np")
    np.testing.assert_array_equal(first, single.images)
    assert np.abs(first - run(pipe, pixels, seeds=(8,))).max() > 0.05


@pytest.mark.parametrize("noise", [False, True])
def test_batch_equals_single_with_per_image_generators(vision, images, noise):
    pipe = make_decoder(vision[0], num_tokens=0 if noise else TOKENS, noise=noise)
    pixels = images[0]
    level = 50 if noise else 0
    batch = run(pipe, pixels, seeds=(0, 1, 2, 3), num_images_per_prompt=2, noise_level=level)
    one_by_one = [run(pipe, pixels[[k // 2]], seeds=(k,), noise_level=level) for k in range(4)]
    np.testing.assert_allclose(batch, np.concatenate(one_by_one), atol=5e-4)


def test_guidance_doubles_the_batch_against_the_zero_input(pipe, images):
    calls = UNetCalls(pipe.unet).calls
    embeds = pipe.encode_image(images[0])
    run(pipe, images[0], seeds=(0, 1, 2, 3), num_images_per_prompt=2, guidance_scale=3.0)
    assert len(calls) == STEPS
    expected = decoder_condition(embeds.repeat_interleave(2, dim=0))
    for batch, class_labels, tokens in calls:
        assert batch == 8 and class_labels.shape == (8, 32) and tokens.shape == (8, TOKENS, WIDTH)
        assert torch.equal(class_labels[:4], torch.zeros(4, 32)) and torch.equal(tokens[:4], torch.zeros(4, 4, WIDTH))
        torch.testing.assert_close(class_labels[4:], expected)
        assert tokens[4:].abs().min(dim=-1).values.max() > 0

    calls.clear()
    run(pipe, images[0], seeds=(0, 1), guidance_scale=1.0)
    assert [batch for batch, _, _ in calls] == [2] * STEPS
    assert all(labels.abs().sum(dim=1).min() > 0 for _, labels, _ in calls)


@pytest.mark.parametrize(
    "start, end, guided",
    [(0.0, 1.0, [0, 1, 2, 3, 4]), (0.4, 1.0, [2, 3, 4]), (0.0, 0.6, [0, 1, 2]), (0.2, 0.8, [1, 2, 3])],
)
def test_guidance_applies_on_the_steps_of_its_interval_only(pipe, images, start, end, guided):
    calls = UNetCalls(pipe.unet).calls
    kwargs = {"num_inference_steps": 5, "guidance_scale": 3.0, "guidance_start": start, "guidance_end": end}
    interval = run(pipe, images[0], seeds=(0, 1), **kwargs)
    assert [batch for batch, _, _ in calls] == [4 if step in guided else 2 for step in range(5)]
    for batch, class_labels, _ in calls:  # the steps left unguided read the conditional input alone
        assert class_labels.abs().sum(dim=1).min() > 0 or batch == 4
    # guided steps are the same function as ever: the full interval is plain guidance, and an interval changes images
    everywhere = run(pipe, images[0], seeds=(0, 1), **{**kwargs, "guidance_start": 0.0, "guidance_end": 1.0})
    assert (np.abs(interval - everywhere).max() > 1e-3) == (guided != [0, 1, 2, 3, 4])


def test_noise_level_varies_the_images(noisy_pipe, images):
    pixels = images[0][:1]
    clean = run(noisy_pipe, pixels, seeds=(0,))
    assert np.abs(clean - run(noisy_pipe, pixels, seeds=(0,), noise_level=900)).max() > 0.01
    with pytest.raises(ValueError, match=r"`noise_level` must be in \[0, 999\], got 1000"):
        run(noisy_pipe, pixels, noise_level=1000)


# ------------------------------------------------------------------------------------------- interpolation


def test_slerp_properties():
    torch.manual_seed(0)
    a, b = torch.randn(16), torch.randn(16)
    ua, ub = torch.nn.functional.normalize(a, dim=0), torch.nn.functional.normalize(b, dim=0)
    times = torch.tensor(interpolation_times(5))
    path = slerp(a, b, times)
    assert path.shape == (5, 16)
    torch.testing.assert_close(path[0], ua)
    torch.testing.assert_close(path[-1], ub)
    torch.testing.assert_close(path.norm(dim=1), torch.ones(5))
    angles = torch.arccos((path[1:] * path[:-1]).sum(dim=1).clamp(-1, 1))
    torch.testing.assert_close(angles, angles.mean().expand(4), rtol=1e-4, atol=1e-5)  # constant speed
    assert slerp(a, b, 0.5).shape == (16,) and slerp(a[None], b[None], times).shape == (5, 1, 16)
    # nearly parallel: the normalised linear path, still unit and finite
    c = ua + 1e-9 * torch.randn(16)
    near = slerp(ua, c, times)
    assert torch.isfinite(near).all()
    torch.testing.assert_close(near, ua.expand(5, 16))
    with pytest.raises(ValueError, match="opposite directions"):
        slerp(ua, -ua, 0.5)
    with pytest.raises(ValueError, match="`num_frames` must be an integer >= 2"):
        interpolation_times(1)


@pytest.mark.parametrize("noise", [False, True])
def test_interpolation_endpoints_are_the_plain_variations(vision, images, noise):
    # DDPM draws noise at every step: every frame must draw the same.
    pipe = make_decoder(vision[0], num_tokens=0 if noise else TOKENS, noise=noise)
    pixels, pil = images
    level = 100 if noise else 0
    out = pipe.interpolate(
        pil,
        num_frames=4,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
        noise_level=level,
    )
    assert out.t == [0.0, 1 / 3, 2 / 3, 1.0] and out.images.shape == (4, SIZE, SIZE, 3)
    for frame, k in ((0, 0), (-1, 1)):
        plain = pipe(
            pixels[k],
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
            noise_level=level,
        ).images[0]
        np.testing.assert_allclose(out.images[frame], plain, atol=5e-4)
    assert np.abs(out.images[1] - out.images[2]).max() > 0  # the embedding moves along the row


def test_interpolation_shares_the_noise_of_every_frame(pipe, images):
    # Between an image and itself every frame is the same image.
    pixels = images[0][[0, 0]]
    out = pipe.interpolate(pixels, num_frames=3, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1))
    frames = [np.asarray(frame, dtype=np.int16) for frame in out.images]
    assert max(np.abs(frames[0] - f).max() for f in frames[1:]) <= 1
    with pytest.raises(ValueError, match="needs exactly two images"):
        pipe.interpolate(images[0][:1], num_frames=3)
    with pytest.raises(ValueError, match="one torch.Generator"):
        pipe.interpolate(images[0], num_frames=3, generator=generators(0, 1))


# --------------------------------------------------------------------------------------------------- checks


def test_an_image_encoder_of_another_width_is_refused(pipe):
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
    with pytest.raises(ValueError, match=r"produces 48-wide image embeddings.*must read 48-wide.*is 32"):
        ImageVariationPipeline(unet=pipe.unet, scheduler=pipe.scheduler, image_encoder=other)
    wide = make_decoder(other)  # a UNet that fits the 48-wide encoder, but 32-wide tokens
    with pytest.raises(ValueError, match="reads 32-wide embeddings, but the image encoder produces 48"):
        ImageVariationPipeline(wide.unet, wide.scheduler, other, pipe.embedding_tokens)
    with pytest.raises(ValueError, match="makes 8-wide tokens, but the UNet's cross_attention_dim is 24"):
        ImageVariationPipeline(pipe.unet, pipe.scheduler, pipe.image_encoder, ImageEmbeddingTokens(32, 2, 8))
    with pytest.raises(ValueError, match="has cross-attention blocks but no `embedding_tokens`"):
        ImageVariationPipeline(unet=pipe.unet, scheduler=pipe.scheduler, image_encoder=pipe.image_encoder)
    with pytest.raises(ValueError, match="noise augmentation the UNet must read 64-wide"):
        ImageVariationPipeline(
            pipe.unet,
            pipe.scheduler,
            pipe.image_encoder,
            pipe.embedding_tokens,
            image_noising_scheduler=make_noising_scheduler(),
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "give exactly one of `image` and `image_embeds`, got neither"),
        ({"image_embeds": torch.zeros(1, 7)}, r"`image_embeds` must be 32 wide .*got shape \(1, 7\)"),
        (
            {"image_embeds": torch.zeros(2, 32).index_fill_(1, torch.tensor([3]), float("nan"))},
            r"`image_embeds` holds 2 non-finite value\(s\) \(NaN or infinity\), the first in row 0",
        ),
        ({"image_embeds": torch.full((1, 32), float("inf"))}, r"`image_embeds` holds 32 non-finite value"),
        ({"image_embeds": torch.zeros(1, 32), "guidance_scale": float("nan")}, r"`guidance_scale` .*finite.*got nan"),
        ({"image": torch.zeros(1, 3, 8, 8)}, "`image` as a tensor must be uint8"),
        ({"image": "a.png"}, "`image` must be a PIL image"),
        ({"image_embeds": torch.zeros(2, 32), "generator": generators(0)}, "list of 1 generators, but 2 images"),
        ({"image_embeds": torch.zeros(1, 32), "noise_level": 3}, "trained without noise augmentation, got 3"),
        ({"image_embeds": torch.zeros(1, 32), "num_inference_steps": 0}, "`num_inference_steps` must be an integer"),
        ({"image_embeds": torch.zeros(1, 32), "output_type": "jpg"}, "`output_type` must be one of"),
        ({"image_embeds": torch.zeros(1, 32), "latents": torch.zeros(1, 3, 8, 8)}, r"`latents` must have shape"),
        (
            {"image_embeds": torch.zeros(1, 32), "guidance_start": -0.1},
            r"`guidance_start` must be .*\[0, 1\], got -0.1",
        ),
        ({"image_embeds": torch.zeros(1, 32), "guidance_end": True}, r"`guidance_end` must be .*got True"),
        (
            {"image_embeds": torch.zeros(1, 32), "guidance_start": 0.5, "guidance_end": 0.5},
            "`guidance_start` must be smaller than `guidance_end`, got 0.5 and 0.5",
        ),
    ],
)
def test_bad_inputs_are_named(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


# ------------------------------------------------------------------------------------------------ latent space


def test_a_latent_decoder_decodes_through_its_vae(vision, images, tmp_path):
    """With a VAE the UNet denoises latents of its own sample size, and the images are their decodings at the VAE's
    resolution (unscaled by `scaling_factor` first), by `__call__` and `interpolate` alike; save/load keeps it."""
    vae = make_vae()
    pipe = make_decoder(vision[0], vae=vae, scheduler=DDIMScheduler())  # no step noise: the initial noise decides
    pixels, _ = images
    assert (pipe.sample_size, pipe.image_size) == (SIZE // 2, SIZE)
    latents = run(pipe, pixels[0], seeds=(3,), output_type="latent")
    assert latents.shape == (1, 4, SIZE // 2, SIZE // 2)
    varied = run(pipe, pixels[0], seeds=(3,))
    with torch.no_grad():
        decoded = vae.decode(latents / 0.7).sample
    np.testing.assert_allclose(varied, (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    noise = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(varied, run(pipe, pixels[0], seeds=(9,), latents=noise))  # the noise's shape
    frames = pipe.interpolate(pixels, num_frames=3, num_inference_steps=STEPS, generator=torch.Generator())
    assert [frame.size for frame in frames.images] == [(SIZE, SIZE)] * 3

    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    loaded = ImageVariationPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, AutoencoderKL) and loaded.vae.config.scaling_factor == 0.7
    # the same weights, bit for bit; on some CPUs (AVX2-only) the kernels of freshly loaded tensors sum in another
    # order, a few 1e-6 apart
    np.testing.assert_allclose(varied, run(loaded, pixels[0], seeds=(3,)), rtol=0, atol=2e-5)


def test_a_pixel_blocks_decoder_shuffles_its_samples_back(vision, images, tmp_path):
    """With `space_to_depth` 2 the UNet denoises (12, SIZE/2, SIZE/2) blocks and the images are those blocks
    rearranged back, by `__call__` and `interpolate` alike; initial noise of the pixels' shape is refused by name;
    save/load keeps it."""
    pipe = make_decoder(vision[0], scheduler=DDIMScheduler(), space_to_depth=2)  # no step noise
    pixels, _ = images
    assert (pipe.sample_size, pipe.image_size) == (SIZE // 2, SIZE)
    blocks = run(pipe, pixels[0], seeds=(3,), output_type="latent")
    assert blocks.shape == (1, 12, SIZE // 2, SIZE // 2)
    varied = run(pipe, pixels[0], seeds=(3,))
    expected = (F.pixel_shuffle(blocks.float(), 2) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    np.testing.assert_allclose(varied, expected.numpy(), atol=1e-6)
    noise = torch.randn(1, 12, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(varied, run(pipe, pixels[0], seeds=(9,), latents=noise))
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 12, 8, 8\)"):
        run(pipe, pixels[0], latents=torch.randn(1, 3, SIZE, SIZE))
    frames = pipe.interpolate(pixels, num_frames=3, num_inference_steps=STEPS, generator=torch.Generator())
    assert [frame.size for frame in frames.images] == [(SIZE, SIZE)] * 3

    pipe.save_pretrained(tmp_path)
    loaded = ImageVariationPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.space_to_depth == 2
    np.testing.assert_allclose(varied, run(loaded, pixels[0], seeds=(3,)), rtol=0, atol=2e-5)


def test_a_folder_from_before_pixel_blocks_loads_as_pixels(vision, tmp_path):
    """A decoder folder whose model_index.json has no `space_to_depth` (saved before the option) loads with 1."""
    make_decoder(vision[0]).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index.pop("space_to_depth") == 1
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = ImageVariationPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.config.space_to_depth == 1 and loaded.image_size == SIZE


@pytest.mark.parametrize(
    "space, match",
    [
        ({"vae": True}, r"the UNet denoises 3 channels, but the VAE's latents have 4"),
        ({"space_to_depth": 2}, r"denoises 3 channels, but pixels as 2x2 blocks have 12; .* as 1x1 blocks"),
    ],
)
def test_a_unet_that_does_not_fit_the_space_is_refused(vision, space, match):
    """A pixel UNet (3 channels) beside a VAE's 4-channel latents, or beside 2x2 pixel blocks."""
    space = {**space, "vae": make_vae()} if space.get("vae") else space
    with pytest.raises(ValueError, match=match):
        ImageVariationPipeline(
            unet=create_unet(unet_config("test", sample_size=SIZE, cross_attention_dim=WIDTH, image_embedding_dim=32)),
            scheduler=DDPMScheduler(),
            image_encoder=vision[0],
            embedding_tokens=ImageEmbeddingTokens(32, TOKENS, WIDTH),
            **space,
        )


# ------------------------------------------------------------------------------------------------ save/load


@pytest.mark.parametrize("noise", [False, True])
def test_save_and_load_give_the_same_images(vision, images, tmp_path, noise):
    pipe = make_decoder(vision[0], num_tokens=0 if noise else TOKENS, noise=noise, scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    if noise:
        assert index["embedding_tokens"] == [None, None]
        assert index["image_noising_scheduler"] == ["diffusers", "DDPMScheduler"]
    else:
        # a clipcond model: diffusers records its module and finds it there on loading
        assert index["embedding_tokens"] == ["clipcond.models.image_embedding", "ImageEmbeddingTokens"]
        assert index["image_noising_scheduler"] == [None, None]
    loaded = ImageVariationPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is DDIMScheduler
    assert (loaded.embedding_tokens is None) == noise and (loaded.image_noising_scheduler is None) != noise
    level = 10 if noise else 0
    np.testing.assert_array_equal(
        run(pipe, images[0], seeds=(3, 4), noise_level=level), run(loaded, images[0], seeds=(3, 4), noise_level=level)
    )


def test_a_fresh_process_loads_the_tokens_through_the_pipeline_module(pipe, tmp_path):
    """diffusers records a component of another library under its module (`clipcond.models.image_embedding`) and
    looks it up in `sys.modules` only, never importing it itself: importing the pipeline class must import it."""
    pipe.save_pretrained(tmp_path)
    code = (
        "import sys; from clipcond.pipelines import ImageVariationPipeline as P; "
        f"p = P.from_pretrained({str(tmp_path)!r}, local_files_only=True); "
        "print(type(p.embedding_tokens).__module__, type(p.embedding_tokens).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["clipcond.models.image_embedding", "ImageEmbeddingTokens"]
