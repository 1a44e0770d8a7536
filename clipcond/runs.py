"""The run record: `clipcond_run.json`, what a training run writes into its output folder when it has finished.

Every training stage writes it through `RunRecord.write` (`clipcond.train.loop.finish_run`), last, so its presence
says the run finished; every reader (the demo, the evaluations, the encoders and pipelines that check lineage) reads
it through `RunRecord.read`. The JSON is one object:

    {"kind": "clipcond-decoder", "args": {...the entry point's arguments...},
     ...the stage's own sections (data, clip, encoder, unet or prior, ema, ...)...,
     "summary": {...steps, final loss, validation...}}

A stage's sections are what its `record()` returns; the typed accessors below name the ones other modules read.
`Lineage` is the frozen encoder a model was trained on, and `check_same_encoder` the one comparison of two of them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipcond.finite import finite_or_null
from clipcond.storage import write_json_atomic

logger = logging.getLogger(__name__)

RUN_RECORD = "clipcond_run.json"  # in a run folder: arguments, data, model, summary; written last, when it is done
KINDS = ("clipcond-clip", "clipcond-decoder", "clipcond-prior", "clipcond-vae", "clipcond-captioner")


@dataclass(frozen=True)
class Lineage:
    """The frozen encoder a model was trained on (`FrozenEncoder.lineage()`), compared by content hash."""

    kind: str | None  # "clipcond", "transformers", "open_clip", "t5"
    name: str | None  # the run folder, path or model name it was loaded from
    content_hash: str | None  # `clipcond.lineage.content_hash` of its weights and config

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "content_hash": self.content_hash}


@dataclass
class RunRecord:
    """A run folder's `clipcond_run.json`, as written and read.

    `sections` keeps the stage's own sections in their order; `to_dict` lays them out between `args` and `summary`,
    as the file holds them. Hand-made records (tests, older tools) may lack `kind`, `args` or `summary`.
    """

    kind: str | None  # one of `KINDS`
    args: dict[str, Any] = field(default_factory=dict)  # the entry point's arguments, `vars(args)`
    sections: dict[str, Any] = field(default_factory=dict)  # the stage's `record()`: data, clip, encoder, unet, ...
    summary: dict[str, Any] = field(default_factory=dict)  # `clipcond.train.loop.summary`: steps, final loss, ...
    path: Path | None = field(default=None, compare=False)  # the file it was read from, for messages

    # ------------------------------------------------------------------------------------------- reading, writing

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> RunRecord:
        if not isinstance(data, dict):
            raise ValueError(f"{str(path)!r} holds {type(data).__name__}, not a run record object")
        sections = {key: value for key, value in data.items() if key not in ("kind", "args", "summary")}
        return cls(data.get("kind"), data.get("args") or {}, sections, data.get("summary") or {}, path)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: `kind`, `args`, the sections, `summary`."""
        return {"kind": self.kind, "args": self.args, **self.sections, "summary": self.summary}

    @staticmethod
    def exists(folder: str | os.PathLike) -> bool:
        """Whether `folder` holds a run record, i.e. a finished run."""
        return (Path(folder) / RUN_RECORD).is_file()

    @classmethod
    def read(cls, folder: str | os.PathLike) -> RunRecord:
        """The record of the run in `folder`; `FileNotFoundError` without one, `ValueError` when it is not JSON."""
        path = Path(folder) / RUN_RECORD
        if not path.is_file():
            raise FileNotFoundError(f"{str(folder)!r} holds no {RUN_RECORD} (a finished `clipcond train` run has one)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r} is not valid JSON ({err})") from None
        return cls.from_dict(data, path)

    @classmethod
    def read_if_present(cls, folder: str | os.PathLike) -> RunRecord | None:
        """`read`, or None when `folder` holds no record."""
        return cls.read(folder) if cls.exists(folder) else None

    def write(self, folder: str | os.PathLike) -> Path:
        """Write the record into `folder` atomically, non-finite numbers as null (a diverged run still finishes)."""
        path = Path(folder) / RUN_RECORD
        write_json_atomic(path, finite_or_null(self.to_dict()))
        return path

    # ------------------------------------------------------------------------------------------- typed accessors

    def section(self, name: str) -> Any:
        """A stage section (`data`, `unet`, `prior`, `image_embedding`, ...); a `ValueError` naming the file when
        the record has none."""
        if name not in self.sections:
            raise ValueError(f"{str(self.path or RUN_RECORD)!r} has no {name!r} section (kind {self.kind!r})")
        return self.sections[name]

    @property
    def clip(self) -> dict[str, Any]:
        """`{"path", "content_hash"}` of the CLIP (or encoder) a decoder or prior was trained on; {} when unrecorded."""
        clip = self.sections.get("clip")
        return clip if isinstance(clip, dict) else {}

    @property
    def clip_path(self) -> str | None:
        return self.clip.get("path") or None

    @property
    def clip_hash(self) -> str | None:
        """The content hash of the CLIP a decoder or prior was trained on."""
        return self.clip.get("content_hash") or None

    @property
    def content_hash(self) -> str | None:
        """A CLIP run's own content hash (its top-level weights and config)."""
        return self.sections.get("content_hash")

    @property
    def hard_negatives(self) -> dict[str, Any] | None:
        """A CLIP run's `--hard-negatives` section (`{"kinds", "share", "share_by_kind", ...}`); None for a CLIP
        trained without them (the plain recipe)."""
        section = self.sections.get("hard_negatives")
        return section if isinstance(section, dict) else None

    @property
    def counterfactual_pairs(self) -> dict[str, Any] | None:
        """A CLIP run's `--counterfactual-pairs` section (`{"kinds", "weight", "share", "share_by_kind", ...}`,
        "weight" the `--counterfactual-weight`: from the arguments where the section predates it, 0 where they do
        too; "kind_weights" the `--counterfactual-kind-weights` dict, {} where none were given, from the arguments
        as the weight); None for a CLIP trained without twins."""
        section = self.sections.get("counterfactual_pairs")
        if not isinstance(section, dict):
            return None
        defaults = {
            "weight": self.args.get("counterfactual_weight", 0.0),
            "kind_weights": self.args.get("counterfactual_kind_weights") or {},
        }
        return {**defaults, **section}

    @property
    def lineage(self) -> Lineage | None:
        """The encoder the run was trained on; records from before the encoder interface give only
        `clip.content_hash` (a clipcond CLIP). None when the record names none."""
        encoder = self.sections.get("encoder")
        if isinstance(encoder, dict):
            return Lineage(encoder.get("kind"), encoder.get("name"), encoder.get("content_hash"))
        if self.clip_hash:
            return Lineage("clipcond", self.clip_path, self.clip_hash)
        return None

    @property
    def model_section(self) -> dict[str, Any]:
        """The trained model's section: `unet` of a decoder, `prior` of a prior."""
        return self.section("prior" if self.kind == "clipcond-prior" else "unet")

    @property
    def parameters(self) -> int:
        """The trained model's parameter count."""
        return self.model_section["parameters"]

    @property
    def ema(self) -> dict[str, Any] | None:
        """The EMA's record (`decay`, `last_decay`, `optimization_step`), None when trained without one."""
        return self.sections.get("ema")

    @property
    def embedding_tokens(self) -> int:
        """An image-embedding decoder's number of context tokens made from the CLIP image embedding."""
        return self.section("image_embedding")["embedding_tokens"]

    @property
    def max_noise_level(self) -> int:
        """An image-embedding decoder's embedding noise augmentation (0: none)."""
        return self.section("image_embedding")["max_noise_level"]


def check_same_encoder(
    trained_on: str | None,
    given: str | None,
    *,
    mismatch: str,
    missing: str = "no run record names what it was trained on",
    fix: str,
    allowed_by: str,
    allow: bool,
    log: logging.Logger = logger,
) -> bool:
    """The one lineage check: refuse to pair a model trained on the encoder with content hash `trained_on` with an
    encoder (or a model trained on one) of content hash `given`, unless `allow`, which only warns.

    `mismatch` says what differs, `missing` what is unknown when `trained_on` is None (nothing recorded); the error
    appends `fix`, the warning names `allowed_by`. Returns whether the two differ (or are unknown) and were allowed.
    """
    if trained_on is not None and trained_on == given:
        return False
    message = missing if trained_on is None else mismatch
    if not allow:
        raise ValueError(f"{message}; {fix}")
    log.warning("%s (allowed by %s)", message, allowed_by)
    return True


def check_finished(folder: str | os.PathLike, what: str) -> None:
    """Refuse a training run folder that was killed before it finished: it has checkpoints but no `RUN_RECORD`, so
    its top-level model may be missing or a mix of two exports. `what` names the argument."""
    folder = Path(folder)
    if (folder / "checkpoints").is_dir() and not (folder / RUN_RECORD).is_file():
        raise ValueError(
            f"{what} {str(folder)!r} is an unfinished training run (it has checkpoints/ but no {RUN_RECORD}): resume "
            "it with `--resume-from-checkpoint latest` and the same arguments, or pass one of its "
            "checkpoints/checkpoint-N/pretrained folders"
        )
