"""The judge on images it did not make: the independent renderer's cases, and what the renderer draws."""

import torch

from clipcond.data.shapes import COLOURS, SHAPES
from clipcond.evaluation.judge import OUTCOMES
from clipcond.evaluation.judge_check import CASES, check_judge, judge_images, render_case

# The test judge trains on a third of the default budget; the default judge's figures are in
# benchmarks/results/judge_quality.json. These floors sit well below both and far above what a forced choice gets
# (0% on blank, several and unknown shapes).
FLOORS = {
    "one object": 0.85,
    "one object, noise 0.2": 0.6,
    "one object, blur 1.2 px": 0.6,
    "one object, JPEG q30": 0.6,
    "blank": 0.85,
    "several objects": 0.8,
    "unknown shape": 0.6,
}


def test_independent_renders_are_judged_as_a_person_would(judge):
    results = check_judge(judge, n=54, seed=1)
    assert list(results) == [name for name, *_ in CASES] == list(FLOORS)
    for name, figures in results.items():
        assert figures["num_images"] == 54
        assert abs(sum(figures["outcomes"].values()) - 1) < 1e-9
        assert figures["right"] >= FLOORS[name], (name, figures)


def test_renderer_is_seeded_and_balanced():
    a, colours, shapes = render_case("object", None, 36, 32, seed=3)
    b, _, _ = render_case("object", None, 36, 32, seed=3)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == (36, 3, 32, 32)
    assert not torch.equal(a, render_case("object", None, 36, 32, seed=4)[0])
    assert sorted(set(zip(colours, shapes))) == sorted((c, s) for c in COLOURS for s in SHAPES)
    blank, none_colours, _ = render_case("blank", "noise", 4, 32, seed=0)
    assert none_colours == [None] * 4 and blank.float().std() > 20  # noise over the background, no object


def test_judge_images_counts_the_right_colour_and_shape_for_objects(judge):
    images, colours, shapes = render_case("object", None, 18, 32, seed=2)
    right = judge_images(judge, images, "object", colours, shapes)
    wrong_colours = [list(COLOURS)[(list(COLOURS).index(c) + 1) % len(COLOURS)] for c in colours]
    shifted = judge_images(judge, images, "object", wrong_colours, shapes)
    assert right["right"] >= 0.8 and shifted["right"] <= 0.1
    assert right["outcomes"]["object"] == shifted["outcomes"]["object"]  # the outcome does not depend on the target
    assert set(right["outcomes"]) == set(OUTCOMES)
