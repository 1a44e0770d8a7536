"""Where a CLIP's held-out zero-shot errors come from: its image tower or its text tower (a diagnosis, not a bar).

    python benchmarks/heldout_diagnosis.py --demo-dir DIR --seeds 0,1,2   # the CLIPs of decoder_quality.py's demos
    python benchmarks/heldout_diagnosis.py --clip RUN --data DIR          # one CLIP and its shapes data

On the one-object test images of the shapes data, per CLIP:
- `zero_shot_*`: the zero-shot classification of `clipcond eval clip` (the 18 class prompts through the default
  templates), and on the held-out compositions the share whose predicted class has the right colour, and the right
  shape;
- `image_*_heldout`: the image tower alone. Each image is given the colour (the shape) of the nearest centroid of the
  seen images of each colour (each shape), averaged over the other attribute. Near 100% on seen images; on held-out
  ones it says whether the image embedding carries the attribute in the same direction as it does for the seen pairs;
- `image_class_centroid_heldout`: each image given the class of the nearest centroid of the true images of every
  class (held-out ones included): whether the held-out classes are separable at all in the image embedding;
- `text_arithmetic_heldout`: zero-shot with each held-out class vector replaced by t(c, s') + t(c', s) - t(c', s')
  averaged over seen triples: whether the text tower composes better than it reads the unseen phrase.
`--save-results` writes the object to benchmarks/results/heldout_diagnosis.json. Progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import add_demo_args, add_results_flag, check_demo_args, command_line, save_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/heldout_diagnosis.py",
        description="Read a CLIP's held-out zero-shot errors apart: image tower or text tower; print one JSON object.",
    )
    parser.add_argument("--clip", type=Path, help="CLIP run folder")
    parser.add_argument("--data", type=Path, help="its shapes data set root")
    add_demo_args(parser)
    add_results_flag(parser, "heldout_diagnosis")
    args = parser.parse_args(argv)
    if (args.demo_dir is None) == (args.clip is None) or (args.clip is None) != (args.data is None):
        raise ValueError("pass `--clip` with `--data`, or `--demo-dir` with `--seeds`")
    check_demo_args(args)
    return args


def _centroids(features, names: list[str], values: list[str], rows):
    """Unit centroids (len(values), D) of `features` at `rows`, grouped by `names`."""
    import torch

    groups = [[i for i in rows if names[i] == value] for value in values]
    return torch.nn.functional.normalize(torch.stack([features[g].mean(0) for g in groups]), dim=-1)


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def diagnose(clip_dir: Path, data_dir: Path) -> dict:
    """The figures of the module docstring for one CLIP."""
    import torch

    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.evaluation.zero_shot import DEFAULT_TEMPLATES, build_zero_shot_classifier
    from clipcond.models.clip import load_clip

    run = load_clip(clip_dir, progress=False)
    dataset = ImageCaptionDataset(data_dir, split="test", resolution=run.image_size)
    info, records = dataset.info, dataset.records
    singles = [i for i, r in enumerate(records) if r.get("kind") == "single"]
    pixels = torch.stack([dataset[i]["pixel_values"] for i in singles])
    features = torch.cat([run.encode_images(pixels[k : k + 256]) for k in range(0, len(pixels), 256)]).cpu()
    labels = [records[i]["label"] for i in singles]
    colours, shapes = [label.split()[0] for label in labels], [label.split()[1] for label in labels]
    held_out, classes = set(info["held_out"]), list(info["classes"])
    seen = [k for k, label in enumerate(labels) if label not in held_out]
    heldout = [k for k, label in enumerate(labels) if label in held_out]

    text = build_zero_shot_classifier(run.encode_text, classes, DEFAULT_TEMPLATES).cpu()
    predicted = [classes[c] for c in (features @ text.T).argmax(1).tolist()]
    result = {
        "num_images_seen": len(seen),
        "num_images_heldout": len(heldout),
        "zero_shot_seen": _share([predicted[k] == labels[k] for k in seen]),
        "zero_shot_heldout": _share([predicted[k] == labels[k] for k in heldout]),
        "zero_shot_heldout_colour_right": _share([predicted[k].split()[0] == colours[k] for k in heldout]),
        "zero_shot_heldout_shape_right": _share([predicted[k].split()[1] == shapes[k] for k in heldout]),
    }
    for name, attribute, values in (("colour", colours, list(info["colours"])), ("shape", shapes, info["shapes"])):
        nearest = (features @ _centroids(features, attribute, values, seen).T).argmax(1).tolist()
        for group, rows in (("seen", seen), ("heldout", heldout)):
            result[f"image_{name}_centroid_{group}"] = _share([values[nearest[k]] == attribute[k] for k in rows])
    nearest = (features @ _centroids(features, labels, classes, range(len(labels))).T).argmax(1).tolist()
    result["image_class_centroid_heldout"] = _share([classes[nearest[k]] == labels[k] for k in heldout])

    composed = text.clone()
    for pair in held_out:
        colour, shape = pair.split()
        vectors = [
            text[classes.index(f"{colour} {s}")]
            + text[classes.index(f"{c} {shape}")]
            - text[classes.index(f"{c} {s}")]
            for c in info["colours"]
            for s in info["shapes"]
            if c != colour and s != shape and not {f"{colour} {s}", f"{c} {shape}", f"{c} {s}"} & held_out
        ]
        composed[classes.index(pair)] = torch.nn.functional.normalize(torch.stack(vectors).mean(0), dim=0)
    predicted = [classes[c] for c in (features @ composed.T).argmax(1).tolist()]
    result["text_arithmetic_heldout"] = _share([predicted[k] == labels[k] for k in heldout])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.demo_dir is None:
        report = {"clip": str(args.clip), "data": str(args.data), "figures": diagnose(args.clip, args.data)}
    else:
        folders = {seed: args.demo_dir / f"seed-{seed}" for seed in args.seeds}
        per_seed = {str(seed): diagnose(folder / "clip", folder / "data") for seed, folder in folders.items()}
        report = {"demo_dir": str(args.demo_dir), "seeds": args.seeds, "per_seed": per_seed}
    report["command"] = command_line("heldout_diagnosis", argv)
    print(json.dumps(report, indent=2))
    if args.save_results:
        print(f"wrote {save_results(args.results_name, report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
