"""Hard-negative captions: the swaps on shapes-data rows and on free text, None when there is nothing to swap, the
batch candidates and the pick from them."""

import pytest
import torch

from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.hard_negatives import KINDS, HardNegatives, parse_kinds, pick_negatives, swap


def _row(kind, objects, relation=None):
    fields = ("colour", "shape", "size", "position")
    return {"kind": kind, "objects": [dict(zip(fields, o, strict=True)) for o in objects], "relation": relation}


RELATION_ROW = _row("relation", [("red", "circle", "small", "left"), ("blue", "square", "large", "right")], "left of")


def test_binding_swap_keeps_the_words_and_exchanges_the_attributes():
    caption = "a red circle left of a blue square"
    for record in (RELATION_ROW, None):  # the shapes row and free text give the same negatives here
        assert swap(caption, "swap-attributes", record) == [
            "a blue circle left of a red square",
            "a red square left of a blue circle",
        ]
    # the articles follow their new word, capitals and punctuation stay
    assert swap("An orange circle, above a red square.", "swap-attributes") == [
        "A red circle, above an orange square.",
        "An orange square, above a red circle.",
    ]
    # the same colour twice: only the shapes can be exchanged; a plural keeps its "s"
    assert swap("a red circle above two red squares", "swap-attributes") == ["a red square above two red circles"]


def test_binding_swap_without_metadata_needs_a_relation_or_new_pairs():
    # two objects that share a shape (or a colour) and no relation: exchanging the others only reorders them
    assert swap("a red circle and a blue circle", "swap-attributes") is None
    assert swap("a red circle next to a red square", "swap-attributes") is None
    # a relation orders the objects: the same exchange is a negative
    assert swap("a red circle above a blue circle", "swap-attributes") == ["a blue circle above a red circle"]
    # new (colour, noun) pairs are a negative with or without a relation; a plural stays where it was
    assert swap("a red shirt and a blue car", "swap-attributes") == ["a blue shirt and a red car"]
    assert swap("two red circles and a red square", "swap-attributes") == ["two red squares and a red circle"]
    # a count's "one above the other" is no relation
    assert swap("a red circle and a blue circle, one above the other", "swap-attributes") is None


def test_relation_swap_flips_the_relation_or_exchanges_the_noun_phrases():
    caption = "a picture of a red circle to the left of a big blue square"
    assert swap(caption, "swap-relations", RELATION_ROW) == [
        "a picture of a red circle to the right of a big blue square",
        "a picture of a big blue square to the left of a red circle",
    ]
    assert swap("a dog jumping over a fence", "swap-relations") == ["a dog jumping under a fence"]
    # a count caption's "one above the other" names no relation: no negative, from the row or from the words
    count = _row("count", [("green", "triangle", "small", "top"), ("green", "triangle", "small", "bottom")])
    for record in (count, None):
        assert swap("two green triangles, one above the other", "swap-relations", record) is None


def test_count_and_position_swaps():
    single = _row("single", [("red", "circle", "small", "top")])
    assert swap("a small red circle at the top", "swap-count", single) == ["two small red circles at the top"]
    assert swap("a small red circle at the top", "swap-position", single) == ["a small red circle at the bottom"]
    assert swap("two red circles", "swap-count") == ["a red circle"]
    # one object is neither "side by side" nor "one above the other": the phrase goes, the rest stays
    count = _row("count", [("red", "circle", "small", "left"), ("red", "circle", "small", "right")])
    for record in (count, None):
        assert swap("Two red circles side by side", "swap-count", record) == ["A red circle"]
        assert swap("a photo of two red circles, one above the other.", "swap-count", record) == [
            "a photo of a red circle."
        ]
    assert swap("a pair of orange squares side by side here", "swap-count") == ["an orange square here"]
    # "on the left of" is a relation, not a position; "in the centre" has no opposite
    assert swap("a red circle on the left of a blue square", "swap-position") is None
    assert swap("a red circle in the centre", "swap-position") is None
    assert swap("on the left side, one purple square", "swap-position") == ["on the right side, one purple square"]


def test_nothing_to_swap_is_none():
    for kind in KINDS:
        assert swap("a photo of a mountain lake at dawn", kind) is None
    single = _row("single", [("red", "circle", "small", "centre")])
    for kind in ("swap-attributes", "swap-relations", "swap-position"):
        assert swap("a red circle in the centre", kind, single) is None
    with pytest.raises(ValueError, match="kind='swap-colour'"):
        swap("a red circle", "swap-colour")


def test_parse_kinds_names_the_flag_and_the_value():
    assert parse_kinds("swap-attributes, swap-relations,swap-attributes") == ("swap-attributes", "swap-relations")
    assert parse_kinds("none") == () and parse_kinds("") == () and parse_kinds(None) == ()
    with pytest.raises(ValueError, match=r"`--hard-negatives` 'swap-attributes,swap-colour' .* 'swap-colour'"):
        parse_kinds("swap-attributes,swap-colour")


def test_rows_of_the_shapes_data_give_true_negatives(shapes_data):
    dataset = ImageCaptionDataset(shapes_data, split="train")
    maker = HardNegatives(KINDS, dataset.records)
    by_kind = {"single": set(), "relation": set(), "count": set()}

    def content(text):  # the words but the articles, in any order
        return sorted(word for word in text.replace(",", "").split() if word not in ("a", "an"))

    for caption, record in zip(dataset.captions, dataset.records, strict=True):
        by_kind[record["kind"]].add(len(maker.for_caption(caption, record)))
        for negative in swap(caption, "swap-attributes", record) or []:
            assert negative != caption and content(negative) == content(caption)
    # a relation scene has all three of binding, relation and count; a count scene only the count
    assert by_kind["relation"] == {3} and by_kind["count"] == {1}
    coverage = maker.coverage(dataset.captions, dataset.records)
    assert coverage["share"] == 1.0 and coverage["captions_checked"] == len(dataset)
    assert 0 < coverage["share_by_kind"]["swap-attributes"] < 1


def test_candidates_and_pick_one_per_caption_with_any():
    samples = [
        {"text": "a red circle left of a blue square", "index": 0},
        {"text": "a photo of a lake", "index": 1},
        {"text": "two red circles", "index": 2},
    ]
    candidates = HardNegatives(("swap-attributes", "swap-count")).candidates(samples)
    assert candidates.num_groups.tolist() == [2, 0, 1]
    assert candidates.captions[candidates.group_start[2, 0]] == "a red circle"
    # draws at the edges of [0, 1) pick the first and the last of each group
    first = pick_negatives(candidates, torch.zeros(3, 2))
    last = pick_negatives(candidates, torch.full((3, 2), 0.999))
    assert [candidates.captions[i] for i in first] == ["a blue circle left of a red square", "a red circle"]
    assert [candidates.captions[i] for i in last] == ["two red circles left of a blue square", "a red circle"]
    middle = pick_negatives(candidates, torch.tensor([[0.2, 0.6], [0.5, 0.5], [0.5, 0.5]]))
    assert candidates.captions[middle[0]] == "a red square left of a blue circle"
