"""The folders of a `clipcond demo` output folder, in one place: the demo writes them, and `clipcond serve --demo`
and the notebooks read them (`find_notebook_demo`).

    OUT/data/              the shapes data set (imagefolder layout, dataset_info.json)
    OUT/clip/              the CLIP run (`clipcond train clip`), its evaluation in clip/eval/
    OUT/probe/             the compositional probes
    OUT/decoder/           the text-to-image decoder (Stable Diffusion path), eval_generation/ inside
    OUT/judge/             the shapes judge the evaluations share
    OUT/samples/           samples of every colour-shape prompt, as `clipcond generate` writes them
    OUT/prior/, OUT/unclip_decoder/, OUT/unclip_eval/      with --dalle2: the DALL-E 2 path
    OUT/data_64/, OUT/vae/, OUT/latent_decoder/            with --latent: the latent path
    OUT/index/             a search index, if a user wrote one there (`clipcond serve --demo` then uses it)
    OUT/report.md, OUT/report.json, OUT/timings.json
"""

from __future__ import annotations

import os
from pathlib import Path

from clipcond.runs import RunRecord

# The latent path's image size (`clipcond demo --latent`): the tiny VAE downsamples x4, so 64 px images are
# 16 x 16 latents.
LATENT_RESOLUTION = 64


class DemoLayout:
    """The paths inside the demo output folder `root` (whether or not they exist yet)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.data = self.root / "data"
        self.clip = self.root / "clip"
        self.probe = self.root / "probe"
        self.decoder = self.root / "decoder"
        self.judge = self.root / "judge"
        self.samples = self.root / "samples"
        self.prior = self.root / "prior"
        self.unclip_decoder = self.root / "unclip_decoder"
        self.unclip_eval = self.root / "unclip_eval"
        self.latent_data = self.root / f"data_{LATENT_RESOLUTION}"
        self.vae = self.root / "vae"
        self.latent_decoder = self.root / "latent_decoder"
        self.captioner = self.root / "captioner"
        self.index = self.root / "index"
        self.report_md = self.root / "report.md"
        self.report_json = self.root / "report.json"
        self.timings = self.root / "timings.json"

    # The run folders, by name, in the order a reader meets them.
    RUNS = ("clip", "decoder", "prior", "unclip_decoder", "vae", "latent_decoder", "captioner")

    def finished_runs(self) -> dict[str, Path]:
        """The run folders that hold a finished run (a run record), by name."""
        return {name: getattr(self, name) for name in self.RUNS if RunRecord.exists(getattr(self, name))}

    def is_finished(self) -> bool:
        """Whether the demo ran to its report (the last thing it writes)."""
        return self.report_json.is_file()


def find_demo(folder: str | os.PathLike, flag: str = "--demo") -> DemoLayout:
    """The demo folder `folder`, checked: it exists and holds at least a finished CLIP run; errors name `flag`."""
    layout = DemoLayout(folder)
    if not layout.root.is_dir():
        raise FileNotFoundError(f"`{flag}` {os.fspath(folder)!r} does not exist")
    if not RunRecord.exists(layout.clip):
        raise ValueError(
            f"`{flag}` {os.fspath(folder)!r} holds no finished CLIP run (clip/clipcond_run.json); pass the output "
            "folder of `clipcond demo` once its CLIP stage has finished"
        )
    return layout


# The folder a notebook looks for beside itself (its working directory) when CLIPCOND_NOTEBOOK_WORKDIR names none.
NOTEBOOK_DEMO_FOLDER = "demo"


def find_notebook_demo(workdir: str | os.PathLike | None, cwd: str | os.PathLike) -> DemoLayout | None:
    """The finished demo folder a notebook shows instead of training, or None (the notebook trains).

    `workdir` is CLIPCOND_NOTEBOOK_WORKDIR: when set, it is the only folder looked at, so a working folder of the
    notebooks' own runs keeps working as one. Unset (None or ""), `cwd/demo` (`clipcond demo`'s default output
    folder beside the notebook) is looked at. Either counts only when the demo ran to its report: an unfinished
    demo folder is still being written.
    """
    folder = Path(workdir).expanduser() if workdir else Path(cwd) / NOTEBOOK_DEMO_FOLDER
    layout = DemoLayout(folder)
    return layout if layout.is_finished() else None
