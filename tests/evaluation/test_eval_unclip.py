"""`clipcond eval unclip`'s judging of image variations: the sources of a split, and `evaluate_variations` with fake
vary functions of known answers (a copy of the source scores what the judge scores on the sources; the wrong colour
scores 0). The whole evaluation on trained runs: tests/test_demo_dalle2.py."""

import json

import numpy as np
import pytest
import torch

from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.shapes import COLOURS, DEFAULT_HELD_OUT, ShapeObject, class_names, render_scene
from clipcond.evaluation.generation import ground_truth_renders
from clipcond.evaluation.unclip import evaluate_variations, parse_args, variation_seed, variation_sources

CLASSES = class_names(None)  # the 18 colour-shape pairs
HELD_OUT = list(DEFAULT_HELD_OUT)
PAIRS = [tuple(name.split()) for name in CLASSES]


@pytest.fixture(scope="module")
def sources():
    """Two ground-truth renders of every class, class by class: uint8 (36, 3, 32, 32) and the class of each."""
    return ground_truth_renders(PAIRS, 2, 32, seed=0), [name for name in CLASSES for _ in range(2)]


def copy_source(images, generators):
    return images.clone()


def test_sources_are_the_first_one_object_images_of_each_class(shapes_data, caplog):
    dataset = ImageCaptionDataset(shapes_data, split="test", resolution=32)
    images, classes, items = variation_sources(dataset, CLASSES, per_class=1)
    assert images.shape == (18, 3, 32, 32) and images.dtype == torch.uint8
    assert classes == CLASSES  # class by class
    assert items == [dataset.labels.index(name) for name in CLASSES]  # the first item labelled with the class
    assert torch.equal(images[5], dataset[items[5]]["pixel_values"])
    # the fixture's test split holds one one-object image per class: asking for two gives one, with a warning
    again, _, more_items = variation_sources(dataset, CLASSES, per_class=2)
    assert more_items == items and torch.equal(again, images)
    assert "class 'red circle' has 1 one-object image(s), fewer than 2" in caplog.text
    with pytest.raises(ValueError, match="no one-object image of class 'pink hexagon'"):
        variation_sources(dataset, ["pink hexagon"], per_class=1)


def test_a_copy_of_the_source_scores_what_the_judge_scores_on_the_sources(judge, sources, tmp_path):
    images, classes = sources
    metrics = evaluate_variations(
        copy_source, images, classes, judge=judge, held_out=HELD_OUT, variations_per_source=3, output_dir=tmp_path
    )
    on_sources = judge.score(images, [c.split()[0] for c in classes], [c.split()[1] for c in classes]).accuracy()
    for key, value in on_sources.items():
        assert metrics[key] == pytest.approx(value) and metrics[f"source_{key}"] == pytest.approx(value)
    for group in ("_seen", "_heldout"):
        for metric in ("colour_accuracy", "shape_accuracy", "both_accuracy"):
            assert metrics[metric + group] == pytest.approx(metrics[f"source_{metric}{group}"])
    assert metrics["colour_accuracy_seen"] >= 0.9  # the judge knows clean renders
    # a copy is at distance 0 from its source, and another source far from it
    assert metrics["distance"]["to_source"] == metrics["distance"]["copy"] == {"pixels": 0.0, "clip": None}
    assert metrics["distance"]["to_unrelated_sources"]["pixels"] > 0.1
    assert metrics["num_sources"] == 36 and metrics["num_images"] == 108
    assert metrics["settings"]["held_out"] == HELD_OUT and len(metrics["per_class"]) == 18
    assert metrics["per_class"]["blue square"]["heldout"] is True
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "grid.png").is_file()


def test_variations_of_the_wrong_colour_score_zero_colour(judge, sources):
    images, classes = sources
    by_image = {bytes(image.numpy()): name for image, name in zip(images, classes)}
    names = list(COLOURS)

    def next_colour(batch, generators):  # the source's shape in the next colour of the palette, at the centre
        out = []
        for image, generator in zip(batch, generators):
            colour, shape = by_image[bytes(image.numpy())].split()
            colour = names[(names.index(colour) + 1) % len(names)]
            size = "small" if torch.rand(1, generator=generator).item() < 0.5 else "large"
            out.append(np.asarray(render_scene([ShapeObject(colour, shape, size, "centre")], 32)))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)

    metrics = evaluate_variations(next_colour, images, classes, judge=judge, held_out=HELD_OUT)
    assert metrics["colour_accuracy"] == 0.0 and metrics["both_accuracy"] == 0.0
    assert metrics["shape_accuracy"] >= 0.9  # the shape is kept
    assert metrics["per_class"]["red circle"]["judged"] == {"green circle": 8}
    assert metrics["distance"]["to_source"]["pixels"] > 0.05  # redrawn in another colour: not a copy


def test_each_variation_has_its_own_seed_whatever_the_batch(judge, sources):
    images, classes = sources
    seen = {}

    def record(batch, generators):
        for image, generator in zip(batch, generators):
            seen.setdefault(bytes(image.numpy()), []).append(torch.rand(1, generator=generator).item())
        return batch.clone()

    evaluate_variations(record, images[:4], classes[:4], judge=judge, variations_per_source=2, batch_size=3, seed=7)
    first, seen = seen, {}
    evaluate_variations(record, images[:4], classes[:4], judge=judge, variations_per_source=2, batch_size=8, seed=7)
    assert first == seen and len(seen) == 4
    expected = torch.rand(1, generator=torch.Generator().manual_seed(variation_seed(7, 1, 1))).item()
    assert seen[bytes(images[1].numpy())][1] == expected


def test_errors_name_the_argument(judge, sources):
    images, classes = sources
    with pytest.raises(ValueError, match="`sources` must be uint8"):
        evaluate_variations(copy_source, images.float(), classes, judge=judge)
    with pytest.raises(ValueError, match="got 35 source classes for 36 sources"):
        evaluate_variations(copy_source, images, classes[:-1], judge=judge)
    with pytest.raises(ValueError, match="source class 'red hexagon'"):
        evaluate_variations(copy_source, images[:1], ["red hexagon"], judge=judge)
    with pytest.raises(ValueError, match="`variations_per_source` must be an integer >= 1"):
        evaluate_variations(copy_source, images, classes, judge=judge, variations_per_source=0)
    with pytest.raises(ValueError, match="for a batch of 8 source rows"):
        evaluate_variations(lambda b, g: b[:1], images[:2], classes[:2], judge=judge)
    with pytest.raises(ValueError, match="`--variations-per-source` must be >= 1"):
        parse_args(["--decoder", "d", "--prior", "p", "--data", "x", "--variations-per-source", "0"])
