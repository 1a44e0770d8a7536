"""`clipcond train decoder --text-encoder SPEC` with each adapter: a few steps on tiny seeded encoders, a run folder
that loads back as a pipeline, lineage recorded and checked, the learned projection for another width."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from without_clipcond import assert_stock_diffusers_draws_the_same

from clipcond.encoders import check_lineage, load_encoder, load_text_to_image, recorded_lineage
from clipcond.encoders.tiny import save_tiny_open_clip, save_tiny_t5, save_tiny_transformers_clip

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

FAST_ARGS = [
    *("--model", "test", "--train-batch-size", "4", "--lr-warmup-steps", "1", "--seed", "0"),
    *("--max-train-steps", "2", "--checkpointing-steps", "0", "--validation-steps", "0"),
]


def _reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def specs(tmp_path_factory, tiny_clip_run, shapes_data):
    from clipcond.data.folders import ImageCaptionDataset

    root = tmp_path_factory.mktemp("encoders")
    captions = ImageCaptionDataset(shapes_data, split="train").captions  # the tiny tokenizers learn their words
    return {
        "clipcond": f"clipcond:{tiny_clip_run}",
        "transformers": save_tiny_transformers_clip(root / "sd", texts=captions),
        "open_clip": save_tiny_open_clip(root / "open_clip"),
        "t5": save_tiny_t5(root / "t5", texts=captions),
    }


def _train(spec, data, out, *extra, module="decoder"):
    from clipcond.train import decoder, prior

    main = {"decoder": decoder.main, "prior": prior.main}[module]
    fast = [*FAST_ARGS, "--resolution", "16"] if module == "decoder" else FAST_ARGS
    try:
        assert main(["--text-encoder", spec, "--data", str(data), "--output-dir", str(out), *fast, *extra]) == 0
    finally:
        _reset_accelerate()
    return json.loads((out / "clipcond_run.json").read_text())


class DecoderRuns:
    """Each adapter's decoder run folder, trained when a test first asks for it: no test depends on another having
    trained it (pytest-xdist may run a module's tests in different processes)."""

    def __init__(self, specs: dict, data, tmp_path_factory):
        self.specs, self.data, self.factory, self.folders = specs, data, tmp_path_factory, {}

    def __getitem__(self, kind: str):
        if kind not in self.folders:
            out = self.factory.mktemp(f"decoder_{kind}")
            _train(self.specs[kind], self.data, out)
            self.folders[kind] = out
        return self.folders[kind]

    def record(self, kind: str) -> dict:
        return json.loads((self[kind] / "clipcond_run.json").read_text())


@pytest.fixture(scope="module")
def decoder_runs(specs, shapes_data, tmp_path_factory):
    return DecoderRuns(specs, shapes_data, tmp_path_factory)


@pytest.mark.parametrize("kind", ["clipcond", "transformers", "open_clip", "t5"])
def test_decoder_trains_on_each_adapter(kind, specs, decoder_runs, tmp_path):
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    out, record = decoder_runs[kind], decoder_runs.record(kind)
    encoder = load_encoder(specs[kind])
    assert record["encoder"] == encoder.lineage() and record["encoder"]["kind"] == kind
    assert record["clip"]["content_hash"] == encoder.content_hash
    assert record["summary"]["steps"] == 2 and record["compatibility"]["projections"] == {}

    # the run folder is a complete pipeline, with the encoder it was trained on
    pipe = TextToImagePipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == encoder.text_width and pipe.unet.config.encoder_hid_dim is None
    saved = pipe.text_encoder(**pipe.tokenizer(["a red circle"], padding="max_length", return_tensors="pt"))
    expected = encoder.encode_text(["a red circle"]).hidden_states
    torch.testing.assert_close(saved.last_hidden_state, expected)
    images = pipe(
        ["a red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
    )
    assert images.images.shape == (1, 3, 16, 16)
    assert recorded_lineage(out) == encoder.lineage()
    # stock diffusers without clipcond draws the same, the encoder's code shipped when it is clipcond's (open_clip)
    call = {"prompt": ["a red circle"], "num_inference_steps": 2, "output_type": "np", "seed": 0}
    assert_stock_diffusers_draws_the_same(out, TextToImagePipeline, tmp_path, **call)


def test_cache_is_keyed_by_encoder(specs, decoder_runs):
    """Each encoder's caption embeddings live in a cache file of their own."""
    keys = {decoder_runs.record(kind)["conditioning"]["cache_key"] for kind in specs}
    assert len(keys) == len(specs)


def test_lineage_refusal_and_override(specs, decoder_runs, caplog):
    run = decoder_runs["transformers"]
    same = load_encoder(specs["transformers"])
    check_lineage(run, same)  # the encoder it was trained on
    other = load_encoder(specs["clipcond"])
    with pytest.raises(ValueError, match="was trained on the transformers encoder .*allow_encoder_mismatch=True"):
        load_text_to_image(run, other)
    # allowed explicitly, the widths still have to fit: the clipcond CLIP is 32 wide, the UNet reads 48
    with pytest.raises(ValueError, match=r"gives 32, but the model reads 48"):
        load_text_to_image(run, other, allow_encoder_mismatch=True)
    # a same-width encoder with other weights: refused, then loaded with a warning when asked
    retrained_folder = specs["transformers"].removeprefix("transformers:") + "-seed1"
    retrained = save_tiny_transformers_clip(retrained_folder, seed=1)
    with pytest.raises(ValueError, match="was trained on"):
        load_text_to_image(run, retrained)
    pipe = load_text_to_image(run, retrained, allow_encoder_mismatch=True)
    assert "allowed by allow_encoder_mismatch" in caplog.text
    assert pipe.text_encoder is not None and pipe.unet.config.cross_attention_dim == 48


def test_generate_with_another_encoder(specs, decoder_runs, tmp_path):
    """`clipcond generate --text-encoder SPEC` checks lineage before it loads the run beside another encoder."""
    from clipcond.generate import main

    run = decoder_runs["transformers"]
    base = ["--model", str(run), "--prompt", "a red circle", "--num-images", "1", "--num-inference-steps", "1"]
    with pytest.raises(ValueError, match="--allow-encoder-mismatch"):
        main([*base, "--text-encoder", specs["clipcond"], "--output-dir", str(tmp_path / "refused")])
    assert main([*base, "--text-encoder", specs["transformers"], "--output-dir", str(tmp_path / "same")]) == 0
    assert (tmp_path / "same" / "00000.png").is_file()


def test_projection_when_widths_differ(specs, shapes_data, tmp_path):
    """A new UNet narrower than the encoder learns a projection (encoder_hid_dim); the record names it."""
    from diffusers import UNet2DConditionModel

    from clipcond.encoders import check_compatibility

    out = tmp_path / "run"
    record = _train(specs["t5"], shapes_data, out, "--cross-attention-dim", "32")
    assert record["compatibility"]["projections"] == {"token-state width (UNet cross_attention_dim)": [40, 32]}
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert (unet.config.encoder_hid_dim, unet.config.cross_attention_dim) == (40, 32)
    check_compatibility(load_encoder(specs["t5"]), unet=unet)  # it reads the T5's 40-wide states
    with pytest.raises(ValueError, match=r"gives 48, but the model reads 40"):
        check_compatibility(load_encoder(specs["transformers"]), unet=unet)


@pytest.mark.parametrize("kind, context", [("transformers", 32), ("open_clip", 24)])
def test_prior_trains_on_each_clip(kind, context, specs, shapes_data, tmp_path):
    from clipcond.pipelines.prior import PriorPipeline

    out = tmp_path / "prior"
    args = ("--validation-split", "none", "--train-batch-size", "8")
    record = _train(specs[kind], shapes_data, out, *args, module="prior")
    assert record["encoder"] == load_encoder(specs[kind]).lineage()
    pipe = PriorPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.prior.config.embedding_dim == 32 and pipe.prior.config.num_embeddings == context
    embeds = pipe(["a red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).image_embeds
    assert embeds.shape == (1, 32) and torch.isfinite(embeds).all()


def test_prior_refuses_a_text_only_encoder(specs, shapes_data, tmp_path):
    with pytest.raises(ValueError, match="has no image encoder; the DALL-E 2 path needs a CLIP"):
        _train(specs["t5"], shapes_data, tmp_path / "prior", "--validation-split", "none", module="prior")


def test_image_embedding_decoder_on_open_clip(specs, shapes_data, tmp_path):
    from clipcond.pipelines.variation import ImageVariationPipeline

    out = tmp_path / "unclip"
    record = _train(specs["open_clip"], shapes_data, out, "--conditioning", "image-embedding")
    assert record["encoder"]["kind"] == "open_clip"
    pipe = ImageVariationPipeline.from_pretrained(out, local_files_only=True)
    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    images = pipe(image=pixels, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert images.images.shape == (1, 3, 16, 16)
