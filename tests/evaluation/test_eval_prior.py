"""`clipcond eval prior`: known answers of the metrics (a predictor that returns the true embedding, the baselines by
hand), determinism of the sampled embeddings, the JSON keys, and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from clipcond.conditioning import ImageEmbeddingCache
from clipcond.data.folders import ImageCaptionDataset
from clipcond.evaluation.prior import (
    METRIC_KEYS,
    evaluate_prior,
    predict_image_embeddings,
    random_derangement,
)
from clipcond.evaluation.zero_shot import DEFAULT_TEMPLATES, build_zero_shot_classifier
from clipcond.models.clip import load_text_tower, load_vision_tower
from clipcond.models.prior import create_prior, embedding_statistics, prior_config, set_embedding_statistics
from clipcond.pipelines.prior import PriorPipeline, PriorPipelineOutput
from clipcond.text_encoding import encode_prompts


@pytest.fixture(scope="module")
def towers(tiny_clip_run):
    text_encoder, tokenizer = load_text_tower(tiny_clip_run)
    vision_model, mean, std = load_vision_tower(tiny_clip_run)
    return text_encoder, tokenizer, vision_model, mean, std


@pytest.fixture(scope="module")
def test_split(shapes_data, towers, tmp_path_factory):
    """The shapes test split (36 items, 18 single-object ones with labels) and its image-embedding cache."""
    *_, vision_model, mean, std = towers
    dataset = ImageCaptionDataset(shapes_data, split="test")
    cache = ImageEmbeddingCache.build_or_load(
        vision_model, dataset, tmp_path_factory.mktemp("cache"), image_mean=mean, image_std=std, progress=False
    )
    return dataset, cache


@pytest.fixture(scope="module")
def pipe(towers, test_split):
    text_encoder, tokenizer, *_ = towers
    torch.manual_seed(0)
    prior = create_prior(prior_config("test", embedding_dim=32, num_embeddings=32))
    set_embedding_statistics(prior, *embedding_statistics(F.normalize(test_split[1].embeddings.float(), dim=-1)))
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="trailing")
    pipe = PriorPipeline(prior=prior.eval(), scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Oracle:
    """A 'prior' that returns the true image embedding of each caption's item (captions are distinct here)."""

    def __init__(self, pipe, captions, true):
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.table = dict(zip(captions, true))

    def __call__(self, prompts, **kwargs):
        return PriorPipelineOutput(image_embeds=torch.stack([self.table[p] for p in prompts]))


def test_an_oracle_scores_one_and_the_baselines_are_what_they_say(pipe, test_split):
    dataset, cache = test_split
    assert len(set(dataset.captions)) == len(dataset)
    true = F.normalize(cache.embeddings.float(), dim=-1)  # (36, D)
    oracle = Oracle(pipe, dataset.captions, true)
    metrics = evaluate_prior(oracle, dataset, image_cache=cache, seed=3)
    assert tuple(metrics) == METRIC_KEYS
    assert metrics["cosine_predicted"] == pytest.approx(1.0, abs=1e-6)
    # the baselines by hand: the caption's text embedding, and the true embedding of another image
    text = F.normalize(encode_prompts(pipe.text_encoder, pipe.tokenizer, dataset.captions).pooled, dim=-1)
    assert metrics["cosine_text_baseline"] == pytest.approx((text * true).sum(-1).mean().item(), abs=1e-6)
    other = random_derangement(36, seed=3)
    assert metrics["cosine_random_baseline"] == pytest.approx((true[other] * true).sum(-1).mean().item(), abs=1e-6)
    # zero-shot of the predictions is that of the true images, on the 18 labelled items, 4 of them held out
    assert metrics["zero_shot_top1_predicted"] == metrics["zero_shot_top1_true_image"]
    assert metrics["zero_shot_top1_predicted_heldout"] == metrics["zero_shot_top1_true_image_heldout"]
    classnames = sorted({label for label in dataset.labels if label})
    classifier = build_zero_shot_classifier(
        lambda prompts: encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts).pooled,
        classnames,
        DEFAULT_TEMPLATES,
    )
    labelled = [i for i, label in enumerate(dataset.labels) if label]
    predicted = (true[labelled] @ classifier.T).argmax(-1)
    targets = torch.tensor([classnames.index(dataset.labels[i]) for i in labelled])
    assert metrics["zero_shot_top1_true_image"] == pytest.approx((predicted == targets).double().mean().item())
    assert metrics["num_captions"] == 36 and metrics["num_zero_shot_captions"] == 18 and metrics["num_classes"] == 18
    heldout = sum(bool(r["heldout"]) for r in dataset.records)
    assert 0 < heldout < 36 and metrics["cosine_predicted_heldout"] == pytest.approx(1.0, abs=1e-6)


def test_derangement_moves_every_item():
    for n in (2, 3, 10, 101):
        other = random_derangement(n, seed=n)
        assert sorted(other.tolist()) == list(range(n)) and (other != torch.arange(n)).all()
    assert torch.equal(random_derangement(10, seed=1), random_derangement(10, seed=1))
    with pytest.raises(ValueError, match="at least 2 items, got 1"):
        random_derangement(1)


def test_sampled_embeddings_do_not_depend_on_the_batch_size(pipe, test_split):
    captions = test_split[0].captions[:5]
    kwargs = {"num_inference_steps": 2, "seed": 4}
    a = predict_image_embeddings(pipe, captions, batch_size=5, **kwargs)
    b = predict_image_embeddings(pipe, captions, batch_size=2, **kwargs)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = predict_image_embeddings(pipe, captions, batch_size=5, num_inference_steps=2, seed=5)
    assert not torch.allclose(a, c)


def test_real_pipeline_with_the_vision_tower_and_a_cap(pipe, test_split, towers):
    """Without a cache the true embeddings come from the vision tower; `max_captions` takes the first items."""
    dataset, cache = test_split
    *_, vision_model, mean, std = towers
    kwargs = {"num_inference_steps": 2, "max_captions": 10}
    with_tower = evaluate_prior(pipe, dataset, vision_model=vision_model, image_mean=mean, image_std=std, **kwargs)
    with_cache = evaluate_prior(pipe, dataset, image_cache=cache, **kwargs)
    assert with_tower["num_captions"] == 10
    for key in METRIC_KEYS:
        if isinstance(with_cache[key], float):
            assert with_tower[key] == pytest.approx(with_cache[key], abs=1e-3), key
    with pytest.raises(ValueError, match="give `image_cache`, or `vision_model`"):
        evaluate_prior(pipe, dataset)
    with pytest.raises(ValueError, match="`max_captions` must be >= 1"):
        evaluate_prior(pipe, dataset, image_cache=cache, max_captions=0)


@pytest.fixture(scope="module")
def prior_run(shapes_data, tiny_clip_run, tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    from clipcond.train.prior import main

    out = tmp_path_factory.mktemp("eval_prior_run")
    main(
        [
            *("--clip", str(tiny_clip_run), "--data", str(shapes_data), "--output-dir", str(out)),
            *("--model", "test", "--train-batch-size", "8", "--max-train-steps", "2", "--lr-warmup-steps", "1"),
            *("--checkpointing-steps", "0", "--validation-steps", "0"),
        ]
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


def test_cli_prints_one_json_object(prior_run, shapes_data, tmp_path, capsys):
    from clipcond.cli import main as cli_main

    argv = ["eval", "prior", "--model", str(prior_run), "--data", str(shapes_data), "--no-progress"]
    argv += ["--num-inference-steps", "2", "--guidance-scale", "2", "--output-dir", str(tmp_path)]
    assert cli_main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert tuple(metrics) == (*METRIC_KEYS, "clip") and metrics["clip"]["mismatch"] is False
    assert metrics["num_captions"] == 36 and metrics["guidance_scale"] == 2.0 and metrics["num_inference_steps"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # the test images' embeddings were cached in the run folder, beside the training caches
    assert len(list((prior_run / "cache").glob("image-embeddings-*.safetensors"))) == 2


def test_cli_errors(prior_run, shapes_data, tiny_clip_run, tmp_path, capsys):
    from clipcond.cli import main as cli_main

    assert cli_main(["eval", "prior", "--model", str(tmp_path / "none"), "--data", str(shapes_data)]) == 2
    assert "clipcond eval prior: error: --model" in capsys.readouterr().err
    assert cli_main(["eval", "prior", "--model", str(tiny_clip_run), "--data", str(shapes_data)]) == 2
    assert "holds no model_index.json" in capsys.readouterr().err
    argv = ["eval", "prior", "--model", str(prior_run), "--data", str(shapes_data), "--num-inference-steps", "0"]
    assert cli_main(argv) == 2
    assert "`--num-inference-steps` must be >= 1, got 0" in capsys.readouterr().err


def test_another_clip_is_an_error_unless_allowed(prior_run, shapes_data, tiny_clip_run, tmp_path, capsys):
    """Cosines in another CLIP's embedding space are not the prior's: refused, or recorded when allowed."""
    import shutil

    from clipcond.cli import main as cli_main

    other = tmp_path / "other_clip"
    shutil.copytree(tiny_clip_run, other, ignore=shutil.ignore_patterns("checkpoints", "cache", "eval"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "note": "another CLIP"}))  # another content hash
    argv = ["eval", "prior", "--model", str(prior_run), "--data", str(shapes_data), "--clip", str(other)]
    argv += ["--no-progress", "--num-inference-steps", "1", "--max-captions", "4", "--output-dir", str(tmp_path)]
    assert cli_main(argv) == 2
    assert "is not the CLIP the prior was trained on" in capsys.readouterr().err
    assert cli_main([*argv, "--allow-clip-mismatch"]) == 0
    assert json.loads(capsys.readouterr().out)["clip"] == {"path": str(other), "mismatch": True}
