"""Counterfactual pairs: the twin image is the render of the swapped scene, its caption differs from the original in
the colour words alone, and no twin is made where it would be wrong (held-out compositions, one colour, no
palette)."""

import itertools

import numpy as np
import pytest
import torch

from clipcond.data.counterfactual import CounterfactualPairs, parse_pair_kinds, swap_colours
from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.shapes import BACKGROUND, COLOURS, ShapeObject, render_scene


def _pixels(objects, resolution=32) -> torch.Tensor:
    return torch.from_numpy(np.array(render_scene(objects, resolution))).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("resolution", [32, 48])
def test_the_twin_is_the_render_of_the_swapped_scene(resolution):
    """For every pair of colours and shapes, with anti-aliased edges and jitter: exchanging the colours in the pixels
    draws what the renderer draws for the swapped scene, to within a rounding step at the edges."""
    for (a, b), (shape_a, shape_b) in zip(
        itertools.permutations(COLOURS, 2),
        itertools.cycle(itertools.product(("circle", "square", "triangle"), repeat=2)),
    ):
        first = {"shape": shape_a, "size": "small", "position": "left", "dx": 0.013, "dy": -0.021, "scale": 1.07}
        second = {"shape": shape_b, "size": "large", "position": "right", "dx": -0.017, "dy": 0.009, "scale": 0.93}
        image = _pixels([ShapeObject(a, **first), ShapeObject(b, **second)], resolution)
        expected = _pixels([ShapeObject(b, **first), ShapeObject(a, **second)], resolution)
        twin = swap_colours(image, COLOURS[a], COLOURS[b], BACKGROUND)
        assert twin is not None and twin.dtype == torch.uint8
        difference = (twin.int() - expected.int()).abs()
        assert difference.max() <= 1, (a, b, shape_a, shape_b)
        assert not torch.equal(twin, image)


def test_no_twin_for_an_image_in_other_colours():
    generator = torch.Generator().manual_seed(0)
    photo = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
    assert swap_colours(photo, COLOURS["red"], COLOURS["blue"], BACKGROUND) is None
    green_and_yellow = _pixels(
        [ShapeObject("green", "circle", "large", "left"), ShapeObject("yellow", "square", "large", "right")]
    )
    assert swap_colours(green_and_yellow, COLOURS["red"], COLOURS["blue"], BACKGROUND) is None


def _record(colours, shapes=("circle", "square"), relation="left of"):
    objects = [
        {"colour": c, "shape": s, "size": "small", "position": "centre"} for c, s in zip(colours, shapes, strict=True)
    ]
    return {"kind": "relation", "objects": objects, "relation": relation}


INFO = {"name": "clipcond-shapes", "colours": COLOURS, "background": list(BACKGROUND), "held_out": ["blue circle"]}


def test_twin_captions_differ_in_the_colour_words_alone():
    pairs = CounterfactualPairs(["swap-colours"], [], INFO)
    caption = "An orange circle to the left of a red square."
    assert pairs.twin_caption(caption, _record(("orange", "red"))) == (
        "A red circle to the left of an orange square.",
        "orange",
        "red",
    )
    # a twin showing a held-out composition ("blue circle") is never made; nor one of a scene of one colour
    assert pairs.twin_caption("a red circle left of a blue square", _record(("red", "blue"))) is None
    assert pairs.twin_caption("a red circle left of a red square", _record(("red", "red"))) is None
    single = {"kind": "single", "objects": [{"colour": "red", "shape": "circle"}], "relation": None}
    assert pairs.twin_caption("a red circle", single) is None
    assert pairs.twin_caption("a red circle left of a blue square", None) is None


def test_twins_of_a_batch_and_their_share(shapes_data):
    data = ImageCaptionDataset(shapes_data, split="train", resolution=32)
    info = {**data.info, "held_out": []}
    pairs = CounterfactualPairs(["swap-colours"], data.records, info)
    samples = [data[i] for i in range(48)]
    twins = pairs.twins(samples)
    expected = [i for i, s in enumerate(samples) if pairs.twin_caption(s["text"], data.records[s["index"]])]
    assert twins["twin_source"].tolist() == expected and expected  # every scene with a twin caption gets its image
    assert twins["twin_pixel_values"].shape == (len(expected), 3, 32, 32)
    for k, row in enumerate(expected):
        original, twin_text = samples[row]["text"], twins["twin_text"][k]
        assert twin_text != original and len(twin_text.split()) == len(original.split())
        changed = [w for w, v in zip(original.split(), twin_text.split(), strict=True) if w != v]
        assert all(w.lower().strip(".,") in (*COLOURS, "a", "an") for w in changed), (original, twin_text)
    relation_share = sum(r["kind"] == "relation" for r in data.records) / len(data)
    assert 0 < pairs.coverage(data.captions)["share"] <= relation_share
    assert pairs.twins([])["twin_pixel_values"].shape[0] == 0


def test_other_data_and_kinds_are_refused(shapes_data):
    with pytest.raises(ValueError, match=r"`--counterfactual-pairs` 'swap-shapes' names an unknown kind"):
        parse_pair_kinds("swap-shapes")
    assert parse_pair_kinds("none") == () and parse_pair_kinds("swap-colours") == ("swap-colours",)
    with pytest.raises(ValueError, match=r"`--counterfactual-pairs` swap-colours .* no folder of the shapes data"):
        CounterfactualPairs(["swap-colours"], [], {"name": "my-photos"})
    with pytest.raises(ValueError, match="no folder of the shapes data"):
        CounterfactualPairs(["swap-colours"], None, INFO)
