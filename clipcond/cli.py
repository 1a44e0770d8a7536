"""The `clipcond` command line: a thin dispatcher over the entry points of the library.

Each leaf command names a module with `main(argv)`; the module is imported only when its command runs, so
`clipcond --help` stays fast and each command's own `--help` is its module's argparse parser. The same modules run
under `accelerate launch -m <module> ...` for multi-process training.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from clipcond.runlock import RunFolderBusyError
from clipcond.storage import DiskFullError

# Reported as one line: a full disk and a busy run folder too (their messages name the file or the folder, and
# nothing saved before is lost).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, DiskFullError, RunFolderBusyError)


@dataclass(frozen=True)
class Command:
    module: str  # imported lazily; must define `main(argv: list[str] | None) -> int | None`
    help: str


# The command tree: groups are dicts, leaves are `Command`s. Order is the order shown in `--help`.
COMMANDS: dict = {
    "demo": Command("clipcond.demo", "end to end on the built-in data: data, CLIP, decoder, samples, report"),
    "data": {
        "shapes": Command("clipcond.data.shapes", "write the built-in synthetic shapes data set (imagefolder layout)"),
        "convert": Command("clipcond.data.convert", "convert an imagefolder/CSV data set to WebDataset tar shards"),
        "tuxpaint": Command("clipcond.data.tuxpaint", "Tux Paint clip-art stamps -> an image-caption data set"),
    },
    "train": {
        "clip": Command("clipcond.train.clip", "pretrain a CLIP (transformers CLIPModel) with a contrastive loss"),
        "decoder": Command("clipcond.train.decoder", "train a diffusers UNet on a CLIP run's frozen text encoder"),
        "prior": Command(
            "clipcond.train.prior", "train a DALL-E 2 prior: CLIP text embedding -> CLIP image embedding"
        ),
        "vae": Command(
            "clipcond.train.vae", "train a latent-diffusion autoencoder (diffusers AutoencoderKL) on images"
        ),
        "captioner": Command(
            "clipcond.train.captioner", "train a LLaVA-style captioner: a small language model on the frozen CLIP"
        ),
    },
    "eval": {
        "clip": Command("clipcond.evaluation.clip", "zero-shot accuracy and retrieval recall of a CLIP run"),
        "generation": Command(
            "clipcond.evaluation.generation",
            "what a text-to-image run draws: judged on the shapes data; CLIP score, FD, grids on any data",
        ),
        "prior": Command(
            "clipcond.evaluation.prior", "cosine of a prior's image embeddings to the true ones, beside baselines"
        ),
        "unclip": Command(
            "clipcond.evaluation.unclip",
            "judge the DALL-E 2 path: variations, text-to-image through the prior, the prior's cosine",
        ),
        "captioner": Command(
            "clipcond.evaluation.captioner", "colour, shape, count, position words of a captioner's captions; answers"
        ),
    },
    "generate": Command("clipcond.generate", "images from text prompts with a trained pipeline: PNGs, grid, records"),
    "vary": Command("clipcond.vary", "variations of images with an image-embedding (DALL-E 2) decoder"),
    "interpolate": Command(
        "clipcond.interpolate", "a row of images between two prompts (through a prior) or two images"
    ),
    "probe": Command(
        "clipcond.probe", "compositional probes: CLIP minimal pairs, generators' prompts judged, against chance"
    ),
    "caption": Command(
        "clipcond.caption", "captions of images with a captioner run (the best of 8 candidates, or sampled)"
    ),
    "ask": Command("clipcond.ask", "a captioner's answer to a question about images"),
    "index": Command("clipcond.build_index", "embed a folder of images with a CLIP into a search index (incremental)"),
    "search": Command("clipcond.search", "top-k images of an index for a text query or an image"),
    "serve": Command("clipcond.serve", "a web page (Gradio) to generate, vary, search and caption with trained runs"),
    "export": {
        "open-clip": Command(
            "clipcond.export_open_clip", "write a CLIP run's weights for open_clip's `local-dir:` loader"
        ),
        "stable-diffusion": Command(
            "clipcond.export_stable_diffusion",
            "a latent text-to-image run as a stock diffusers StableDiffusionPipeline",
        ),
        "diffusers": Command(
            "clipcond.export_diffusers",
            "an older decoder or prior run with its pipeline's code, for stock diffusers without clipcond",
        ),
    },
}


def _format_help(path: list[str], node: dict) -> str:
    prog = " ".join(["clipcond", *path])
    lines = [f"usage: {prog} <command> [options]", ""]
    if not path:
        lines += ["Pretrain a CLIP, freeze it, and condition diffusers UNets on it.", ""]
    lines.append("commands:")
    width = max(len(name) for name in node) + 2
    for name, child in node.items():
        if isinstance(child, Command):
            lines.append(f"  {name:<{width}}{child.help}")
        else:
            lines.append(f"  {name:<{width}}{', '.join(child)}")
    lines += ["", f"Run `{prog} <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from clipcond import __version__

        print(f"clipcond {__version__}")
        return 0

    node, path = COMMANDS, []
    while isinstance(node, dict) and argv and argv[0] in node:
        path.append(argv.pop(0))
        node = node[path[-1]]

    if isinstance(node, Command):
        from clipcond.allocator import keep_freed_memory

        keep_freed_memory()  # before the command allocates its first tensors
        module = importlib.import_module(node.module)
        try:
            return int(module.main(argv) or 0)
        except USER_ERRORS as err:
            # Bad input is reported as one line naming the argument and value, not a traceback.
            # Set CLIPCOND_DEBUG=1 to see where it came from.
            if os.environ.get("CLIPCOND_DEBUG"):
                raise
            print(f"{' '.join(['clipcond', *path])}: error: {err}", file=sys.stderr)
            return 2

    if not argv or argv[0] in ("-h", "--help"):
        print(_format_help(path, node))
        return 0
    prog = " ".join(["clipcond", *path])
    print(_format_help(path, node), file=sys.stderr)
    print(f"\n{prog}: error: unknown command {argv[0]!r}; choose from {', '.join(node)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
