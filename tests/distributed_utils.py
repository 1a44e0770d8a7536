"""Run a function in several CPU processes joined in a ``torch.distributed`` process group (gloo), for tests.

Usage::

    def _worker(rank: int, world_size: int, seed: int) -> dict[str, torch.Tensor]:
        ...  # torch.distributed is initialised here (unless init_process_group=False)
        return {"loss": loss.detach(), "grad": x.grad}

    results = run_in_processes(_worker, 2, 0)  # [result of rank 0, result of rank 1]

The worker must be a module-level function (the processes are spawned and import it by name), and its return value
must load with ``torch.load(weights_only=True)``: tensors, numbers, strings, and lists / tuples / dicts of them.
Each process starting imports torch again: budget a few seconds per call and batch many checks into one worker.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    out_dir: str,
    init_process_group: bool,
    args: tuple,
) -> None:
    # The environment torchrun would set, so that Accelerate (MULTI_CPU) and env:// initialisation work too.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # the processes share a few cores
    if init_process_group:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_in_processes(
    fn: Callable[..., Any], world_size: int, *args: Any, init_process_group: bool = True, timeout_s: float = 120.0
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned CPU processes; return the results by rank.

    With ``init_process_group`` (default) each process joins a gloo process group on 127.0.0.1 before calling
    ``fn``; with False only the torchrun environment variables (MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE) are set and ``fn`` (or Accelerate) initialises it. The parent's environment is not changed.
    A failing process raises ``torch.multiprocessing.ProcessRaisedException`` with its traceback; processes still
    running after ``timeout_s`` are killed and ``TimeoutError`` is raised.
    """
    with tempfile.TemporaryDirectory(prefix="clipcond-dist-") as out_dir:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, find_free_port(), out_dir, init_process_group, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(
                    f"{getattr(fn, '__name__', fn)} did not finish in {timeout_s} s on {world_size} processes"
                )
        return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=True) for rank in range(world_size)]
