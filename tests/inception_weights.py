"""Random Inception-v3 weights for the FID tests, saved as the safetensors file `--inception-weights` takes.

Left at PyTorch's default initialisation, 94 layers shrink the activations to ~1e-8; the BatchNorm statistics are
therefore set from one forward pass in training mode on random images (momentum None: the batch's own statistics),
so every layer passes on activations of unit scale and the pool3 features tell images apart.
"""

import torch
from safetensors.torch import save_file


def random_inception(kind: str = "torchvision", seed: int = 0) -> torch.nn.Module:
    """torchvision's `inception_v3` (1000 classes, with the auxiliary classifier, as torchvision saves it) or, with
    `kind="pytorch-fid"`, pytorch-fid's FID Inception (1008 classes), random with BatchNorm statistics of unit-scale
    activations."""
    torch.manual_seed(seed)
    if kind == "pytorch-fid":
        from clipcond.evaluation.inception_fid import fid_inception_v3

        network = fid_inception_v3()
    else:
        from torchvision.models.inception import Inception3

        network = Inception3(num_classes=1000, aux_logits=True, init_weights=False)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    network.train()
    with torch.no_grad():
        network(torch.rand(4, 3, 299, 299, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    return network.eval()


def write_random_inception(path, kind: str = "torchvision", seed: int = 0):
    """Save `random_inception(kind, seed)`'s state dict to `path` as safetensors; returns `path`."""
    save_file(random_inception(kind, seed).state_dict(), str(path))
    return path
