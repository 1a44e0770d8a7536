"""Which attention kernel a diffusers model runs: xformers' memory-efficient attention where it can run, PyTorch's
`scaled_dot_product_attention` (diffusers' default processor on torch >= 2) otherwise.

xformers runs on CUDA only. diffusers' `is_xformers_available()` says only whether the package imports, and is True
on a CPU machine where xformers is installed but cannot run, so the CUDA check is ours.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def enable_xformers_if_possible(model: torch.nn.Module) -> bool:
    """Switch a diffusers model (UNet, VAE, prior) to xformers attention if CUDA and xformers can run it.

    Returns True when xformers is on; otherwise logs a warning that says why and leaves the model on PyTorch's
    scaled-dot-product attention (which is also memory-efficient on recent GPUs).
    """
    fallback = "using PyTorch's scaled_dot_product_attention instead"
    if not torch.cuda.is_available():
        logger.warning("xformers attention was asked for, but it needs CUDA, which is not available; %s", fallback)
        return False
    try:
        import xformers  # noqa: F401
    except ImportError as err:
        logger.warning(
            "xformers attention was asked for, but xformers does not import (%s); install it with "
            "`pip install clipcond[xformers]` (a build that matches this torch), or %s",
            err,
            fallback,
        )
        return False
    try:
        model.enable_xformers_memory_efficient_attention()
    except Exception as err:  # diffusers runs a test kernel; a mismatched build fails there with various errors
        logger.warning("xformers attention could not be enabled (%s: %s); %s", type(err).__name__, err, fallback)
        model.disable_xformers_memory_efficient_attention()  # back to the SDPA processors, whatever was switched
        return False
    logger.info("using xformers memory-efficient attention in %s", type(model).__name__)
    return True
