"""Catch, on a CPU, the tensors that would land on the wrong device on a GPU.

On a CUDA machine the models, batches and generators of a run live on `cuda`, while a tensor made without naming
its device (`torch.rand(n, generator=g)`, `torch.zeros(b)`, `torch.tensor([...])`) lands on the CPU; mixing the two
fails (`Expected a 'cpu' device type for generator but found 'cuda'`, `index is on cuda:0, different from other
tensors on cpu`). On a CPU-only machine both are the CPU, so the bug passes every test.

`implicit_device_is_meta()` recreates the split without a GPU: inside it, a tensor that clipcond's own code makes
without naming a device is made on `meta` (shapes, no data), while the models and batches stay on the CPU, the
role CUDA plays on a GPU. Any operation that then mixes a meta tensor with a real one raises `MixedDeviceError`
naming the operation; that includes indexing a CPU tensor with a meta index, which PyTorch itself answers with
uninitialised memory instead of an error, and moving it afterwards (`torch.tensor(x).to(device)`: made on the CPU
and copied, where it could have been made in place; a meta tensor has nothing to copy). Libraries (tokenizers, diffusers' schedulers) keep making their host-side
tensors on the CPU, as they do on a GPU machine, so only clipcond's code is held to naming its devices.

`guard_model_calls(monkeypatch)` puts every place where clipcond runs a model under that context: the training
stages' `loss` and `after_optimizer_step`, the pipelines' calls, the CLIP's encoders, the attribute judge and the embedding caches. Host-side
bookkeeping around them (metrics, file lists, samplers) stays outside, where a CPU tensor is what is meant.

What it cannot catch: code that names the wrong device explicitly (a model left on the CPU beside a CUDA one),
which only a run on a GPU shows (`benchmarks/gpu_check.py`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MixedDeviceError(RuntimeError):
    pass


def _source_roots() -> tuple[str, ...]:
    import clipcond
    import clipcond.pipelines
    import clipcond.train

    return tuple(os.path.dirname(m.__file__) + os.sep for m in (clipcond, clipcond.pipelines, clipcond.train))


_TORCH_ROOT = os.path.dirname(torch.__file__) + os.sep


class _ImplicitToMeta(TorchFunctionMode):
    """Tensor constructors called by clipcond's code without a `device` make meta tensors."""

    def __init__(self, also: tuple[str, ...] = ()):
        super().__init__()
        self.roots = _source_roots() + tuple(also)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and self._called_from_clipcond():
            kwargs["device"] = "meta"
        return func(*args, **kwargs)

    def _called_from_clipcond(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_ROOT):
            frame = frame.f_back
        return frame is not None and frame.f_code.co_filename.startswith(self.roots)


class _NoMixing(TorchDispatchMode):
    """Raise on any operation whose tensor arguments are on `meta` and on a real device at once."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        devices = {t.device.type for t in flat if isinstance(t, torch.Tensor)}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
            devices.add(torch.device(kwargs["device"]).type)  # made without a device, then moved: make it there
        if "meta" in devices and len(devices) > 1:
            shapes = [(tuple(t.shape), t.device.type) for t in flat if isinstance(t, torch.Tensor)]
            raise MixedDeviceError(
                f"{func} mixes a tensor made without naming its device (meta here, the CPU on a GPU machine) with "
                f"tensors on the model's device: {shapes}; name the device where the tensor is made"
            )
        return func(*args, **kwargs)


_active = threading.local()


@contextlib.contextmanager
def implicit_device_is_meta(also: tuple[str, ...] = ()):
    """Tensors that clipcond makes without a device are meta tensors inside; mixing them with real ones raises.
    `also`: more source files or folders held to the rule (a test's own file)."""
    if getattr(_active, "on", False):  # nested model calls: one guard is enough
        yield
        return
    _active.on = True
    try:
        with _ImplicitToMeta(also), _NoMixing():
            yield
    finally:
        _active.on = False


def guarded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with implicit_device_is_meta():
            return fn(*args, **kwargs)

    return wrapper


def model_calls() -> list[tuple[object, str]]:
    """(owner, attribute) of every function through which clipcond runs a model on its device."""
    from clipcond import conditioning
    from clipcond.evaluation.judge import AttributeJudge
    from clipcond.models.captioner import Captioner
    from clipcond.models.clip import ClipRun
    from clipcond.pipelines.prior import PriorPipeline
    from clipcond.pipelines.text_to_image import TextToImagePipeline
    from clipcond.pipelines.unclip import UnCLIPTextToImagePipeline
    from clipcond.pipelines.variation import ImageVariationPipeline
    from clipcond.train import captioner, clip, decoder, prior, unclip_decoder  # noqa: F401  (defines the stages)
    from clipcond.train.loop import Stage
    from clipcond.vision_tokens import VisionTokenCache

    calls: list[tuple[object, str]] = [
        (conditioning, "encode_prompts"),
        (conditioning, "embed_images"),
        (VisionTokenCache, "build_or_load"),
        (Captioner, "generate"),
        (ClipRun, "encode_text"),
        (ClipRun, "encode_images"),
        (AttributeJudge, "predict"),
    ]
    pipelines = (TextToImagePipeline, PriorPipeline, UnCLIPTextToImagePipeline, ImageVariationPipeline)
    for cls in pipelines:
        calls += [
            (cls, name)
            for name in ("__call__", "interpolate", "interpolate_embeddings", "decode")
            if name in vars(cls)
        ]
    stages, todo = [], [Stage]
    while todo:
        cls = todo.pop()
        stages.append(cls)
        todo += cls.__subclasses__()
    calls += [
        (cls, name)
        for cls in stages
        for name in ("loss", "after_optimizer_step")
        if name in vars(cls) and cls is not Stage
    ]
    return calls


def guard_model_calls(monkeypatch) -> list[str]:
    """Run every `model_calls()` function under `implicit_device_is_meta`; returns their names."""
    names = []
    for owner, name in model_calls():
        monkeypatch.setattr(owner, name, guarded(getattr(owner, name)))
        names.append(f"{getattr(owner, '__name__', owner)}.{name}")
    return names
