"""The compositional probes (`clipcond.evaluation.probes`): minimal pairs that differ in the probed field only, the
caption reader, the scene reader on renders, and pair scoring that an oracle passes and a constant scorer does not."""

import random

import numpy as np
import pytest
import torch

from clipcond.data.questions import describe as describe_record
from clipcond.data.shapes import (
    DEFAULT_HELD_OUT,
    POSITION_PHRASE,
    POSITION_PHRASES,
    RELATION_PHRASES,
    caption_scene,
    render_scene,
    sample_scene,
)
from clipcond.evaluation import probes
from clipcond.evaluation.captioner import score_caption

EXPECTED_DIFFERENCE = {
    "count": {"count"},
    "relation": {"relation"},
    "binding": {"pairs"},
    "position": {"position"},
    "size": {"size"},
}


@pytest.mark.parametrize("probe", probes.PROBES)
def test_minimal_pairs_differ_only_in_the_probed_field(probe):
    pairs = probes.build_pairs(probe, 12, held_out=DEFAULT_HELD_OUT, seed=3)
    assert len(pairs) == 24 and sum(p.heldout for p in pairs) == 12
    for pair in pairs:
        right, wrong = probes.read_caption(pair.right).as_dict(), probes.read_caption(pair.wrong).as_dict()
        assert {key for key in right if right[key] != wrong[key]} == EXPECTED_DIFFERENCE[probe], pair
        # the right caption states the scene: its objects' colour-shape pairs, and the held-out flag follows them
        assert set(right["pairs"]) == {obj.pair for obj in pair.scene.objects}
        assert pair.heldout == any(obj.pair in DEFAULT_HELD_OUT for obj in pair.scene.objects)
    if probe == "binding":  # a swap keeps the colours and the shapes, so only their binding tells the captions apart
        assert all(right_colours_and_shapes_kept(p) for p in pairs)
    if probe == "count":  # one- and two-object images alike
        assert {len(p.scene.objects) for p in pairs} == {1, 2}


def right_colours_and_shapes_kept(pair):
    right, wrong = probes.read_caption(pair.right).as_dict(), probes.read_caption(pair.wrong).as_dict()
    return right["colours"] == wrong["colours"] and right["shapes"] == wrong["shapes"] and len(right["colours"]) == 2


def test_pairs_are_seeded():
    first = [(p.right, p.wrong) for p in probes.build_pairs("relation", 5, held_out=DEFAULT_HELD_OUT, seed=1)]
    again = [(p.right, p.wrong) for p in probes.build_pairs("relation", 5, held_out=DEFAULT_HELD_OUT, seed=1)]
    other = [(p.right, p.wrong) for p in probes.build_pairs("relation", 5, held_out=DEFAULT_HELD_OUT, seed=2)]
    assert first == again and first != other
    assert len(probes.build_pairs("size", 4)) == 4  # no held-out pairs: the seen group only
    with pytest.raises(ValueError, match="probe='colour'"):
        probes.build_pairs("colour", 4)


def test_read_caption_reads_the_data_captions():
    """The word parser reads the objects of the data's own varied captions, and the relation of relation scenes."""
    rng = random.Random(0)
    pairs = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")]
    for i in range(150):
        scene = sample_scene(("single", "relation", "count")[i % 3], pairs, rng)
        fields = probes.read_caption(caption_scene(scene, rng))
        assert [f"{c} {s}" for c, s in fields.objects] == [obj.pair for obj in scene.objects]
        if scene.relation is not None:
            assert fields.relation == scene.relation
    assert probes.read_caption("a little orange square in the middle").as_dict() == {
        "count": 1,
        "pairs": ("orange square",),
        "colours": ("orange",),
        "shapes": ("square",),
        "relation": None,
        "position": "centre",
        "size": "small",
    }


def test_read_caption_reads_the_captioners_detailed_descriptions():
    """`describe` (the captioner's "describe the image in detail." answer) names each shape before its colour ("a
    small circle in red on the left"): the reader pairs them as in the captions, for every kind of scene."""
    rng = random.Random(1)
    pairs = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")]
    for i in range(150):
        scene = sample_scene(("single", "relation", "count")[i % 3], pairs, rng)
        record = {"objects": [o.to_dict(32) for o in scene.objects], "relation": scene.relation}
        fields = probes.read_caption(describe_record(record))
        assert [f"{c} {s}" for c, s in fields.objects] == [obj.pair for obj in scene.objects], describe_record(record)
        if scene.kind == "single":  # what `clipcond eval captioner` scores: a right description is right in all
            assert all(score_caption(fields, record["objects"][0]).values())
    # a colour after "in" belongs to a shape that has none; a colour before the shape keeps it
    assert probes.read_caption("a red circle in blue").objects == (("red", "circle"),)
    assert probes.read_caption("two squares in green side by side").objects == (("green", "square"),) * 2


def test_read_caption_counts_plurals_and_number_words():
    assert probes.read_caption("two red circles").objects == (("red", "circle"), ("red", "circle"))
    assert probes.read_caption("a pair of blue square").count == 2
    assert probes.read_caption("a red circle and a blue circle").count == 2
    assert probes.read_caption("one red circle").count == 1


def test_read_caption_reads_every_position_phrase_of_the_shapes_data():
    """`_POSITION_WORDS` follows `clipcond.data.shapes.POSITION_PHRASES`; relation phrases are not positions."""
    for position, phrases in POSITION_PHRASES.items():
        for phrase in phrases:
            fields = probes.read_caption(f"a red circle {phrase}")
            assert fields.position == position and fields.positions == (position,), phrase
    for relation, phrases in RELATION_PHRASES.items():
        for phrase in phrases:
            fields = probes.read_caption(f"a red circle {phrase} a blue square")
            assert fields.relation == relation and fields.positions == (), phrase


def test_scene_reader_is_right_on_renders(judge):
    prompts = probes.generator_prompts(6, held_out=DEFAULT_HELD_OUT, seed=0)
    reader, baseline = probes.reader_figures(prompts, judge, resolution=32)
    for kind, fields in probes.GENERATOR_KINDS.items():
        for field in fields:
            assert reader[kind][field]["all"]["accuracy"] >= 0.95, (kind, field, reader[kind][field])
            assert reader[kind][field]["all"]["n"] == 12
    # renders of other prompts rarely show the prompt's two pairs: the prompt-blind baseline is far below the reader
    assert baseline["binding"]["objects"]["all"]["accuracy"] < 0.5
    assert baseline["relation"]["objects"]["all"]["accuracy"] < 0.5
    # the reader's geometry: count, position, size and relation of one render
    red = probes.ShapeObject("red", "circle", "large", "left")
    blue = probes.ShapeObject("blue", "square", "small", "right")
    image = torch.from_numpy(np.array(render_scene([red, blue], 32))).permute(2, 0, 1)
    (two,) = probes.read_scenes(image[None], judge)
    assert two.count == 2 and [o.pair for o in two.objects] == ["red circle", "blue square"]
    assert [o.size for o in two.objects] == ["large", "small"] and [o.position for o in two.objects] == [
        "left",
        "right",
    ]
    assert probes.relation_between(*two.objects) == "left of"


def test_oracle_passes_every_pair_and_constant_scorer_sits_at_chance(judge):
    pairs = {p: probes.build_pairs(p, 8, held_out=DEFAULT_HELD_OUT, seed=0) for p in probes.PROBES}
    oracle, _ = probes.run_pair_probes(probes.reader_scorer(judge), pairs, 32)
    constant, _ = probes.run_pair_probes(lambda images, captions: torch.zeros(len(captions)), pairs, 32)
    inverted_scorer = probes.reader_scorer(judge)
    inverted, _ = probes.run_pair_probes(lambda im, c: -inverted_scorer(im, c), pairs, 32)
    for probe in probes.PROBES:
        assert oracle[probe]["all"]["accuracy"] == 1.0 and oracle[probe]["all"]["versus_chance"] == "above"
        assert constant[probe]["all"]["accuracy"] == 0.5 and constant[probe]["all"]["versus_chance"] == "at"
        assert inverted[probe]["all"]["accuracy"] == 0.0 and inverted[probe]["all"]["versus_chance"] == "below"
        for group in ("seen", "heldout", "all"):
            stat = oracle[probe][group]
            assert stat["chance"] == 0.5 and stat["low"] < 1.0 <= stat["high"]
            assert stat["n"] == (16 if group == "all" else 8)


def test_clip_probe_figures_are_proportions(tiny_clip_run):
    from clipcond.models.clip import load_clip

    clip_run = load_clip(tiny_clip_run, progress=False)
    pairs = {p: probes.build_pairs(p, 4, held_out=DEFAULT_HELD_OUT, seed=0) for p in probes.PROBES}
    figures, outcomes = probes.run_pair_probes(probes.clip_scorer(clip_run), pairs, 32)
    assert set(figures) == set(probes.PROBES)
    for probe, groups in figures.items():
        assert set(outcomes[probe].tolist()) <= {0.0, 0.5, 1.0}
        for stat in groups.values():
            assert 0.0 <= stat["low"] <= stat["accuracy"] <= stat["high"] <= 1.0
            assert stat["versus_chance"] in ("above", "at", "below")


def test_pairs_from_metadata_and_captioner(shapes_data, judge):
    split = shapes_data / "test"
    pairs = {p: probes.pairs_from_metadata(split, p, 50, held_out=DEFAULT_HELD_OUT) for p in probes.PROBES}
    assert all(pairs[p] for p in ("count", "relation", "binding", "size"))
    for probe, items in pairs.items():
        for pair in items:
            assert pair.image is not None and pair.source.startswith(str(split.resolve()))
            right, wrong = probes.read_caption(pair.right).as_dict(), probes.read_caption(pair.wrong).as_dict()
            assert {key for key in right if right[key] != wrong[key]} == EXPECTED_DIFFERENCE[probe]
    # the images are the data's: the scene reader finds the metadata's objects in them
    readings = probes.read_scenes(probes.pair_images(pairs["binding"], 32), judge)
    assert [sorted(o.pair for o in r.objects) for r in readings] == [
        sorted(obj.pair for obj in p.scene.objects) for p in pairs["binding"]
    ]

    # a captioner that says what each image shows passes; one that always says the same thing does not
    def reading_captioner(images):
        out = []
        for reading in probes.read_scenes(images, judge):
            objects = reading.objects
            if len(objects) == 1:
                (o,) = objects
                out.append(f"a {o.size} {o.pair} {POSITION_PHRASE[o.position]}")
            elif objects[0].pair == objects[1].pair:
                out.append(f"two {objects[0].pair}s")
            else:
                out.append(f"a {objects[0].pair} {probes.relation_between(*objects)} a {objects[1].pair}")
        return out

    good = probes.captioner_figures(reading_captioner, pairs, 32)
    fixed = probes.captioner_figures(lambda images: ["a red circle"] * len(images), pairs, 32)
    for probe in ("count", "relation", "binding", "size"):
        assert good[probe]["all"]["accuracy"] == 1.0, probe
    assert fixed["relation"]["all"]["accuracy"] == 0.0 and fixed["binding"]["all"]["accuracy"] == 0.0

    # in calls of at most `batch_size` images, with the figures of one call
    sizes = []
    batched = probes.captioner_figures(
        lambda images: sizes.append(len(images)) or reading_captioner(images), pairs, 32, 3
    )
    assert batched == good and sizes and max(sizes) == 3
    with pytest.raises(ValueError, match=f"returned 1 captions for {len(pairs['count'])} count images"):
        probes.captioner_figures(lambda images: ["a red circle"], {"count": pairs["count"]}, 32)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, got 0"):
        probes.captioner_figures(reading_captioner, pairs, 32, 0)


def test_generator_figures_tell_a_perfect_generator_from_a_blind_one(judge):
    prompts = probes.generator_prompts(4, held_out=DEFAULT_HELD_OUT, seed=0)
    _, baseline = probes.reader_figures(prompts, judge, 32)
    renders = probes.render_scenes([p.scene for p in prompts], 32)
    perfect = probes.generator_figures(prompts, renders.repeat_interleave(2, dim=0), judge, 2, baseline)
    blank = probes.generator_figures(
        prompts, torch.full_like(renders, 240).repeat_interleave(2, dim=0), judge, 2, baseline
    )
    for kind, fields in probes.GENERATOR_KINDS.items():
        for field in fields:
            assert perfect[kind][field]["all"]["n"] == 16
            assert perfect[kind][field]["all"]["accuracy"] >= 0.95
            chance = baseline[kind][field]["all"]["accuracy"] if field == "objects" else probes.GENERATOR_CHANCE[field]
            assert perfect[kind][field]["all"]["chance"] == chance
            if field in ("count", "objects"):
                assert blank[kind][field]["all"]["accuracy"] == 0.0 and blank[kind][field]["all"]["n"] == 16
            else:  # binding and relation are judged only where the colours and shapes (or the objects) are right
                assert blank[kind][field]["all"]["n"] == 0


def test_a_caption_states_a_relation_in_either_order_and_metadata_rows_need_the_fields():
    truth = probes.read_caption("a red circle right of a blue square")
    assert probes.states_field("relation", probes.read_caption("a blue square to the left of a red circle"), truth)
    assert not probes.states_field("relation", probes.read_caption("a blue square right of a red circle"), truth)
    assert not probes.states_field("relation", probes.read_caption("a red circle and a blue square"), truth)
    assert probes.states_field("binding", probes.read_caption("a blue square and a red circle"), truth)
    row = {"objects": [{"colour": "red", "shape": "circle", "size": "small", "position": "left"}], "relation": None}
    assert probes.scene_from_record(row).kind == "single"
    assert probes.scene_from_record({"text": "a red circle"}) is None
    assert probes.scene_from_record({**row, "objects": [{"colour": "pink", "shape": "circle"}]}) is None
    two = [row["objects"][0], {"colour": "blue", "shape": "square", "size": "small", "position": "right"}]
    assert probes.scene_from_record({"objects": two, "relation": None}) is None  # two different objects, no relation
