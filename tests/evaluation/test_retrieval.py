import pytest
import torch

from clipcond.evaluation.retrieval import caption_ids, normalize_caption, retrieval_hits, retrieval_recall


def test_known_answer_distinct_captions_is_asymmetric():
    images = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # image 1 is closer to text 0 (0.8) than to its own text 1 (0.6); text 1 is still closest to image 1.
    metrics = retrieval_recall(images, texts, ["a red circle", "a blue square"], ks=(1, 2))
    assert metrics == {
        "image_to_text_R@1": 0.5,
        "image_to_text_R@2": 1.0,
        "text_to_image_R@1": 1.0,
        "text_to_image_R@2": 1.0,
    }


def test_hits_say_which_queries_are_right():
    images = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    hits = retrieval_hits(images, texts, ["a red circle", "a blue square"], ks=(1, 2))
    assert hits["image_to_text_R@1"].tolist() == [True, False]  # image 1's nearest text is text 0
    assert hits["text_to_image_R@1"].tolist() == [True, True] and hits["image_to_text_R@2"].tolist() == [True, True]
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    y = x + torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    captions = [f"caption {i % 30}" for i in range(40)]  # duplicates among them
    hits, recall = retrieval_hits(x, y, captions, chunk_size=7), retrieval_recall(x, y, captions, chunk_size=7)
    assert {key: hit.float().mean().item() for key, hit in hits.items()} == pytest.approx(recall)
    assert all(hit.shape == (40,) and hit.dtype == torch.bool for hit in hits.values())


def test_duplicate_captions_count_as_matches():
    e = torch.eye(3)
    # Images 0 and 1 have the same caption (after lower-casing and whitespace normalisation), and each is
    # embedded exactly where the other's text is: wrong by index, right by content.
    images = torch.stack([e[1], e[0], e[2]])
    texts = torch.stack([e[0], e[1], e[2]])
    captions = ["A red  circle", "a red circle ", "a blue square"]
    metrics = retrieval_recall(images, texts, captions, ks=(1,))
    assert metrics == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0}
    # With distinct captions the same features are right for one pair in three.
    metrics = retrieval_recall(images, texts, ["one", "two", "three"], ks=(1,))
    assert metrics == {"image_to_text_R@1": pytest.approx(1 / 3), "text_to_image_R@1": pytest.approx(1 / 3)}


def test_caption_normalisation():
    assert normalize_caption("  A Red\tCircle \n") == "a red circle"
    assert caption_ids(["a b", "A  b", "c"]).tolist() == [0, 0, 1]


def _reference(images, texts, captions, ks):
    """Recall@k by the definition, with the full similarity matrix and Python loops."""
    norm = [normalize_caption(c) for c in captions]
    sim = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    out = {}
    for name, matrix in (("image_to_text", sim), ("text_to_image", sim.T)):
        order = matrix.argsort(dim=-1, descending=True)
        for k in ks:
            hits = sum(any(norm[j] == norm[i] for j in order[i, :k].tolist()) for i in range(len(captions)))
            out[f"{name}_R@{k}"] = hits / len(captions)
    return out


def test_matches_reference_with_chunks_and_duplicates():
    generator = torch.Generator().manual_seed(0)
    n = 50
    captions = [f"caption {i % 17}" for i in range(n)]  # many duplicates
    images = torch.randn(n, 8, generator=generator)
    texts = images + 0.8 * torch.randn(n, 8, generator=generator)
    ks = (1, 5, 10)
    metrics = retrieval_recall(images, texts, captions, ks=ks, chunk_size=7)
    assert metrics == pytest.approx(_reference(images, texts, captions, ks))
    assert 0 < metrics["image_to_text_R@1"] < metrics["image_to_text_R@10"] <= 1


def test_k_above_n_retrieves_everything_and_input_errors():
    x = torch.randn(3, 4)
    assert retrieval_recall(x, torch.randn(3, 4), ["a", "b", "c"], ks=(3, 10)) == {
        "image_to_text_R@3": 1.0,
        "image_to_text_R@10": 1.0,
        "text_to_image_R@3": 1.0,
        "text_to_image_R@10": 1.0,
    }
    with pytest.raises(ValueError, match="same shape"):
        retrieval_recall(x, torch.randn(2, 4), ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 captions"):
        retrieval_recall(x, x, ["a", "b"])
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(x, x, ["a", "b", "c"], ks=(0,))
