"""`clipcond train decoder` at test scale: the frozen encoder, the embedding cache, EMA, the run folder, resume after
SIGKILL, the objective's numbers, and errors."""

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import kill_at_step
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection
from without_clipcond import assert_ships_its_code, assert_stock_diffusers_draws_the_same

from clipcond import conditioning as conditioning_module
from clipcond.lineage import content_hash
from clipcond.models.vae import to_model_range
from clipcond.train import decoder, diffusion, loop
from clipcond.train.decoder import (
    DecoderStage,
    diffusion_loss,
    diffusion_target,
    main,
    min_snr_weights,
)
from clipcond.train.decoder_conditioning import UNetInputs
from clipcond.train.model_space import PixelSpace
from clipcond.train.text_decoder import TextConditioning

# The numpy-2 `__array__` copy DeprecationWarning of diffusers' DPM-Solver, which validation samples with.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

STEPS = 4  # checkpoints and validation every 2 steps
FAST_ARGS = [
    *("--model", "test", "--resolution", "16", "--train-batch-size", "4", "--lr-warmup-steps", "1", "--seed", "0"),
    *("--validation-inference-steps", "1", "--validation-images-per-prompt", "1"),
    *("--validation-prompts", "a red circle", "a blue square"),
]


RESUME_ARGS = ["--max-train-steps", str(STEPS), "--checkpointing-steps", "2", "--validation-steps", "2"]


def _argv(clip, data, out, *extra):
    return ["--clip", str(clip), "--data", str(data), "--output-dir", str(out), *FAST_ARGS, *extra]


def _reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for name in a:  # stated tolerance: bit-identical on one CPU process
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum((a[k].float() - b[k].float()).pow(2).sum().item() for k in a) ** 0.5


@pytest.fixture(scope="module")
def decoder_run(shapes_data, tiny_clip_run, tmp_path_factory):
    """One short training run through the CLI, with the objects it used captured: the text encoder, the initial UNet
    weights, the optimizer, and the number of text-encoder calls made by the cache. It is also the uninterrupted
    run of the resume test."""
    import clipcond.pipelines.text_to_image  # noqa: F401  (imported now, it keeps the unpatched encode_prompts)
    from clipcond.cli import main as cli_main

    out = tmp_path_factory.mktemp("decoder_run")
    seen = SimpleNamespace(encode_calls=0)
    load_text_tower, create_unet, make_optimizer = diffusion.load_text_tower, decoder.create_unet, loop.make_optimizer
    encode_prompts = conditioning_module.encode_prompts

    def capture_encoder(path):
        seen.text_encoder, tokenizer = load_text_tower(path)
        seen.encoder_before = {k: v.clone() for k, v in seen.text_encoder.state_dict().items()}
        return seen.text_encoder, tokenizer

    def capture_unet(config):
        unet = create_unet(config)
        seen.unet_init = {k: v.clone() for k, v in unet.state_dict().items()}
        return unet

    def capture_optimizer(params, args, accelerator):
        seen.optimizer = make_optimizer(params, args, accelerator)
        return seen.optimizer

    def count_encode(*args, **kwargs):
        seen.encode_calls += 1
        return encode_prompts(*args, **kwargs)

    argv = _argv(tiny_clip_run, shapes_data, out, *RESUME_ARGS, "--report-to", "tensorboard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusion, "load_text_tower", capture_encoder)
        mp.setattr(decoder, "create_unet", capture_unet)
        mp.setattr(loop, "make_optimizer", capture_optimizer)
        mp.setattr(conditioning_module, "encode_prompts", count_encode)
        assert cli_main(["train", "decoder", *argv]) == 0
    _reset_accelerate()
    seen.out = out
    return seen


# ----------------------------------------------------------------------------------------------- the run


def test_run_folder_is_a_pipeline_with_lineage(decoder_run, tiny_clip_run, shapes_data):
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    out = decoder_run.out
    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["kind"] == "clipcond-decoder"
    assert record["clip"] == {"path": str(tiny_clip_run), "content_hash": content_hash(tiny_clip_run)}
    assert record["summary"]["steps"] == STEPS
    assert record["data"]["num_samples"] == 240 and record["data"]["resolution"] == 16  # --resolution over 32 px
    assert record["unet"]["content_hash"] == content_hash(out / "unet")
    assert record["conditioning"]["cache_key"] in record["conditioning"]["cache"]

    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert unet.config.sample_size == 16 and unet.config.cross_attention_dim == 32  # the text encoder's width
    pipe = TextToImagePipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    # the default recipe: v-prediction on the cosine schedule
    assert (
        pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.num_train_timesteps == 1000
    )
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    images = pipe("a red circle", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 16, 16, 3)

    # every checkpoint is the same pipeline; the validation grid has a row per prompt, and went to tensorboard
    TextToImagePipeline.from_pretrained(out / "checkpoints" / f"checkpoint-{STEPS}" / "pretrained")
    assert_ships_its_code(out, "pipeline_text_to_image", "TextToImagePipeline", "text_to_image.py")
    pretrained = out / "checkpoints" / f"checkpoint-{STEPS}" / "pretrained"
    assert_ships_its_code(pretrained, "pipeline_text_to_image", "TextToImagePipeline", "text_to_image.py")
    from PIL import Image

    for step in (2, STEPS):
        with Image.open(out / "validation" / f"step-{step}.png") as grid:
            assert grid.size == (16, 2 * 16)
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_stock_diffusers_draws_the_runs_images_without_clipcond(decoder_run, tmp_path):
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    call = {"prompt": ["a red circle", "a blue square"], "num_inference_steps": 2, "output_type": "np", "seed": 0}
    assert_stock_diffusers_draws_the_same(decoder_run.out, TextToImagePipeline, tmp_path, **call)


def test_text_encoder_is_frozen(decoder_run, tiny_clip_run):
    encoder = decoder_run.text_encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.training
    optimized = {id(p) for group in decoder_run.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in encoder.parameters()}
    _assert_same(encoder.state_dict(), decoder_run.encoder_before)
    # and the saved pipeline carries the CLIP run's own text weights
    saved = CLIPTextModelWithProjection.from_pretrained(decoder_run.out, subfolder="text_encoder").state_dict()
    original = CLIPTextModelWithProjection.from_pretrained(tiny_clip_run).state_dict()
    _assert_same(saved, original)


def test_ema_weights_trail_the_raw_weights(decoder_run):
    checkpoint = decoder_run.out / "checkpoints" / f"checkpoint-{STEPS}"
    raw = load_file(checkpoint / "model.safetensors")  # the optimizer's weights (accelerate's save_state)
    ema = _unet_weights(decoder_run.out)  # what the pipeline was saved with
    init = decoder_run.unet_init
    assert raw.keys() == ema.keys() == init.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    # warm-up: the EMA started from the first step's weights and follows the raw weights closely
    assert _distance(ema, raw) < 0.5 * _distance(init, raw)
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state["extra"]["stage"]["ema"]["optimization_step"] == STEPS
    # the run record gives the decay bound and the decay of the last update: 1 - STEPS^(-2/3) with warm-up
    record = json.loads((decoder_run.out / "clipcond_run.json").read_text())["ema"]
    assert record["decay"] == 0.999 and record["optimization_step"] == STEPS
    assert record["last_decay"] == pytest.approx(1 - STEPS ** (-2 / 3), abs=1e-6)


def test_cache_is_built_once_and_reused(decoder_run, shapes_data, tiny_clip_run, tmp_path, monkeypatch):
    assert decoder_run.encode_calls == 2  # 235 distinct captions in one batch of 256, then the empty prompt
    cache_dir = decoder_run.out / "cache"
    calls, encode_prompts = [], conditioning_module.encode_prompts

    def count_encode(*args, **kwargs):
        calls.append(1)
        return encode_prompts(*args, **kwargs)

    monkeypatch.setattr(conditioning_module, "encode_prompts", count_encode)
    argv = _argv(tiny_clip_run, shapes_data, tmp_path / "second", "--cache-dir", str(cache_dir))
    main([*argv, "--max-train-steps", "1", "--checkpointing-steps", "0", "--validation-steps", "0", "--no-ema"])
    assert calls == []
    assert len(list(cache_dir.iterdir())) == 1


def test_no_ema_wider_cross_attention_epsilon(shapes_data, tiny_clip_run, tmp_path):
    """--no-ema saves the raw weights; --cross-attention-dim other than the encoder's width adds a projection; the
    epsilon, linear-schedule and no-min-SNR options train and are saved with the scheduler."""
    out = tmp_path / "run"
    argv = _argv(tiny_clip_run, shapes_data, out, "--max-train-steps", "2", "--checkpointing-steps", "2")
    argv += ["--validation-steps", "2", "--no-ema", "--cross-attention-dim", "48"]
    main([*argv, "--prediction-type", "epsilon", "--snr-gamma", "0", "--beta-schedule", "linear"])
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert unet.config.cross_attention_dim == 48 and unet.config.encoder_hid_dim == 32
    assert unet.encoder_hid_proj.weight.shape == (48, 32)
    raw = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    _assert_same(_unet_weights(out), raw)
    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["ema"] is None
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.beta_schedule == "linear"
    assert record["args"]["snr_gamma"] is None
    assert (out / "validation" / "step-2.png").is_file()  # the pipeline samples through the projection


KILL = [kill_at_step.PATH, "clipcond.train.decoder", "DecoderStage"]  # runs the stage, SIGKILLed after a step


def test_resume_after_sigkill_matches_uninterrupted_run(decoder_run, shapes_data, tiny_clip_run, tmp_path):
    """Killed after step 3, resumed from checkpoint 2: the same weights as the uninterrupted `decoder_run`, whose
    validation at step 2 (EMA weights swapped in and out) must not have disturbed its training either."""
    killed, straight = tmp_path / "killed", decoder_run.out
    env = {**os.environ, "CLIPCOND_KILL_AT_STEP": "3"}
    cmd = [sys.executable, *KILL, *_argv(tiny_clip_run, shapes_data, killed, *RESUME_ARGS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "unet").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-2"]

    main(_argv(tiny_clip_run, shapes_data, killed, *RESUME_ARGS, "--resume-from-checkpoint", "latest"))
    record = json.loads((killed / "clipcond_run.json").read_text())
    assert record["summary"]["resumed_from"].endswith("checkpoint-2")
    # the EMA weights (the saved UNet), and the raw weights and EMA state of the last checkpoint
    _assert_same(_unet_weights(killed), _unet_weights(straight))
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
        ({"--model": "huge"}, ValueError, "`model` must be one of"),
        (
            {"--conditioning": "image-embedding", "--pooled-text": ""},
            ValueError,
            "`--pooled-text` .* got 'image-embedding'",
        ),
        (
            {"--conditioning": "image-embedding", "--no-mask-text-padding": ""},
            ValueError,
            "`--no-mask-text-padding` .* needs `--conditioning text`, got 'image-embedding'",
        ),
        ({"--space-to-depth": "3"}, ValueError, "`--space-to-depth 3` must divide the image size 16"),
        ({"--space-to-depth": "0"}, ValueError, "`--space-to-depth` must be >= 1, got 0"),
        ({"--space-to-depth": "2", "--vae": "vae-folder"}, ValueError, "is for pixel space; with `--vae vae-folder`"),
        (
            {"--space-to-depth": "16"},
            ValueError,
            "`--space-to-depth 16` leaves the UNet 1 x 1 samples of `--resolution 16` images, but a `--model",
        ),
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
        argv += [option, value] if value else [option]  # "": a flag without a value
    with pytest.raises(error, match=match):
        main(argv)


def test_a_diffusers_folder_is_not_a_clip(decoder_run, shapes_data, tmp_path):
    with pytest.raises(ValueError, match="is not a CLIP model folder .*model_type None"):
        main(_argv(decoder_run.out / "unet", shapes_data, tmp_path / "o"))


def test_bad_prediction_type_through_the_cli(shapes_data, tiny_clip_run, tmp_path, capsys):
    from clipcond.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "decoder", *_argv(tiny_clip_run, shapes_data, tmp_path / "o", "--prediction-type", "x")])
    assert exit_info.value.code == 2
    assert "--prediction-type: invalid choice: 'x'" in capsys.readouterr().err
    assert cli_main(["train", "decoder", *_argv(tmp_path / "none", shapes_data, tmp_path / "o")]) == 2
    assert "clipcond train decoder: error: `--clip` folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the objective's numbers


def test_min_snr_weights_for_a_known_schedule():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")  # betas 1e-4 ... 2e-2
    t = torch.tensor([0, 999])
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)  # (1 - 1e-4) / 1e-4 = 9999 at t=0; about 4e-5 at t=999
    torch.testing.assert_close(snr[0], torch.tensor(9999.0), rtol=1e-3, atol=0)
    assert snr[1] < 1e-4
    eps_weights = min_snr_weights(scheduler, t, gamma=5.0)
    torch.testing.assert_close(eps_weights, torch.stack([5.0 / snr[0], torch.tensor(1.0)]), rtol=1e-4, atol=0)

    v_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction")
    v_weights = min_snr_weights(v_scheduler, t, gamma=5.0)
    torch.testing.assert_close(v_weights, torch.stack([5.0 / (snr[0] + 1), snr[1] / (snr[1] + 1)]), rtol=1e-4, atol=0)

    # the loss is the per-sample MSE times those weights, averaged
    prediction, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    loss = diffusion_loss(prediction, target, t, scheduler, snr_gamma=5.0)
    torch.testing.assert_close(loss, (eps_weights * torch.tensor([1.0, 4.0])).mean())
    assert diffusion_loss(prediction, target, t, scheduler) == pytest.approx(2.5)


def _stage(scheduler, model, conditioning):
    accelerator = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m)
    return DecoderStage(
        accelerator,
        model,
        scheduler,
        conditioning,
        space=PixelSpace(16),
        plugin=None,
        ema=None,
        snr_gamma=None,
        validation=None,
        clip_hash="abc",
    )


def test_the_stage_fits_a_fixed_batch(tiny_clip_run, shapes_data, tmp_path):
    """The UNet, conditioning and objective that training uses learn: on one batch of 8 images the loss under fixed
    noise and timesteps falls well below where a random UNet starts."""
    from clipcond.data.folders import ImageCaptionDataset, collate_image_text
    from clipcond.models.unet import create_unet, unet_config
    from clipcond.tokenizer import load_tokenizer

    text_encoder = CLIPTextModelWithProjection.from_pretrained(tiny_clip_run).eval()
    tokenizer = load_tokenizer(tiny_clip_run)
    dataset = ImageCaptionDataset(shapes_data, split="train", resolution=16)
    batch = collate_image_text([dataset[i] for i in range(8)])
    captions, rows = conditioning_module.unique_captions(batch["text"])
    cache = conditioning_module.TextEmbeddingCache.build_or_load(text_encoder, tokenizer, captions, tmp_path)
    batch["index"] = torch.arange(8)
    torch.manual_seed(0)
    unet = create_unet(unet_config("test", sample_size=16, cross_attention_dim=32))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    stage = _stage(scheduler, unet, TextConditioning(cache, rows, caption_dropout=0.0))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)

    def fixed_loss() -> float:  # the same noise and timesteps every time
        with torch.no_grad():
            return stage.loss(batch, torch.Generator().manual_seed(123))[0].item()

    before = fixed_loss()
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        loss, _ = stage.loss(batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = fixed_loss()
    assert after < 0.5 * before, (before, after)


def test_v_prediction_target_and_the_stage_loss():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction")
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 3, 8, 8, generator=generator), torch.randn(3, 3, 8, 8, generator=generator)
    t = torch.tensor([10, 500, 990])
    v = diffusion_target(scheduler, x0, noise, t)
    torch.testing.assert_close(v, scheduler.get_velocity(x0, noise, t))
    a = scheduler.alphas_cumprod[t].view(3, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)  # Salimans & Ho 2022, sec. 4

    # the stage regresses the UNet's output on that target: with a model that predicts 0, the loss is E[v^2]
    pixels = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    conditioning = lambda batch, gen, device: UNetInputs(torch.zeros(3, 4, 8), None)  # noqa: E731
    stage = _stage(scheduler, lambda sample, *a, **k: (torch.zeros_like(sample),), conditioning)
    loss, _ = stage.loss({"pixel_values": pixels}, torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)  # the stage draws the noise, then the timesteps
    sample = pixels.float() / 127.5 - 1
    noise = torch.randn(sample.shape, generator=replay)
    t = torch.randint(0, 1000, (3,), generator=replay)
    expected = scheduler.get_velocity(sample, noise, t).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_caption_dropout_swaps_in_the_empty_prompt():
    hidden = torch.arange(6 * 4 * 2, dtype=torch.float16).view(6, 4, 2)
    cache = conditioning_module.TextEmbeddingCache(
        captions=[str(i) for i in range(6)],
        embeddings=conditioning_module.TextEmbeddings(hidden, torch.ones(6, 4, dtype=torch.uint8), None),
        empty=conditioning_module.TextEmbeddings(
            torch.full((1, 4, 2), -1.0, dtype=torch.float16), torch.tensor([[1, 1, 0, 0]], dtype=torch.uint8), None
        ),
        key="k",
        path=Path("unused"),
    )
    rows = torch.tensor([5, 4, 3, 2, 1, 0])  # sample i has caption row 5 - i
    batch = {"index": torch.arange(6).repeat(50)}  # 300 samples
    kept = TextConditioning(cache, rows, caption_dropout=0.0)(batch, torch.Generator(), torch.device("cpu"))
    assert torch.equal(kept.encoder_hidden_states, hidden[rows[batch["index"]]].float())

    dropped = TextConditioning(cache, rows, caption_dropout=0.3)(
        batch, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    is_empty = (dropped.encoder_hidden_states == -1).all(dim=(1, 2))
    assert 0.2 < is_empty.float().mean() < 0.4
    assert (dropped.encoder_attention_mask[is_empty].sum(dim=1) == 2).all()
    assert torch.equal(dropped.encoder_hidden_states[~is_empty], kept.encoder_hidden_states[~is_empty])


def test_resume_refuses_another_clip():
    stage = _stage(DDPMScheduler(), None, None)
    with pytest.raises(ValueError, match="trained on the CLIP with content hash 0123456789ab"):
        stage.load_extra_state({"clip_content_hash": "0123456789abcdef"})


def test_images_to_model_range():
    pixels = torch.tensor([0, 255, 0, 255], dtype=torch.uint8).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    torch.testing.assert_close(to_model_range(pixels), pixels.float() / 127.5 - 1)
    assert to_model_range(pixels).min() == -1 and to_model_range(pixels).max() == 1
    with pytest.raises(ValueError, match="`pixels` must be uint8 in \\[0, 255\\], got torch.float32"):
        to_model_range(pixels.float())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_xformers_falls_back_to_sdpa_with_a_warning(caplog):
    from clipcond.models.attention import enable_xformers_if_possible
    from clipcond.models.unet import create_unet, unet_config

    unet = create_unet(unet_config("test", sample_size=16, cross_attention_dim=8))
    with caplog.at_level(logging.WARNING, logger="clipcond.models.attention"):
        assert enable_xformers_if_possible(unet) is False
    assert "needs CUDA" in caplog.text and "scaled_dot_product_attention" in caplog.text
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_step_budget_follows_the_conditioning(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help at the terminal width
    base = ["--clip", "CLIP", "--data", "DATA", "--output-dir", "OUT"]
    assert decoder.parse_args(base).max_train_steps == decoder.DEFAULT_STEPS["text"]
    image = decoder.parse_args([*base, "--conditioning", "image-embedding"])
    assert image.max_train_steps == decoder.DEFAULT_STEPS["image-embedding"] != decoder.DEFAULT_STEPS["text"]
    assert decoder.parse_args([*base, "--max-train-steps", "7"]).max_train_steps == 7
    with pytest.raises(SystemExit):
        decoder.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    text, image = decoder.DEFAULT_STEPS["text"], decoder.DEFAULT_STEPS["image-embedding"]
    assert f"{text} with --conditioning text, {image} with --conditioning image-embedding)" in help_text
    assert "(default: None)" not in help_text


def test_pooled_text_is_dropped_with_the_caption_and_normalised():
    hidden = torch.arange(6 * 4 * 2, dtype=torch.float16).view(6, 4, 2)
    pooled = torch.arange(1, 6 * 3 + 1, dtype=torch.float16).view(6, 3)
    cache = conditioning_module.TextEmbeddingCache(
        captions=[str(i) for i in range(6)],
        embeddings=conditioning_module.TextEmbeddings(hidden, torch.ones(6, 4, dtype=torch.uint8), pooled),
        empty=conditioning_module.TextEmbeddings(
            torch.full((1, 4, 2), -1.0, dtype=torch.float16),
            torch.tensor([[1, 1, 0, 0]], dtype=torch.uint8),
            torch.tensor([[0.0, 0.0, -2.0]], dtype=torch.float16),
        ),
        key="k",
        path=Path("unused"),
    )
    rows = torch.arange(6)
    batch = {"index": torch.arange(6).repeat(50)}
    off = TextConditioning(cache, rows, caption_dropout=0.3)(
        batch, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert off.class_labels is None
    on = TextConditioning(cache, rows, caption_dropout=0.3, pooled=True)(
        batch, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert torch.allclose(on.class_labels.norm(dim=-1), torch.ones(300))
    is_empty = (on.encoder_hidden_states == -1).all(dim=(1, 2))
    assert 0.2 < is_empty.float().mean() < 0.4
    assert torch.equal(on.class_labels[is_empty], torch.tensor([0.0, 0.0, -1.0]).expand(int(is_empty.sum()), 3))
    expected = torch.nn.functional.normalize(pooled.float()[batch["index"]], dim=-1)
    assert torch.allclose(on.class_labels[~is_empty], expected[~is_empty])


def test_pooled_text_decoder_trains_saves_and_samples(shapes_data, tiny_clip_run, tmp_path):
    """--pooled-text: the UNet gets a projection class embedding of the CLIP's embedding width, the run record says
    so, and the saved pipeline feeds the pooled embedding (the sample depends on it, not only on the tokens)."""
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    out = tmp_path / "run"
    argv = _argv(tiny_clip_run, shapes_data, out, "--max-train-steps", "2", "--checkpointing-steps", "0")
    main([*argv, "--validation-steps", "0", "--pooled-text"])
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    clip_config = json.loads((tiny_clip_run / "config.json").read_text())
    assert unet.config.class_embed_type == "projection"
    assert unet.config.projection_class_embeddings_input_dim == clip_config["projection_dim"]
    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["conditioning"]["pooled_text"] is True

    pipe = TextToImagePipeline.from_pretrained(out, local_files_only=True)
    torch.nn.init.normal_(pipe.unet.class_embedding.linear_1.weight, std=1.0)  # make the pooled input matter

    def sample():
        generator = torch.Generator().manual_seed(0)
        return pipe(["a red circle"], num_inference_steps=2, generator=generator, output_type="pt").images

    first = sample()
    pipe.unet.class_embedding.linear_1.weight.data.mul_(-1)
    assert not torch.allclose(first, sample())


def test_unmasked_text_padding_trains_on_every_position_and_is_saved(
    shapes_data, tiny_clip_run, tmp_path, monkeypatch
):
    """--no-mask-text-padding: the cache holds unmasked states under its own key, the UNet reads every position
    without a mask, and the saved pipeline samples that way (what `clipcond export stable-diffusion` needs)."""
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    masks = []
    unet_forward = UNet2DConditionModel.forward

    def record_mask(self, *args, encoder_attention_mask=None, **kwargs):
        masks.append(encoder_attention_mask)
        return unet_forward(self, *args, encoder_attention_mask=encoder_attention_mask, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", record_mask)
    out = tmp_path / "run"
    argv = _argv(tiny_clip_run, shapes_data, out, "--max-train-steps", "2", "--checkpointing-steps", "0")
    main([*argv, "--validation-steps", "0", "--no-mask-text-padding"])
    assert masks and all(mask is None for mask in masks)
    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["conditioning"]["mask_text_padding"] is False
    key = functools.partial(
        conditioning_module.TextEmbeddingCache.cache_key, *_text_tower(tiny_clip_run), _captions(shapes_data)
    )
    assert record["conditioning"]["cache_key"] == key(mask_padding=False) != key(mask_padding=True)
    pipe = TextToImagePipeline.from_pretrained(out, local_files_only=True)
    assert pipe.config.mask_text_padding is False
    masks.clear()
    pipe(["a red circle"], num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert masks and all(mask is None for mask in masks)


def test_space_to_depth_trains_on_pixel_blocks_and_samples_whole_images(shapes_data, tiny_clip_run, tmp_path):
    """--space-to-depth 2: the UNet denoises (12, 8, 8) blocks of the 16 px images, the run record and the saved
    pipeline say so, and the pipeline's images are its samples rearranged back to (3, 16, 16)."""
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    out = tmp_path / "run"
    argv = _argv(tiny_clip_run, shapes_data, out, "--max-train-steps", "2", "--checkpointing-steps", "0")
    main([*argv, "--validation-steps", "2", "--space-to-depth", "2"])
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (12, 12, 8)
    grid = Image.open(out / "validation" / "step-2.png")  # two prompts, an image each, at the data's 16 px
    assert grid.size == (16, 32)
    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["model_space"] == {"space": "pixels", "sample_size": 8, "space_to_depth": 2}

    pipe = TextToImagePipeline.from_pretrained(out, local_files_only=True)
    assert pipe.config.space_to_depth == 2 and pipe.default_size == (16, 16)

    def sample(output_type):
        generator = torch.Generator().manual_seed(0)
        return pipe(["a red circle"], num_inference_steps=2, generator=generator, output_type=output_type).images

    blocks, images = sample("latent"), sample("pt")
    assert blocks.shape == (1, 12, 8, 8) and images.shape == (1, 3, 16, 16)
    expected = (torch.nn.functional.pixel_shuffle(blocks.float(), 2) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected)


def test_resume_refuses_another_space_to_depth(shapes_data, tiny_clip_run, tmp_path):
    """A checkpoint of pixel blocks resumed without the flag fails on the flag, not on the weights' shapes; with it,
    the run resumes and finishes."""
    argv = _argv(tiny_clip_run, shapes_data, tmp_path / "run", "--checkpointing-steps", "1", "--validation-steps", "0")
    main([*argv, "--max-train-steps", "1", "--space-to-depth", "2"])
    _reset_accelerate()
    resume = [*argv, "--max-train-steps", "2", "--resume-from-checkpoint", "latest"]
    with pytest.raises(ValueError, match="trained with `--space-to-depth 2`, but this run has `--space-to-depth 1`"):
        main(resume)
    _reset_accelerate()
    main([*resume, "--space-to-depth", "2"])
    assert json.loads((tmp_path / "run" / "clipcond_run.json").read_text())["summary"]["steps"] == 2


def test_pixel_space_blocks_hold_the_same_pixels():
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    batch = {"pixel_values": pixels}
    whole = PixelSpace(8).sample(batch, None, torch.device("cpu"))
    blocks = PixelSpace(8, space_to_depth=2).sample(batch, None, torch.device("cpu"))
    assert blocks.shape == (2, 12, 4, 4)
    assert torch.equal(torch.nn.functional.pixel_shuffle(blocks, 2), whole)
    assert torch.equal(blocks[:, 0::4, 0, 0], whole[:, :, 0, 0])  # channel c * 4 + 0: colour c of a block's top left


def _text_tower(clip_run):
    return diffusion.load_text_tower(clip_run)


def _captions(data):
    from clipcond.conditioning import unique_captions
    from clipcond.data.folders import ImageCaptionDataset

    return unique_captions(ImageCaptionDataset(data, split="train").captions)[0]
