"""Counterfactual pairs: the twin image is the render of the swapped scene, its caption differs from the original in
the swapped words alone, and no twin is made where it would be wrong (held-out compositions, one colour, no
palette, objects that would touch)."""

import itertools
import random

import numpy as np
import pytest
import torch

from clipcond.data import hard_negatives
from clipcond.data.counterfactual import (
    KINDS,
    REDRAW_TOLERANCE,
    CounterfactualPairs,
    check_pair_data,
    exchange_places,
    format_kind_weights,
    parse_kind_weights,
    parse_pair_kinds,
    redraw_swapped_places,
    redraw_swapped_shapes,
    swap_colours,
)
from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.shapes import (
    BACKGROUND,
    COLOURS,
    MARGIN,
    OPPOSITE_RELATION,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    boxes_apart,
    caption_scene,
    relation_of,
    render_boxes,
    render_scene,
    sample_scene,
)
from clipcond.evaluation.probes import read_caption


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


RELATION_WORDS = {word for phrases in RELATION_PHRASES.values() for phrase in phrases for word in phrase.split()}
INFO = {
    "name": "clipcond-shapes",
    "colours": COLOURS,
    "background": list(BACKGROUND),
    "resolution": 32,
    "held_out": ["blue circle"],
}


def test_twin_captions_differ_in_the_swapped_words_alone():
    pairs = CounterfactualPairs(["swap-colours", "swap-shapes"], [], INFO)
    caption = "An orange circle to the left of a red square."
    record = _record(("orange", "red"))
    assert pairs.twin_caption(caption, record, "swap-colours") == "A red circle to the left of an orange square."
    assert pairs.twin_caption(caption, record, "swap-shapes") == "An orange square to the left of a red circle."
    # a twin showing a held-out composition ("blue circle") is never made, of either kind
    for kind in ("swap-colours", "swap-shapes"):
        assert pairs.twin_caption("a red circle left of a blue square", _record(("red", "blue")), kind) is None
    # nothing to exchange: one colour, one shape, one object, no metadata
    assert pairs.twin_caption("a red circle left of a red square", _record(("red", "red")), "swap-colours") is None
    same_shape = _record(("red", "green"), ("square", "square"))
    assert pairs.twin_caption("a red square left of a green square", same_shape, "swap-shapes") is None
    single = {"kind": "single", "objects": [{"colour": "red", "shape": "circle"}], "relation": None}
    assert pairs.twin_caption("a red circle", single, "swap-colours") is None
    assert pairs.twin_caption("a red circle left of a blue square", None, "swap-shapes") is None


def test_an_unplaced_caption_has_one_binding_twin_and_no_relation_twin():
    """ "A and B" (`clipcond data shapes --unplaced-share`) says nothing of places: the scene with the objects
    exchanged fits it (no relation twin nor negative), exchanging colours names the same objects as exchanging
    shapes (one twin, the other exchange its paraphrase, one negative), and of two objects that share a shape,
    exchanging colours names the same objects again (no twin, no negative). A size the caption names tells the
    two objects apart as a place would (every exchange its own twin and negative)."""
    pairs = CounterfactualPairs(list(KINDS), [], INFO)
    caption = "a red circle and an orange square"
    record = _placed(("red", "orange"), ("circle", "square"), "right of")
    colour_twin = ["an orange circle and a red square", "a red square and an orange circle"]
    assert pairs.twin_captions(caption, record, "swap-colours") == colour_twin
    assert pairs.twin_captions(caption, record, "swap-shapes") == colour_twin[::-1]
    assert pairs.twin_captions(caption, record, "swap-relations") == []
    assert pairs.kinds_of(caption, record) == ("swap-colours", "swap-relations")
    assert pairs.kinds_of("a red circle right of an orange square", record) == KINDS  # placed: every kind
    assert hard_negatives.swap(caption, "swap-relations", record) is None
    assert hard_negatives.swap(caption, "swap-attributes", record) == colour_twin[:1]
    same_shape = _placed(("red", "orange"), ("circle", "circle"), "above")
    for kind in ("swap-colours", "swap-shapes"):
        assert pairs.twin_captions("a red circle and an orange circle", same_shape, kind) == []
    assert hard_negatives.swap("a red circle and an orange circle", "swap-attributes", same_shape) is None
    assert hard_negatives.swap("a red circle above an orange circle", "swap-attributes", same_shape) == [
        "an orange circle above a red circle"
    ]
    # a batch of that one scene: its colour twin alone, and no hard negative that names the twin's objects
    objects = [ShapeObject("red", "circle", "small", "right"), ShapeObject("orange", "square", "small", "left")]
    sample = {"pixel_values": _pixels(objects), "text": caption, "index": 0}
    twins = CounterfactualPairs(list(KINDS), [record], INFO).twins([sample])
    assert twins["twin_text"] == colour_twin[:1] and twins["twin_paraphrases"] == [colour_twin[1:]]
    negatives = hard_negatives.HardNegatives(["swap-attributes"], [record]).candidates([sample], [colour_twin])
    assert negatives.captions == [] and negatives.num_groups.tolist() == [0]

    sized = _placed(("red", "orange"), ("circle", "square"), "right of", sizes=("large", "small"))
    big = "a big red circle and an orange square"
    assert pairs.twin_captions(big, sized, "swap-colours") == ["a big orange circle and a red square"]
    assert pairs.twin_captions(big, sized, "swap-shapes") == ["a big red square and an orange circle"]
    assert pairs.kinds_of(big, sized) == KINDS
    assert hard_negatives.swap(big, "swap-attributes", sized) == [
        "a big orange circle and a red square",
        "a big red square and an orange circle",
    ]
    assert pairs.twin_captions(caption, sized, "swap-colours") == colour_twin  # no size named: as before
    sized_same_shape = {
        **same_shape,
        "objects": [{**same_shape["objects"][0], "size": "large"}, same_shape["objects"][1]],
    }
    assert pairs.twin_captions("a big red circle and an orange circle", sized_same_shape, "swap-colours") == [
        "a big orange circle and a red circle"
    ]
    # the share of captions with a twin counts an unplaced caption's shape twin only where it is made
    coverage = CounterfactualPairs(list(KINDS), [record, sized], INFO).coverage([caption, big])
    assert coverage["share_by_kind"] == {"swap-colours": 1.0, "swap-shapes": 0.5, "swap-relations": 0.0}


def _placed(colours, shapes, relation, sizes=("small", "small")):
    """A relation scene's metadata row, its objects on the relation's anchors (with their boxes)."""
    objects = [
        ShapeObject(colour, shape, size, position).to_dict(32)
        for colour, shape, size, position in zip(colours, shapes, sizes, RELATIONS[relation], strict=True)
    ]
    return {"kind": "relation", "objects": objects, "relation": relation}


def test_relation_twin_captions_name_the_opposite_relation():
    pairs = CounterfactualPairs(["swap-relations"], [], INFO)
    cases = {
        ("An orange circle to the left of a red square.", "left of"): [
            "An orange circle to the right of a red square.",
            "A red square to the left of an orange circle.",  # the nouns exchanged: true of the twin as well
        ],
        ("a red square beneath a green circle", "below"): ["a red square over a green circle"],
        # its pairs are the original's: a twin of a scene of a held-out pair's neighbours is made
        ("a red circle above a blue square", "above"): ["a red circle below a blue square"],
    }
    for (caption, relation), expected in cases.items():
        record = _placed(("red", "blue"), ("circle", "square"), relation)
        assert pairs.twin_captions(caption, record, "swap-relations")[: len(expected)] == expected
        assert pairs.twin_caption(caption, record, "swap-relations") == expected[0]
        del record["objects"][0]["bbox"]  # no boxes: no places to exchange
        assert pairs.twin_captions(caption, record, "swap-relations") == []
    count = {"kind": "count", "objects": _record(("red", "red"))["objects"], "relation": None}
    assert pairs.twin_caption("two red circles, one above the other", count, "swap-relations") is None
    # the larger object, moved in from the border, would come within MARGIN of the other (a row of the generator's
    # data): no twin, caption nor image
    crowded = _placed(("red", "blue"), ("circle", "square"), "left of", sizes=("large", "large"))
    crowded["objects"][0]["bbox"], crowded["objects"][1]["bbox"] = (
        [0.96, 9.19, 13.76, 21.99],
        [15.24, 9.3, 29.23, 23.29],
    )
    assert pairs.twin_captions("a red circle left of a blue square", crowded, "swap-relations") == []
    drawn = render_boxes([(COLOURS[o["colour"]], o["shape"], [v / 32 for v in o["bbox"]]) for o in crowded["objects"]])
    image = torch.from_numpy(np.array(drawn)).permute(2, 0, 1).contiguous()
    assert redraw_swapped_places(image, crowded["objects"], "left of", INFO) is None
    crowded["objects"][0]["bbox"] = [0.96, 9.19, 12.96, 21.19]  # a little smaller: the exchange fits
    assert len(pairs.twin_captions("a red circle left of a blue square", crowded, "swap-relations")) == 2


def _centre_of(pixels: torch.Tensor, colour: str) -> tuple[float, float]:
    """The centre (x, y) of the pixels of exactly `colour` (an object's inside)."""
    inside = (pixels == torch.tensor(COLOURS[colour], dtype=torch.uint8).view(3, 1, 1)).all(0)
    ys, xs = inside.nonzero(as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


def _says_what_it_shows(caption: str, pixels: torch.Tensor) -> bool:
    """Whether the relation that `caption` names between its two objects is the one between their colours' pixels."""
    said = read_caption(caption)
    (colour_a, _), (colour_b, _) = said.objects
    return relation_of(_centre_of(pixels, colour_a), _centre_of(pixels, colour_b)) == said.relation


def _with_centre(obj: ShapeObject, other: ShapeObject) -> ShapeObject:
    """`obj` at `other`'s place: `other`'s anchor and offset, `obj`'s colour, shape and size."""
    return ShapeObject(obj.colour, obj.shape, obj.size, other.position, dx=other.dx, dy=other.dy, scale=obj.scale)


def test_the_relation_twin_is_the_render_of_the_exchanged_scene():
    """Generated relation scenes of every relation and size: the twin is the renderer's drawing of the two objects in
    each other's places, which is a scene of the opposite relation, the objects apart and inside the border; every
    caption `twin_captions` gives is true of the twin's pixels, as the original caption is of the original's."""
    rng = random.Random(0)
    pairs = CounterfactualPairs(["swap-relations"], [], INFO)
    made = read = 0
    for _ in range(60):
        scene = sample_scene("relation", [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES], rng)
        first, second = scene.objects
        objects = [first.to_dict(32), second.to_dict(32)]
        twin = redraw_swapped_places(_pixels(scene), objects, scene.relation, INFO)
        caption = caption_scene(scene, rng)
        record = {"kind": "relation", "objects": objects, "relation": scene.relation}
        captions = pairs.twin_captions(caption, record, "swap-relations")
        assert bool(captions) == (twin is not None)
        if twin is not None and first.colour != second.colour:
            assert _says_what_it_shows(caption, _pixels(scene)), caption
            assert all(_says_what_it_shows(c, twin) for c in captions) and len(captions) == 2, (caption, captions)
            read += 1
        exchanged = Scene(
            (_with_centre(first, second), _with_centre(second, first)), OPPOSITE_RELATION[scene.relation]
        )
        # a larger object moved in from the border may come within MARGIN of the other: then no twin
        assert (twin is not None) == boxes_apart(*(obj.box() for obj in exchanged.objects)), scene
        if twin is not None:  # to within the rows' boxes rounded to 0.01 px, as a row redraws its own image
            assert (twin.float() - _pixels(exchanged).float()).abs().mean() <= REDRAW_TOLERANCE, scene
            made += 1
    assert made >= 55 and read >= 40
    other = _pixels([ShapeObject("red", "circle", "small", "right"), second])
    assert redraw_swapped_places(other, objects, scene.relation, INFO) is None


def test_places_are_exchanged_inside_the_border_or_not_at_all():
    small_at_the_edge, large = [0.78, 0.40, 0.97, 0.59], [0.05, 0.30, 0.45, 0.70]  # "large left of small"
    a, b = exchange_places(large, small_at_the_edge, "left of")
    assert a[2] == pytest.approx(1 - MARGIN) and a[2] - a[0] == pytest.approx(0.40)  # moved in, size kept
    assert b[2] - b[0] == pytest.approx(0.19) and (b[0] + b[2]) / 2 == pytest.approx(0.25)
    assert (a[0] + a[2]) / 2 > (b[0] + b[2]) / 2  # the large one is now right of the small one
    touching = [0.40, 0.30, 0.60, 0.50]
    assert exchange_places([0.20, 0.30, 0.41, 0.51], touching, "left of") is None
    assert exchange_places([0.10, 0.40, 0.30, 0.60], [0.60, 0.40, 0.80, 0.60], "above") is None  # side by side


def test_the_shape_twin_is_the_render_of_the_swapped_scene():
    """Each object's shape drawn in the other's box, from the metadata row alone; nothing where the row does not
    redraw the image (another image, or the image resampled to another size)."""
    info = INFO
    for shape_a, shape_b in ((a, b) for a in SHAPES for b in SHAPES if a != b):
        first = ShapeObject("red", shape_a, "small", "left", dx=0.013, dy=-0.021, scale=1.07)
        second = ShapeObject("green", shape_b, "large", "right", dx=-0.017, dy=0.009, scale=0.93)
        objects = [first.to_dict(32), second.to_dict(32)]
        twin = redraw_swapped_shapes(_pixels([first, second]), objects, info)
        expected = _pixels(
            [
                ShapeObject("red", shape_b, "small", "left", dx=0.013, dy=-0.021, scale=1.07),
                ShapeObject("green", shape_a, "large", "right", dx=-0.017, dy=0.009, scale=0.93),
            ]
        )
        assert twin is not None and torch.equal(twin, expected), (shape_a, shape_b)
    other = _pixels([ShapeObject("red", "circle", "small", "right"), second])
    assert redraw_swapped_shapes(other, objects, info) is None
    resized = torch.nn.functional.interpolate(_pixels([first, second])[None].float(), size=48, mode="bilinear")
    assert redraw_swapped_shapes(resized[0].round().to(torch.uint8), objects, info) is None


def test_twins_of_a_batch_and_their_share(shapes_data):
    data = ImageCaptionDataset(shapes_data, split="train", resolution=32)
    info = {**data.info, "held_out": []}
    kinds = ["swap-colours", "swap-shapes", "swap-relations"]
    pairs = CounterfactualPairs(kinds, data.records, info)
    samples = [data[i] for i in range(48)]
    twins = pairs.twins(samples)
    # every scene with a twin caption gets its image, by sample and then by kind
    expected = [
        (i, kind)
        for i, s in enumerate(samples)
        for kind in kinds
        if pairs.twin_caption(s["text"], data.records[s["index"]], kind)
    ]
    assert twins["twin_source"].tolist() == [i for i, _ in expected] and {k for _, k in expected} == set(kinds)
    assert twins["twin_kind"].tolist() == [kinds.index(kind) for _, kind in expected]
    assert twins["twin_pixel_values"].shape == (len(expected), 3, 32, 32)
    for k, (row, kind) in enumerate(expected):
        original, twin_text = samples[row]["text"], twins["twin_text"][k]
        assert twin_text != original and len(twin_text.split()) == len(original.split())
        changed = [w for w, v in zip(original.split(), twin_text.split(), strict=True) if w != v]
        words = {"swap-colours": COLOURS, "swap-shapes": SHAPES, "swap-relations": RELATION_WORDS}[kind]
        assert all(w.lower().strip(".,") in (*words, "a", "an") for w in changed), (original, twin_text)
        assert not torch.equal(twins["twin_pixel_values"][k], samples[row]["pixel_values"])
    coverage = pairs.coverage(data.captions)
    relation_share = sum(r["kind"] == "relation" for r in data.records) / len(data)
    assert 0 < coverage["share_by_kind"]["swap-shapes"] < coverage["share"] <= relation_share
    assert 0 < coverage["share_by_kind"]["swap-relations"] <= coverage["share"]
    assert pairs.twins([])["twin_pixel_values"].shape[0] == 0


def test_other_data_and_kinds_are_refused(shapes_data, tmp_path):
    check_pair_data(["swap-colours"], shapes_data)  # the shapes data: accepted
    for other in (tmp_path, tmp_path / "missing.csv"):
        with pytest.raises(ValueError, match=rf"`--data` {str(other)!r} holds no shapes data set"):
            check_pair_data(["swap-colours"], other)
    with pytest.raises(ValueError, match=r"`--counterfactual-pairs` 'swap-sizes' names an unknown kind"):
        parse_pair_kinds("swap-sizes")
    assert parse_pair_kinds("none") == () and parse_pair_kinds("swap-colours") == ("swap-colours",)
    with pytest.raises(ValueError, match=r"`--counterfactual-pairs` swap-colours .* no folder of the shapes data"):
        CounterfactualPairs(["swap-colours"], [], {"name": "my-photos"})
    with pytest.raises(ValueError, match="no folder of the shapes data"):
        CounterfactualPairs(["swap-colours"], None, INFO)


def test_kind_weights_name_kinds_of_the_twins_and_weights_of_zero_or_more():
    kinds = ("swap-colours", "swap-relations")
    assert parse_kind_weights("Swap-Relations = 16, swap-colours=0", kinds) == {
        "swap-relations": 16,
        "swap-colours": 0,
    }
    assert parse_kind_weights("none", kinds) == parse_kind_weights(None, kinds) == {}
    for text, match in (
        ("swap-shapes=2", r"names 'swap-shapes', which `--counterfactual-pairs` swap-colours,swap-relations does not"),
        ("swap-colours", r"'swap-colours' must read KIND=WEIGHT, e.g. swap-relations=16"),
        ("swap-colours=-1", r"the weight of swap-colours must be >= 0, got '-1'"),
        ("swap-colours=nan", r"the weight of swap-colours must be a finite number, got 'nan'"),
        ("swap-colours=two", r"the weight of swap-colours must be a number, got 'two'"),
        ("swap-colours=1,swap-colours=2", r"names swap-colours twice"),
    ):
        with pytest.raises(ValueError, match=rf"`--counterfactual-kind-weights` '{text}'.*{match}"):
            parse_kind_weights(text, kinds)
    with pytest.raises(ValueError, match=r"'swap-colours=1' weighs twins, but `--counterfactual-pairs` is 'none'"):
        parse_kind_weights("swap-colours=1", ())
    # written back as parsed, in the order of KINDS (what results compare), whatever the digits
    weights = parse_kind_weights("swap-relations=0.1234567, swap-colours=1234567.5,swap-shapes=-0", KINDS)
    assert list(weights) == list(KINDS) and weights["swap-shapes"] == 0.0
    assert parse_kind_weights(format_kind_weights(weights), KINDS) == weights
    assert format_kind_weights({"swap-relations": 16.0}) == "swap-relations=16" and format_kind_weights({}) == "none"
