import math

import pytest
import torch

from clipcond.evaluation.zero_shot import (
    DEFAULT_TEMPLATES,
    build_zero_shot_classifier,
    check_templates,
    confusion_matrix,
    load_templates,
    zero_shot_metrics,
    zero_shot_predict,
)


def test_known_answer_four_images_three_classes_one_wrong():
    classifier = torch.eye(3)  # class c is the unit vector e_c
    # Image 3 (true class 1) looks like class 0; the image features are not normalised on purpose.
    images = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 3.0], [0.9, 0.3, 0.0]])
    targets = torch.tensor([0, 1, 2, 1])

    predictions = zero_shot_predict(images, classifier)
    assert predictions.tolist() == [0, 1, 2, 0]

    metrics = zero_shot_metrics(predictions, targets, 3, groups={"seen": [0, 1], "heldout": [2]})
    assert metrics["top1"] == pytest.approx(3 / 4)
    assert metrics["balanced"] == pytest.approx((1 + 1 / 2 + 1) / 3)  # per-class recall 1, 1/2, 1
    assert metrics["top1_seen"] == pytest.approx(2 / 3)  # images 0, 1, 3
    assert metrics["top1_heldout"] == pytest.approx(1.0)  # image 2

    assert confusion_matrix(predictions, targets, 3).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_balanced_accuracy_skips_classes_without_images_and_empty_groups_are_none():
    predictions = torch.tensor([0, 0, 0, 1])
    targets = torch.tensor([0, 0, 0, 0])  # classes 1 and 2 have no image: their recall is undefined
    metrics = zero_shot_metrics(predictions, targets, 3, groups={"heldout": [2], "none": []})
    assert metrics["top1"] == pytest.approx(3 / 4)
    assert metrics["balanced"] == pytest.approx(3 / 4)
    assert metrics["top1_heldout"] is None
    assert metrics["top1_none"] is None


def test_metrics_reject_bad_indices():
    with pytest.raises(ValueError, match="outside"):
        zero_shot_metrics(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="entries"):
        zero_shot_metrics(torch.tensor([0, 1]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="group 'g'"):
        zero_shot_metrics(torch.tensor([0]), torch.tensor([0]), 3, groups={"g": [5]})
    with pytest.raises(ValueError, match="at least one image"):
        zero_shot_metrics(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)


def test_prompt_ensembling_averages_normalised_embeddings():
    vectors = {
        "a x.": [2.0, 0.0, 0.0],  # norms differ on purpose: each prompt counts once, whatever its norm
        "b x.": [0.0, 3.0, 0.0],
        "a y.": [0.0, 0.0, 1.0],
        "b y.": [0.0, 1.0, 1.0],
    }
    calls = []

    def encode_text(texts):
        calls.append(list(texts))
        return torch.tensor([vectors[t] for t in texts])

    classifier = build_zero_shot_classifier(encode_text, ["x", "y"], ["a {}.", "b {}."])
    assert calls == [["a x.", "b x.", "a y.", "b y."]]  # one call, class-major
    s = 1 / math.sqrt(2)
    x = torch.tensor([0.5, 0.5, 0.0])  # mean of (1, 0, 0) and (0, 1, 0)
    y = torch.tensor([0.0, s / 2, (1 + s) / 2])  # mean of (0, 0, 1) and (0, s, s)
    expected = torch.stack([x / x.norm(), y / y.norm()])
    torch.testing.assert_close(classifier, expected)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("bad", ["a photo of a cat", "{} and {}", "a {0}."])
def test_templates_need_exactly_one_placeholder(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("{", r"\{").replace("}", r"\}")):
        check_templates(["a {}.", bad])
    with pytest.raises(ValueError, match="exactly one"):
        build_zero_shot_classifier(lambda t: torch.ones(len(t), 2), ["x"], [bad])


def test_templates_other_errors_and_defaults(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        check_templates([])
    with pytest.raises(ValueError, match="single string"):
        check_templates("a {}.")
    assert check_templates(DEFAULT_TEMPLATES) == list(DEFAULT_TEMPLATES)
    with pytest.raises(ValueError, match="at least one class"):
        build_zero_shot_classifier(lambda t: torch.ones(len(t), 2), [], ["a {}."])


def test_load_templates(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a {}.\n\n  a photo of a {}.  \n", encoding="utf-8")
    assert load_templates(path) == ["a {}.", "a photo of a {}."]
    path.write_text("a {}.\nno placeholder\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no placeholder"):
        load_templates(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no template"):
        load_templates(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_templates(tmp_path / "missing.txt")
