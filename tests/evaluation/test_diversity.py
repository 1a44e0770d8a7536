"""Diversity and distance to the source: zero for copies, larger for varied images, the right pairing."""

import numpy as np
import torch
import torch.nn.functional as F

from clipcond.data.shapes import ShapeObject, render_scene
from clipcond.evaluation.diversity import distance_to_sources, diversity, pixel_distances


def renders(objects_per_image):
    return torch.from_numpy(np.stack([np.asarray(render_scene(o, 32)) for o in objects_per_image])).permute(0, 3, 1, 2)


def test_pixel_distance_is_rms_in_unit_range():
    black = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    white = torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)  # resized to 8 px
    assert torch.allclose(pixel_distances(black, white), torch.ones(2))
    assert torch.equal(pixel_distances(black, black), torch.zeros(2))


def test_collapsed_prompts_have_no_diversity_and_varied_ones_do():
    positions = ["left", "right", "top", "bottom"]
    varied = renders([[ShapeObject("red", "circle", "small", p)] for p in positions])
    same = varied[:1].repeat(4, 1, 1, 1)
    features = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    collapsed = diversity(same, [range(4)], features[:1].repeat(4, 1))
    assert collapsed["pixels"] == 0.0 and abs(collapsed["clip"]) < 1e-6
    spread = diversity(varied, [range(4)], features)
    assert spread["pixels"] > 0.05 and spread["clip"] > 0.3
    assert diversity(varied, [[0], [1]]) == {"pixels": None, "clip": None}  # one image per prompt: nothing to compare


def test_distance_to_sources_pairs_each_variation_with_its_source():
    classes = ["red square", "blue circle", "red circle"]
    sources = renders([[ShapeObject(*name.split(), "large", "centre")] for name in classes])
    copies = sources.repeat_interleave(2, dim=0)  # two "variations" per source, exact copies
    figures = distance_to_sources(copies, sources, [0, 0, 1, 1, 2, 2], classes)
    assert figures["to_source"]["pixels"] == 0.0 and figures["copy"] == {"pixels": 0.0, "clip": None}
    # red square vs blue circle: unrelated; red circle shares a word with both, so it is nobody's unrelated source
    # but its own unrelated sources fall back to every other class
    expected = torch.stack(
        [pixel_distances(sources[[0]], sources[[1]]), pixel_distances(sources[[1]], sources[[0]])]
        + [pixel_distances(sources[[2]], sources[[j]]) for j in (0, 1)]
    )
    per_variation = [expected[0], expected[0], expected[1], expected[1], (expected[2] + expected[3]) / 2] * 1
    per_variation += [(expected[2] + expected[3]) / 2]
    assert abs(figures["to_unrelated_sources"]["pixels"] - float(torch.stack(per_variation).mean())) < 1e-6
    features = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    with_clip = distance_to_sources(
        copies, sources, [0, 0, 1, 1, 2, 2], classes, features.repeat_interleave(2, 0), features
    )
    assert abs(with_clip["to_source"]["clip"]) < 1e-6 and with_clip["to_unrelated_sources"]["clip"] > 0.1
