"""TextToImagePipeline on tiny seeded components (CPU, 2 steps): outputs, determinism, guidance, schedulers, VAE path."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

from clipcond.models.unet import create_unet, unet_config
from clipcond.pipeline_loading import scheduler_name
from clipcond.pipelines import SCHEDULERS, TextToImagePipeline, scheduler_from_name
from clipcond.text_encoding import encode_prompts
from clipcond.tokenizer import train_tokenizer

WIDTH = 32  # the text encoder's token-state width = the UNet's cross_attention_dim
CONTEXT = 16
SIZE = 16
STEPS = 2
# The numpy-2 `__array__` copy DeprecationWarning that diffusers' sigma schedulers raise.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a small yellow star on the left"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS, vocab_size=300, context_length=CONTEXT)


def make_text_encoder(tokenizer, width: int = WIDTH) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT,
        projection_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(config).eval()


def make_unet(in_channels: int = 3, sample_size: int = SIZE, cross_attention_dim: int = WIDTH):
    torch.manual_seed(0)
    config = unet_config(
        "test", sample_size=sample_size, cross_attention_dim=cross_attention_dim, in_channels=in_channels
    )
    return create_unet(config).eval()


def make_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),  # one downsampling: latents are half the image size
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    ).eval()


def make_pipeline(tokenizer, scheduler=None, vae=None) -> TextToImagePipeline:
    unet = make_unet() if vae is None else make_unet(in_channels=4, sample_size=SIZE // 2)
    pipe = TextToImagePipeline(
        unet=unet,
        scheduler=scheduler or DDPMScheduler(num_train_timesteps=1000),
        text_encoder=make_text_encoder(tokenizer),
        tokenizer=tokenizer,
        vae=vae,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(tokenizer):
    return make_pipeline(tokenizer)


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def run(pipe, prompt="a red circle", seeds=(0,), **kwargs):
    """The pipeline's images as float arrays (B, H, W, 3), one generator per image seeded with `seeds`."""
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe(prompt, generator=generators(*seeds), **kwargs).images


class UNetCalls:
    """Records each UNet forward's inputs: sample batch, text states and attention mask."""

    def __init__(self, unet):
        self.calls = []
        unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.calls.append((sample.shape[0], kwargs["encoder_hidden_states"], kwargs.get("encoder_attention_mask")))


def test_output_types_and_shapes(pipe):
    out = pipe(
        ["a red circle", "a blue square"], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)
    )
    assert len(out.images) == 2 and all(isinstance(image, Image.Image) for image in out.images)
    assert out.images[0].size == (SIZE, SIZE) and out.images[0].mode == "RGB"

    images = run(pipe, "a red circle", seeds=(0, 1, 2), num_images_per_prompt=3)
    assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0

    pt = run(pipe, "a red circle", output_type="pt")
    assert pt.shape == (1, 3, SIZE, SIZE) and pt.dtype == torch.float32
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), run(pipe, "a red circle"), atol=1e-6)
    raw = run(pipe, "a red circle", output_type="latent")  # pixel space: the denoised sample in [-1, 1] terms
    torch.testing.assert_close(pt, (raw / 2 + 0.5).clamp(0, 1))

    result = pipe("a red circle", num_inference_steps=STEPS, output_type="np", return_dict=False)
    assert isinstance(result, tuple) and len(result) == 1 and result[0].shape == (1, SIZE, SIZE, 3)


def test_stored_output_slice(tokenizer):
    # Computed once with torch 2.14.1, diffusers 0.42.1, transformers 5.24 on CPU. An upgrade of any of them, or a
    # change to the `test` UNet preset, the tokenizer trainer or the seeded initialisations may move it: recompute.
    # The slice is of the raw denoised sample, with DDPM's clipping of x0 off: a random UNet's x0 estimates lie far
    # outside [-1, 1], and clipping or clamping them would hide most changes.
    pipe = make_pipeline(tokenizer, scheduler=DDPMScheduler(clip_sample=False))
    sample = run(pipe, "a red circle", seeds=(0,), guidance_scale=3.0, output_type="latent")
    image_slice = sample[0, -1, -3:, -3:]
    expected = torch.tensor(EXPECTED_SLICE)
    assert (image_slice - expected).abs().max() < 1e-3, image_slice


EXPECTED_SLICE = [[-0.3923, 6.8353, -1.0176], [3.3213, 4.7917, 1.4157], [6.2359, 2.5863, -1.2092]]


def test_deterministic_under_a_generator(pipe):
    first = run(pipe, "a red circle", seeds=(7,))
    np.testing.assert_array_equal(first, run(pipe, "a red circle", seeds=(7,)))
    single = pipe(
        "a red circle", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7), output_type="np"
    )
    np.testing.assert_array_equal(first, single.images)  # a list of one generator is the generator itself
    assert np.abs(first - run(pipe, "a red circle", seeds=(8,))).max() > 0.05


@pytest.mark.parametrize(
    ("scheduler_class", "options"),
    [
        (DDPMScheduler, {}),
        (EulerDiscreteScheduler, {}),
        (EulerAncestralDiscreteScheduler, {}),
        (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    ],
)
def test_batch_equals_single_with_per_image_generators(pipe, scheduler_class, options):
    # DDPM, Euler ancestral and SDE-DPM-Solver++ draw fresh noise inside `step`: with one generator per image, each
    # image's noise is its own, so a batch equals its images generated one at a time.
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    prompts = ["a red circle", "a blue square"]
    batch = run(pipe, prompts, seeds=(0, 1, 2, 3), num_images_per_prompt=2, negative_prompt="a green triangle")
    one_by_one = [
        run(pipe, prompt, seeds=(seed,), negative_prompt="a green triangle")
        for seed, prompt in enumerate([prompts[0], prompts[0], prompts[1], prompts[1]])
    ]
    np.testing.assert_allclose(batch, np.concatenate(one_by_one), atol=5e-4)


def test_latents_argument_is_the_initial_noise(tokenizer):
    # Euler starts at init_noise_sigma != 1: given latents are scaled like drawn ones.
    pipe = make_pipeline(tokenizer, scheduler=scheduler_from_name("euler", DDPMScheduler().config))
    assert pipe.scheduler.init_noise_sigma > 1
    latents = randn_tensor((2, 3, SIZE, SIZE), generator=generators(0, 1))
    given = run(pipe, "a red circle", seeds=(5, 6), num_images_per_prompt=2, latents=latents)
    np.testing.assert_allclose(given, run(pipe, "a red circle", seeds=(0, 1), num_images_per_prompt=2), atol=1e-6)


def test_save_and_load_give_the_same_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]
    loaded = TextToImagePipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and type(loaded.scheduler) is DDPMScheduler
    np.testing.assert_array_equal(run(pipe, "a red circle", seeds=(3,)), run(loaded, "a red circle", seeds=(3,)))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_swaps_in(pipe, name):
    base = pipe.scheduler.config
    pipe.scheduler = scheduler_from_name(name, base)
    assert type(pipe.scheduler) is SCHEDULERS[name]
    if name.startswith("dpm"):
        assert pipe.scheduler.config.algorithm_type == {"dpm": "dpmsolver++", "dpm-sde": "sde-dpmsolver++"}[name]
    assert scheduler_name(pipe.scheduler) == name
    first = run(pipe, ["a red circle", "a blue square"], seeds=(0, 1))
    assert first.shape == (2, SIZE, SIZE, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, run(pipe, ["a red circle", "a blue square"], seeds=(0, 1)))

    # v-prediction is the scheduler's business: it carries over from the saved config and changes the images.
    pipe.scheduler = scheduler_from_name(name, DDPMScheduler.from_config(base, prediction_type="v_prediction").config)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    v_images = run(pipe, ["a red circle", "a blue square"], seeds=(0, 1))
    assert np.isfinite(v_images).all() and np.abs(v_images - first).max() > 0.01


def test_schedulers_differ(pipe):
    base = pipe.scheduler.config
    images = {}
    for name in ("ddpm", "ddim", "euler", "euler-a", "dpm", "dpm-sde"):
        pipe.scheduler = scheduler_from_name(name, base)
        images[name] = run(pipe, "a red circle", seeds=(0,))
    assert np.abs(images["ddpm"] - images["ddim"]).max() > 0.01
    assert np.abs(images["ddim"] - images["euler"]).max() > 0.01
    assert np.abs(images["dpm"] - images["dpm-sde"]).max() > 0.01  # the SDE variant draws fresh noise per step
    assert not np.array_equal(images["euler"], images["euler-a"])  # so does ancestral Euler (once in 2 steps)


def test_guidance_doubles_the_unet_batch_once_per_step(pipe, tokenizer):
    calls = UNetCalls(pipe.unet).calls
    run(pipe, ["a red circle", "a blue square"], seeds=(0, 1, 2, 3), num_images_per_prompt=2, guidance_scale=3.0)
    assert len(calls) == STEPS
    expected = encode_prompts(pipe.text_encoder, tokenizer, ["", "a red circle", "a blue square"])
    longest = int(expected.attention_mask.sum(dim=1).max())  # padding columns past the longest prompt are dropped
    assert longest < CONTEXT
    expected = expected.without_padding_columns()
    for batch, states, mask in calls:
        assert batch == 8 and states.shape == (8, longest, WIDTH) and mask.shape == (8, longest)
        # [unconditional (the empty prompt) x 4; "a red circle" x 2, "a blue square" x 2]
        order = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
        torch.testing.assert_close(states, expected.hidden_states[order])
        torch.testing.assert_close(mask, expected.attention_mask[order])


@pytest.mark.parametrize("guidance_scale", [1.0, 0.5])
def test_no_guidance_runs_the_single_batch(pipe, guidance_scale, caplog):
    calls = UNetCalls(pipe.unet).calls
    plain = run(pipe, ["a red circle", "a blue square"], seeds=(0, 1), guidance_scale=guidance_scale)
    assert [batch for batch, _, _ in calls] == [2] * STEPS
    with caplog.at_level(logging.WARNING, logger="clipcond.pipelines.text_to_image"):
        ignored = run(
            pipe,
            ["a red circle", "a blue square"],
            seeds=(0, 1),
            guidance_scale=guidance_scale,
            negative_prompt="a green triangle",
        )
    np.testing.assert_array_equal(plain, ignored)
    assert "`negative_prompt` is ignored" in caplog.text


def test_negative_prompt_is_used(pipe):
    plain = run(pipe, "a red circle", guidance_scale=3.0)
    negative = run(pipe, "a red circle", guidance_scale=3.0, negative_prompt="a blue square")
    assert np.abs(plain - negative).max() > 0.01
    np.testing.assert_array_equal(plain, run(pipe, "a red circle", guidance_scale=3.0, negative_prompt=""))
    per_prompt = run(
        pipe, ["a red circle", "a red circle"], seeds=(0, 0), guidance_scale=3.0, negative_prompt=["a blue square", ""]
    )
    np.testing.assert_allclose(per_prompt, np.concatenate([negative, plain]), atol=5e-4)


def test_callback_on_step_end(pipe):
    steps = []

    def callback(pipeline, step, timestep, tensors):
        steps.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else {}

    images = run(pipe, "a red circle", callback_on_step_end=callback)
    assert steps == list(range(STEPS))
    np.testing.assert_allclose(images, 0.5)  # zero latents decode to mid-grey


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guidance_scale": -1.0}, r"`guidance_scale` must be a number >= 0 .*got -1.0"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a number >= 0 \(finite; .*got nan"),
        ({"guidance_scale": float("-inf")}, r"`guidance_scale` must be a number >= 0 \(finite; .*got -inf"),
        ({"num_inference_steps": 0}, r"`num_inference_steps` must be an integer >= 1, got 0"),
        ({"prompt": 3}, r"`prompt` must be a string or a list of strings, got int: 3"),
        ({"prompt": ["a red circle", None]}, r"`prompt` must be a string or a non-empty list of strings"),
        ({"prompt": []}, r"`prompt` must be a string or a non-empty list of strings, got \[\]"),
        ({"negative_prompt": ["x", "y"]}, r"`negative_prompt` has 2 entries but `prompt` has 1"),
        ({"num_images_per_prompt": 0}, r"`num_images_per_prompt` must be an integer >= 1, got 0"),
        ({"generator": generators(0, 1)}, r"`generator` is a list of 2 generators, but 1 images"),
        ({"latents": torch.zeros(1, 3, 8, 8)}, r"`latents` must have shape \(1, 3, 16, 16\), got \(1, 3, 8, 8\)"),
        (
            {"height": 32},
            r"`height` and `width` must be the image size the UNet was trained on, \(16, 16\).*got \(32, 16\)",
        ),
        ({"output_type": "jpg"}, r"`output_type` must be one of .*got 'jpg'"),
    ],
)
def test_bad_inputs(pipe, kwargs, match):
    kwargs = {"prompt": "a red circle", "num_inference_steps": STEPS, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_unknown_scheduler():
    with pytest.raises(
        ValueError,
        match=r"`scheduler` must be one of \['ddim', 'ddpm', 'dpm', 'dpm-sde', 'euler', 'euler-a', 'unipc'\], got 'heun'",
    ):
        scheduler_from_name("heun", DDPMScheduler().config)


def test_encoder_that_does_not_fit_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"produces 32-wide token states, but this UNet reads 24"):
        TextToImagePipeline(
            unet=make_unet(cross_attention_dim=24),
            scheduler=DDPMScheduler(),
            text_encoder=make_text_encoder(tokenizer),
            tokenizer=tokenizer,
        )


def test_latent_space_with_a_vae(tokenizer, tmp_path):
    vae = make_vae()
    pipe = make_pipeline(tokenizer, vae=vae)
    assert pipe.vae_scale_factor == 2 and pipe.default_size == (SIZE, SIZE)
    latents = run(pipe, "a red circle", output_type="latent")
    assert latents.shape == (1, 4, SIZE // 2, SIZE // 2)
    images = run(pipe, "a red circle")
    assert images.shape == (1, SIZE, SIZE, 3)
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    np.testing.assert_allclose(images, (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    # Any size divisible by the VAE's factor; the UNet is convolutional.
    assert run(pipe, "a red circle", height=24, width=16).shape == (1, 24, 16, 3)
    with pytest.raises(ValueError, match=r"divisible by the VAE's factor 2, got \(15, 16\)"):
        run(pipe, "a red circle", height=15)

    pipe.save_pretrained(tmp_path)
    loaded = TextToImagePipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, AutoencoderKL)
    np.testing.assert_array_equal(images, run(loaded, "a red circle"))


def test_vae_whose_latents_do_not_fit_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"the UNet denoises 3 channels, but the VAE's latents have 4"):
        TextToImagePipeline(
            unet=make_unet(),
            scheduler=DDPMScheduler(),
            text_encoder=make_text_encoder(tokenizer),
            tokenizer=tokenizer,
            vae=make_vae(),
        )


@pytest.mark.parametrize(
    "unet_channels, space_to_depth, vae, match",
    [
        (
            3,
            2,
            False,
            r"denoises 3 channels, but pixels as 2x2 blocks have 12; .* as 1x1 blocks \(`--space-to-depth 1`",
        ),
        (
            12,
            1,
            False,
            r"denoises 12 channels, but pixels as 1x1 blocks have 3; .* as 2x2 blocks \(`--space-to-depth 2`",
        ),
        (4, 1, False, r"denoises 4 channels, .*; it denoises latents: give the pipeline the `vae` it was trained"),
        (4, 2, True, r"`space_to_depth` 2 is for pixel space; a pipeline with a `vae` has none"),
    ],
)
def test_space_to_depth_that_does_not_fit_the_unet_is_refused(tokenizer, unet_channels, space_to_depth, vae, match):
    with pytest.raises(ValueError, match=match):
        TextToImagePipeline(
            unet=make_unet(in_channels=unet_channels, sample_size=SIZE // 2),
            scheduler=DDPMScheduler(),
            text_encoder=make_text_encoder(tokenizer),
            tokenizer=tokenizer,
            vae=make_vae() if vae else None,
            space_to_depth=space_to_depth,
        )


def test_text_encoder_from_a_clip_run(tiny_clip_run):
    text_encoder = CLIPTextModelWithProjection.from_pretrained(tiny_clip_run, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_run, local_files_only=True)
    unet = make_unet(cross_attention_dim=text_encoder.config.hidden_size)
    pipe = TextToImagePipeline(unet=unet, scheduler=DDIMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    images = run(pipe, ["a red circle", ""], seeds=(0, 1))
    assert images.shape == (2, SIZE, SIZE, 3)
