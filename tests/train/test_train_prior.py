"""`clipcond train prior` at test scale: the run folder, the standardisation from the data, frozen towers, caches built
once, caption dropout, EMA, resume after SIGKILL, and errors."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import kill_at_step
import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from diffusers import DDPMScheduler, PriorTransformer
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTextModelWithProjection
from without_clipcond import assert_ships_its_code, assert_stock_diffusers_draws_the_same

from clipcond import conditioning as conditioning_module
from clipcond.data.folders import ImageCaptionDataset
from clipcond.lineage import content_hash
from clipcond.models.clip_pixels import normalize_pixels
from clipcond.pipelines.prior import PriorPipeline
from clipcond.train import diffusion, loop
from clipcond.train import prior as prior_module
from clipcond.train.prior import PriorData, PriorStage, main

STEPS = 4  # checkpoints and validation every 2 steps
FAST_ARGS = [
    *("--model", "test", "--train-batch-size", "8", "--lr-warmup-steps", "1", "--seed", "0"),
    *("--validation-max-captions", "8", "--validation-inference-steps", "2"),
]
RESUME_ARGS = ["--max-train-steps", str(STEPS), "--checkpointing-steps", "2", "--validation-steps", "2"]


def _argv(clip, data, out, *extra):
    return ["--clip", str(clip), "--data", str(data), "--output-dir", str(out), *FAST_ARGS, *extra]


def _reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _prior_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "prior" / "diffusion_pytorch_model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for name in a:  # stated tolerance: bit-identical on one CPU process
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def _distance(a, b) -> float:
    return sum((a[k].float() - b[k].float()).pow(2).sum().item() for k in a) ** 0.5


@pytest.fixture(scope="module")
def prior_run(shapes_data, tiny_clip_run, tmp_path_factory):
    """One short run through the CLI, with what it used captured: both towers, the initial prior, the optimizer, and
    the number of encoder calls. It is also the uninterrupted run of the resume test."""
    import clipcond.evaluation.prior  # noqa: F401  (imported now, it keeps the unpatched encode_prompts)
    from clipcond.cli import main as cli_main

    out = tmp_path_factory.mktemp("prior_run")
    seen = SimpleNamespace(encode_calls=0, vision_calls=0)
    load_text, load_vision = diffusion.load_text_tower, diffusion.load_vision_tower
    create_prior, make_optimizer = prior_module.create_prior, loop.make_optimizer
    encode_prompts = conditioning_module.encode_prompts

    def capture_text(path):
        seen.text_encoder, tokenizer = load_text(path)
        seen.text_before = {k: v.clone() for k, v in seen.text_encoder.state_dict().items()}
        return seen.text_encoder, tokenizer

    def capture_vision(path):
        seen.vision_model, mean, std = load_vision(path)
        seen.vision_before = {k: v.clone() for k, v in seen.vision_model.state_dict().items()}
        seen.vision_model.register_forward_hook(lambda *_: setattr(seen, "vision_calls", seen.vision_calls + 1))
        return seen.vision_model, mean, std

    def capture_prior(config):
        prior = create_prior(config)
        seen.prior_init = {k: v.clone() for k, v in prior.state_dict().items()}
        return prior

    def capture_optimizer(params, args, accelerator):
        seen.optimizer = make_optimizer(params, args, accelerator)
        return seen.optimizer

    def count_encode(*args, **kwargs):
        seen.encode_calls += 1
        return encode_prompts(*args, **kwargs)

    argv = _argv(tiny_clip_run, shapes_data, out, *RESUME_ARGS, "--report-to", "tensorboard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusion, "load_text_tower", capture_text)
        mp.setattr(diffusion, "load_vision_tower", capture_vision)
        mp.setattr(prior_module, "create_prior", capture_prior)
        mp.setattr(loop, "make_optimizer", capture_optimizer)
        mp.setattr(conditioning_module, "encode_prompts", count_encode)
        assert cli_main(["train", "prior", *argv]) == 0
    _reset_accelerate()
    seen.out = out
    return seen


# ----------------------------------------------------------------------------------------------- the run


def test_run_folder_is_a_prior_pipeline_with_lineage(prior_run, tiny_clip_run):
    out = prior_run.out
    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["kind"] == "clipcond-prior"
    assert record["clip"] == {"path": str(tiny_clip_run), "content_hash": content_hash(tiny_clip_run)}
    assert record["data"]["num_samples"] == 240 and record["data"]["resolution"] == 32
    assert record["prior"]["content_hash"] == content_hash(out / "prior")
    assert record["prior"]["embedding_dim"] == 32 and record["prior"]["num_embeddings"] == 32
    summary = record["summary"]
    assert summary["steps"] == STEPS
    # the last validation is in the run record
    for key in ("cosine_predicted", "cosine_text_baseline", "cosine_random_baseline", "zero_shot_top1_predicted"):
        assert -1.0 <= summary[key] <= 1.0, key

    pipe = PriorPipeline.from_pretrained(out)
    assert isinstance(pipe.prior, PriorTransformer) and isinstance(pipe.scheduler, DDPMScheduler)
    config = pipe.scheduler.config
    assert config.prediction_type == "sample" and config.beta_schedule == "squaredcos_cap_v2"
    assert config.num_train_timesteps == 1000
    pipe.set_progress_bar_config(disable=True)
    embeds = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).image_embeds
    assert embeds.shape == (1, 32)
    PriorPipeline.from_pretrained(out / "checkpoints" / f"checkpoint-{STEPS}" / "pretrained")
    assert_ships_its_code(out, "pipeline_prior", "PriorPipeline", "prior.py")
    pretrained = out / "checkpoints" / f"checkpoint-{STEPS}" / "pretrained"
    assert_ships_its_code(pretrained, "pipeline_prior", "PriorPipeline", "prior.py")
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_stock_diffusers_samples_the_runs_embeddings_without_clipcond(prior_run, tmp_path):
    call = {"prompt": ["a red circle", "a blue square"], "num_inference_steps": 3, "output_type": "pt", "seed": 0}
    assert_stock_diffusers_draws_the_same(prior_run.out, PriorPipeline, tmp_path, **call)


def test_standardisation_comes_from_the_training_images(prior_run, tiny_clip_run, shapes_data):
    """clip_mean / clip_std are the statistics of the normalised image embeddings of the training split, computed
    here independently with CLIPModel, and they are saved with the prior."""
    dataset = ImageCaptionDataset(shapes_data, split="train")
    clip = CLIPModel.from_pretrained(tiny_clip_run).eval()
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=normalize_pixels(pixels))
    features = F.normalize(getattr(features, "pooler_output", features), dim=-1)
    prior = PriorTransformer.from_pretrained(prior_run.out, subfolder="prior")
    # the cache stores fp16 embeddings: ~1e-3 relative
    torch.testing.assert_close(prior.clip_mean[0], features.mean(0), rtol=0, atol=2e-3)
    torch.testing.assert_close(prior.clip_std[0], features.std(0), rtol=2e-2, atol=2e-4)


def test_both_towers_are_frozen_and_untouched(prior_run, tiny_clip_run):
    optimized = {id(p) for group in prior_run.optimizer.param_groups for p in group["params"]}
    for tower, before in (
        (prior_run.text_encoder, prior_run.text_before),
        (prior_run.vision_model, prior_run.vision_before),
    ):
        assert not any(p.requires_grad for p in tower.parameters()) and not tower.training
        assert not optimized & {id(p) for p in tower.parameters()}
        _assert_same({k: v.cpu() for k, v in tower.state_dict().items()}, before)
    # nor are the standardisation statistics trained
    prior_stats = load_file(prior_run.out / "checkpoints" / f"checkpoint-{STEPS}" / "model.safetensors")
    saved = _prior_weights(prior_run.out)
    _assert_same(
        {k: prior_stats[k] for k in ("clip_mean", "clip_std")}, {k: saved[k] for k in ("clip_mean", "clip_std")}
    )
    # the pipeline carries the CLIP run's own text weights
    saved = CLIPTextModelWithProjection.from_pretrained(prior_run.out, subfolder="text_encoder").state_dict()
    _assert_same(saved, CLIPTextModelWithProjection.from_pretrained(tiny_clip_run).state_dict())


def test_ema_weights_trail_the_raw_weights(prior_run):
    checkpoint = prior_run.out / "checkpoints" / f"checkpoint-{STEPS}"
    raw = load_file(checkpoint / "model.safetensors")
    ema = _prior_weights(prior_run.out)
    init = prior_run.prior_init
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert _distance(ema, raw) < 0.5 * _distance({k: init[k] for k in raw}, raw)
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state["extra"]["stage"]["ema"]["optimization_step"] == STEPS


def test_caches_are_built_once_and_reused(prior_run, shapes_data, tiny_clip_run, tmp_path, monkeypatch):
    assert prior_run.encode_calls == 2  # 235 distinct captions in one batch of 256, then the empty prompt
    assert prior_run.vision_calls == 2  # 240 train images, then 36 test images, in one batch each
    cache_dir = prior_run.out / "cache"
    calls, encode_prompts = [], conditioning_module.encode_prompts
    monkeypatch.setattr(
        conditioning_module, "encode_prompts", lambda *a, **k: calls.append(1) or encode_prompts(*a, **k)
    )
    embed_calls, embed_images = [], conditioning_module.embed_images
    monkeypatch.setattr(
        conditioning_module, "embed_images", lambda *a, **k: embed_calls.append(1) or embed_images(*a, **k)
    )
    argv = _argv(tiny_clip_run, shapes_data, tmp_path / "second", "--cache-dir", str(cache_dir))
    main([*argv, "--max-train-steps", "1", "--checkpointing-steps", "0", "--validation-steps", "0", "--no-ema"])
    assert calls == [] and embed_calls == []
    assert sorted(p.name.split("-")[0] for p in cache_dir.iterdir()) == ["image", "image", "text"]


def test_caption_dropout_feeds_the_empty_prompt(prior_run):
    """With dropout, dropped samples get exactly the empty prompt's inputs (what the pipeline's unconditional branch
    encodes); the others keep their captions'."""
    text_encoder, tokenizer = prior_run.text_encoder, None
    cache = conditioning_module.TextEmbeddingCache.build_or_load(
        text_encoder,
        PriorPipeline.from_pretrained(prior_run.out).tokenizer,
        ["a red circle", "a blue square"],
        prior_run.out / "cache_dropout",
        progress=False,
    )
    del tokenizer
    data = PriorData(targets=torch.zeros(2, 32), text_cache=cache, caption_rows=torch.tensor([0, 1]))
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, noisy, timesteps, proj_embedding, encoder_hidden_states, attention_mask, return_dict):
            seen["proj"] = proj_embedding
            return (noisy * 0,)

    accelerator = SimpleNamespace(device=torch.device("cpu"))
    scheduler = DDPMScheduler(num_train_timesteps=10)
    batch = {"index": torch.tensor([0, 1] * 32)}
    stage = PriorStage(
        accelerator,
        Recorder(),
        scheduler,
        data,
        text_encoder=text_encoder,
        tokenizer=None,
        caption_dropout=0.5,
        ema=None,
        validation=None,
        clip_hash="x",
    )
    stage.loss(batch, torch.Generator().manual_seed(0))
    empty = data.empty(1, text_encoder, accelerator.device).proj_embedding[0]
    own = data.text(batch["index"], text_encoder, accelerator.device).proj_embedding
    dropped = torch.isclose(seen["proj"], empty.expand_as(own)).all(dim=1)
    kept = torch.isclose(seen["proj"], own).all(dim=1)
    assert (dropped | kept).all() and 16 <= dropped.sum() <= 48


KILL = [kill_at_step.PATH, "clipcond.train.prior", "PriorStage"]  # runs the stage, SIGKILLed after a step


def test_resume_after_sigkill_matches_uninterrupted_run(prior_run, shapes_data, tiny_clip_run, tmp_path):
    """Killed after step 3, resumed from checkpoint 2: the prior and its EMA equal the uninterrupted `prior_run`'s,
    whose validation at step 2 (EMA weights swapped in and out) must not have disturbed its training either."""
    killed, straight = tmp_path / "killed", prior_run.out
    env = {**os.environ, "CLIPCOND_KILL_AT_STEP": "3"}
    argv = _argv(tiny_clip_run, shapes_data, killed, *RESUME_ARGS, "--cache-dir", str(straight / "cache"))
    proc = subprocess.run([sys.executable, *KILL, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "prior").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-2"]

    main([*argv, "--resume-from-checkpoint", "latest"])
    record = json.loads((killed / "clipcond_run.json").read_text())
    assert record["summary"]["resumed_from"].endswith("checkpoint-2")
    _assert_same(_prior_weights(killed), _prior_weights(straight))
    for name in ("model.safetensors", "extra_state.safetensors"):
        expected = load_file(straight / "checkpoints" / f"checkpoint-{STEPS}" / name)
        _assert_same(load_file(killed / "checkpoints" / f"checkpoint-{STEPS}" / name), expected)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"--clip": "nowhere"}, FileNotFoundError, "`--clip` folder .*nowhere.* does not exist"),
        ({"--clip": "DATA"}, ValueError, "`--clip` .* is not a CLIP model folder .*it has no config.json"),
        ({"--caption-dropout": "1.5"}, ValueError, r"`--caption-dropout` must be in \[0, 1\), got 1.5"),
        ({"--ema-decay": "1"}, ValueError, r"`--ema-decay` must be in \(0, 1\), got 1.0"),
        ({"--validation-max-captions": "0"}, ValueError, "`--validation-max-captions` must be >= 1, got 0"),
        ({"--model": "huge"}, ValueError, "`model` must be one of"),
    ],
)
def test_bad_arguments_are_named(shapes_data, tiny_clip_run, tmp_path, change, error, match):
    values = {"--clip": str(tiny_clip_run), **change}
    if values["--clip"] == "nowhere":
        values["--clip"] = str(tmp_path / "nowhere")
    if values["--clip"] == "DATA":
        values["--clip"] = str(shapes_data)
    argv = [*FAST_ARGS, "--data", str(shapes_data), "--output-dir", str(tmp_path / "o")]
    for option, value in values.items():
        argv += [option, value]
    with pytest.raises(error, match=match):
        main(argv)


def test_user_errors_through_the_cli(shapes_data, tmp_path, capsys):
    from clipcond.cli import main as cli_main

    assert cli_main(["train", "prior", *_argv(tmp_path / "none", shapes_data, tmp_path / "o")]) == 2
    assert "clipcond train prior: error: `--clip` folder" in capsys.readouterr().err


def test_the_stage_fits_a_fixed_batch(prior_run):
    """The prior, its text inputs and its objective learn: on 8 captions with fixed target embeddings the loss under
    fixed noise and timesteps falls well below where a random prior starts, and the learnt prior's one-step
    prediction is closer to each caption's own target than to the others'."""
    from clipcond.models.prior import create_prior, prior_config

    captions = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]
    captions += ["a purple square", "an orange triangle", "a red square left of a blue circle", "a green circle"]
    cache = conditioning_module.TextEmbeddingCache.build_or_load(
        prior_run.text_encoder,
        PriorPipeline.from_pretrained(prior_run.out).tokenizer,
        captions,
        prior_run.out / "cache_fit",
        progress=False,
    )
    width = prior_run.text_encoder.config.projection_dim
    targets = torch.randn(8, width, generator=torch.Generator().manual_seed(1))  # standardised embeddings
    data = PriorData(targets=targets, text_cache=cache, caption_rows=torch.arange(8))
    torch.manual_seed(0)
    model = create_prior(
        prior_config("test", embedding_dim=width, num_embeddings=cache.embeddings.hidden_states.shape[1])
    )
    stage = PriorStage(
        SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m),
        model,
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        data,
        text_encoder=prior_run.text_encoder,
        tokenizer=None,
        caption_dropout=0.0,
        ema=None,
        validation=None,
        clip_hash="x",
    )
    batch = {"index": torch.arange(8)}

    text = data.text(batch["index"], prior_run.text_encoder, torch.device("cpu"))

    def fixed_loss() -> float:
        with torch.no_grad():
            return stage.loss(batch, torch.Generator().manual_seed(123))[0].item()

    @torch.no_grad()
    def cosine_to_targets() -> torch.Tensor:  # (8, 8): the one-step prediction from pure noise against every target
        noise = torch.randn(8, width, generator=torch.Generator().manual_seed(7))
        prediction = model(
            noise,
            torch.full((8,), 999),
            proj_embedding=text.proj_embedding,
            encoder_hidden_states=text.encoder_hidden_states,
            attention_mask=text.attention_mask,
        ).predicted_image_embedding
        return F.normalize(prediction, dim=-1) @ F.normalize(targets, dim=-1).T

    before, untrained = fixed_loss(), cosine_to_targets()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss, _ = stage.loss(batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = fixed_loss()
    assert after < 0.3 * before, (before, after)

    # from pure noise at the last timestep, the learnt prior names each caption's own target; a random one does not
    cosine = cosine_to_targets()
    assert untrained.diagonal().mean().abs() < 0.3, untrained
    assert (cosine.argmax(dim=1) == torch.arange(8)).sum() >= 7, cosine
    assert cosine.diagonal().mean() > 0.7, cosine
