"""Where bf16 is fast: the demo's default precision follows it."""

import pytest
import torch

from clipcond.device import fast_bf16

CPU_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


@pytest.mark.parametrize(
    "units, fast",
    [((False, False), False), ((True, False), True), ((False, True), True), ((True, True), True)],
)
def test_a_cpu_is_fast_in_bf16_only_with_bf16_units(monkeypatch, units, fast):
    for name, present in zip(CPU_CHECKS, units):
        monkeypatch.setattr(torch.cpu, name, lambda present=present: present, raising=False)
    assert fast_bf16(torch.device("cpu")) is fast


def test_a_torch_without_the_checks_counts_as_slow(monkeypatch):
    for name in CPU_CHECKS:
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert fast_bf16(torch.device("cpu")) is False


def test_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert fast_bf16(torch.device("cuda")) is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert fast_bf16(torch.device("cuda")) is False
    assert fast_bf16(torch.device("meta")) is False
