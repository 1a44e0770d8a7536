"""`keep_freed_memory`: freed blocks are reused instead of page-faulted in afresh, and a user's choice is respected."""

import subprocess
import sys

import pytest

from clipcond.allocator import _user_chose_allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings (Linux)")

# 20 rounds of eight 4 MiB blocks, written, then all freed, as a training step allocates its activations and frees
# them at the end; prints the minor page faults those rounds cost. By default glibc trims the freed 32 MiB off the
# top of its heap after every round, so every round faults it in again.
ROUNDS = """
import ctypes, resource, sys
from clipcond.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 4 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    blocks = [libc.malloc(size) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_rounds(mode: str, **env) -> tuple[str, int]:
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("MALLOC_", "CLIPCOND_KEEP"))}
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_blocks_are_reused_not_faulted_in_again():
    pages = (32 << 20) // 4096  # of one round
    applied, kept = run_rounds("keep")
    _, default = run_rounds("default")
    assert applied == "True"
    assert default > 10 * pages  # glibc maps and unmaps the block every round: every page faults again
    assert kept < 3 * pages  # the first round faults the block in, later rounds reuse it
    # the user's opt-out leaves glibc as it is
    applied, opted_out = run_rounds("keep", CLIPCOND_KEEP_FREED_MEMORY="0")
    assert applied == "False" and opted_out > 10 * pages


@pytest.mark.parametrize(
    "environ, reason",
    [
        ({}, None),
        ({"CLIPCOND_KEEP_FREED_MEMORY": "1"}, None),
        ({"CLIPCOND_KEEP_FREED_MEMORY": "0"}, "CLIPCOND_KEEP_FREED_MEMORY=0"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_ is set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES sets glibc.malloc"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD holds jemalloc"),
    ],
)
def test_a_user_choice_of_allocator_is_respected(environ, reason):
    assert _user_chose_allocator(environ) == reason
