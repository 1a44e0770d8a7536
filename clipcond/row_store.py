"""Rows of fixed-shape tensors on disk, in shards, read a few rows at a time: caches larger than memory.

A store is a folder:

    NAME/
      shard-00000.safetensors    rows 0 .. n0-1: one tensor per column, (n0, *row shape)
      shard-00001.safetensors    the next rows
      ...
      index.json                 format, key, columns (name -> row shape, dtype), shards (file, rows, bytes),
                                 metadata; written last

Rows are addressed by integer index; a row holds any number of named tensors ("columns"), each of a fixed shape and
dtype (a text-embedding cache: per-token states, mask, pooled embedding; a latent cache: mean and std).

Building (`RowStoreWriter`) never holds more than one shard and the batch being appended: rows go into a scratch
folder, a shard is written (atomically, `clipcond.storage.save_tensors_atomic`) each time `rows_per_shard` rows are
buffered, the index after the last shard, and the finished folder is renamed into place. A build that is killed
leaves no `NAME/` (a reader never meets a part); its scratch folder is removed by the next build of that name.

Reading (`RowStore`) parses each shard's safetensors header itself (a JSON header of byte offsets; nothing is
unpickled) and reads exactly the bytes of the rows asked for with `os.preadv` into a fresh tensor: a lookup of B
random rows reads B rows, and nothing of the file stays mapped into the process, so the resident memory is the
batch, whatever the store's size (the kernel's page cache still keeps what was read while memory is free, shared
and reclaimable). `mmap=True` maps the shards instead (`numpy.memmap`): the same rows, but every page touched stays
counted in the process's resident set until the kernel reclaims it (benchmarks/cache_memory.py measures both).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipcond.storage import save_tensors_atomic, write_json_atomic, writing

logger = logging.getLogger(__name__)

ROW_STORE_FORMAT = 1
INDEX_NAME = "index.json"
# Shards of about this many bytes: what a build holds in memory at most (a few times, while safetensors
# serialises it), and few enough files for a store of many GB.
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024
# What a scan of a column (`RowStore.iter_column`) reads at a time.
SCAN_BYTES = 8 * 1024 * 1024

# safetensors' dtype names (its header's "dtype") <-> torch
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class RowStoreError(ValueError):
    """A store that cannot be read as its index says: missing or truncated shard, foreign header, wrong key."""


@dataclass(frozen=True)
class Column:
    """One named tensor of every row: its shape (without the row axis) and safetensors dtype name."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.torch_dtype.itemsize


def _column_of(tensor: torch.Tensor) -> Column:
    if tensor.dtype not in _DTYPE_NAMES:
        raise ValueError(f"a row store cannot hold dtype {tensor.dtype}; use one of {sorted(map(str, _DTYPE_NAMES))}")
    return Column(tuple(tensor.shape[1:]), _DTYPE_NAMES[tensor.dtype])


def _scratch_folders(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RowStoreWriter:
    """Append rows batch by batch; `finish()` writes the last shard and the index and puts the folder in place.

        with RowStoreWriter(path, key=key) as writer:
            for batch in batches:
                writer.append(hidden_states=h, attention_mask=m)  # (B, ...) each, same B
            writer.finish(metadata={...})

    Columns and their shapes come from the first `append`; later batches must match. Leaving the block without
    `finish()` (an error, an interrupt) removes the scratch folder: no store appears.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        key: str = "",
        rows_per_shard: int | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        if rows_per_shard is not None and rows_per_shard < 1:
            raise ValueError(f"`rows_per_shard` must be >= 1, got {rows_per_shard}")
        self.path = Path(path)
        self.key = key
        self.rows_per_shard = rows_per_shard
        self.shard_bytes = shard_bytes
        self.columns: dict[str, Column] | None = None
        self.shards: list[dict] = []
        self.num_rows = 0
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in _scratch_folders(self.path):  # left by a build that was killed
            pid = stale.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        self.scratch = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        self._done = False

    def __enter__(self) -> RowStoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        """Drop what was written; nothing appears at `path`."""
        self._done = True
        self._pending = []
        shutil.rmtree(self.scratch, ignore_errors=True)

    def append(self, **tensors: torch.Tensor) -> None:
        """Add rows: each named tensor (B, *row shape), the same B, on any device (copied to the CPU)."""
        if not tensors:
            raise ValueError("`append` needs at least one named tensor")
        if self._done:
            raise ValueError(f"the row store {self.path} is finished or aborted; open a new writer")
        sizes = {name: t.shape[0] for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every column needs the same number of rows, got {sizes}")
        columns = {name: _column_of(t) for name, t in tensors.items()}
        if self.columns is None:
            self.columns = columns
            if self.rows_per_shard is None:
                row_bytes = sum(c.row_bytes for c in columns.values())
                self.rows_per_shard = max(1, self.shard_bytes // max(row_bytes, 1))
        elif columns != self.columns:
            raise ValueError(f"rows of {columns} do not fit the store's columns {self.columns}")
        self._pending.append({name: t.detach().to("cpu") for name, t in tensors.items()})
        self._pending_rows += next(iter(sizes.values()))
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        """Write the first `rows` pending rows as the next shard; keep the rest pending."""
        assert self.columns is not None
        merged = {name: torch.cat([p[name] for p in self._pending]) for name in self.columns}
        shard = {name: t[:rows] for name, t in merged.items()}  # leading rows of a contiguous tensor: contiguous
        rest = {name: t[rows:].clone() for name, t in merged.items()}  # not a view that keeps `merged` alive
        self._pending = [rest] if self._pending_rows > rows else []
        self._pending_rows -= rows
        del merged
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_tensors_atomic(shard, self.scratch / name)
        self.shards.append({"file": name, "rows": rows, "bytes": (self.scratch / name).stat().st_size})
        self.num_rows += rows

    def finish(self, metadata: dict | None = None) -> RowStore:
        """Write the last shard and the index (last), then move the folder to `path` (replacing what was there)."""
        if self._done:
            raise ValueError(f"the row store {self.path} is finished or aborted; open a new writer")
        if self._pending_rows:
            self._flush(self._pending_rows)
        index = {
            "format": ROW_STORE_FORMAT,
            "key": self.key,
            "num_rows": self.num_rows,
            "columns": {n: {"shape": list(c.shape), "dtype": c.dtype} for n, c in (self.columns or {}).items()},
            "shards": self.shards,
            "metadata": metadata or {},
        }
        write_json_atomic(self.scratch / INDEX_NAME, index)
        with writing(self.path, scratch=[self.scratch]):
            if self.path.exists():  # a damaged store, or one another process finished first: replace it
                old = self.path.with_name(f".{self.path.name}.{os.getpid()}.old")
                os.replace(self.path, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(self.scratch, self.path)
        self._done = True
        return RowStore(self.path, key=self.key)


@dataclass
class _Shard:
    path: Path
    start: int  # first row
    rows: int
    offsets: dict[str, int]  # column -> byte offset of its first row in the file


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (JSON) and the byte offset where its data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise RowStoreError(f"the shard {path} is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 1024 * 1024:
            raise RowStoreError(f"the shard {path} has no safetensors header (it claims {length} bytes)")
        text = f.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RowStoreError(f"the shard {path} has an unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise RowStoreError(f"the shard {path} has no safetensors header")
    return header, 8 + length


class RowStore:
    """A finished store, opened for reading rows (see the module's docstring).

    Opening reads `index.json` and each shard's header and checks them against each other (sizes, dtypes, shapes,
    byte ranges): a missing, truncated or foreign shard raises `RowStoreError` here, before any row is read.
    """

    def __init__(self, path: str | os.PathLike, *, key: str | None = None, mmap: bool = False):
        self.path = Path(path)
        index_path = self.path / INDEX_NAME
        try:
            index = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise RowStoreError(f"{self.path} has no {INDEX_NAME}: it is not a finished row store") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RowStoreError(f"the index {index_path} cannot be read ({err})") from None
        if index.get("format") != ROW_STORE_FORMAT:
            raise RowStoreError(f"{index_path} has format {index.get('format')!r}, not {ROW_STORE_FORMAT}")
        if key is not None and index.get("key") != key:
            raise RowStoreError(f"{index_path} holds key {index.get('key')!r}, not {key!r}")
        self.key: str = index["key"]
        self.metadata: dict = index.get("metadata", {})
        self.columns = {n: Column(tuple(c["shape"]), c["dtype"]) for n, c in index["columns"].items()}
        self.num_rows: int = index["num_rows"]
        self.shards: list[_Shard] = []
        start = 0
        for entry in index["shards"]:
            self.shards.append(self._check_shard(self.path / entry["file"], start, entry["rows"], entry["bytes"]))
            start += entry["rows"]
        if start != self.num_rows:
            raise RowStoreError(f"{index_path} lists {start} rows in its shards but {self.num_rows} in all")
        self._starts = np.array([s.start for s in self.shards], dtype=np.int64)
        self._fds: dict[int, int] = {}
        self.mmap = mmap
        self._maps: dict[tuple[int, str], np.memmap] = {}

    def _check_shard(self, path: Path, start: int, rows: int, size: int) -> _Shard:
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise RowStoreError(f"the shard {path} is missing") from None
        if actual != size:
            raise RowStoreError(f"the shard {path} has {actual} bytes, its index says {size} (truncated or replaced)")
        header, data_start = _read_header(path)
        offsets = {}
        for name, column in self.columns.items():
            entry = header.get(name)
            expected = [rows, *column.shape]
            if entry is None or entry.get("dtype") != column.dtype or entry.get("shape") != expected:
                raise RowStoreError(
                    f"the shard {path} holds {name!r} as {entry}, its index says {column.dtype} {expected}"
                )
            begin, end = entry["data_offsets"]
            if end - begin != rows * column.row_bytes or data_start + end > actual:
                raise RowStoreError(f"the shard {path} has a byte range {begin}..{end} for {name!r} that does not fit")
            offsets[name] = data_start + begin
        return _Shard(path, start, rows, offsets)

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):  # open files and maps stay with the process that opened them
        state = dict(self.__dict__)
        state["_fds"], state["_maps"] = {}, {}
        return state

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps.clear()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter shutdown
            self.close()

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self.shards[shard].path, os.O_RDONLY)
        return self._fds[shard]

    def _map(self, shard: int, name: str) -> np.memmap:
        if (shard, name) not in self._maps:
            s, column = self.shards[shard], self.columns[name]
            self._maps[shard, name] = np.memmap(
                s.path, dtype=np.uint8, mode="r", offset=s.offsets[name], shape=(s.rows, column.row_bytes)
            )
        return self._maps[shard, name]

    def read(
        self, rows: torch.Tensor | list[int], names: list[str] | None = None, *, first: dict[str, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """The rows at these indices (B,), in that order (repeats allowed): each column (B, *row shape), fresh CPU
        tensors. `first={name: k}` reads only the first k entries of that column's leading row axis (the first k
        token positions of a (L, W) row: k * W values, not L * W)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device="cpu").reshape(-1)  # host-side: file offsets
        if rows.numel() and (int(rows.min()) < -self.num_rows or int(rows.max()) >= self.num_rows):
            raise IndexError(f"rows {rows.tolist()[:8]} out of range for a store of {self.num_rows} rows")
        rows = rows % max(self.num_rows, 1)
        shard_of = np.searchsorted(self._starts, rows.numpy(), side="right") - 1
        out = {}
        for name in names or list(self.columns):
            column = self.columns[name]
            shape = column.shape
            if first and name in first:
                shape = (min(first[name], shape[0]), *shape[1:])
            item = column.torch_dtype.itemsize
            nbytes = int(np.prod(shape, dtype=np.int64)) * item
            buffer = torch.empty((len(rows), nbytes), dtype=torch.uint8, device="cpu")
            if self.mmap:
                for shard in np.unique(shard_of):
                    where = np.nonzero(shard_of == shard)[0]
                    local = rows.numpy()[where] - self.shards[shard].start
                    buffer[torch.from_numpy(where)] = torch.from_numpy(self._map(shard, name)[local, :nbytes])
            else:
                view = buffer.numpy()
                for i, (row, shard) in enumerate(zip(rows.tolist(), shard_of.tolist())):
                    s = self.shards[shard]
                    offset = s.offsets[name] + (row - s.start) * column.row_bytes
                    if os.preadv(self._fd(shard), [view[i]], offset) != nbytes:
                        raise RowStoreError(f"the shard {s.path} ended before row {row - s.start} of {name!r}")
            out[name] = buffer.view(column.torch_dtype).reshape(len(rows), *shape)
        return out

    def read_column(self, name: str) -> torch.Tensor:
        """Every row of one column (N, *row shape): for small columns (a length per row), read shard by shard."""
        return torch.cat(list(self.iter_column(name, rows=None)))

    def iter_column(self, name: str, rows: int | None = None) -> Iterator[torch.Tensor]:
        """One column in order, `rows` at a time (by default about `SCAN_BYTES`): a scan that holds one piece."""
        column = self.columns[name]
        step = rows or max(1, SCAN_BYTES // max(column.row_bytes, 1))
        for i, s in enumerate(self.shards):
            for begin in range(0, s.rows, step):
                n = min(step, s.rows - begin)
                buffer = torch.empty((n, column.row_bytes), dtype=torch.uint8, device="cpu")
                got = os.preadv(self._fd(i), [buffer.numpy()], s.offsets[name] + begin * column.row_bytes)
                if got != buffer.numel():
                    raise RowStoreError(f"the shard {s.path} ended inside {name!r}")
                yield buffer.view(column.torch_dtype).reshape(n, *column.shape)
