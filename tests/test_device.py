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


def test_transformers_dtype_keyword_follows_the_version(monkeypatch):
    """transformers 5 reads `dtype` (and warns on `torch_dtype`); the 4.x releases allowed read `torch_dtype`."""
    import transformers

    from clipcond.device import transformers_dtype_keyword

    for version, keyword in (("4.46.0", "torch_dtype"), ("5.0.0", "dtype"), ("5.25.0", "dtype")):
        monkeypatch.setattr(transformers, "__version__", version)
        assert transformers_dtype_keyword() == keyword
