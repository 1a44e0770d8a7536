"""Where and in what precision a pipeline runs: the `--device` and `--dtype` options of the commands and evaluations.

torch is imported inside the functions, so that a command's `--help` answers without it.
"""

from __future__ import annotations

DTYPES = ("fp32", "bf16", "fp16")


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device` {name!r} asks for CUDA, but no CUDA device is available")
    return device


def fast_bf16(device) -> bool:
    """Whether bf16 runs faster than fp32 on `device`: a CUDA device that supports it, or a CPU with bf16 units
    (AVX512-BF16 or AMX), on which oneDNN's bf16 kernels run natively. Elsewhere bf16 is emulated, several times
    slower than fp32 (docs/lab-notes.md, "bf16 on a CPU without bf16 units")."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)  # private in torch: absent means unknown, so no


def resolve_dtype(name: str, device):
    import torch

    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"`--dtype fp16` needs a CUDA device, got `--device` {device.type!r}; use fp32 or bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_name(dtype) -> str:
    """torch.float32 -> "fp32", the `--dtype` name of a floating dtype (inverse of `resolve_dtype`)."""
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names:
        raise ValueError(f"`dtype` must be one of {sorted(map(str, names))}, got {dtype}")
    return names[dtype]


def dtype_keyword() -> str:
    """diffusers (by 0.42) renamed from_pretrained's `torch_dtype` to `dtype` (huggingface/diffusers#14205) and warns
    on the old name; casting with `.to` afterwards warns too, so pass the name this version expects."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.42.0") else "torch_dtype"


def transformers_dtype_keyword() -> str:
    """transformers 5 names from_pretrained's `torch_dtype` `dtype` and warns on the old name, which the 4.x releases
    this package allows read: pass the name this version expects."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("5.0.0") else "torch_dtype"
