"""Getting host values onto the device without making the host wait for it.

A training step on CUDA only queues work; the host runs ahead of the device until something makes it wait. Two
everyday things do: building a small tensor from Python numbers on the device (`torch.tensor(mean,
device="cuda")` copies from pageable memory and synchronises the stream), and copying a pageable CPU tensor to the
device (the driver may stage it synchronously). `constant` builds such tensors once per device and keeps them;
`to_device` pins a CPU tensor before an asynchronous copy, as the DataLoader's `pin_memory` does for batches.
"""

from __future__ import annotations

import functools

import torch


def constant(values: tuple[float, ...] | list[float], device: torch.device | str, dtype=torch.float32) -> torch.Tensor:
    """`torch.tensor(values)` on `device`, built once per (values, device, dtype) and shared: do not modify it."""
    return _constant(tuple(float(v) for v in values), torch.device(device), dtype)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`, copied asynchronously: a CPU tensor bound for CUDA is pinned first (a no-op for one
    that is, such as a DataLoader batch with `pin_memory`)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
