"""Where a CLIP's relation probe fails: its text tower, its image tower, or both (a benchmark, not a test).

    python benchmarks/relation_embeddings.py --data DIR RUN [RUN ...] [--num-pairs 200] [--seed 0] [--save-results]
        [--results-name relation_embeddings]

On the relation probe's minimal pairs (`clipcond probe`: "a red circle left of a blue square" against "a red circle
right of a blue square", seen and held-out compositions of DIR's shapes data), per CLIP run (a run folder or a
checkpoint's `pretrained/` folder):

- `relation_probe`: the share of pairs whose image is closer to the right caption (`clipcond probe`'s figure), and
  `binding_probe`, the same for the binding probe's pairs of the same seed (colours swapped between two shapes), so
  that both probes of the hard-negative bar can be read at one run's checkpoints; and
  `binding_probe_relation_wording`, the binding pairs said as the training captions say two objects ("A left of B"
  against the colours swapped, where the probe says "A and B"): a position-bearing caption can be told from its
  swap by where each colour is, without reading which colour is on which shape;
- text tower: the mean cosine of a caption with the one that says the same the other way round ("B right of A"),
  and with the probe's wrong caption ("A right of B"). A tower that reads relations puts the first closer; one that
  reads the nouns' order but not the relation word puts the wrong caption closer (a bag of words puts the two at
  one cosine: they hold the same words);
- image tower, on the left/right scenes: the mean cosine of an image with its mirror image (which shows the
  opposite relation), the share where the right caption prefers the image to its mirror (text -> image, chance 1/2),
  and the share where the image prefers "A on the left" to "A on the right" for the side its first object is on
  (the single-object position captions, read on a two-object image; chance 1/2).

Every share counts a tie as 1/2, as the probe does.

Prints one JSON object; `--save-results` also writes benchmarks/results/relation_embeddings.json (or
`--results-name`'s, for another set of runs) and its history.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_results_flag, command_line, machine, save_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/relation_embeddings.py",
        description="Relation-probe diagnostics of CLIP runs: text-tower and image-tower cosines on minimal pairs.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="CLIP run or checkpoint pretrained/ folders")
    parser.add_argument("--data", type=Path, required=True, help="the shapes data root the runs were trained on")
    parser.add_argument("--num-pairs", type=int, default=200, help="relation pairs per group (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="the pairs' seed, as `clipcond probe --seed`")
    add_results_flag(parser, "relation_embeddings")
    return parser.parse_args(argv)


def _mean(values) -> float:
    return round(float(values.float().mean()), 4)


def relation_captions(pairs) -> dict[str, list[str]]:
    """Per pair: the right caption, the same relation said the other way round, and the probe's wrong caption."""
    from clipcond.data.shapes import OPPOSITE_RELATION, Scene
    from clipcond.evaluation.probes import describe

    def reversed_caption(scene):  # "B <opposite> A": the same scene, named from its second object
        flipped = Scene(tuple(reversed(scene.objects)), OPPOSITE_RELATION[scene.relation])
        return describe(flipped, "relation")

    return {
        "right": [p.right for p in pairs],
        "same_meaning": [reversed_caption(p.scene) for p in pairs],
        "wrong": [p.wrong for p in pairs],
    }


def relation_wording(binding_pairs) -> list:
    """The binding pairs said as the relation probe says a scene, "A <relation> B", against the same with the two
    objects' colours exchanged."""
    from dataclasses import replace

    from clipcond.data.shapes import Scene
    from clipcond.evaluation.probes import describe

    def swapped(scene):
        a, b = scene.objects
        return Scene((replace(a, colour=b.colour), replace(b, colour=a.colour)), scene.relation)

    return [
        replace(p, right=describe(p.scene, "relation"), wrong=describe(swapped(p.scene), "relation"))
        for p in binding_pairs
    ]


def side_captions(pairs) -> tuple[list[str], list[str]]:
    """Per left/right pair: "A on <its side>" and "A on <the other side>", A the first object."""
    from clipcond.data.shapes import OPPOSITE_POSITION, Scene, ShapeObject
    from clipcond.evaluation.probes import describe

    def at(obj, side):
        return describe(Scene((ShapeObject(obj.colour, obj.shape, obj.size, side),)), "position")

    firsts = [p.scene.objects[0] for p in pairs]
    return [at(o, o.position) for o in firsts], [at(o, OPPOSITE_POSITION[o.position]) for o in firsts]


def diagnose(run_dir: Path, pairs, resolution: int, binding_pairs) -> dict:
    from clipcond.evaluation.judged import clip_image_features
    from clipcond.evaluation.probes import clip_scorer, pair_images, pair_outcomes, preferred
    from clipcond.models.clip import load_clip

    clip = load_clip(run_dir, progress=False, what="RUN")
    images = pair_images(pairs, resolution)
    image = clip_image_features(clip, images, batch_size=256)  # resized to the CLIP's side, as `clipcond probe`
    text = {name: clip.encode_text(captions) for name, captions in relation_captions(pairs).items()}
    score = {name: (image * t).sum(-1) for name, t in text.items()}
    binding_images = pair_images(binding_pairs, resolution)
    figures = {
        "relation_probe": _mean(preferred(score["right"], score["wrong"])),
        "binding_probe": _mean(pair_outcomes(clip_scorer(clip), binding_pairs, binding_images)),
        "binding_probe_relation_wording": _mean(
            pair_outcomes(clip_scorer(clip), relation_wording(binding_pairs), binding_images)
        ),
        "text_cos_same_meaning": _mean((text["right"] * text["same_meaning"]).sum(-1)),
        "text_cos_wrong": _mean((text["right"] * text["wrong"]).sum(-1)),
    }
    sideways = [i for i, p in enumerate(pairs) if p.scene.relation in ("left of", "right of")]
    figures["num_left_right_pairs"] = len(sideways)
    if not sideways:
        return figures
    mirror = clip_image_features(clip, images[sideways].flip(-1), batch_size=256)
    own_side, other_side = (clip.encode_text(c) for c in side_captions([pairs[i] for i in sideways]))
    image, right = image[sideways], text["right"][sideways]
    return {
        **figures,
        "image_cos_mirror": _mean((image * mirror).sum(-1)),
        "caption_prefers_image_to_mirror": _mean(preferred((image * right).sum(-1), (mirror * right).sum(-1))),
        "image_prefers_first_object_side": _mean(preferred((image * own_side).sum(-1), (image * other_side).sum(-1))),
    }


def main(argv: list[str] | None = None) -> int:
    from clipcond.data.shapes import load_dataset_info
    from clipcond.evaluation.probes import build_pairs

    args = parse_args(argv)
    info = load_dataset_info(args.data)
    if info is None:
        raise ValueError(f"`--data` {str(args.data)!r} holds no shapes data set (no dataset_info.json)")
    pairs, binding_pairs = (
        build_pairs(probe, args.num_pairs, held_out=info.get("held_out") or (), seed=args.seed)
        for probe in ("relation", "binding")
    )
    resolution = int(info.get("resolution") or 32)
    report = {
        "benchmark": "relation_embeddings",
        "command": command_line("relation_embeddings", argv),
        "settings": {"data": str(args.data), "num_pairs": args.num_pairs, "seed": args.seed},
        "machine": machine(),
        "runs": {str(run): diagnose(run, pairs, resolution, binding_pairs) for run in args.runs},
    }
    print(json.dumps(report, indent=2))
    if args.save_results:
        save_results(args.results_name, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
