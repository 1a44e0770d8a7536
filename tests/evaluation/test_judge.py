"""The attribute judge: accuracy on clean and noisy renders, predict/score, the cache (keyed, atomic, no retraining)."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from clipcond.data.shapes import COLOURS, SHAPES
from clipcond.evaluation import judge as judge_module
from clipcond.evaluation.judge import (
    CONFIG_NAME,
    JUDGE_VERSION,
    OUTCOMES,
    WEIGHTS_NAME,
    AttributeJudge,
    AttributeNet,
    JudgeTrainingConfig,
    corrupt,
    default_cache_dir,
    judge_cache_path,
    load_or_train_judge,
    render_judge_set,
    render_single_objects,
)


def test_accuracy_on_clean_and_noisy_renders(judge):
    accuracy = judge.accuracy  # measured on held-out renders when it was trained
    assert accuracy["clean_both_accuracy"] >= 0.98
    assert accuracy["clean_colour_accuracy"] >= 0.99
    assert accuracy["noisy_colour_accuracy"] >= 0.97
    assert accuracy["noisy_both_accuracy"] >= 0.9
    # and on renders of yet another seed, measured here
    assert judge.evaluate_on_renders(360, seed=123)["both_accuracy"] >= 0.98


def test_predict_returns_indices_and_resizes_other_resolutions(judge):
    images, colour_idx, shape_idx = render_single_objects(36, 64, seed=7)  # 64 px: resized to the judge's input
    colour, shape, outcome = judge.predict(images)
    assert colour.dtype == shape.dtype == outcome.dtype == torch.long and colour.shape == shape.shape == (36,)
    assert (colour == colour_idx).double().mean() >= 0.95
    assert (shape == shape_idx).double().mean() >= 0.9
    assert (outcome == OUTCOMES.index("object")).double().mean() >= 0.95
    assert all(part.shape == (0,) for part in judge.predict(torch.zeros(0, 3, 32, 32, dtype=torch.uint8)))


def test_outcomes_of_renders_it_did_not_train_on(judge):
    images, outcome_idx, _, _ = render_judge_set(400, 32, seed=99)
    outcome = judge.predict(images)[2]
    for k, name in enumerate(OUTCOMES):
        mask = outcome_idx == k
        assert mask.sum() >= 40, name
        assert (outcome[mask] == k).double().mean() >= 0.85, name


def test_an_image_that_is_not_one_object_is_wrong_in_colour_and_shape(judge):
    images, outcome_idx, _, _ = render_judge_set(200, 32, seed=5)
    several = images[outcome_idx == OUTCOMES.index("several")][:20]  # scored as if each prompt were "a red circle"
    blank = images[outcome_idx == OUTCOMES.index("blank")][:20]
    for batch, expected in ((several, "several"), (blank, "blank")):
        scores = judge.score(batch, ["red"] * len(batch), ["circle"] * len(batch))
        assert scores.outcome.count(expected) >= 0.85 * len(batch)
        not_object = torch.tensor([o != "object" for o in scores.outcome])
        assert not scores.colour_correct[not_object].any() and not scores.shape_correct[not_object].any()
        assert [label for label, o in zip(scores.labels, scores.outcome) if o != "object"] == [
            o for o in scores.outcome if o != "object"
        ]
        shares = scores.outcome_shares()
        assert set(shares) == set(OUTCOMES) and abs(sum(shares.values()) - 1) < 1e-9
        assert shares[expected] == scores.outcome.count(expected) / len(batch)
    assert (
        judge.score(blank, ["red"] * len(blank), ["circle"] * len(blank)).outcome_shares(
            torch.zeros(len(blank), dtype=torch.bool)
        )
        is None
    )


def test_score_by_names_and_indices(judge):
    images, colour_idx, shape_idx = render_single_objects(18, 32, seed=3)  # every pair once
    names = [list(COLOURS)[i] for i in colour_idx]
    by_name = judge.score(images, names, [SHAPES[i] for i in shape_idx])
    by_index = judge.score(images, colour_idx.tolist(), shape_idx.tolist())
    assert torch.equal(by_name.both_correct, by_index.both_correct)
    assert by_name.accuracy()["both_accuracy"] >= 17 / 18
    assert sum(a == b for a, b in zip(by_name.colour, names)) >= 17
    # wrong on purpose: every image scored against the next colour
    shifted = [list(COLOURS)[(i + 1) % len(COLOURS)] for i in colour_idx]
    wrong = judge.score(images, shifted, [SHAPES[i] for i in shape_idx]).accuracy()
    assert wrong["colour_accuracy"] <= 1 / 18 and wrong["both_accuracy"] <= 1 / 18


@pytest.mark.parametrize(
    "images, colours, match",
    [
        (torch.zeros(2, 3, 32, 32), ["red", "red"], "uint8"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), ["red", "red"], "3 channels"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["red"], "one each"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["red", "pink"], "'pink' is not one"),
    ],
)
def test_score_rejects_bad_input(judge, images, colours, match):
    with pytest.raises(ValueError, match=match):
        judge.score(images, colours, ["circle"] * len(colours))


def test_cache_round_trip_does_not_retrain(judge, judge_cache, judge_config, monkeypatch):
    folder = judge_cache_path(32, config=judge_config, cache_dir=judge_cache)
    assert judge.path == folder
    info = json.loads((folder / CONFIG_NAME).read_text())
    assert info["version"] == JUDGE_VERSION and info["resolution"] == 32 and info["seed"] == 0
    assert list(info["colours"]) == list(COLOURS) and info["shapes"] == list(SHAPES)
    assert info["training"]["num_renders"] == judge_config.num_renders
    assert set(load_file(folder / WEIGHTS_NAME)) == set(judge.model.state_dict())
    assert [p.name for p in judge_cache.iterdir() if p.name.startswith(".")] == []  # no temporary folder left

    def no_training(*args, **kwargs):
        raise AssertionError("a cached judge was trained again")

    monkeypatch.setattr(judge_module, "train_judge", no_training)
    start = time.perf_counter()
    again = load_or_train_judge(32, cache_dir=judge_cache, config=judge_config)
    assert time.perf_counter() - start < 5
    assert not again.trained and again.accuracy == judge.accuracy
    images, _, _ = render_single_objects(24, 32, seed=11)
    for a, b in zip(judge.predict(images), again.predict(images)):
        assert torch.equal(a, b)


def test_cache_key_covers_what_changes_the_weights(tmp_path, judge_config):
    base = judge_cache_path(32, cache_dir=tmp_path)
    assert base.parent == tmp_path
    assert len({base, judge_cache_path(64, cache_dir=tmp_path), judge_cache_path(32, seed=1, cache_dir=tmp_path)}) == 3
    assert judge_cache_path(32, config=judge_config, cache_dir=tmp_path) != base
    assert judge_cache_path(32, cache_dir=tmp_path) == base


def test_default_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "clipcond" / "judge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "clipcond" / "judge"


def test_unreadable_cache_is_replaced(tmp_path, monkeypatch):
    """A cache folder with a broken weight file is trained anew (here with a stand-in for the training)."""
    config = JudgeTrainingConfig(num_renders=18, epochs=1, num_eval_renders=18)
    folder = judge_cache_path(32, config=config, cache_dir=tmp_path)
    folder.mkdir(parents=True)
    (folder / CONFIG_NAME).write_text(json.dumps(judge_module._identity(32, 0, config)))
    (folder / WEIGHTS_NAME).write_bytes(b"not safetensors")

    def quick_train(resolution, *, seed, config, device):
        judge = AttributeJudge(AttributeNet(len(COLOURS), len(SHAPES), config.width), resolution)
        judge.info = {**judge_module._identity(resolution, seed, config), "accuracy": {}}
        judge.trained = True
        return judge

    monkeypatch.setattr(judge_module, "train_judge", quick_train)
    fresh = load_or_train_judge(32, cache_dir=tmp_path, config=config)
    assert fresh.trained and fresh.path == folder
    assert not load_or_train_judge(32, cache_dir=tmp_path, config=config).trained


def test_corruptions_are_seeded_and_in_range():
    images, _, _ = render_single_objects(8, 32, seed=0)
    a = corrupt(images, torch.Generator().manual_seed(5))
    b = corrupt(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and a.dtype == torch.float32
    clean = corrupt(images, torch.Generator(), noise=(0, 0), blur=(0, 0), colour_jitter=0, background_tint=0)
    assert torch.allclose(clean * 255, images.float())
    noisy = corrupt(images, torch.Generator().manual_seed(0), noise=(0.1, 0.1), blur=(0, 0), colour_jitter=0)
    assert 0.07 < float((noisy - clean).std()) < 0.13


def test_resolution_is_checked():
    with pytest.raises(ValueError, match="resolution=8"):
        judge_module.train_judge(8)
