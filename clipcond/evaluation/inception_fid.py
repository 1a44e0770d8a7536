"""The Inception-v3 of TensorFlow's FID code (graph `inception-2015-12-05`) as torchvision modules, so pytorch-fid's
weights file `pt_inception-2015-12-05-6726825d.pth` gives pytorch-fid's features (`fid_inception_v3`).

That graph differs from torchvision's `inception_v3` only in the pooling branch of its mixed blocks: its average
pools leave the zero padding out of the mean (`count_include_pad=False`), and the last block (Mixed_7c) max-pools
instead. The blocks below are pytorch-fid's `FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE_1` and
`FIDInceptionE_2` (mseitzer/pytorch-fid, `inception.py`, Apache-2.0), with the same parameters as torchvision's, so
the weights load under torchvision's key names. Imported only when such a file is given: it needs torchvision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from clipcond.evaluation.inception import FID_NUM_CLASSES


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool(x))]


class FIDInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool(x))]


class FIDInceptionE(InceptionE):
    """Mixed_7b (`max_pool=False`, pytorch-fid's `FIDInceptionE_1`) and Mixed_7c (`max_pool=True`, its
    `FIDInceptionE_2`: the TF graph max-pools there, unlike the paper)."""

    def __init__(self, in_channels: int, *, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]


def fid_inception_v3() -> Inception3:
    """pytorch-fid's `fid_inception_v3()` without its download: torchvision's `Inception3` (1008 classes, no
    auxiliary classifier, no initialisation: the weights are loaded next) with the TF graph's mixed blocks."""
    inception = Inception3(num_classes=FID_NUM_CLASSES, aux_logits=False, init_weights=False)
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    inception.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return inception
