"""Keep freed memory in the process: glibc malloc settings for training and sampling on CPU.

Every training step allocates and frees the same activation buffers. glibc's malloc serves a large block (above
`M_MMAP_THRESHOLD`, which it raises only to the size of the last such block freed) with a fresh `mmap` and gives it
back with `munmap` when freed, and it trims freed memory off the top of its heaps; so the next step touches fresh
pages and the kernel faults and zeroes every one of them again. The settings below keep those pages in the process,
so a step reuses the last one's (what that saved on a small UNet is in the README's speed table).

PyTorch's CPU performance guide suggests preloading jemalloc or tcmalloc for the same reason; this gets the bulk
of it in-process with no extra library. It is left alone when the user chose otherwise: a `MALLOC_*_` or
`GLIBC_TUNABLES` malloc setting, another allocator in `LD_PRELOAD`, or `CLIPCOND_KEEP_FREED_MEMORY=0`. The cost is
that memory freed after the peak of a run is not returned to the system until the process ends.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it: blocks up to 32 MiB come from (and go back to) the heap
TRIM_THRESHOLD = 1 << 30  # give memory back only when 1 GiB lies free at the top of a heap
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps

_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_applied: bool | None = None


def _user_chose_allocator(environ) -> str | None:
    """Why to leave malloc alone, or None."""
    if environ.get("CLIPCOND_KEEP_FREED_MEMORY", "1") == "0":
        return "CLIPCOND_KEEP_FREED_MEMORY=0"
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if name in environ:
            return f"{name} is set"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preload = environ.get("LD_PRELOAD", "")
    for allocator in _OTHER_ALLOCATORS:
        if allocator in preload:
            return f"LD_PRELOAD holds {allocator}"
    return None


def keep_freed_memory(environ=None) -> bool:
    """Set glibc's malloc to keep freed blocks of up to 32 MiB for reuse (once per process); returns whether the
    settings are in force. A no-op off Linux, on a C library without `mallopt`, or when the user chose otherwise."""
    global _applied
    if _applied is not None:
        return _applied
    environ = os.environ if environ is None else environ
    reason = "not Linux" if not sys.platform.startswith("linux") else _user_chose_allocator(environ)
    if reason is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            reason = "the C library has no mallopt"
    if reason is not None:
        logger.debug("malloc left at its settings: %s", reason)
        _applied = False
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the thresholds first, so a failure leaves glibc's dynamic threshold in place
    _applied = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    logger.debug("malloc keeps freed memory: %s", _applied)
    return _applied
