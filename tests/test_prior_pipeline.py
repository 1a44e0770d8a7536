"""`PriorPipeline` with tiny seeded components: shapes, normalisation, the standardisation round trip, guidance in one
batch, determinism, batch-vs-single equality, save/load, and errors that name the argument."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PriorTransformer
from transformers import CLIPTextModelWithProjection

from clipcond.models.clip import load_text_tower
from clipcond.models.prior import (
    create_prior,
    embedding_statistics,
    prior_config,
    prior_presets,
    set_embedding_statistics,
    standardize,
)
from clipcond.models.prior_text import PriorTextInputs, prior_text_inputs
from clipcond.pipelines.prior import PriorPipeline, PriorPipelineOutput
from clipcond.text_encoding import TextEmbeddings, encode_prompts

WIDTH, CONTEXT = 32, 32  # the `test` CLIP's projection width and context length
PROMPTS = ["a red circle", "a small blue square on the left"]


@pytest.fixture(scope="module")
def text_tower(tiny_clip_run):
    return load_text_tower(tiny_clip_run)


def _scheduler():
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=5.0,
        timestep_spacing="trailing",
    )


def _prior(seed: int = 0) -> PriorTransformer:
    torch.manual_seed(seed)
    prior = create_prior(prior_config("test", embedding_dim=WIDTH, num_embeddings=CONTEXT))
    # statistics of some normalised embeddings, so that post-processing is not the identity
    embeds = F.normalize(torch.randn(64, WIDTH) + torch.linspace(-1, 1, WIDTH), dim=-1)
    set_embedding_statistics(prior, *embedding_statistics(embeds))
    return prior.eval()


@pytest.fixture(scope="module")
def pipe(text_tower):
    text_encoder, tokenizer = text_tower
    pipe = PriorPipeline(prior=_prior(), scheduler=_scheduler(), text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(n: int, offset: int = 0):
    return [torch.Generator().manual_seed(offset + k) for k in range(n)]


def test_presets_and_config():
    assert set(prior_presets()) == {"test", "tiny", "small", "base"}
    config = prior_config("tiny", embedding_dim=128, num_embeddings=32)
    assert config["embedding_dim"] == 128 and config["num_embeddings"] == 32
    prior = create_prior(config)
    assert prior.config.num_attention_heads * prior.config.attention_head_dim == 128
    assert not prior.clip_mean.requires_grad and not prior.clip_std.requires_grad  # data, not weights
    with pytest.raises(ValueError, match="`model` must be one of .*got 'huge'"):
        prior_config("huge", embedding_dim=8, num_embeddings=8)


def test_output_shape_normalised_and_tuple(pipe):
    out = pipe(PROMPTS, num_inference_steps=2, num_images_per_prompt=3, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, PriorPipelineOutput)
    assert out.image_embeds.shape == (6, WIDTH) and out.image_embeds.dtype == torch.float32
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(6))
    (embeds,) = pipe("a red circle", num_inference_steps=2, output_type="np", return_dict=False)
    assert embeds.shape == (1, WIDTH)


def test_statistics_are_used_in_post_processing(text_tower):
    """A prior whose prediction is always 0 (standardised) ends at the mean embedding, un-standardised and
    normalised: DDPM's last step returns the predicted sample."""
    text_encoder, tokenizer = text_tower
    prior = _prior()
    with torch.no_grad():
        prior.proj_to_clip_embeddings.weight.zero_()
        prior.proj_to_clip_embeddings.bias.zero_()
    pipe = PriorPipeline(prior=prior, scheduler=_scheduler(), text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    embeds = pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).image_embeds
    expected = F.normalize(prior.clip_mean.detach(), dim=-1).expand(2, -1)
    torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-5)
    # standardize is the inverse of post_process_latents
    x = F.normalize(torch.randn(4, WIDTH), dim=-1)
    torch.testing.assert_close(prior.post_process_latents(standardize(prior, x)), x)


def test_statistics_of_normalised_embeddings():
    embeds = F.normalize(torch.randn(1000, 8) + 2.0, dim=-1)
    mean, std = embedding_statistics(embeds)
    torch.testing.assert_close(mean, embeds.mean(0))
    torch.testing.assert_close(std, embeds.std(0))
    standardized = (embeds - mean) / std
    torch.testing.assert_close(standardized.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardized.std(0), torch.ones(8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="do not fit a prior of width 32"):
        set_embedding_statistics(_prior(), mean, std)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = PriorPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.prior, PriorTransformer) and isinstance(loaded.scheduler, DDPMScheduler)
    assert loaded.scheduler.config.prediction_type == "sample"
    # the standardisation travels with the weights
    torch.testing.assert_close(loaded.prior.clip_mean, pipe.prior.clip_mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.prior.clip_std, pipe.prior.clip_std, rtol=0, atol=0)
    assert (pipe.prior.clip_std != 0).all()
    a = pipe(PROMPTS, num_inference_steps=3, generator=_generators(2)).image_embeds
    b = loaded(PROMPTS, num_inference_steps=3, generator=_generators(2)).image_embeds
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_guidance_doubles_the_batch_once_per_step(pipe):
    batches = []
    handle = pipe.prior.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, num_images_per_prompt=2)
        assert batches == [8, 8, 8]
        batches.clear()
        pipe(PROMPTS, num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2)
        assert batches == [4, 4, 4]
    finally:
        handle.remove()


def test_guidance_mixes_conditional_and_unconditional(pipe):
    """w = 1 is the conditional prediction; the negative prompt "" is the default unconditional branch; w = 0 with
    guidance on would be the unconditional one, which equals sampling the empty prompt without guidance."""
    kwargs = {"num_inference_steps": 3}
    cond = pipe(PROMPTS, guidance_scale=1.0, generator=_generators(2), **kwargs).image_embeds
    guided = pipe(PROMPTS, guidance_scale=4.0, generator=_generators(2), **kwargs).image_embeds
    explicit = pipe(PROMPTS, guidance_scale=4.0, negative_prompt="", generator=_generators(2), **kwargs).image_embeds
    assert not torch.allclose(cond, guided)
    torch.testing.assert_close(guided, explicit, rtol=0, atol=0)
    other = pipe(PROMPTS, guidance_scale=4.0, negative_prompt="a green triangle", generator=_generators(2), **kwargs)
    assert not torch.allclose(other.image_embeds, guided)


def test_deterministic_under_a_generator(pipe):
    a = pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(7)).image_embeds
    b = pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(7)).image_embeds
    c = pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(8)).image_embeds
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_batch_equals_single(pipe):
    """With one generator per embedding, a batch gives each prompt what it gets alone."""
    batch = pipe(PROMPTS, num_inference_steps=3, num_images_per_prompt=2, generator=_generators(4)).image_embeds
    singles = [
        pipe(prompt, num_inference_steps=3, num_images_per_prompt=2, generator=_generators(2, offset=2 * i))
        for i, prompt in enumerate(PROMPTS)
    ]
    torch.testing.assert_close(batch, torch.cat([s.image_embeds for s in singles]), rtol=1e-5, atol=1e-5)


def test_given_latents_are_the_initial_noise(pipe):
    latents = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(3))
    a = pipe(PROMPTS, num_inference_steps=2, latents=latents, generator=_generators(2)).image_embeds
    b = pipe(PROMPTS, num_inference_steps=2, latents=latents.clone(), generator=_generators(2)).image_embeds
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_text_inputs_match_the_encoder(pipe):
    """The prior reads the normalised CLIP text embedding and the token states with their mask."""
    text = encode_prompts(pipe.text_encoder, pipe.tokenizer, PROMPTS)
    inputs = prior_text_inputs(text, pipe.text_encoder)
    torch.testing.assert_close(inputs.proj_embedding, F.normalize(text.pooled, dim=-1))
    assert inputs.encoder_hidden_states.shape == (2, CONTEXT, WIDTH)
    assert inputs.attention_mask.dtype == torch.bool and inputs.attention_mask[:, 0].all()
    cond, uncond = pipe.encode_prompt(PROMPTS, ["", ""], torch.device("cpu"))
    torch.testing.assert_close(cond.proj_embedding, inputs.proj_embedding)
    torch.testing.assert_close(uncond.proj_embedding[0], uncond.proj_embedding[1])


def test_narrower_token_states_go_through_the_text_projection():
    """A text tower whose token states are wider than its projection: tokens are projected to the prior's width."""
    text_encoder = CLIPTextModelWithProjection._from_config(
        CLIPTextModelWithProjection.config_class(
            hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=WIDTH
        )
    ).eval()
    text = TextEmbeddings(torch.randn(2, 5, 48), torch.ones(2, 5, dtype=torch.long), torch.randn(2, WIDTH))
    inputs = prior_text_inputs(text, text_encoder)
    expected = text.hidden_states @ text_encoder.text_projection.weight.T
    torch.testing.assert_close(inputs.encoder_hidden_states, expected)
    assert isinstance(PriorTextInputs.cat([inputs, inputs]).proj_embedding, torch.Tensor)


def test_width_and_context_mismatches_are_refused(text_tower):
    text_encoder, tokenizer = text_tower
    narrow = CLIPTextModelWithProjection._from_config(
        text_encoder.config.__class__(**{**text_encoder.config.to_dict(), "projection_dim": 16})
    )
    with pytest.raises(ValueError, match="projection width is 16, but the prior's embedding_dim is 32"):
        PriorPipeline(prior=_prior(), scheduler=_scheduler(), text_encoder=narrow, tokenizer=tokenizer)
    short = create_prior(prior_config("test", embedding_dim=WIDTH, num_embeddings=16))
    with pytest.raises(ValueError, match="reads 32 tokens, but the prior's num_embeddings is 16"):
        PriorPipeline(prior=short, scheduler=_scheduler(), text_encoder=text_encoder, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": 3}, "`prompt` must be a string or a list of strings, got int: 3"),
        ({"prompt": []}, r"`prompt` must be a string or a non-empty list of strings, got \[\]"),
        ({"negative_prompt": ["x"]}, "`negative_prompt` has 1 entries but `prompt` has 2"),
        ({"num_inference_steps": 0}, "`num_inference_steps` must be an integer >= 1, got 0"),
        ({"guidance_scale": -1.0}, "`guidance_scale` must be a number >= 0 .*got -1.0"),
        ({"num_images_per_prompt": 0}, "`num_images_per_prompt` must be an integer >= 1, got 0"),
        ({"generator": [torch.Generator()]}, "`generator` is a list of 1 generators, but 2 embeddings"),
        ({"latents": torch.zeros(2, 8)}, r"`latents` must have shape \(2, 32\), got \(2, 8\)"),
        ({"output_type": "pil"}, r"`output_type` must be one of \['pt', 'np'\], got 'pil'"),
    ],
)
def test_check_inputs_names_the_argument(pipe, kwargs, match):
    call = {"prompt": PROMPTS, "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**call)
