"""`clipcond index`: a CLIP search index over a folder of images, kept up to date incrementally.

    clipcond index --model runs/clip photos/ --output photos.index
    clipcond search --index photos.index "a red circle"

An index is a folder holding two files:

- `embeddings.safetensors`: the tensor `embeddings` (N, D), the L2-normalised CLIP image embeddings (fp16 by default,
  or fp32), one row per image that could be decoded; its metadata names the CLIP run (path and content hash, see
  `clipcond.lineage`), the image folder and the SHA-256 of the file list it goes with;
- `files.jsonl`: one line per image file found, `{"path", "size", "mtime_ns", "row"}`, sorted by `path` (relative to
  the image folder, with "/"), `row` the file's embedding row, or null for a file that could not be decoded.

The folder is searched recursively for `IMAGE_EXTENSIONS`. Images are decoded, resized and centre-cropped to the CLIP's
resolution by `clipcond.data.folders.ImageCaptionDataset`, which also logs a warning for each file it cannot decode.
Running `clipcond index` again on the same folder and index updates it: only files that are new, or whose size or
modification time changed, are embedded; removed files are dropped; an unreadable file is tried again only once it
changes. The CLIP of an index is fixed: updating or searching with another one is refused (`--rebuild` starts over).

A file found in the folder that is a symlink to a file outside it is skipped with a warning, and left out of the
index, unless `--allow-outside-paths` is given: a folder from someone else must not make the index (and `clipcond
search`) read and show any image the user can read. Links that stay inside the folder are followed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipcond.finite import check_finite_tensor
from clipcond.storage import dumps_json, writing

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EMBEDDINGS_FILE = "embeddings.safetensors"
FILES_FILE = "files.jsonl"
INDEX_FORMAT = "clipcond-image-index"
INDEX_FORMAT_VERSION = 1
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass
class FileEntry:
    """One image file of the indexed folder, as `files.jsonl` stores it."""

    path: str  # relative to the index's root, "/"-separated
    size: int  # bytes; size and mtime_ns tell whether the file changed since it was embedded
    mtime_ns: int
    row: int | None  # its row of `embeddings`; None: the file could not be decoded


@dataclass
class UpdateReport:
    """What an update did, by relative path."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # files tried in this update that could not be decoded
    outside: list[str] = field(default_factory=list)  # links to files outside the folder, skipped and not indexed
    unchanged: int = 0
    num_images: int = 0  # images in the index afterwards (embedded rows)

    def summary(self) -> str:
        outside = f", {len(self.outside)} outside the folder skipped" if self.outside else ""
        return (
            f"{self.num_images} images indexed: {len(self.added)} added, {len(self.changed)} changed, "
            f"{len(self.removed)} removed, {self.unchanged} unchanged, {len(self.unreadable)} unreadable skipped"
            f"{outside}"
        )


@dataclass
class SearchResult:
    rank: int  # 1 = best
    score: float  # cosine similarity of the query and the image embeddings
    path: str  # the image file: the index's root joined with its relative path


def scan_images(root: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> dict[str, tuple[int, int]]:
    """`{relative path: (size, mtime_ns)}` of the image files under `root`, subfolders included, sorted by path.

    Files are matched by extension, case-insensitively; hidden files and folders (".name") are left out.
    """
    root = Path(root)
    found = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(extensions):
                continue
            path = Path(folder, name)
            try:
                stat = path.stat()
            except OSError as err:  # a dangling link, or a file removed while we walk
                logger.warning("skipping %s (%s)", path, err)
                continue
            found[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return dict(sorted(found.items()))


def _drop_outside(root: Path, found: dict[str, tuple[int, int]]) -> list[str]:
    """Remove from `found` the files that resolve outside `root` (links to elsewhere); returns their paths."""
    from clipcond.data.folders import resolves_inside

    inside = root.resolve()
    outside = [path for path in found if not resolves_inside(root / path, inside)]
    for path in outside:
        del found[path]
    if outside:
        logger.warning(
            "skipping %d image file(s) of %s that lead outside the data folder (links elsewhere), e.g. %s -> %s; "
            "pass --allow-outside-paths only if you trust the folder",
            len(outside),
            root,
            outside[0],
            (root / outside[0]).resolve(),
        )
    return outside


def _model_hash(clip_run) -> str:
    from clipcond.lineage import content_hash

    return content_hash(clip_run.path)


class _Decoded(torch.utils.data.Dataset):
    """`(i, uint8 pixels (3, R, R) or None)` for each file of an `ImageCaptionDataset`; None: it cannot be decoded.

    The data set substitutes the next readable item for an unreadable one (and logs a warning naming the file); an
    index wants no substitute, so a substituted item (another `index`) counts as unreadable.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None]:
        try:
            item = self.dataset[i]
        except ValueError:  # no file of the listing can be decoded
            return i, None
        return i, item["pixel_values"] if item["index"] == i else None


def image_dataset(paths: list[str | os.PathLike], resolution: int):
    """An `ImageCaptionDataset` of image files (absolute paths) at `resolution` (shorter side, centre crop).

    The data set reads a listing file; this writes one (`path,caption`, the caption a placeholder) to a temporary
    folder, so that decoding, resizing and the handling of unreadable files are the data set's own. Every path is
    outside that temporary folder, so the data set's own check of paths is off: the caller chose the files (the
    index keeps to its folder, see `ImageIndex.update`).
    """
    from clipcond.data.folders import ImageCaptionDataset

    with tempfile.TemporaryDirectory(prefix="clipcond-index-") as tmp:
        listing = Path(tmp, "images.csv")
        with open(listing, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "caption"])
            writer.writerows([os.path.abspath(p), "-"] for p in paths)
        return ImageCaptionDataset(listing, resolution=resolution, allow_outside_paths=True)


@torch.no_grad()
def embed_image_files(
    clip_run,
    paths: list[str | os.PathLike],
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[dict[int, torch.Tensor], list[int]]:
    """L2-normalised CLIP embeddings of image files: `({position in paths: (D,) float32}, [positions unreadable])`."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    if not paths:
        return {}, []
    dataset = _Decoded(image_dataset(paths, clip_run.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    embeddings, unreadable = {}, []
    with tqdm(
        total=len(dataset), desc="embedding images", unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        for batch in loader:
            readable = [(i, pixels) for i, pixels in batch if pixels is not None]
            unreadable += [i for i, pixels in batch if pixels is None]
            if readable:
                pixels = torch.stack([p for _, p in readable])  # (B, 3, R, R) uint8
                rows = clip_run.encode_images(pixels).cpu()  # (B, D) float32, unit norm
                embeddings.update((i, row) for (i, _), row in zip(readable, rows))
            bar.update(len(batch))
    return embeddings, unreadable


class ImageIndex:
    """Normalised CLIP embeddings of the images under a folder, with the file list that says which is which.

    Build one with `ImageIndex.build(folder, clip_run)` (or `ImageIndex.load(path)` and `update(clip_run)`), save it
    with `save(path)`, query it with `search(embedding, top_k)`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        embeddings: torch.Tensor,
        files: list[FileEntry],
        *,
        clip_path: str,
        clip_hash: str,
        dtype: str = "fp16",
    ):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
        rows = [f.row for f in files if f.row is not None]
        assert rows == list(range(embeddings.shape[0])), "rows follow the file list, one per decoded file"
        self.root = Path(root)
        self.embeddings = embeddings.to(DTYPES[dtype])  # (N, D), unit norm
        self.files = files
        self.clip_path = clip_path
        self.clip_hash = clip_hash
        self.dtype = dtype

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, num_images={len(self)}, dim={self.dim})"

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def paths(self) -> list[str]:
        """Relative path of each embedding row."""
        return [f.path for f in self.files if f.row is not None]

    @classmethod
    def empty(cls, root: str | os.PathLike, clip_run, *, dtype: str = "fp16", clip_hash: str | None = None):
        """An index of nothing yet for images under `root`, embedded with `clip_run` (a `ClipRun`)."""
        dim = clip_run.model.config.projection_dim
        return cls(
            Path(root).resolve(),
            torch.empty(0, dim),
            [],
            clip_path=os.path.abspath(clip_run.path),
            clip_hash=clip_hash or _model_hash(clip_run),
            dtype=dtype,
        )

    @classmethod
    def build(cls, root: str | os.PathLike, clip_run, *, dtype: str = "fp16", **update_kwargs) -> ImageIndex:
        """Embed every image under `root`; `update_kwargs` go to `update`."""
        index = cls.empty(root, clip_run, dtype=dtype, clip_hash=update_kwargs.pop("clip_hash", None))
        index.update(clip_run, **update_kwargs)
        return index

    def check_model(self, clip_hash: str, clip_path: str | os.PathLike, what: str = "--model") -> None:
        """Refuse a CLIP other than the index's (by content hash): its embeddings live in another space."""
        if clip_hash != self.clip_hash:
            raise ValueError(
                f"`{what}` {os.fspath(clip_path)!r} is not the CLIP this index was built with ({self.clip_path!r}): "
                f"content hash {clip_hash[:12]} vs {self.clip_hash[:12]}; use that CLIP, or rebuild the index "
                "with `clipcond index --rebuild`"
            )

    def update(
        self,
        clip_run,
        *,
        batch_size: int = 128,
        num_workers: int = 0,
        progress: bool = False,
        clip_hash: str | None = None,
        allow_outside_paths: bool = False,
    ) -> UpdateReport:
        """Re-scan the root and bring the index up to date: embed new and changed files, drop removed ones.

        Files that lead outside the root (symlinks elsewhere) are left out and listed in the report's `outside`,
        unless `allow_outside_paths`; they are checked again at each update, so a later update that allows them
        adds them.
        """
        self.check_model(clip_hash or _model_hash(clip_run), clip_run.path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"the index's image folder {str(self.root)!r} does not exist")
        found = scan_images(self.root)
        outside = [] if allow_outside_paths else _drop_outside(self.root, found)
        old = {f.path: f for f in self.files}
        report = UpdateReport(removed=sorted(set(old) - set(found)), outside=outside)
        todo = []
        for path, stat in found.items():
            entry = old.get(path)
            if entry is not None and (entry.size, entry.mtime_ns) == stat:
                report.unchanged += 1  # an unchanged unreadable file is not tried again
            else:
                todo.append(path)
                (report.changed if entry is not None else report.added).append(path)

        new, unreadable = embed_image_files(
            clip_run,
            [self.root / p for p in todo],
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
        new = {todo[i]: row for i, row in new.items()}
        if new:
            check_finite_tensor(
                torch.stack(list(new.values())), f"the embeddings of {len(new)} images by {clip_run.path!r}"
            )
        tried = set(todo)
        report.unreadable = [todo[i] for i in unreadable]
        if report.unreadable:
            logger.warning(
                "%d of %d images could not be decoded and are not indexed, e.g. %s",
                len(report.unreadable),
                len(todo),
                self.root / report.unreadable[0],
            )

        rows, files = [], []
        for path, (size, mtime_ns) in found.items():  # sorted by path: an updated index equals a fresh one
            if path in new:
                row = new[path]
            elif path not in tried and old[path].row is not None:
                row = self.embeddings[old[path].row]
            else:
                row = None
            files.append(FileEntry(path, size, mtime_ns, None if row is None else len(rows)))
            if row is not None:
                rows.append(row.to(DTYPES[self.dtype]))
        self.embeddings = torch.stack(rows) if rows else self.embeddings.new_empty(0, self.dim)
        self.files = files
        report.num_images = len(self)
        return report

    @torch.no_grad()
    def search(self, query: torch.Tensor, top_k: int = 5) -> list[SearchResult]:
        """The `top_k` images closest to a query embedding (D,) by cosine (the query is normalised here)."""
        if top_k < 1:
            raise ValueError(f"`top_k` must be >= 1, got {top_k}")
        query = query.detach().float().cpu().flatten()
        if query.shape[0] != self.dim:
            raise ValueError(f"the query embedding has width {query.shape[0]} but the index's embeddings {self.dim}")
        check_finite_tensor(query, "the query embedding")  # the index's rows were checked where they came in
        scores = self.embeddings.float() @ torch.nn.functional.normalize(query, dim=0)  # (N,)
        values, rows = scores.topk(min(top_k, len(self)))
        paths = self.paths
        return [
            SearchResult(rank=rank, score=value, path=str(self.root / paths[row]))
            for rank, (value, row) in enumerate(zip(values.tolist(), rows.tolist()), start=1)
        ]

    def save(self, path: str | os.PathLike) -> None:
        """Write `embeddings.safetensors` and `files.jsonl` into the folder `path` (made if needed).

        Each file is written to a temporary name and renamed; the embeddings record the hash of the file list, so an
        index interrupted between the two renames is detected on load rather than read wrongly.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        listing = "".join(dumps_json(asdict(f)) + "\n" for f in self.files).encode("utf-8")
        metadata = {
            "format": INDEX_FORMAT,
            "format_version": str(INDEX_FORMAT_VERSION),
            "root": str(self.root),
            "clip_path": self.clip_path,
            "clip_hash": self.clip_hash,
            "dtype": self.dtype,
            "files_sha256": hashlib.sha256(listing).hexdigest(),
        }
        tmp_embeddings = path / f".{EMBEDDINGS_FILE}.{os.getpid()}.tmp"
        tmp_files = path / f".{FILES_FILE}.{os.getpid()}.tmp"
        with writing(path / EMBEDDINGS_FILE, scratch=[tmp_embeddings, tmp_files]):
            save_file({"embeddings": self.embeddings.contiguous()}, tmp_embeddings, metadata=metadata)
            tmp_files.write_bytes(listing)
        os.replace(tmp_embeddings, path / EMBEDDINGS_FILE)
        os.replace(tmp_files, path / FILES_FILE)

    @classmethod
    def load(cls, path: str | os.PathLike, what: str = "--index") -> ImageIndex:
        """Read an index folder written by `save`; errors name the argument `what`."""
        import safetensors
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"`{what}` {str(path)!r} does not exist; build an index with "
                f"`clipcond index --model RUN FOLDER --output {path}`"
            )
        embeddings_file, files_file = path / EMBEDDINGS_FILE, path / FILES_FILE
        for file in (embeddings_file, files_file):
            if not file.is_file():
                raise FileNotFoundError(
                    f"`{what}` {str(path)!r} is not an image index: {file.name} is missing; build one with "
                    f"`clipcond index --model RUN FOLDER --output {path}`"
                )
        try:
            with safe_open(embeddings_file, framework="pt") as f:
                metadata = f.metadata() or {}
                embeddings = f.get_tensor("embeddings")
        except (OSError, safetensors.SafetensorError) as err:
            raise ValueError(f"`{what}` {str(path)!r}: cannot read {EMBEDDINGS_FILE} ({err})") from None
        if metadata.get("format") != INDEX_FORMAT or metadata.get("format_version") != str(INDEX_FORMAT_VERSION):
            raise ValueError(
                f"`{what}` {str(path)!r}: {EMBEDDINGS_FILE} is not a clipcond image index of format version "
                f"{INDEX_FORMAT_VERSION} (its metadata: format {metadata.get('format')!r}, "
                f"version {metadata.get('format_version')!r})"
            )
        listing = files_file.read_bytes()
        if hashlib.sha256(listing).hexdigest() != metadata.get("files_sha256"):
            raise ValueError(
                f"`{what}` {str(path)!r}: {FILES_FILE} does not belong to {EMBEDDINGS_FILE} (an interrupted write?); "
                "rebuild the index with `clipcond index --rebuild`"
            )
        files = [FileEntry(**json.loads(line)) for line in listing.decode("utf-8").splitlines() if line.strip()]
        _check_rows(embeddings, files, embeddings_file, files_file, what)
        return cls(
            metadata["root"],
            embeddings,
            files,
            clip_path=metadata["clip_path"],
            clip_hash=metadata["clip_hash"],
            dtype=metadata["dtype"],
        )


def _check_rows(
    embeddings: torch.Tensor, files: list[FileEntry], embeddings_file: Path, files_file: Path, what: str
) -> None:
    """A loaded index's embeddings: one finite row (N, D) for each decoded file of the list, in its order."""
    rebuild = "rebuild the index with `clipcond index --rebuild`"
    if embeddings.ndim != 2:
        raise ValueError(
            f"`{what}`: {str(embeddings_file)!r} holds embeddings of shape {tuple(embeddings.shape)}, not (N, D); "
            f"{rebuild}"
        )
    rows = [f.row for f in files if f.row is not None]
    if rows != list(range(embeddings.shape[0])):
        how = "in another order than 0, 1, ..." if len(rows) == embeddings.shape[0] else "for"
        raise ValueError(
            f"`{what}`: {str(files_file)!r} lists {len(rows)} embedded files {how} the {embeddings.shape[0]} rows of "
            f"{str(embeddings_file)!r}; the two files do not belong together: {rebuild}"
        )
    check_finite_tensor(embeddings, f"`{what}`: {str(embeddings_file)!r}", rebuild)


def is_index(path: str | os.PathLike) -> bool:
    """Whether `path` holds an index (at least one of its two files)."""
    return any((Path(path) / name).exists() for name in (EMBEDDINGS_FILE, FILES_FILE))
