"""The runs a `clipcond serve` page works with: which folder plays which part (`RunPaths`, from the flags or from a
demo folder), and the models loaded from them once, kept on one device (`ServedRuns`).
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from dataclasses import dataclass, fields
from pathlib import Path

from clipcond.demo_layout import DemoLayout
from clipcond.pipeline_loading import decoder_of, load_pipeline, pipeline_class_name
from clipcond.runs import RunRecord, check_finished

# How many of a demo's test images the Vary and Caption tabs offer to pick from.
TEST_IMAGES = 36
REQUEST_FOLDER = re.compile(r"\d{5,}-[a-z]+")  # one request's files: `00003-generate`


@dataclass
class RunPaths:
    """The folders of the runs served; None where a part is missing (its tab is not shown)."""

    text_to_image: Path | None = None  # a TextToImagePipeline folder: the Stable Diffusion path
    image_decoder: Path | None = None  # an ImageVariationPipeline or UnCLIPTextToImagePipeline folder
    prior: Path | None = None  # a prior run, paired with `image_decoder` for text -> image (DALL-E 2)
    clip: Path | None = None  # the CLIP of the search index (default: the one the index records)
    index: Path | None = None  # a `clipcond index` folder
    captioner: Path | None = None  # a `clipcond train captioner` run
    demo: Path | None = None  # the demo folder these came from, if any (its report goes on the run panel)
    test_images: Path | None = None  # a folder of images to pick from (a demo's test split)

    def items(self) -> list[tuple[str, Path]]:
        """(part, folder) of the runs given, in field order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]


def paths_from_flags(
    models: list[str], prior=None, clip=None, index=None, captioner=None, demo: DemoLayout | None = None
) -> RunPaths:
    """The parts of `--model` (one text-to-image decoder and/or one image-embedding decoder, told apart by their
    pipeline class) and of the other flags, over those of `demo` if given; errors name the flag and the value."""
    paths = paths_from_demo(demo) if demo is not None else RunPaths()
    seen = set()
    for model in models:
        class_name = pipeline_class_name(model)
        part = "text_to_image" if class_name == "TextToImagePipeline" else "image_decoder"
        if class_name not in ("TextToImagePipeline", "ImageVariationPipeline", "UnCLIPTextToImagePipeline"):
            raise ValueError(
                f"`--model` {model!r} holds a {class_name or 'pipeline of unknown class'}; pass a decoder run "
                "(`clipcond train decoder`, text or image-embedding conditioning) or an unCLIP pipeline folder"
            )
        if part in seen:
            raise ValueError(f"`--model` {model!r} is a second {class_name}; pass at most one decoder of each kind")
        seen.add(part)
        setattr(paths, part, Path(model))
        if part == "image_decoder":
            paths.prior = None  # a demo's prior goes with the demo's decoder, not with this one
    if index is not None:
        paths.clip = None  # an index records its CLIP; a demo's CLIP is for the demo's in-memory index
    for flag, value in (("prior", prior), ("clip", clip), ("index", index), ("captioner", captioner)):
        if value is not None:
            if not os.path.isdir(value):
                raise FileNotFoundError(f"`--{flag}` {os.fspath(value)!r} does not exist")
            setattr(paths, flag, Path(value))
    if clip is not None and index is None and demo is None:
        raise ValueError(
            f"`--clip` {os.fspath(clip)!r} is the CLIP of an index that moved: pass it with `--index INDEX` (or "
            "`--demo OUT`, whose test images it then indexes)"
        )
    if paths.prior is not None and paths.image_decoder is None:
        raise ValueError(
            f"`--prior` {os.fspath(paths.prior)!r} needs an image-embedding decoder to draw its embeddings: pass "
            "`--model` the output folder of `clipcond train decoder --conditioning image-embedding`"
        )
    if not any((paths.text_to_image, paths.image_decoder, paths.index, paths.captioner)):
        raise ValueError(
            "nothing to serve: pass `--model DECODER`, `--index INDEX`, `--captioner CAP` or `--demo OUT`"
        )
    return paths


def paths_from_demo(layout: DemoLayout) -> RunPaths:
    """Every finished run of a `clipcond demo` folder that the page uses (the pixel decoder, or the latent one when
    the demo has no other), its test images (by absolute path: the page sends them), and its index if it has one."""
    runs = layout.finished_runs()
    test_images = (layout.data / "test").resolve()
    return RunPaths(
        text_to_image=runs.get("decoder") or runs.get("latent_decoder"),
        image_decoder=runs.get("unclip_decoder"),
        prior=runs.get("prior") if "unclip_decoder" in runs else None,
        clip=runs.get("clip"),
        index=layout.index if layout.index.is_dir() else None,
        captioner=runs.get("captioner"),
        demo=layout.root,
        test_images=test_images if test_images.is_dir() else None,
    )


def check_output_folder(output_dir: str | os.PathLike, paths: RunPaths) -> None:
    """Refuse an output folder that is, holds or lies in a folder served, or that holds anything but the request
    folders of an earlier server (`ServedRuns.request_folder`): the page sends every file of its output folder, so a
    run's weights, a data set or a user's own files must not be among them."""
    out = Path(output_dir).resolve()
    for part, folder in paths.items():
        folder = Path(folder).resolve()
        if out == folder or out.is_relative_to(folder) or folder.is_relative_to(out):
            raise ValueError(
                f"`--output-dir` {os.fspath(output_dir)!r} is, holds or lies in the {part} folder {str(folder)!r}: "
                "the page sends the files of its output folder; pass a folder of its own"
            )
    entries = list(out.iterdir()) if out.is_dir() else []
    others = sorted(e.name for e in entries if not (e.is_dir() and REQUEST_FOLDER.fullmatch(e.name)))
    if others:
        raise ValueError(
            f"`--output-dir` {os.fspath(output_dir)!r} holds {others[0]!r}, which is not a request folder of "
            "`clipcond serve`: the page sends every file of its output folder; pass an empty or a new folder"
        )


class ServedRuns:
    """The models of `paths`, loaded once on `device` in `dtype` (as `clipcond generate`'s `--device`, `--dtype`);
    each request writes its images into a folder of its own under `output_dir`."""

    def __init__(self, paths: RunPaths, *, output_dir: str | os.PathLike, device: str | None = None, dtype="fp32"):
        from clipcond.device import resolve_device

        check_output_folder(output_dir, paths)
        self.paths, self.dtype = paths, dtype
        self.device = resolve_device(device)
        self.lock = threading.Lock()  # held by every request that uses a model: one at a time
        self.output_dir = Path(output_dir)
        self._requests = itertools.count()
        options = {"device": str(self.device), "dtype": dtype}
        self.text_to_image = load_pipeline(paths.text_to_image, **options) if paths.text_to_image else None
        self.unclip, self.variation = None, None
        if paths.image_decoder is not None:
            pipe = load_pipeline(paths.image_decoder, prior=paths.prior, **options)
            self.unclip = pipe if type(pipe).__name__ == "UnCLIPTextToImagePipeline" else None
            self.variation = decoder_of(pipe, paths.image_decoder)
        self.clip_run, self.index = self._load_search()
        self.captioner = self._load_captioner()
        self.test_images = self._test_images()

    def _load_search(self):
        """The index and its CLIP: `paths.index` (checked against `paths.clip` if given), or, for a demo without
        one, an index of its test images built in memory (nothing is written into the demo folder)."""
        from clipcond.index import ImageIndex
        from clipcond.index_queries import load_index_clip
        from clipcond.models.clip import load_clip

        if self.paths.index is not None:
            index = ImageIndex.load(self.paths.index)
            clip = None if self.paths.clip is None else os.fspath(self.paths.clip)
            return load_index_clip(index, clip, str(self.device), flag="--clip"), index
        if self.paths.demo is not None and self.paths.clip is not None and self.paths.test_images is not None:
            clip_run = load_clip(self.paths.clip, device=self.device, progress=False, what="the demo's CLIP")
            return clip_run, ImageIndex.build(self.paths.test_images, clip_run, dtype="fp32")
        return None, None

    def _load_captioner(self):
        if self.paths.captioner is None:
            return None
        from clipcond.models.captioner import Captioner

        check_finished(self.paths.captioner, "`--captioner`")
        return Captioner.from_pretrained(self.paths.captioner, what="--captioner").to(self.device)

    def _test_images(self) -> list[tuple[str, Path]]:
        """("file: caption", file) of the first `TEST_IMAGES` images of the test split, as its metadata lists them."""
        from clipcond.data.folders import ImageCaptionDataset

        if self.paths.test_images is None:
            return []
        split = ImageCaptionDataset(self.paths.test_images)
        pairs = zip(split.image_paths[:TEST_IMAGES], split.captions, strict=False)
        return [(f"{path.name}: {caption}", path) for path, caption in pairs]

    def request_folder(self, kind: str) -> Path:
        """A new folder for one request's files (`00003-generate`, matching `REQUEST_FOLDER`), under `output_dir`."""
        folder = self.output_dir / f"{next(self._requests):05d}-{kind}"
        while folder.exists():  # an output folder reused across restarts
            folder = self.output_dir / f"{next(self._requests):05d}-{kind}"
        return folder

    @property
    def tabs(self) -> list[str]:
        """The tabs the runs allow, in page order."""
        draws_text = self.text_to_image is not None or self.unclip is not None
        tabs = {
            "Generate": draws_text,
            "Vary": self.variation is not None,
            "Search": self.index is not None,
            "Caption": self.captioner is not None,
            "Compare": draws_text,
        }
        return [name for name, shown in tabs.items() if shown]

    def records(self) -> dict[str, RunRecord]:
        """The run record of each run served (its `clipcond_run.json`), by part."""
        parts = ("text_to_image", "image_decoder", "prior", "clip", "captioner")
        return {
            part: RunRecord.read(folder)
            for part, folder in self.paths.items()
            if part in parts and RunRecord.exists(folder)
        }
