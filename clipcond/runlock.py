"""One writer per run folder: an exclusive lock held while a command writes into its `--output-dir`.

Two trainings into one folder would interleave their checkpoints (one run's weights under the other's optimizer and
RNG state) and exit 0. The lock is an `flock` on `FOLDER/.clipcond.lock`, which the kernel releases when its holder
dies however it dies, so a killed run never blocks the next one; the file names the holder (host, pid, command,
start time) for the message a second writer gets. A holder that exits cleanly empties the file; a file that still
names a holder whose lock is free is a run that died, and taking it over says so.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".clipcond.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock file still names the holder, but is not enforced (a warning says so)
    fcntl = None


class RunFolderBusyError(RuntimeError):
    """Another live process holds the run folder's lock."""


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:500],
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace")


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']!r}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike, *, flag: str = "--output-dir") -> Iterator[Path]:
    """Create `folder` if needed and hold its lock for the `with` block; `RunFolderBusyError` at once if another
    process holds it. `flag` names the argument in the message. A folder created here is removed again when the
    block fails before writing anything into it."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            if fcntl is None:
                raise OSError("this platform has no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusyError(
                f"`{flag}` {str(folder)!r} is in use by another run ({_describe(_read(fd))}); wait for it to "
                f"finish or choose another `{flag}`"
            ) from None
        except OSError as err:  # e.g. Lustre without -o flock, NFS without lockd (ENOLCK, EOPNOTSUPP)
            logger.warning("cannot lock %s (%s): nothing stops a second run from writing into it", folder, err)
        previous = _read(fd)
        if previous.strip():
            logger.warning("taking over %s from a run that is gone (%s)", path, _describe(previous))
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(_holder()) + "\n").encode())
        except OSError as err:  # a full disk: the lock holds without its note; the writes that matter will say so
            logger.warning("could not name this run in %s (%s)", path, err)
        try:
            yield folder
        except BaseException:
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                path.unlink()  # a run that failed before writing anything leaves no folder behind
                folder.rmdir()
            raise
        finally:
            os.ftruncate(fd, 0)  # an orderly exit: the next holder has nothing to take over
    finally:
        os.close(fd)  # releases the flock
