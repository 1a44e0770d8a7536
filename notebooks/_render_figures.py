"""Runs the notebooks on a finished `clipcond demo --dalle2` folder and saves one figure of each for the README:

    python notebooks/_render_figures.py DEMO_FOLDER [--output-dir docs/notebooks] [--executed-dir DIR]

Each notebook is executed (nbclient) with CLIPCOND_NOTEBOOK_WORKDIR=DEMO_FOLDER in a temporary working directory,
so it shows the demo's runs and writes nothing into the demo folder or beside the notebooks. The picture of the
cell tagged FIGURE (see _build.py) is saved as a PNG, made smaller when it exceeds --max-kb. The committed
notebooks stay without outputs; --executed-dir keeps the executed copies to look at.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from _build import FIGURE
from nbclient import NotebookClient
from PIL import Image

from clipcond.demo_layout import DemoLayout

HERE = Path(__file__).resolve().parent
# The README's figure of each notebook, by notebook.
FIGURES = {
    "01_pretrain_clip.ipynb": "01_confusion.png",
    "02_stable_diffusion_path.ipynb": "02_samples.png",
    "03_dalle2_path.ipynb": "03_variations.png",
    "04_swap_encoders.ipynb": "04_encoders.png",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", metavar="DEMO_FOLDER", help="the output folder of a finished `clipcond demo --dalle2`")
    parser.add_argument("--output-dir", default=str(HERE.parent / "docs" / "notebooks"), help="where the PNGs go")
    parser.add_argument("--executed-dir", default=None, help="also save the executed notebooks here")
    parser.add_argument("--notebooks", nargs="+", default=list(FIGURES), choices=list(FIGURES), metavar="NAME")
    parser.add_argument("--max-kb", type=int, default=150, help="largest PNG to write, in KB (default 150)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    return parser.parse_args(argv)


def figure_png(notebook: nbformat.NotebookNode, name: str) -> bytes:
    """The first PNG output of the cell tagged FIGURE."""
    for cell in notebook.cells:
        if FIGURE in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                if "image/png" in output.get("data", {}):
                    return base64.b64decode(output["data"]["image/png"])
            raise ValueError(f"{name}: the cell tagged {FIGURE!r} shows no PNG")
    raise ValueError(f"{name}: no cell is tagged {FIGURE!r}; rebuild it with its notebooks/_build*.py")


def small_png(png: bytes, max_bytes: int) -> bytes:
    """`png`, re-encoded optimised and, while it is larger than `max_bytes`, with a 256-colour palette, then
    scaled down."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    for attempt in range(8):
        buffer = io.BytesIO()
        (image if attempt == 0 else image.quantize(256)).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
        if attempt > 0:
            image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    raise ValueError(f"the figure does not fit {max_bytes} bytes")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = DemoLayout(args.demo)
    if not demo.is_finished():
        raise ValueError(f"`DEMO_FOLDER` {args.demo!r} is not a finished `clipcond demo` folder (no report)")
    os.environ["CLIPCOND_NOTEBOOK_WORKDIR"] = str(demo.root.resolve())  # the kernels inherit it
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in args.notebooks:
        notebook = nbformat.read(HERE / name, as_version=4)
        with tempfile.TemporaryDirectory(prefix="clipcond-render-") as cwd:
            start = time.perf_counter()
            NotebookClient(notebook, timeout=args.timeout, resources={"metadata": {"path": cwd}}).execute()
            seconds = time.perf_counter() - start
        if args.executed_dir:
            Path(args.executed_dir).mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, Path(args.executed_dir) / name)
        png = small_png(figure_png(notebook, name), args.max_kb * 1000)
        (output_dir / FIGURES[name]).write_bytes(png)
        print(f"{name}: executed in {seconds:.0f} s; wrote {output_dir / FIGURES[name]} ({len(png) // 1000} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
