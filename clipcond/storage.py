"""Writing files without losing what was there: strict JSON written atomically, and disk-full errors that say so.

Every place that writes a user's results (checkpoints, exports, caches, indexes, generated images) goes through
`writing`, so that a full disk reads "no space left on device while writing FILE (N MB needed, M MB free)" whatever
the library underneath raised (torch's zip writer says `basic_ios::clear: iostream error` or `unexpected pos`,
safetensors its own error), and the partial scratch files are removed. What was saved before is never touched:
writers put new files in scratch and `os.replace` them into place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MB = 1024 * 1024
# Below this much free space after a failed write, the failure is taken to be the disk filling up: libraries that
# write through C++ streams report a full disk with messages that carry no errno.
DISK_FULL_MARGIN = 1 * MB


class DiskFullError(OSError):
    """No space left on the device while writing a file; `errno` is ENOSPC, `filename` the file being written."""

    def __str__(self) -> str:  # the message alone (it names the file), not OSError's "[Errno 28] ...: 'file'"
        return self.strerror


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as hex, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _is_disk_full(error: BaseException, free: int, needed: int | None) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "no space left" in str(error).lower():
        return True
    return free < max(DISK_FULL_MARGIN, needed or 0)


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB // 10 else f"{n / 1024:.1f} KB"


def _remove(paths: Iterable[str | os.PathLike]) -> None:
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _named_file(error: BaseException, path: str | os.PathLike, scratch: list) -> str | os.PathLike:
    """The file a failed write names: the very file where the error names one, but `path` for a scratch file (or one
    in a scratch folder), which the user never sees."""
    named = getattr(error, "filename", None)
    if named is None:
        return path
    absolute = Path(named).absolute()
    hidden = {Path(p).absolute() for p in scratch}
    return path if absolute in hidden or hidden & set(absolute.parents) else named


@contextlib.contextmanager
def writing(
    path: str | os.PathLike, *, needed: int | None = None, scratch: Iterable[str | os.PathLike] = ()
) -> Iterator[None]:
    """Run the block that writes `path`; if it fails for want of space, remove `scratch` and raise `DiskFullError`.

    `needed` (bytes), when known, is named in the message. Other errors pass through unchanged, after `scratch` is
    removed as well: a failed write never leaves a half-written file where a reader would take it for a whole one.
    """
    scratch = list(scratch)
    try:
        yield
    except BaseException as error:
        free = free_bytes(path)  # measured before the scratch is removed: what the write met
        _remove(scratch)
        if isinstance(error, Exception) and _is_disk_full(error, free, needed):
            need = f"{_mb(needed)} needed, " if needed else ""
            file = _named_file(error, path, scratch)
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on device while writing {file} ({need}{_mb(free)} free); free some space and run "
                "the command again (what was saved before is intact)",
                str(file),
            ) from error
        raise


@contextlib.contextmanager
def new_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder beside `path` for the block to write a new folder into, renamed to `path` when the block
    ends and removed when it fails (`writing`): a reader never finds half a folder at `path`."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with writing(scratch, scratch=[scratch]):
        scratch.mkdir(parents=True)
        yield scratch
        os.replace(scratch, path)


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Raise `DiskFullError` before writing `what` (about `needed` bytes) under `path` when there is not room."""
    free = free_bytes(path)
    if needed > free:
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on device for {what} in {path} ({_mb(needed)} needed, {_mb(free)} free); free some "
            "space and run the command again (what was saved before is intact)",
            str(path),
        )


def _scratch_file(path: Path) -> Path:
    """The scratch file beside `path` that an atomic write fills before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_tensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` through a scratch file renamed into place, so a reader never meets a part."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _scratch_file(path)
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with writing(path, needed=needed, scratch=[tmp]):
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that refuses NaN and infinities (they are not JSON, and a reader in another language fails)."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a scratch file renamed into place: a reader sees the old file or the
    new one, never a part."""
    path = Path(path)
    tmp = _scratch_file(path)
    data = text.encode("utf-8")
    with writing(path, needed=len(data), scratch=[tmp]):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as strict JSON to `path`, atomically (`write_text_atomic`)."""
    write_text_atomic(path, dumps_json(obj, indent=2) + "\n")


def save_image_atomic(image: Any, path: str | os.PathLike, format: str = "PNG") -> Path:
    """Save a PIL image to `path` (in `format`) through a scratch file renamed into place: a run killed while it
    writes leaves the earlier image, or none, never a part. Returns the path."""
    path = Path(path)
    tmp = _scratch_file(path)
    with writing(path, scratch=[tmp]):
        image.save(tmp, format=format)
        os.replace(tmp, path)
    return path


def remove_earlier_outputs(folder: str | os.PathLike, patterns: Iterable[str]) -> None:
    """Remove what matches `patterns` (globs relative to `folder`, files or folders): the outputs that an earlier run
    of the same command wrote into `folder` and this run need not overwrite (another guidance scale's grid, the images
    beyond this run's count), so that none of them sits beside this run's results. Nothing else there is touched."""
    for pattern in patterns:
        for path in Path(folder).glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def check_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> None:
    """Refuse, before any work, an output folder that cannot be made or written: `path` an existing file, a file
    among its parents, or a nearest existing folder that this process may not write into. The ValueError names
    `flag` and the value; nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`{flag}` {str(path)!r} is a file, not a folder; pass a folder (made if absent)")
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:  # exists() is False under a file, too
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"`{flag}` {str(path)!r} cannot be made: {str(existing)!r} is a file, not a folder; pass a folder "
            "elsewhere"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path.absolute() else f"its parent {str(existing)!r}"
        raise ValueError(
            f"`{flag}` {str(path)!r} is not writable: {where} does not let this user write into it; pass a folder "
            "you can write to"
        )
