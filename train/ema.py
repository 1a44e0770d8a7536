"""An exponential moving average of a model's weights, as the diffusion stages (decoder, prior) keep and save it.

diffusers' `EMAModel` with warm-up: the decay is 1 - (1 + step)^-power, capped by `--ema-decay`, so at CPU budgets of
a few hundred steps the average forgets the random initialisation (a fixed 0.999 would still hold 0.999^300 = 74%
of it after 300 steps; with power 2/3 the decay is about 0.98 there, an average over the last ~50 steps). The EMA
state goes into the training loop's checkpoints (`Stage.extra_state`), so a resumed run continues the same average.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel

from clipcond.finite import finite_float

logger = logging.getLogger(__name__)


def add_ema_args(parser: argparse.ArgumentParser, what: str = "weights") -> argparse.ArgumentParser:
    ema = parser.add_argument_group(f"EMA of the {what} (the saved model)")
    ema.add_argument("--no-ema", action="store_true", help="save the raw weights; keep no moving average")
    ema.add_argument("--ema-decay", type=finite_float, default=0.999, help="upper bound of the EMA decay")
    ema.add_argument(
        "--ema-warmup-power",
        type=finite_float,
        default=2 / 3,
        help="EMA warm-up: decay = 1 - (1 + step)^-power, capped by --ema-decay",
    )
    ema.add_argument(
        "--no-ema-warmup", action="store_true", help="use diffusers' (1 + step) / (10 + step) ramp instead"
    )
    return parser


def check_ema_args(args: argparse.Namespace) -> None:
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"`--ema-decay` must be in (0, 1), got {args.ema_decay}")
    if args.ema_warmup_power <= 0:
        raise ValueError(f"`--ema-warmup-power` must be > 0, got {args.ema_warmup_power}")


def make_ema(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> EMAModel | None:
    """An `EMAModel` of `model`'s parameters on `device` (None with `--no-ema`), started from its current weights.

    A diffusers model (one with a `config`) is recorded with its class, so `EMAModel.save_pretrained` works on it.
    """
    if args.no_ema:
        return None
    config = getattr(model, "config", None)
    ema = EMAModel(
        model.parameters(),
        decay=args.ema_decay,
        use_ema_warmup=not args.no_ema_warmup,
        power=args.ema_warmup_power,
        foreach=True,
        model_cls=type(model) if config is not None else None,
        model_config=config,
    )
    ema.to(device)
    return ema


@contextmanager
def ema_weights(ema: EMAModel | None, model: torch.nn.Module):
    """`model` with the EMA weights inside the block (its own weights without an EMA); restored after."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


def ema_state(ema: EMAModel | None) -> dict:
    """The EMA's part of a checkpoint's extra state."""
    return {} if ema is None else {"ema": ema.state_dict()}


def load_ema_state(ema: EMAModel | None, state: dict, device: torch.device) -> None:
    """Restore the EMA from a checkpoint's extra state, refusing a checkpoint trained with the other setting."""
    if ema is None:
        if "ema" in state:
            logger.warning("the checkpoint holds EMA weights, which --no-ema drops")
        return
    if "ema" not in state:
        raise ValueError("the checkpoint holds no EMA weights (it was trained with --no-ema); resume with --no-ema")
    ema.load_state_dict(state["ema"])
    ema.to(device)


def ema_record(ema: EMAModel | None) -> dict | None:
    """What the run record says about the EMA: its upper bound `decay`, and `last_decay`, the decay of its last
    update (with warm-up, below the bound at CPU budgets: 0.986 after 600 steps, an average over ~70 steps)."""
    if ema is None:
        return None
    return {
        "decay": ema.decay,
        "last_decay": round(ema.get_decay(ema.optimization_step), 6),
        "optimization_step": ema.optimization_step,
    }
