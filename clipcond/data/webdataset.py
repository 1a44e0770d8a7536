"""Streaming image-caption data from WebDataset tar shards, for data sets that do not fit a folder.

A shard is a plain tar file whose members are grouped by sample: `KEY.png` (or `.jpg`, `.webp`, ...), `KEY.txt`
(the caption) and `KEY.json` (the metadata row: label and attributes), consecutively, as WebDataset expects
(`clipcond data convert` writes them; shards written by the `webdataset` library read here too). Shards are named
by a brace pattern (`shards/{000000..000099}.tar`, expanded as bash and WebDataset's `braceexpand` do), a list,
a single .tar file or a folder of shards. An `index.json` beside the shards (wids' `wids-shard-index-v1` layout,
which `clipcond data convert` writes) gives each shard's sample count; shards it does not list are counted by
reading their tar headers.

`ShardedImageCaptionDataset` yields the items of `clipcond.data.folders.ImageCaptionDataset` (uint8 pixel_values
at `resolution`, text, label, index, skipped), so `collate_image_text` batches them. `index` is the sample's
position in the shard list (the shard's offset plus its ordinal in the shard), the same in every epoch, so the
caption and embedding caches of the training stages look rows up by it as for folders.

Two modes:

- plain (as built): one pass over all samples in shard order, like iterating a map-style data set; what building
  an embedding cache or evaluating needs.
- training (after `configure`, which `clipcond.train.loop.train` calls): each epoch shuffles the shard order with
  (seed, epoch), deals the shards round-robin to the `processes x dataloader workers` streams (each shard is read by
  exactly one stream, so no sample is seen twice in an epoch), and shuffles each stream through a bounded buffer.
  Every stream yields the same number of whole batches, that of the smallest stream (so the processes stay in step
  and the DataLoader's round-robin over its workers gives a fixed batch order); the samples past it are dropped for
  that epoch, as the tail of a map-style epoch is. `set_epoch(epoch, start_batch)` resumes mid-epoch exactly: each
  stream skips the samples of the batches it already gave (their tar headers only; no image is read or decoded).
  Exact resume needs the same numbers of processes and workers, which define the streams. Unlike a map-style
  epoch, N processes do not see the global batches of a 1-process run: each reads its own streams.

An unreadable image is skipped with one warning; the next readable sample of the stream takes its place and names
the file in its `skipped` list (as `ImageCaptionDataset` does), so the number of items never changes.

Local shards are read by seeking (a resume skips over images without reading them). A shard may also be a URL, as
the `webdataset` and `wids` libraries take them: `pipe:COMMAND` (the tar file is COMMAND's standard output, e.g.
`pipe:curl -s https://host/shards/000000.tar` or `pipe:aws s3 cp s3://bucket/000000.tar -`) or `http(s)://...`,
brace patterns included. Those are read as a stream, front to back: their samples are counted by one pass over them
when the data set is made (no index.json is read for them), a resume reads through the samples it skips (nothing is
decoded), and the shuffle buffer holds its samples' bytes. The order, the split across streams and the exact resume
are those of local shards; only a shard that changes between runs (its URL stays) goes unnoticed, where a local
shard's size and modification time key the embedding caches.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import re
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from clipcond.data.folders import METADATA_FILES, UNREADABLE_IMAGE_ERRORS, image_to_tensor, resize_image, to_rgb

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_KIND = "wids-shard-index-v1"  # the shard index layout of webdataset's `wids`: shardlist of {url, nsamples}
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# WebDataset's split of a member name into sample key and extension: the key ends at the first dot of the basename.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ------------------------------------------------------------------------------------------------ shard lists


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion, as WebDataset's shard patterns: `{000000..000099}` (a numeric range; leading
    zeros of a bound pad every number to its width), `{a,b}` (alternatives), several or nested groups."""
    depth, start = 0, None
    for i, char in enumerate(pattern):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1 : i], pattern[i + 1 :]
                options = _brace_options(body)
                if options is None:  # a literal `{...}`: keep it, expand what follows
                    return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
                return [head + option + rest for option in options for rest in expand_braces(tail)]
    return [pattern]


def _brace_options(body: str) -> list[str] | None:
    match = _RANGE.match(body)
    if match:
        a, b = match.groups()
        width = max(len(a), len(b)) if (len(a) > 1 and a.startswith("0")) or (len(b) > 1 and b.startswith("0")) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        return [str(n).zfill(width) for n in range(lo, hi + step, step)]
    parts, depth, current = [], 0, ""
    for char in body:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (char == "{") - (char == "}")
        current += char
    if not parts:
        return None
    parts.append(current)
    return [expanded for part in parts for expanded in expand_braces(part)]


REMOTE_PREFIXES = ("pipe:", "http://", "https://")


def is_remote(shard: str | Path) -> bool:
    """Whether a shard is a URL read as a stream (`pipe:COMMAND`, `http(s)://...`) rather than a local file."""
    return isinstance(shard, str) and shard.startswith(REMOTE_PREFIXES)


def list_shards(data: str | Path | Sequence[str | Path]) -> list[Path | str]:
    """The shards that `data` names: a brace pattern or a .tar path, a folder (its *.tar files, sorted), a URL or
    brace pattern of URLs (`pipe:...`, `http(s)://...`, kept as strings), or a list of those. Raises
    FileNotFoundError naming the first missing local shard."""
    specs = [data] if isinstance(data, str | Path) else list(data)
    paths: list[Path | str] = []
    for spec in specs:
        spec = str(spec)
        if is_remote(spec):
            paths += expand_braces(spec)
            continue
        if Path(spec).is_dir():
            found = sorted(Path(spec).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"the shard folder {spec} holds no .tar files")
            paths += found
            continue
        paths += [Path(p) for p in expand_braces(spec)]
    if not paths:
        raise FileNotFoundError(f"no shards in {data!r}")
    missing = [p for p in paths if not is_remote(p) and not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} shards named by {data!r} do not exist, e.g. {missing[0]}; "
            "check the pattern (quote it, so that the shell leaves the braces alone)"
        )
    return paths


def is_shard_source(data: str | Path | Sequence[str | Path]) -> bool:
    """Whether `data` names WebDataset shards (a list, a path or pattern ending in .tar, a folder with the index
    of `clipcond data convert` or with .tar files and no metadata) rather than an imagefolder or a CSV file."""
    if not isinstance(data, str | Path):
        return True
    text = str(data)
    if text.endswith(".tar") or is_remote(text):
        return True
    folder = Path(text)
    if not folder.is_dir():
        return False
    if (folder / INDEX_FILE).is_file():
        try:
            return json.loads((folder / INDEX_FILE).read_text()).get("__kind__") == INDEX_KIND
        except (json.JSONDecodeError, AttributeError):
            return False
    has_metadata = any((folder / name).is_file() for name in METADATA_FILES) or (folder / "train").is_dir()
    return not has_metadata and any(folder.glob("*.tar"))


def read_shard_index(path: str | Path) -> dict:
    """An index.json in wids' layout; raises ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(index, dict) or index.get("__kind__") != INDEX_KIND or "shardlist" not in index:
        raise ValueError(f"{path} is not a shard index (expected __kind__ {INDEX_KIND!r} and a shardlist)")
    return index


# ------------------------------------------------------------------------------------------------ tar reading


@dataclass
class _Record:
    """A sample located in its shard: where its members' bytes lie. Reading the headers costs no image I/O."""

    shard: Path | str
    key: str
    members: dict[str, tuple[int, int]]  # extension (lower case) -> (offset of the data in the tar file, size)
    index: int = -1  # position in the shard list
    data: dict[str, bytes] | None = None  # a streamed shard's members, read as they came (no file to seek in)

    @property
    def image_extension(self) -> str | None:
        return next((ext for ext in IMAGE_EXTENSIONS if ext in self.members), None)

    def read(self, file, extension: str) -> bytes:
        if self.data is not None:
            return self.data[extension]
        offset, size = self.members[extension]
        file.seek(offset)
        return file.read(size)


def _sample_member(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a tar member that belongs to a sample; None for anything else (a
    folder, a link, a name without WebDataset's `KEY.EXT` form)."""
    if not member.isfile():
        return None
    match = _KEY_AND_EXTENSION.match(member.name)
    return None if match is None else (match.group(1), match.group(2).lower())


def scan_shard(path: Path) -> list[_Record]:
    """The samples of a shard in tar order, from its headers only. Members are grouped by key, consecutively (as
    WebDataset groups them); groups without an image are left out."""
    records: list[_Record] = []
    current: _Record | None = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                named = _sample_member(member)
                if named is None:
                    continue
                key, extension = named
                if current is None or current.key != key:
                    current = _Record(path, key, {})
                    records.append(current)
                current.members[extension] = (member.offset_data, member.size)
    except tarfile.TarError as err:
        raise ValueError(f"the shard {path} is not a readable tar file ({err})") from None
    return [r for r in records if r.image_extension is not None]


@contextlib.contextmanager
def open_url(url: str) -> Iterator[io.RawIOBase]:
    """A remote shard's bytes as a stream: `pipe:COMMAND`'s standard output (run by the shell, as WebDataset does)
    or an HTTP(S) response. A command that fails (exit status not 0) raises ValueError naming it and what it
    printed; one stopped early (the reader had what it wanted) is ended quietly."""
    if url.startswith("pipe:"):
        command = url[len("pipe:") :]
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: S602
        try:
            yield process.stdout
            process.stdout.read()  # what the tar reader left (its end padding): let the command finish
        except BaseException as err:  # the reader stopped early (or failed): end the command
            if process.poll() is None:
                process.kill()
            process.stdout.close()
            _, stderr = process.communicate()
            if isinstance(err, ValueError) and process.returncode not in (0, -9):  # the command failed: say so
                raise ValueError(f"{err}; {_failed(command, process.returncode, stderr)}") from None
            raise
        process.stdout.close()
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise ValueError(_failed(command, process.returncode, stderr))
        return
    try:
        response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (the user's own shard URL)
    except OSError as err:
        raise ValueError(f"the shard {url} cannot be read ({err})") from None
    with response:
        yield response


def _failed(command: str, status: int, stderr: bytes) -> str:
    return (
        f"the shard command {command!r} exited with status {status}: {stderr.decode(errors='replace').strip()[-500:]}"
    )


def stream_shard(url: str) -> Iterator[_Record]:
    """The samples of a remote shard in tar order, each with its members' bytes, read as one stream. Members are
    grouped by key, consecutively; groups without an image are left out."""
    current: _Record | None = None
    with open_url(url) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    named = _sample_member(member)
                    if named is None:
                        continue
                    key, extension = named
                    if current is None or current.key != key:
                        if current is not None and current.image_extension is not None:
                            yield current
                        current = _Record(url, key, {}, data={})
                    current.data[extension] = tar.extractfile(member).read()
                    current.members[extension] = (-1, member.size)
        except tarfile.TarError as err:
            raise ValueError(f"the shard {url} is not a readable tar stream ({err})") from None
    if current is not None and current.image_extension is not None:
        yield current


@dataclass(frozen=True)
class Shard:
    path: Path | str  # a local file, or a URL (`is_remote`)
    num_samples: int
    offset: int  # index of its first sample in the shard list


def _shard_counts(paths: list[Path | str]) -> tuple[list[int], dict | None]:
    """Each shard's sample count (from the index.json beside it where it lists the shard, else from the tar
    headers; a remote shard's by reading it once) and the `clipcond` section of the first index found (source,
    split, dataset_info)."""
    known: dict[Path, int] = {}
    extra = None
    remote = [p for p in paths if is_remote(p)]
    if remote:
        logger.info("counting the samples of %d remote shard(s) by reading each once", len(remote))
    for folder in dict.fromkeys(p.parent for p in paths if not is_remote(p)):
        index_path = folder / INDEX_FILE
        if not index_path.is_file():
            continue
        index = read_shard_index(index_path)
        for entry in index["shardlist"]:
            known[(folder / entry["url"]).resolve()] = int(entry["nsamples"])
        if extra is None:
            extra = index.get("clipcond")
    counts = []
    for path in paths:
        if is_remote(path):
            counts.append(sum(1 for _ in stream_shard(path)))
            continue
        count = known.get(path.resolve())
        counts.append(len(scan_shard(path)) if count is None else count)
    return counts, extra


# ---------------------------------------------------------------------------------------------- the data set


class ShardedImageCaptionDataset(torch.utils.data.IterableDataset):
    """Image-caption samples streamed from WebDataset tar shards (see the module's docstring).

    Items: `{"pixel_values": uint8 tensor (3, R, R), "text": str, "label": str, "index": int, "skipped": list[str]}`,
    as `ImageCaptionDataset`'s. `len()` is the number of samples in the shards.

    Args:
        shards: a brace pattern (`shards/{000000..000099}.tar`), a .tar path, a folder of shards, or a list.
        resolution: resize the shorter side to this and crop the centre square; None keeps the native size.
        center_crop: False squashes the whole image to `resolution` x `resolution` instead of cropping.
        caption_column: "text" reads the `.txt` member (or, without one, the json's "text" or "caption");
            another name reads that field of the `.json` member.
        shuffle_buffer: samples held by each stream's shuffle buffer in training mode (1: shard order only).
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        *,
        resolution: int | None = None,
        center_crop: bool = True,
        caption_column: str = "text",
        shuffle_buffer: int = 1000,
    ):
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f"resolution={resolution!r} must be a positive int or None")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer!r} must be >= 1")
        self.source = shards
        paths = list_shards(shards)
        counts, extra = _shard_counts(paths)
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        self.shards = [Shard(p, n, o) for p, n, o in zip(paths, counts, offsets)]
        self.num_samples = sum(counts)
        if self.num_samples == 0:
            raise ValueError(f"the shards named by {shards!r} hold no samples with an image")
        self.info = (extra or {}).get("dataset_info")  # the shapes data's dataset_info.json, when converted from it
        self.resolution = resolution
        self.center_crop = center_crop
        self.caption_column = caption_column
        self.shuffle_buffer = shuffle_buffer
        self._plan: _TrainingPlan | None = None  # set by `configure`
        self.epoch, self.start_batch = 0, 0
        self._metadata: tuple[list[str], list[str]] | None = None  # captions and labels, read on first use
        self._unreadable: set[str] = set()  # per process: DataLoader workers each keep (and warn about) their own

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.source)!r}, shards={len(self.shards)}, n={len(self)}, "
            f"resolution={self.resolution})"
        )

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy at every epoch: leave the caption list (one string per sample) behind.
        return {**self.__dict__, "_metadata": None}

    # --------------------------------------------------------------------------------------------- metadata

    @property
    def captions(self) -> list[str]:
        """Every sample's caption, by index: a metadata pass over the shards that reads the .txt / .json members
        and seeks past the images (no image is read), once per process."""
        return self._read_metadata()[0]

    @property
    def labels(self) -> list[str]:
        return self._read_metadata()[1]

    def _read_metadata(self) -> tuple[list[str], list[str]]:
        if self._metadata is None:
            captions, labels = [], []
            for shard in self.shards:
                records = self._records(shard)
                with contextlib.nullcontext() if is_remote(shard.path) else open(shard.path, "rb") as f:
                    for record in records:
                        text, label, _ = self._text_and_label(record, f)
                        captions.append(text)
                        labels.append(label)
            self._metadata = (captions, labels)
        return self._metadata

    def _records(self, shard: Shard) -> Iterator[_Record] | list[_Record]:
        if is_remote(shard.path):
            return self._streamed_records(shard)
        records = scan_shard(shard.path)
        if len(records) != shard.num_samples:
            raise ValueError(
                f"the shard {shard.path} holds {len(records)} samples, but its index.json says {shard.num_samples}; "
                "rewrite the index (clipcond data convert) or remove it"
            )
        for ordinal, record in enumerate(records):
            record.index = shard.offset + ordinal
        return records

    def _streamed_records(self, shard: Shard) -> Iterator[_Record]:
        """A remote shard's records as they stream in, indexed; a count other than the one made when the data set
        was opened raises ValueError (the shard changed)."""
        ordinal = 0
        for ordinal, record in enumerate(stream_shard(shard.path), start=1):
            if ordinal > shard.num_samples:
                break
            record.index = shard.offset + ordinal - 1
            yield record
        if ordinal != shard.num_samples:
            raise ValueError(
                f"the shard {shard.path} now gives {'more than ' if ordinal > shard.num_samples else ''}{ordinal} "
                f"samples, but held {shard.num_samples} when the data set was opened"
            )

    def _text_and_label(self, record: _Record, file) -> tuple[str, str, dict]:
        meta = {}
        if "json" in record.members:
            try:
                meta = json.loads(record.read(file, "json"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{record.shard}: {record.key}.json is not valid JSON ({err})") from None
        if self.caption_column == "text" and "txt" in record.members:
            text = record.read(file, "txt").decode("utf-8")
        elif self.caption_column == "text":
            text = meta.get("text", meta.get("caption"))
        else:
            text = meta.get(self.caption_column)
        if not isinstance(text, str) or not text.strip():
            where = "its .txt member" if self.caption_column == "text" else f"{self.caption_column!r} of its .json"
            raise ValueError(f"{record.shard}: sample {record.key!r} has no caption in {where} (got {text!r})")
        label = meta.get("label")
        if label is None and "cls" in record.members:
            label = record.read(file, "cls").decode("utf-8").strip()
        return text, "" if label is None else str(label), meta

    # ------------------------------------------------------------------------------------------ training mode

    def max_workers(self, num_processes: int) -> int:
        """The most DataLoader workers per process that `configure` accepts: every worker of every process reads
        whole shards of its own (0: the processes alone use every shard)."""
        return len(self.shards) // num_processes

    def configure(
        self,
        batch_size: int,
        *,
        num_processes: int = 1,
        process_index: int = 0,
        num_workers: int = 0,
        seed: int = 0,
        batches_multiple_of: int = 1,
    ) -> None:
        """Switch to training mode: this process's share of shuffled, batch-aligned epochs (see the module's
        docstring). `num_workers` must be the DataLoader's. Raises ValueError when some stream would get no shard
        or an epoch would not fill one optimizer step."""
        streams = num_processes * max(1, num_workers)
        if len(self.shards) < streams:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {num_processes} processes x {max(1, num_workers)} dataloader "
                f"workers: each of the {streams} streams reads whole shards. Write more, smaller shards "
                f"(clipcond data convert --shard-size) or use fewer --dataloader-num-workers"
            )
        self._plan = _TrainingPlan(
            batch_size, num_processes, process_index, max(1, num_workers), seed, batches_multiple_of
        )
        self.set_epoch(0)
        if self.num_batches == 0:
            raise ValueError(
                f"the shards hold {self.num_samples} samples, too few for one optimizer step per epoch "
                f"({batch_size} per process x {num_processes} processes x {batches_multiple_of} accumulation steps, "
                f"each of {streams} streams reading whole shards)"
            )
        used = self.num_batches * batch_size * num_processes
        if used < 0.9 * self.num_samples:
            logger.warning(
                "an epoch uses %d of the %d samples in the shards: each of the %d streams reads whole shards and "
                "stops at the smallest stream's whole batches; equal shards, as many as a multiple of %d, waste least",
                used,
                self.num_samples,
                streams,
                streams,
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Training mode: iterate epoch `epoch` from its batch `start_batch` (batches of this process)."""
        self.epoch, self.start_batch = epoch, start_batch

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        random.Random(f"clipcond-shards-{self._plan.seed}-{epoch}").shuffle(order)
        return order

    def _stream_shards(self, epoch: int, stream: int) -> list[Shard]:
        order, plan = self.shard_order(epoch), self._plan
        return [self.shards[i] for i in order[stream :: plan.num_processes * plan.num_workers]]

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches of each process in an epoch: the smallest stream's whole batches, times the workers, cut to a
        multiple of `batches_multiple_of`."""
        plan = self._plan
        streams = range(plan.num_processes * plan.num_workers)
        per_stream = min(sum(s.num_samples for s in self._stream_shards(epoch, k)) for k in streams)
        per_stream //= plan.batch_size
        return (per_stream * plan.num_workers) // plan.batches_multiple_of * plan.batches_multiple_of

    @property
    def num_batches(self) -> int:
        """Training mode: this process's batches in the current epoch (what `ShardedEpochSampler.num_batches` is)."""
        return self.batches_in_epoch(self.epoch)

    # ---------------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        plan = self._plan
        if plan is None:
            yield from self.in_order(worker_id, num_workers)
            return
        if num_workers != plan.num_workers:
            raise RuntimeError(
                f"the data set was configured for {plan.num_workers} workers but the DataLoader has {num_workers}"
            )
        # The DataLoader asks its workers for batches in turn, so batch j of this process's epoch comes from
        # logical stream j % W. After a resume at batch k the first request goes to worker 0: worker w plays the
        # logical stream (w + k) % W, which has already given the batches in range(logical, k, W).
        total = self.batches_in_epoch(self.epoch)
        logical = (worker_id + self.start_batch) % num_workers
        done = len(range(logical, min(self.start_batch, total), num_workers))
        count = len(range(logical, total, num_workers))
        stream = plan.process_index * num_workers + logical
        rng = random.Random(f"clipcond-samples-{plan.seed}-{self.epoch}-{stream}")
        records = (r for shard in self._stream_shards(self.epoch, stream) for r in self._records(shard))
        shuffled = _shuffle(records, self.shuffle_buffer, rng)
        yield from self._samples(shuffled, skip=done * plan.batch_size, limit=(count - done) * plan.batch_size)

    def in_order(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[dict]:
        """Every sample in shard order, whatever the mode (with workers, each takes every num_workers-th shard)."""
        records = (r for shard in self.shards[worker_id::num_workers] for r in self._records(shard))
        yield from self._samples(records, skip=0, limit=None)

    def items_at(self, positions: Sequence[int]) -> dict[int, dict]:
        """The items at `positions` of `in_order()`, decoding only their images: reading a local shard's headers
        costs no image I/O, so a few items spread over a large data set do not decode all of it. An unreadable
        image's place goes to the next readable one, as in the stream (past the last readable one, the stream itself
        is read to its end)."""
        wanted = sorted({int(p) for p in positions})
        outside = [p for p in wanted if not 0 <= p < len(self)]
        if outside:
            raise IndexError(f"positions {outside[:5]} out of range for a data set of {len(self)} items")
        found, pending, skipped, ahead = {}, [], [], iter(wanted)
        target = next(ahead, None)
        records = (r for shard in self.shards for r in self._records(shard))
        with _ShardFiles() as files:
            for position, record in enumerate(records):
                if target is None and not pending:
                    break
                if position == target:
                    pending.append(position)
                    target = next(ahead, None)
                if not pending:
                    continue  # no image to decode here
                sample = self._decode(record, None if record.data is not None else files.get(record.shard))
                if sample is None:
                    skipped.append(f"{record.shard}:{record.key}.{record.image_extension}")
                    continue
                for i, waiting in enumerate(pending):
                    found[waiting] = {**sample, "skipped": skipped if i == 0 else []}
                pending, skipped = [], []
        if pending:  # unreadable to the end: the stream gives these places its last readable sample
            last = set(pending)
            found.update((p, item) for p, item in enumerate(self.in_order()) if p in last)
        return found

    def _samples(self, records: Iterator[_Record], skip: int, limit: int | None) -> Iterator[dict]:
        """Decode records into items, after skipping `skip` of them undecoded, up to `limit` items. An unreadable
        image's place goes to the next readable sample (the last one at the end of the stream)."""
        if limit is not None and limit <= 0:
            return
        skipped: list[str] = []
        last, given = None, 0
        with _ShardFiles() as files:
            for position, record in enumerate(records):
                if position < skip:
                    continue
                sample = self._decode(record, None if record.data is not None else files.get(record.shard))
                if sample is None:
                    skipped.append(f"{record.shard}:{record.key}.{record.image_extension}")
                    continue
                last = sample
                for _ in range(len(skipped) + 1):  # the sample, in its own place and in those of skipped ones
                    yield {**sample, "skipped": skipped}
                    skipped = []
                    given += 1
                    if limit is not None and given >= limit:
                        return
        if skipped:
            if last is None:
                raise ValueError(f"none of the images of {self.source!r} could be read (see the warnings)")
            for i in range(len(skipped)):
                yield {**last, "skipped": skipped if i == 0 else []}
                given += 1
                if limit is not None and given >= limit:
                    return

    def _decode(self, record: _Record, file) -> dict | None:
        text, label, _ = self._text_and_label(record, file)
        name = f"{record.shard}:{record.key}.{record.image_extension}"
        if name in self._unreadable:
            return None
        try:
            with Image.open(io.BytesIO(record.read(file, record.image_extension))) as image:
                image.load()
                image = to_rgb(image)
        except UNREADABLE_IMAGE_ERRORS as err:
            self._unreadable.add(name)
            logger.warning("skipping unreadable image %s (%s: %s)", name, type(err).__name__, err)
            return None
        pixels = image_to_tensor(resize_image(image, self.resolution, self.center_crop))  # (3, H, W) uint8
        return {"pixel_values": pixels, "text": text, "label": label, "index": record.index}


class _ShardFiles:
    """The open shard files of a stream, at most `limit` at once, least recently used closed first (a shuffle
    buffer holds samples of one or two shards at a time)."""

    def __init__(self, limit: int = 4):
        self.limit = limit
        self.files: dict[Path, io.BufferedReader] = {}

    def get(self, path: Path) -> io.BufferedReader:
        file = self.files.pop(path, None)
        if file is None:
            if len(self.files) >= self.limit:
                self.files.pop(next(iter(self.files))).close()
            file = open(path, "rb")  # noqa: SIM115 (closed by `close`)
        self.files[path] = file  # last: most recently used
        return file

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self.files = {}

    def __enter__(self) -> _ShardFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _TrainingPlan:
    batch_size: int
    num_processes: int
    process_index: int
    num_workers: int  # streams per process: the DataLoader's workers, or 1 without workers
    seed: int
    batches_multiple_of: int


def _shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """WebDataset's bounded shuffle: hold `size` items, emit a random one as each new item comes in."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer
