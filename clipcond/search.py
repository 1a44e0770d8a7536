"""`clipcond search`: the images of an index (`clipcond index`) closest to a text query or to an image.

    clipcond search --index photos.index "a red circle"
    clipcond search --index photos.index --image query.png --top-k 10 --json

The query is embedded with the index's CLIP (the run folder recorded in the index, or `--model` if it moved; a CLIP
with other weights is refused) and the images are ranked by cosine similarity. Plain output is one line per result,
`rank  score  path`; `--json` prints `{"query", "index", "results": [{"rank", "score", "path"}, ...]}`.
`--ensemble` (or `--templates FILE`) embeds a text query as zero-shot classification does: the query put into each
template ("a photo of a {}."), the embeddings averaged (`clipcond.evaluation.zero_shot`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

import torch

from clipcond.index import ImageIndex
from clipcond.index_queries import embed_image_query, embed_text, load_index_clip
from clipcond.storage import dumps_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond search",
        description="Print the top-k images of an index (`clipcond index`) for a text query or an image.",
    )
    parser.add_argument("query", nargs="?", default=None, metavar="TEXT", help="text query, e.g. 'a red circle'")
    parser.add_argument("--image", default=None, metavar="PATH", help="search with an image instead of text")
    parser.add_argument("--index", required=True, help="index folder written by `clipcond index`")
    parser.add_argument("--top-k", type=int, default=5, help="number of results (default 5)")
    parser.add_argument("--model", default=None, help="the index's CLIP run folder, if it moved (default: recorded)")
    parser.add_argument(
        "--ensemble", action="store_true", help="embed a text query through the zero-shot prompt templates"
    )
    parser.add_argument(
        "--templates", default=None, metavar="FILE", help="templates for --ensemble, one per line with '{}'"
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query (TEXT) or `--image PATH`, not both and not neither")
    if args.query is not None and not args.query.strip():
        raise ValueError(f"the text query is empty ({args.query!r}); give some words, e.g. 'a red circle'")
    if args.top_k < 1:
        raise ValueError(f"`--top-k` must be >= 1, got {args.top_k}")
    if args.image is not None:
        if not os.path.isfile(args.image):
            raise FileNotFoundError(f"`--image` {args.image!r} does not exist")
        if args.ensemble or args.templates:
            raise ValueError("`--ensemble` / `--templates` apply to a text query, not to `--image`")


@torch.no_grad()
def embed_text_query(clip_run, text: str, templates: list[str] | None = None) -> torch.Tensor:
    """The unit-norm embedding (D,) of a text query; with `templates`, the normalised mean over the templates."""
    if not templates:
        return embed_text(clip_run, text)
    from clipcond.evaluation.zero_shot import build_zero_shot_classifier

    return build_zero_shot_classifier(clip_run.encode_text, [text], templates)[0].cpu()


def main(argv: list[str] | None = None) -> int:
    from clipcond.evaluation.zero_shot import DEFAULT_TEMPLATES, load_templates

    args = parse_args(argv)
    check_args(args)
    templates = (
        load_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES) if args.ensemble else None
    )
    index = ImageIndex.load(args.index)
    if len(index) == 0:
        raise ValueError(f"`--index` {args.index!r} holds no images; add images and run `clipcond index` again")
    clip_run = load_index_clip(index, args.model, args.device)

    if args.image is not None:
        query = embed_image_query(clip_run, args.image)
    else:
        query = embed_text_query(clip_run, args.query, templates)
    results = index.search(query, top_k=args.top_k)

    if args.json:
        record = {
            "query": {"text": args.query} if args.image is None else {"image": args.image},
            "index": args.index,
            "results": [asdict(r) for r in results],
        }
        if templates:
            record["query"]["templates"] = templates
        print(dumps_json(record, indent=2))
    else:
        for r in results:
            print(f"{r.rank:>3}  {r.score:.4f}  {r.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
