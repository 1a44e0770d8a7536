"""`clipcond train clip` end to end at test scale: the run folder, resume after SIGKILL, errors."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import kill_at_step
import pytest
import torch
from conftest import TINY_CLIP_ARGS
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from clipcond.data.augment import CROP_DRAWS, ImageAugment
from clipcond.data.counterfactual import KINDS as PAIR_KINDS
from clipcond.data.hard_negatives import KINDS as HARD_NEGATIVE_KINDS
from clipcond.lineage import content_hash
from clipcond.models.clip import load_clip, text_features
from clipcond.train.clip import main, parse_args

# a run that only has to start and take a few optimizer steps
THREE_STEPS = ["--max-train-steps", "3", "--validation-steps", "0", "--checkpointing-steps", "0"]


def _run(data, out, *extra):
    return main(["--data", str(data), "--output-dir", str(out), *TINY_CLIP_ARGS, *extra])


def test_run_folder_loads_in_transformers(tiny_clip_run):
    record = json.loads((tiny_clip_run / "clipcond_run.json").read_text())
    assert record["summary"]["steps"] == 4
    assert record["content_hash"] == content_hash(tiny_clip_run)
    full = CLIPModel.from_pretrained(tiny_clip_run)
    text = CLIPTextModelWithProjection.from_pretrained(tiny_clip_run)
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_run)
    tokens = tokenizer(["a red circle"], padding="max_length", max_length=32, return_tensors="pt")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref_text = full.text_projection(full.text_model(**tokens).pooler_output)
        ref_image = full.visual_projection(full.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(text(**tokens).text_embeds, ref_text)
        torch.testing.assert_close(vision(pixel_values=pixels).image_embeds, ref_image)
    assert (tiny_clip_run / "model.safetensors").is_file() and not list(tiny_clip_run.glob("*.bin"))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_dropping_trailing_padding_keeps_the_text_embeddings(tiny_clip_run, attention):
    """Training runs the text tower on each batch's longest caption, not the whole context, and without the padding
    mask (the causal mask alone): both must be exact."""
    run = load_clip(tiny_clip_run)
    run.model.set_attn_implementation(attention)
    captions = ["a red circle", "an image showing a big blue square to the left of a little green triangle"]
    tokens = run.tokenize(captions)  # padded to the context, 32
    length = int(tokens["attention_mask"].sum(dim=1).max())
    assert length < run.context_length
    with torch.no_grad():
        full = text_features(run.model, **tokens)
        trimmed = text_features(run.model, **{k: v[:, :length] for k, v in tokens.items()})
        unmasked = text_features(run.model, input_ids=tokens["input_ids"][:, :length], attention_mask=None)
    torch.testing.assert_close(trimmed, full)
    torch.testing.assert_close(unmasked, full)


def test_contrastive_model_fits_a_fixed_batch(tiny_clip_run):
    """The model + loss that training uses can drive the loss on one batch far below chance (ln 16)."""
    from clipcond.data.folders import ImageCaptionDataset, collate_image_text
    from clipcond.loss import ClipLoss
    from clipcond.models.clip_pixels import normalize_pixels
    from clipcond.train.clip import ContrastiveModel

    torch.manual_seed(0)
    run = load_clip(tiny_clip_run)
    model = ContrastiveModel(run.model.train(), with_bias=False)
    dataset = ImageCaptionDataset(json.loads((tiny_clip_run / "clipcond_run.json").read_text())["data"]["path"])
    batch = collate_image_text([dataset[i] for i in range(16)])
    tokens = run.tokenize(batch["text"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn, losses = ClipLoss(), []
    for _ in range(120):
        image, text, scale, _ = model(pixel_values=normalize_pixels(batch["pixel_values"]), **tokens)
        loss = loss_fn(image, text, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses[::10]


def test_training_writes_checkpoints_and_validates(shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    _run(
        shapes_data,
        out,
        "--max-train-steps",
        "12",
        "--learning-rate",
        "2e-3",
        "--checkpointing-steps",
        "6",
        "--validation-steps",
        "12",
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 12
    assert 0.0 <= summary["zero_shot_top1"] <= 1.0  # the last validation lands in the summary
    checkpoint = out / "checkpoints" / "checkpoint-12"
    assert (checkpoint / "training_state.json").is_file()
    CLIPModel.from_pretrained(checkpoint / "pretrained")  # every checkpoint is a usable model


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize(
    "recipe",
    [
        [],
        [
            *("--hard-negatives", "swap-attributes,swap-relations,swap-count"),
            *("--counterfactual-pairs", "swap-colours,swap-relations"),
        ],
    ],
    ids=["plain", "hard_negatives_and_twins"],
)
def test_resume_after_sigkill_matches_uninterrupted_run(shapes_data, tmp_path, recipe):
    """Also with hard negatives and twins: the negatives' pick draws from the stage's generator, which the checkpoint
    keeps."""
    common = ["--max-train-steps", "8", "--checkpointing-steps", "2", "--validation-steps", "0", *recipe]
    _run(shapes_data, tmp_path / "straight", *common)

    killed = tmp_path / "killed"
    env = {**os.environ, "CLIPCOND_KILL_AT_STEP": "5", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [
        sys.executable,
        kill_at_step.PATH,
        "clipcond.train.clip",
        "ClipStage",
        "--data",
        str(shapes_data),
        "--output-dir",
        str(killed),
        *TINY_CLIP_ARGS,
        *common,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "model.safetensors").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    _run(shapes_data, killed, *common, "--resume-from-checkpoint", "latest")
    record = json.loads((killed / "clipcond_run.json").read_text())
    assert record["summary"]["resumed_from"].endswith("checkpoint-4")
    straight, resumed = _weights(tmp_path / "straight"), _weights(killed)
    assert straight.keys() == resumed.keys()
    for name in straight:  # stated tolerance: bit-identical on one CPU process
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_captions_tokenised_per_batch_train_the_same_weights_as_tokens_made_up_front(
    shapes_data, tmp_path, monkeypatch
):
    """The loader tokenises each batch's captions (`CaptionTokens`); until it did, training tokenised every caption
    of the data set before the first step and a batch gathered its rows by index. Both give the same tokens for a
    caption (each is padded on its own to the context), so a short run trains bit-identical weights."""
    from clipcond.data.folders import ImageCaptionDataset, collate_image_text
    from clipcond.train import clip as train_clip

    common = THREE_STEPS
    made = []

    class Recording(train_clip.CaptionTokens):
        def __call__(self, samples):
            batch = super().__call__(samples)
            made.append(batch["input_ids"])
            return batch

    monkeypatch.setattr(train_clip, "CaptionTokens", Recording)
    _run(shapes_data, tmp_path / "per_batch", *common)
    assert len(made) >= 3 and all(ids.shape == (16, 32) for ids in made[:3])

    captions = ImageCaptionDataset(shapes_data, split="train").captions  # as the run reads it

    class UpFront(train_clip.CaptionTokens):
        """The earlier way: the token table of every caption, made once; a batch's rows gathered by index."""

        def __init__(self, tokenizer, context_length, *makers):
            super().__init__(tokenizer, context_length, *makers)
            self.table = self.tokens(captions)

        def __call__(self, samples):
            batch = collate_image_text(samples)
            batch.update({name: rows[batch["index"]] for name, rows in self.table.items()})
            return batch

    monkeypatch.setattr(train_clip, "CaptionTokens", UpFront)
    _run(shapes_data, tmp_path / "up_front", *common)
    per_batch, up_front = _weights(tmp_path / "per_batch"), _weights(tmp_path / "up_front")
    assert per_batch.keys() == up_front.keys()
    for name in per_batch:
        torch.testing.assert_close(per_batch[name], up_front[name], rtol=0, atol=0, msg=name)


def test_resume_falls_back_past_a_damaged_checkpoint(shapes_data, tmp_path, caplog):
    common = ["--max-train-steps", "6", "--checkpointing-steps", "2", "--validation-steps", "0"]
    _run(shapes_data, tmp_path / "straight", *common)
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "straight", damaged)
    (damaged / "clipcond_run.json").unlink()
    weights = damaged / "checkpoints" / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    with caplog.at_level("WARNING"):
        _run(shapes_data, damaged, *common, "--resume-from-checkpoint", "latest")
    assert "skipping the damaged checkpoint" in caplog.text and "model.safetensors is 1000 bytes" in caplog.text
    record = json.loads((damaged / "clipcond_run.json").read_text())
    assert record["summary"]["resumed_from"].endswith("checkpoint-4")
    straight, resumed = _weights(tmp_path / "straight"), _weights(damaged)
    for name in straight:  # steps 5 and 6 taken again from checkpoint-4: the same weights
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_a_run_killed_in_its_final_export_is_unfinished_until_resumed(shapes_data, tmp_path, monkeypatch, capsys):
    from clipcond.cli import main as cli
    from clipcond.train.clip import ClipStage

    out = tmp_path / "run"
    common = ["--max-train-steps", "4", "--checkpointing-steps", "4", "--validation-steps", "4"]
    export = ClipStage.export

    def killed_in_final_export(self, path):
        if path.name.startswith(".export."):  # the final export's scratch folder
            self.tokenizer.save_pretrained(path)
            raise KeyboardInterrupt("killed")
        export(self, path)

    monkeypatch.setattr(ClipStage, "export", killed_in_final_export)
    with pytest.raises(KeyboardInterrupt):
        _run(shapes_data, out, *common)
    monkeypatch.undo()
    assert not (out / "clipcond_run.json").exists() and not (out / "config.json").exists()
    with pytest.raises(ValueError, match="is an unfinished training run"):
        load_clip(out)
    assert cli(["eval", "clip", "--model", str(out), "--data", str(shapes_data), "--output-dir", str(tmp_path)]) == 2
    assert "unfinished training run" in capsys.readouterr().err

    _run(shapes_data, out, *common, "--resume-from-checkpoint", "latest")
    summary = json.loads((out / "clipcond_run.json").read_text())["summary"]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "training_state.json").read_text())["state"]
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 4
    assert summary["final_loss"] == round(state["last_loss"], 5) and summary["final_loss"] > 0
    assert summary["zero_shot_top1"] == state["validation"]["zero_shot_top1"]  # the figures of the run's last step
    load_clip(out)


def test_grayscale_views_are_what_the_towers_see(shapes_data, tmp_path):
    """`--grayscale-prob 1` trains exactly as plain training on a grayscale copy of the data, and 0.5 lies between."""
    import shutil

    from PIL import Image

    gray_data = tmp_path / "gray_data"
    shutil.copytree(shapes_data, gray_data)
    for png in (gray_data / "train").glob("*.png"):
        Image.open(png).convert("L").convert("RGB").save(png)
    # a learning rate of its own: the thresholds below are in weight units, which scale with it
    common = [*THREE_STEPS, "--learning-rate", "1e-3"]
    _run(shapes_data, tmp_path / "always", *common, "--grayscale-prob", "1")
    _run(gray_data, tmp_path / "copy", *common, "--grayscale-prob", "0")
    _run(shapes_data, tmp_path / "colour", *common, "--grayscale-prob", "0")
    _run(shapes_data, tmp_path / "half", *common, "--grayscale-prob", "0.5")
    always, copy, colour, half = (_weights(tmp_path / n) for n in ("always", "copy", "colour", "half"))
    name = "vision_model.embeddings.patch_embedding.weight"
    # PIL's fixed-point luminance can differ from ours by one level on a few pixels: close, not bit-identical
    torch.testing.assert_close(always[name], copy[name], rtol=0, atol=1e-4)
    assert (always[name] - colour[name]).abs().max() > 1e-3
    assert not torch.equal(half[name], colour[name]) and not torch.equal(half[name], always[name])


def test_crops_and_flips_change_what_the_towers_see(shapes_data, tmp_path):
    """`--random-crop-scale` and `--hflip-prob` train on other pixels than plain training."""
    common = THREE_STEPS
    _run(shapes_data, tmp_path / "plain", *common)
    _run(shapes_data, tmp_path / "crops", *common, "--random-crop-scale", "0.5", "--hflip-prob", "0.5")
    plain, crops = (_weights(tmp_path / n) for n in ("plain", "crops"))
    name = "vision_model.embeddings.patch_embedding.weight"
    assert (crops[name] - plain[name]).abs().max() > 1e-4
    record = json.loads((tmp_path / "crops" / "clipcond_run.json").read_text())
    assert (record["args"]["random_crop_scale"], record["args"]["hflip_prob"]) == (0.5, 0.5)


@pytest.mark.parametrize(
    "augment, draws",
    [
        (ImageAugment(), []),
        (ImageAugment(grayscale_prob=0.3), [()]),
        (ImageAugment(grayscale_prob=0.3, hflip_prob=0.5), [(), (CROP_DRAWS,)]),
        (ImageAugment(crop_scale=0.5), [(CROP_DRAWS,)]),
    ],
)
def test_augmentation_draws_only_what_is_on(augment, draws):
    """Each augmentation takes its uniforms from the stage's generator only when on, grayscale first: a run without
    crops draws what it drew before they existed, so its seeds and resumes are unchanged."""
    from types import SimpleNamespace

    from clipcond.train.clip import ClipStage

    pixels = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    used, expected = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ClipStage.augmented(SimpleNamespace(augment=augment), pixels, used)
    for shape in draws:
        torch.rand(6, *shape, generator=expected)
    assert torch.equal(used.get_state(), expected.get_state())


def _record_twin_steps(monkeypatch, batch_key: str, from_loss) -> tuple[list, list]:
    """Lists that fill, at each training step, with the stage's `batch[batch_key]` and with `from_loss(loss_fn,
    image_features, options)` of the ClipLoss call it makes."""
    from clipcond import loss as loss_module
    from clipcond.train import clip as train_clip

    from_batches, from_losses = [], []
    stage_loss, forward = train_clip.ClipStage.loss, loss_module.ClipLoss.forward

    def recording_stage(self, batch, generator):
        from_batches.append(batch[batch_key])
        return stage_loss(self, batch, generator)

    def recording_loss(self, image, text, scale, **options):
        from_losses.append(from_loss(self, image, options))
        return forward(self, image, text, scale, **options)

    monkeypatch.setattr(train_clip.ClipStage, "loss", recording_stage)
    monkeypatch.setattr(loss_module.ClipLoss, "forward", recording_loss)
    return from_batches, from_losses


def test_the_pair_term_weighs_each_twin_with_its_original(shapes_data, tmp_path, monkeypatch):
    """`--counterfactual-weight W`: the loss gets the weight and, each step, the rows of every twin and its original
    (the twins come after the batch's B rows, in the order of `twin_source`)."""
    sources, calls = _record_twin_steps(
        monkeypatch, "twin_source", lambda loss, image, options: (loss.pair_weight, image.shape[0], options["pairs"])
    )
    _run(
        shapes_data,
        tmp_path / "run",
        *THREE_STEPS,
        "--counterfactual-pairs",
        "swap-colours",
        "--counterfactual-weight",
        "2",
    )
    assert len(calls) == 3 and sum(len(source) for source in sources) > 0
    for source, (weight, rows, pairs) in zip(sources, calls, strict=True):
        assert weight == 2.0 and rows == 16 + len(source)
        assert pairs.tolist() == [[row, 16 + k] for k, row in enumerate(source.tolist())]
    record = json.loads((tmp_path / "run" / "clipcond_run.json").read_text())
    assert record["args"]["counterfactual_weight"] == record["counterfactual_pairs"]["weight"] == 2.0


def test_kind_weights_weigh_each_twin_by_its_kind(shapes_data, tmp_path, monkeypatch):
    """`--counterfactual-kind-weights swap-relations=16`: relation twins' pairs at 16, the colour twins' at
    `--counterfactual-weight`; the record names both."""
    kinds, weights = _record_twin_steps(
        monkeypatch, "twin_kind", lambda loss, image, options: options["pair_weights"].cpu()
    )
    twins = ["--counterfactual-pairs", "swap-relations,swap-colours", "--counterfactual-weight", "2"]
    _run(shapes_data, tmp_path / "run", *THREE_STEPS, *twins, "--counterfactual-kind-weights", "swap-relations=16")
    kinds, weights = torch.cat(kinds), torch.cat(weights)
    assert set(kinds.tolist()) == {0, 1}  # both kinds met, in the order of --counterfactual-pairs (not of KINDS)
    assert weights.tolist() == [16.0 if kind == 0 else 2.0 for kind in kinds.tolist()]
    record = json.loads((tmp_path / "run" / "clipcond_run.json").read_text())
    assert record["counterfactual_pairs"]["weight"] == 2.0
    assert record["counterfactual_pairs"]["kind_weights"] == {"swap-relations": 16.0}


def test_twins_are_shown_in_colour_with_their_originals_crop():
    """The originals are shown as without twins; a twin is cropped and flipped as its original, but never shown in
    grayscale (its colours are what it is there for), and draws nothing of its own."""
    from clipcond.train.clip import ClipStage

    pixels = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    twins = (pixels[[1, 4, 4]].flip(1), torch.tensor([1, 4, 4]))  # channels reversed: other colours, same layout
    stage = SimpleNamespace(augment=ImageAugment(grayscale_prob=1.0, crop_scale=0.5, hflip_prob=0.5))
    used, expected = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    out = ClipStage.augmented(stage, pixels, used, twins)
    torch.rand(6, generator=expected), torch.rand(6, CROP_DRAWS, generator=expected)
    assert torch.equal(used.get_state(), expected.get_state())  # the draws of a batch of 6
    assert out.shape == (9, 3, 8, 8)
    in_colour = [bool((image[0] != image[1]).any() or (image[1] != image[2]).any()) for image in out]
    assert in_colour == [False] * 6 + [True] * 3
    assert torch.equal(out[:6], ClipStage.augmented(stage, pixels, torch.Generator().manual_seed(1)))
    # a crop moves pixels alike in every channel: the twins' crops are their originals' (row 4 has two twins)
    colour = SimpleNamespace(augment=ImageAugment(crop_scale=0.5, hflip_prob=0.5))
    generator = torch.Generator().manual_seed(1)
    torch.rand(6, generator=generator)  # the grayscale draws, first
    cropped = ClipStage.augmented(colour, pixels, generator)
    assert torch.equal(out[6], cropped[1].flip(0)) and torch.equal(out[7], cropped[4].flip(0))
    assert torch.equal(out[8], out[7]) and not torch.equal(cropped[1], pixels[1])


def test_twins_train_and_are_recorded(shapes_data, tmp_path, monkeypatch):
    """The towers see the B pairs and the twins of the two-object scenes; the run record names the kinds and the
    share of captions with a twin."""
    from clipcond.data.hard_negatives import swap_relations
    from clipcond.train import clip as train_clip

    seen, relation_twins = [], []
    loss = train_clip.ClipStage.loss

    def recording(self, batch, generator):
        out = loss(self, batch, generator)
        seen.append((out[1]["train/counterfactual_pairs"], batch["twin_source"].shape[0]))
        sources = [batch["text"][row] for row in batch["twin_source"].tolist()]
        relation_twins.extend(t in swap_relations(s)[:1] for t, s in zip(batch["twin_text"], sources, strict=True))
        return out

    monkeypatch.setattr(train_clip.ClipStage, "loss", recording)
    _run(shapes_data, tmp_path / "twins", *THREE_STEPS, "--counterfactual-pairs", ",".join(PAIR_KINDS))
    assert len(seen) == 3 and sum(count for _, count in seen) > 0
    assert all(share == count / 16 for share, count in seen)
    assert 0 < sum(relation_twins) < len(relation_twins)  # relation twins beside the others
    record = json.loads((tmp_path / "twins" / "clipcond_run.json").read_text())
    assert record["args"]["counterfactual_pairs"] == list(PAIR_KINDS)
    section = record["counterfactual_pairs"]
    assert section["kinds"] == list(PAIR_KINDS) and 0 < section["share"] < 1
    assert all(0 < section["share_by_kind"][kind] <= section["share"] for kind in PAIR_KINDS)
    monkeypatch.undo()
    _run(shapes_data, tmp_path / "plain", *THREE_STEPS)
    plain = json.loads((tmp_path / "plain" / "clipcond_run.json").read_text())
    assert "counterfactual_pairs" not in plain and plain["args"]["counterfactual_pairs"] == []
    name = "vision_model.embeddings.patch_embedding.weight"
    assert (_weights(tmp_path / "plain")[name] - _weights(tmp_path / "twins")[name]).abs().max() > 1e-5


def test_data_without_twins_fails_before_a_tokenizer_is_trained(shapes_data, tmp_path, monkeypatch):
    """The twin maker is built from the data alone, before the tokenizer and the model: its error comes first."""
    from clipcond.train import clip as train_clip

    def refuse(*args):
        raise ValueError("this data set has no metadata rows")

    trained = []
    monkeypatch.setattr(train_clip, "CounterfactualPairs", refuse)
    monkeypatch.setattr(train_clip, "train_clip_tokenizer", lambda *args: trained.append(args))
    with pytest.raises(ValueError, match="no metadata rows"):
        _run(shapes_data, tmp_path / "run", *THREE_STEPS, "--counterfactual-pairs", "swap-colours")
    assert trained == []


def test_a_twins_caption_is_never_a_hard_negative(shapes_data):
    """Hard negatives are columns of every image, the twins' too: a candidate equal to a twin's caption, or to another
    caption true of the twin (a relation twin's: the original's noun phrases exchanged), would ask the twin to score
    a caption of itself below itself. Such candidates are dropped, the others kept."""
    from clipcond.data.counterfactual import CounterfactualPairs
    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.data.hard_negatives import HardNegatives
    from clipcond.tokenizer import train_tokenizer
    from clipcond.train.clip import CaptionTokens

    data = ImageCaptionDataset(shapes_data, split="train", resolution=32)
    samples = [data[i] for i in range(64)]
    negatives = HardNegatives(["swap-attributes", "swap-relations", "swap-count"], data.records)
    twins = CounterfactualPairs(list(PAIR_KINDS), data.records, {**data.info, "held_out": []})
    tokenizer = train_tokenizer(data.captions, vocab_size=300, context_length=32)
    batch = CaptionTokens(tokenizer, 32, negatives, twins)(samples)

    def candidates_of(found, b: int) -> list[str]:
        groups = range(int(found.num_groups[b]))
        spans = [(int(found.group_start[b, g]), int(found.group_size[b, g])) for g in groups]
        return [caption for start, size in spans for caption in found.captions[start : start + size]]

    alone = negatives.candidates(samples)
    made = twins.twins(samples)
    true_of_twins = [[c, *others] for c, others in zip(made["twin_text"], made["twin_paraphrases"], strict=True)]
    assert made["twin_text"] == batch["twin_text"] and any(len(true) == 2 for true in true_of_twins)
    dropped = {"own captions": 0, "paraphrases": 0}
    for row, true in zip(batch["twin_source"].tolist(), true_of_twins, strict=True):
        assert not set(true) & set(candidates_of(batch["negatives"], row))
        dropped["own captions"] += true[0] in candidates_of(alone, row)
        dropped["paraphrases"] += len(set(true[1:]) & set(candidates_of(alone, row)))
        kept = [c for c in candidates_of(alone, row) if c not in sum(true_of_twins, [])]
        assert set(kept) <= set(candidates_of(batch["negatives"], row))  # the count swap, the other exchange
    assert dropped["own captions"] > 0 and dropped["paraphrases"] > 0, dropped


def test_twins_need_the_shapes_data(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (10 * i, 100, 200)).save(data / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": "a red circle left of a blue square"} for i in range(4)]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        ValueError, match=r"`--counterfactual-pairs` swap-colours .* but `--data` '.*data' holds no shapes"
    ):
        _run(data, tmp_path / "run", *THREE_STEPS, "--counterfactual-pairs", "swap-colours")
    assert not (tmp_path / "run").exists()  # refused with the arguments, before anything was made


def test_unreadable_images_are_skipped_and_counted(shapes_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    for name in ("00003.png", "00010.png"):
        (data / "train" / name).write_bytes(b"not a png")
    _run(data, tmp_path / "run", "--max-train-steps", "15", "--validation-steps", "0", "--checkpointing-steps", "0")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped_files"] == 2  # 15 steps x 16 > 240 images: every file was read
    # 2 of 240 is 0.8%: over a limit of 0.5% the run stops at the end of its first epoch, naming the files
    with pytest.raises(ValueError, match=r"2 of the 240 training images could not be read \(0.8%\).*00003.png"):
        _run(
            data,
            tmp_path / "strict",
            "--max-train-steps",
            "30",
            "--validation-steps",
            "0",
            "--checkpointing-steps",
            "0",
            "--max-skipped-fraction",
            "0.005",
        )


def test_siglip_loss_trains_and_saves(shapes_data, tmp_path, capsys):
    _run(
        shapes_data,
        tmp_path / "run",
        "--loss",
        "siglip",
        "--max-train-steps",
        "2",
        "--validation-steps",
        "0",
        "--checkpointing-steps",
        "0",
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["logit_bias"] is not None
    run = load_clip(tmp_path / "run")
    assert run.encode_text(["a red circle"]).shape == (1, 32)


def test_hard_negatives_train_and_are_recorded(shapes_data, tmp_path, monkeypatch):
    """The text tower sees the B captions and one negative for each caption that has one (every shapes caption has
    a count swap); the run record names the kinds and the share of captions with a negative."""
    from clipcond.train import clip as train_clip

    seen = []
    loss = train_clip.ClipStage.loss

    def recording(self, batch, generator):
        out = loss(self, batch, generator)
        seen.append(out[1]["train/hard_negatives"])
        return out

    monkeypatch.setattr(train_clip.ClipStage, "loss", recording)
    kinds = "swap-attributes,swap-relations,swap-count"
    # without grayscale views the two runs differ in the negatives alone (their draws feed nothing else)
    common = [*THREE_STEPS, "--grayscale-prob", "0"]
    _run(shapes_data, tmp_path / "negatives", *common, "--hard-negatives", kinds)
    assert seen == [1.0, 1.0, 1.0]
    record = json.loads((tmp_path / "negatives" / "clipcond_run.json").read_text())
    assert record["args"]["hard_negatives"] == kinds.split(",")
    section = record["hard_negatives"]
    assert section["kinds"] == kinds.split(",") and section["share"] == 1.0
    assert 0 < section["share_by_kind"]["swap-relations"] < 1  # the relation scenes only
    monkeypatch.undo()
    _run(shapes_data, tmp_path / "plain", *common)
    plain = json.loads((tmp_path / "plain" / "clipcond_run.json").read_text())
    assert "hard_negatives" not in plain and plain["args"]["hard_negatives"] == []
    assert not torch.equal(
        _weights(tmp_path / "plain")["logit_scale"], _weights(tmp_path / "negatives")["logit_scale"]
    )


def test_hard_negatives_warn_when_few_captions_have_one(tmp_path, caplog):
    """On captions without two objects a binding swap finds nothing: the run trains as the plain recipe, says so once
    and records the share."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(32):
        Image.new("RGB", (32, 32), (10 * i, 100, 200)).save(data / f"{i}.png")
        rows.append(
            {"file_name": f"{i}.png", "text": f"a photo number {i}" if i else "a red circle above a blue square"}
        )
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--max-train-steps", "1", "--validation-steps", "0", "--checkpointing-steps", "0"]
    with caplog.at_level("WARNING"):
        _run(data, tmp_path / "run", *common, "--hard-negatives", "swap-attributes")
    warnings = [r.getMessage() for r in caplog.records if "--hard-negatives" in r.getMessage()]
    assert len(warnings) == 1 and "3.1% of the 32 training captions" in warnings[0]
    record = json.loads((tmp_path / "run" / "clipcond_run.json").read_text())
    assert record["hard_negatives"]["share"] == pytest.approx(1 / 32, abs=1e-4)


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["--model", "huge"], ValueError, "`model` must be one of"),
        (["--train-batch-size", "0"], ValueError, "`--train-batch-size` must be >= 1, got 0"),
        (["--grayscale-prob", "1.5"], ValueError, r"`--grayscale-prob` must be in \[0, 1\], got 1.5"),
        (["--random-crop-scale", "0"], ValueError, r"`--random-crop-scale` must be in \(0, 1\], got 0.0"),
        (["--hflip-prob", "-0.5"], ValueError, r"`--hflip-prob` must be in \[0, 1\], got -0.5"),
        (["--patch-size", "5"], ValueError, r"`image_size` \(32\) must be a multiple of `patch_size` \(5\)"),
        (
            ["--hard-negatives", "swap-attributes,swap-colours"],
            ValueError,
            r"`--hard-negatives` 'swap-attributes,swap-colours' names an unknown kind 'swap-colours'; choose from",
        ),
        (
            ["--hard-negatives", "swap-count", "--loss", "siglip"],
            ValueError,
            r"`--hard-negatives` 'swap-count' needs `--loss clip`.*got `--loss siglip`",
        ),
        (
            ["--counterfactual-pairs", "swap-colours", "--loss", "siglip"],
            ValueError,
            r"`--counterfactual-pairs` 'swap-colours' needs `--loss clip`, got `--loss siglip`",
        ),
        (
            ["--counterfactual-pairs", "swap-colours,swap-sizes"],
            ValueError,
            r"`--counterfactual-pairs` 'swap-colours,swap-sizes' names an unknown kind 'swap-sizes'; choose from swap-",
        ),
        (
            ["--counterfactual-weight", "2"],
            ValueError,
            r"`--counterfactual-weight` 2.0 weighs the twins of `--counterfactual-pairs`, which is 'none'",
        ),
        (
            ["--counterfactual-pairs", "swap-colours", "--counterfactual-weight", "-1"],
            ValueError,
            r"`--counterfactual-weight` must be >= 0, got -1.0",
        ),
        (
            ["--counterfactual-pairs", "swap-colours", "--counterfactual-kind-weights", "swap-relations=4"],
            ValueError,
            r"`--counterfactual-kind-weights` 'swap-relations=4' names 'swap-relations', which `--counterfactual-pairs` "
            r"swap-colours does not make; add it there",
        ),
        (
            ["--counterfactual-kind-weights", "swap-colours=4"],
            ValueError,
            r"`--counterfactual-kind-weights` 'swap-colours=4' weighs twins, but `--counterfactual-pairs` is 'none'",
        ),
        (
            ["--counterfactual-pairs", "swap-colours", "--counterfactual-kind-weights", "swap-colours=inf"],
            ValueError,
            r"the weight of swap-colours must be a finite number, got 'inf'",
        ),
    ],
)
def test_bad_arguments_are_named(shapes_data, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        main(["--data", str(shapes_data), "--output-dir", str(tmp_path / "o"), *TINY_CLIP_ARGS, *extra])


def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o"), *TINY_CLIP_ARGS])


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--resume-from-checkpoint", "--mixed-precision", "--gradient-accumulation-steps", "--loss"):
        assert option in text
    flat = " ".join(text.split()).replace("- ", "-")  # argparse may wrap a line after a hyphen
    assert "--hard-negatives KINDS" in flat and all(kind in flat for kind in HARD_NEGATIVE_KINDS)
    pairs_help = flat[flat.rindex("--counterfactual-pairs KINDS") :][:900]  # "swap-relations" is a negative kind too
    assert all(kind in pairs_help for kind in PAIR_KINDS)


def test_bf16_on_cpu_trains_with_eager_attention_and_saves_the_default(tmp_path):
    """On CPU in bf16 both towers train with eager attention (the fused kernel's bf16 backward is slow there): the
    same function as SDPA, and not written into the saved config; `--attn-implementation` overrides the choice."""
    from clipcond.models.clip import clip_config
    from clipcond.train.clip import configure_clip_for_training

    config = clip_config("test", vocab_size=64, bos_token_id=1, eos_token_id=0, pad_token_id=3)
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    input_ids = torch.tensor([[1, 5, 6, 0, 3, 3], [1, 8, 9, 10, 11, 0]])  # start, words, end, right padding
    size = config.vision_config.image_size
    inputs = {"input_ids": input_ids, "attention_mask": input_ids != 3, "pixel_values": torch.randn(2, 3, size, size)}
    options = SimpleNamespace(gradient_checkpointing=False)

    def attention():
        return {clip.text_model.config._attn_implementation, clip.vision_model.config._attn_implementation}

    configure_clip_for_training(clip, options, torch.device("cpu"), "no")
    assert attention() == {"sdpa"}
    with torch.no_grad():
        reference = clip(**inputs)
    configure_clip_for_training(clip, options, torch.device("cpu"), "bf16")
    assert attention() == {"eager"}
    with torch.no_grad():
        eager = clip(**inputs)
    torch.testing.assert_close(eager.text_embeds, reference.text_embeds)
    torch.testing.assert_close(eager.image_embeds, reference.image_embeds)
    clip.save_pretrained(tmp_path)
    assert CLIPModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    configure_clip_for_training(
        clip, SimpleNamespace(gradient_checkpointing=False, attn_implementation="sdpa"), torch.device("cpu"), "bf16"
    )
    assert attention() == {"sdpa"}  # --attn-implementation wins over the CPU choice
    if not importlib.util.find_spec("flash_attn"):
        with pytest.raises(ValueError, match="`--attn-implementation flash_attention_2` cannot run here"):
            flash = SimpleNamespace(gradient_checkpointing=False, attn_implementation="flash_attention_2")
            configure_clip_for_training(clip, flash, torch.device("cpu"), "bf16")


def test_attention_kernel_and_compile_options(shapes_data, tmp_path, monkeypatch, capsys):
    """`--sdpa-backend` restricts the training step's fused attention to one kernel (and fails where it cannot run),
    `--torch-compile [MODE]` compiles in that mode."""
    from clipcond.train import loop

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(kw))
    argv = ["--data", str(shapes_data), *TINY_CLIP_ARGS, "--max-train-steps", "1", "--validation-steps", "0"]
    argv += ["--checkpointing-steps", "0", "--attn-implementation", "sdpa"]
    assert main([*argv, "--output-dir", str(tmp_path / "math"), "--sdpa-backend", "math", "--torch-compile"]) == 0
    assert compiled == [{"mode": "default"}]
    assert (
        parse_args([*argv, "--output-dir", "x", "--torch-compile", "reduce-overhead"]).torch_compile
        == "reduce-overhead"
    )
    assert parse_args([*argv, "--output-dir", "x"]).torch_compile is None
    with pytest.raises(RuntimeError, match="No viable backend"):  # the step ran under the one kernel asked for
        main([*argv, "--output-dir", str(tmp_path / "cudnn"), "--sdpa-backend", "cudnn"])  # a CUDA kernel
    with loop.attention_kernel(SimpleNamespace(sdpa_backend="cudnn")), pytest.raises(RuntimeError, match="kernel"):
        q = torch.randn(1, 1, 4, 8)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # no cuDNN attention on a CPU
