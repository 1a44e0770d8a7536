"""`clipcond eval captioner`: what a captioner says about the shapes test images.

    clipcond eval captioner --model runs/cap --data shapes/

On the one-object images of the split, the greedy caption (and the best of `--best-of` candidates, the caption
`clipcond caption` writes by default: `Captioner.generate_best_of`) is read for its colour, shape, count and
position words by the probes' caption reader (`clipcond.evaluation.probes.read_caption`, which pairs each shape with
the colour before it and counts a plural, or "two", as two objects); a field is right when the caption names the
true value and no other ("a red circle and a blue circle" gets count and colour wrong; a caption that names no
position gets its position wrong). Accuracy per field with its 95% Wilson interval (`clipcond.evaluation.stats`),
beside chance (one over the number of values), for the images of compositions seen in training and the held-out ones
separately. A captioner trained with questions (`clipcond.data.questions`) is also asked to describe each image (the
`describe` question, whose answers always name the position), and its descriptions are scored the same way; and it
is asked every question of every image of the split, its answers scored by exact match, per question type.

Writes `OUTPUT_DIR/captioner.json` (default `MODEL/eval/`) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from clipcond.data.questions import DESCRIBE, QUESTION_TYPES, questions_for
from clipcond.device import resolve_device
from clipcond.evaluation.arguments import add_output_arguments, check_at_least, eval_parser
from clipcond.evaluation.probes import CaptionFields, read_caption
from clipcond.evaluation.stats import wilson_interval
from clipcond.models.captioner import CAPTION_BEST_OF
from clipcond.storage import check_output_dir, write_json_atomic

CAPTION_FIELDS = ("colour", "shape", "count", "position")
# the texts scored, as `captioner.json` names them: greedy captions, the best of several, detailed descriptions
TEXTS = ("caption", "best_of", "description")


def score_caption(said: CaptionFields, obj: dict) -> dict[str, bool]:
    """Per field: whether a caption of a one-object image (`said`, as `read_caption` reads it; `obj`, the image's
    metadata object) names the object's value and no other."""
    named = {
        "colour": {colour for colour, _ in said.objects},
        "shape": {shape for _, shape in said.objects},
        "count": said.count,
        "position": set(said.positions),
    }
    truth = {"colour": {obj["colour"]}, "shape": {obj["shape"]}, "count": 1, "position": {obj["position"]}}
    return {field: named[field] == truth[field] for field in CAPTION_FIELDS}


def _proportion(hits: int, n: int) -> dict:
    low, high = wilson_interval(hits, n)
    return {"accuracy": hits / n if n else None, "low": low, "high": high, "n": n}


@torch.no_grad()
def evaluate_captioner(
    captioner,
    dataset,
    *,
    info: dict,
    questions: bool,
    max_images: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    best_of: int = 1,
) -> dict:
    """The figures of the module docstring for `dataset` (an `ImageCaptionDataset` of the shapes data at the
    captioner's resolution, whose `records` hold the metadata) and the data set's `info` (dataset_info.json);
    `best_of` > 1 also scores the best of that many candidates per image (`Captioner.generate_best_of`, sampled from
    a generator of seed 0)."""
    records = dataset.records
    singles = [i for i, r in enumerate(records) if r.get("kind") == "single"][:max_images]
    if not singles:
        raise ValueError(f"the data set {dataset!r} has no one-object images to caption")

    # 1. captions of the one-object images, and with questions their descriptions
    chance = {
        "colour": 1 / len(info["colours"]),
        "shape": 1 / len(info["shapes"]),
        "count": 1 / 2,
        "position": 1 / len(info["positions"]),
    }
    result = {"num_images": len(singles), "chance": chance}
    generator = torch.Generator(device=captioner.device).manual_seed(0)
    writers = {"caption": lambda pixels: captioner.generate(pixels, max_new_tokens=max_new_tokens)}
    if best_of > 1:
        writers["best_of"] = lambda pixels: captioner.generate_best_of(
            pixels, best_of=best_of, max_new_tokens=max_new_tokens, generator=generator
        )
    if questions:
        writers["description"] = lambda pixels: captioner.generate(pixels, DESCRIBE, max_new_tokens=max_new_tokens)
    for name, write in writers.items():
        result[name] = _score_texts(write, dataset, singles, batch_size)
    if best_of > 1:
        result["best_of"]["candidates"] = best_of

    # 2. answers to every question of every image
    if questions:
        asked = [(i, q) for i in range(len(records))[:max_images] for q in questions_for(records[i])]
        right, total = defaultdict(int), defaultdict(int)
        for start in range(0, len(asked), batch_size):
            chunk = asked[start : start + batch_size]
            answers = captioner.generate(
                _pixels(dataset, [i for i, _ in chunk]),
                [q.question for _, q in chunk],
                max_new_tokens=max_new_tokens,
            )
            for (_, q), answer in zip(chunk, answers, strict=True):
                total[q.kind] += 1
                right[q.kind] += answer.strip().lower() == q.answer
        result["questions"] = {kind: _proportion(right[kind], total[kind]) for kind in QUESTION_TYPES if total[kind]}
    return result


def _pixels(dataset, indices: list[int]) -> torch.Tensor:
    return torch.stack([dataset[i]["pixel_values"] for i in indices])  # (B, 3, S, S) uint8


def _score_texts(write, dataset, singles, batch_size) -> dict:
    """Per field, the share of one-object images whose text (`write(pixels)` of a batch: captions, or answers)
    names the true value and no other: for seen and held-out compositions and all; the share that names a position;
    examples."""
    records = dataset.records
    hits = {group: defaultdict(int) for group in ("seen", "heldout")}
    counts, examples, names_position = defaultdict(int), [], 0
    for start in range(0, len(singles), batch_size):
        chunk = singles[start : start + batch_size]
        texts = write(_pixels(dataset, chunk))
        for i, text in zip(chunk, texts, strict=True):
            group = "heldout" if records[i].get("heldout") else "seen"
            counts[group] += 1
            said = read_caption(text)
            for field, right in score_caption(said, records[i]["objects"][0]).items():
                hits[group][field] += right
            names_position += bool(said.positions)
            if len(examples) < 12:
                examples.append({"file": records[i]["file_name"], "truth": records[i]["text"], "text": text})
    scores = {}
    for group in ("seen", "heldout", "all"):
        n = sum(counts.values()) if group == "all" else counts[group]
        scores[group] = {}
        for field in CAPTION_FIELDS:
            right = hits["seen"][field] + hits["heldout"][field] if group == "all" else hits[group][field]
            scores[group][field] = _proportion(right, n)
    return {**scores, "names_position": names_position / len(singles), "examples": examples}


def flat_figures(result: dict) -> dict[str, float]:
    """The headline numbers as flat scalars (for training logs): caption (and description) accuracy per field over
    all one-object images, and question accuracy per type."""
    figures = {}
    for text in TEXTS:
        if text in result:
            figures |= {f"{text}_{f}": result[text]["all"][f]["accuracy"] for f in CAPTION_FIELDS}
    for kind, value in result.get("questions", {}).items():
        figures[f"qa_{kind}"] = value["accuracy"]
    return figures


# ------------------------------------------------------------------------------------------------ the command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = eval_parser(
        "clipcond eval captioner",
        "Caption the one-object images of the shapes data and score the colour, shape, count and position words; "
        "ask the data's questions when the captioner was trained with them.",
        model="captioner run folder (from `clipcond train captioner`)",
        shapes=True,
    )
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--max-images", type=int, default=None, help="first N images of the split (default all)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per generation call (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest caption in tokens (default 32)")
    parser.add_argument(
        "--best-of",
        type=int,
        default=CAPTION_BEST_OF,
        metavar="N",
        help="also score the best of N candidates per image, as `clipcond caption --best-of N` writes captions (the "
        f"candidates sampled from one generator of seed 0 over the split) (default {CAPTION_BEST_OF}, its default; 1 "
        "skips them)",
    )
    add_output_arguments(parser, output_dir="where captioner.json goes (default MODEL/eval)")
    args = parser.parse_args(argv)
    check_at_least(args, 1, "batch_size", "max_new_tokens", "best_of")
    if args.max_images is not None:
        check_at_least(args, 1, "max_images")
    return args


def main(argv: list[str] | None = None) -> int:
    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.data.shapes import is_shapes_data, load_dataset_info
    from clipcond.models.captioner import Captioner
    from clipcond.runs import RunRecord, check_finished

    args = parse_args(argv)
    # 1. check the inputs before the slow loads
    info = load_dataset_info(args.data) if Path(args.data).is_dir() else None
    if not is_shapes_data(info):
        raise ValueError(f"`--data` {args.data!r} is not the shapes data (no shapes dataset_info.json)")
    check_finished(args.model, "`--model`")
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.model) / "eval"
    check_output_dir(output_dir)

    # 2. the captioner and the split at its resolution
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars
    captioner = Captioner.from_pretrained(args.model).to(resolve_device(args.device))
    record = RunRecord.read_if_present(args.model)
    questions = bool(record is not None and record.sections.get("tasks", {}).get("questions"))
    dataset = ImageCaptionDataset(
        args.data, split=args.split, resolution=captioner.image_size, allow_outside_paths=args.allow_outside_paths
    )

    # 3. evaluate, write, print
    result = evaluate_captioner(
        captioner,
        dataset,
        info=info,
        questions=questions,
        max_images=args.max_images,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        best_of=args.best_of,
    )
    result = {"model": str(args.model), "data": str(args.data), "split": args.split, **result}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "captioner.json", result)
    print(json.dumps({"num_images": result["num_images"], **flat_figures(result)}))
    labels = {"caption": "greedy captions", "best_of": f"best of {args.best_of}", "description": "descriptions"}
    for name, label in labels.items():
        for group in ("seen", "heldout") if name in result else ():
            figures = result[name][group]
            line = ", ".join(f"{f} {_percent(figures[f])}" for f in CAPTION_FIELDS)
            print(f"{label}, {group} compositions ({figures['colour']['n']} images): {line}")
    if "questions" in result:
        print("answers: " + ", ".join(f"{k} {_percent(v)}" for k, v in result["questions"].items()))
    return 0


def _percent(p: dict) -> str:
    if p["accuracy"] is None:
        return "n/a"
    return f"{p['accuracy']:.1%} [{p['low']:.1%}, {p['high']:.1%}]"


if __name__ == "__main__":
    raise SystemExit(main())
