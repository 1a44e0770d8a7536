"""Inception-v3 pool3 features, the feature space of the Fréchet Inception Distance (FID; Heusel et al. 2017, "GANs
Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"), from weights the user gives as a
local safetensors file (`clipcond eval generation --inception-weights FILE`): nothing is downloaded or unpickled.

The network is torchvision's `inception_v3` (torchvision is imported only when a file is given). Images are fed as
pytorch-fid feeds them: uint8 -> [0, 1], resized to 299 x 299 bilinearly (`F.interpolate`, align_corners=False, no
antialiasing; clean-fid resizes with PIL's bicubic instead, so its figures differ), then scaled to [-1, 1], the
range of the TF-ported weights; the feature is the 2048-d output of the last average pool ("pool3"), in fp32.

Two files are understood, told apart by the classifier they carry (`fc.weight`'s rows):
- torchvision's ImageNet weights (`inception_v3_google-0cc3c7bd.pth`, 1000 classes, or a file without `fc.*`)
  saved as safetensors (README, "The command line"): the figures compare runs measured with the same file, not published
  FIDs, which use TF's weights;
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` saved the same way (TF's FID graph, 1008 classes): built
  with that graph's pooling (`clipcond.evaluation.inception_fid`), it gives pytorch-fid's features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipcond.lineage import file_hash

FLAG = "`--inception-weights`"
INPUT_SIZE = 299
FEATURE_DIM = 2048  # pool3
FID_NUM_CLASSES = 1008  # the classifier of TF's FID graph (pytorch-fid's weights): 1000 ImageNet classes, 8 unused
KINDS = ("torchvision", "pytorch-fid")
# What a file may hold beyond the feature extractor: the auxiliary and final classifiers, BatchNorm step counters.
UNUSED_PREFIXES = ("AuxLogits.", "fc.")
_CONVERT_HINT = (
    "save a torchvision inception_v3 state dict you trust as safetensors: save_file(torch.load(PTH, map_location='cpu', "
    "weights_only=True), FILE) with safetensors.torch.save_file"
)


@dataclass(frozen=True)
class InceptionWeights:
    """A checked weights file (`check_inception_weights`)."""

    path: Path
    kind: str  # one of KINDS: which blocks the network is built with
    sha256: str  # of the file: two files at one path are told apart

    @property
    def settings(self) -> dict:
        """What an evaluation records of the features it measured `fd_inception` in."""
        return {
            "weights": str(self.path),
            "sha256": self.sha256,
            "blocks": self.kind,
            "input": f"bilinear resize to {INPUT_SIZE} (as pytorch-fid), scaled to [-1, 1]",
        }


def _network(kind: str) -> torch.nn.Module:
    """torchvision's Inception-v3 of `kind`, without the auxiliary classifier and uninitialised (weights follow)."""
    try:
        if kind == "pytorch-fid":
            from clipcond.evaluation.inception_fid import fid_inception_v3

            return fid_inception_v3()
        from torchvision.models.inception import Inception3
    except ImportError as err:
        raise ValueError(
            f"{FLAG} needs torchvision, which does not import ({err}); install the torchvision that matches your "
            "torch (`pip install torchvision`, or clipcond's `openclip` extra)"
        ) from None
    return Inception3(num_classes=1000, aux_logits=False, init_weights=False)


def _expected_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the feature extractor's tensors (the classifier and BatchNorm step counters left out)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        state = _network(kind).state_dict()
    return {
        key: tuple(value.shape)
        for key, value in state.items()
        if not key.startswith(UNUSED_PREFIXES) and not key.endswith("num_batches_tracked")
    }


def check_inception_weights(path: str | os.PathLike) -> InceptionWeights:
    """Refuse, before any slow load, a file that is missing, not safetensors, or whose tensors do not fit
    Inception-v3 (missing or foreign keys, wrong shapes), naming `--inception-weights` and the path; the file's kind
    (`KINDS`) from its classifier."""
    from safetensors import SafetensorError, safe_open

    what = f"{FLAG} {str(path)!r}"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} does not exist")
    try:
        with safe_open(path, framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{what} is not a safetensors file ({err}); {_CONVERT_HINT}") from None
    fc = shapes.get("fc.weight")
    kind = "pytorch-fid" if fc is not None and fc[0] == FID_NUM_CLASSES else "torchvision"
    expected = _expected_shapes(kind)
    missing = [key for key in expected if key not in shapes]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(
            f"{what} is not a torchvision inception_v3 state dict: {len(missing)} of its {len(expected)} tensors "
            f"are missing ({shown}); {_CONVERT_HINT}"
        )
    foreign = [
        key
        for key in shapes
        if key not in expected and not key.startswith(UNUSED_PREFIXES) and not key.endswith("num_batches_tracked")
    ]
    wrong = [f"{key} {shapes[key]} (expected {expected[key]})" for key in expected if shapes[key] != expected[key]]
    if foreign or wrong:
        shown = ", ".join([*wrong[:2], *foreign[:2]])
        raise ValueError(
            f"{what} does not fit torchvision's inception_v3: {len(wrong)} tensor(s) of the wrong shape and "
            f"{len(foreign)} unknown ({shown})"
        )
    return InceptionWeights(path, kind, file_hash(path))


class InceptionFeatures:
    """Inception-v3 pool3 features of uint8 images: `features(images)` (N, 3, H, W) -> (N, 2048) float32 on the
    CPU, computed on `device` in fp32, `batch_size` images at a time."""

    def __init__(self, weights: InceptionWeights, device: torch.device | str = "cpu", batch_size: int = 32) -> None:
        from safetensors.torch import load_file

        network = _network(weights.kind)
        network.fc = torch.nn.Identity()  # the output is then pool3, (N, 2048): no classifier
        state = {key: value for key, value in load_file(weights.path).items() if not key.startswith(UNUSED_PREFIXES)}
        # num_batches_tracked may be absent: BatchNorm fills it in for a state dict without version metadata.
        network.load_state_dict(state)
        self.network = network.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights = weights

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, torch.float32) / 255.0  # (B, 3, H, W)
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            chunks.append(self.network(2.0 * x - 1.0).float().cpu())  # (B, 2048)
        return torch.cat(chunks)


def load_inception(
    path: str | os.PathLike, device: torch.device | str = "cpu", batch_size: int = 32
) -> InceptionFeatures:
    """The Inception-v3 feature extractor of a safetensors file (`check_inception_weights`, then load)."""
    return InceptionFeatures(check_inception_weights(path), device, batch_size)
