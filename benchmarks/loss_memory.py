"""Peak memory of the contrastive loss against the global batch, for simulated world sizes 1-64.

    python benchmarks/loss_memory.py [--world-sizes 1 2 4 8 16 32 64] [--local-batch 32] [--save-results]

In a W-process run each process scores its b local pairs against the B = W x b gathered ones: `ClipLoss` with
`local_loss=True` builds two (b, B) logit matrices, so its memory must grow with b x B — linearly in W at a fixed
local batch — and not with B^2 as the full (B, B) loss (`local_loss=False`) does. This benchmark measures that on
one process: a fake process group of W ranks (`torch.testing._internal.distributed.fake_pg`) makes the real
`ClipLoss` code path run as rank 0 of W, its all-gather allocating the (B, d) gathered features (their values are
not filled in: memory, not numbers, is measured here).

Memory: on CUDA the allocator's peak (`torch.cuda.max_memory_allocated`) above what was allocated before; on CPU a
tensor-bytes account (`PeakMemory`: the peak over the run of the bytes of all live tensor storages created inside
it, tracked per operator through a dispatch mode — allocator rounding and per-operator scratch space are not seen).

Printed: per world size the loss's forward+backward peak for `local_loss` on and off; the growth exponent in W
(log2 of the ratio of successive increments over the last three world sizes: 1 for b x B, 2 for B^2) and bytes per
logit entry; and a whole training step of the `tiny` towers (forward, loss, backward) with gradient checkpointing
of the towers off and on at a few world sizes: its peak, and the loss's share (what the loss adds above the towers'
activations while it runs, on CPU), which grows with W while the towers' part does not. `--save-results` writes benchmarks/results/loss_memory.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from common import add_results_flag, command_line, machine, save_results
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/loss_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--local-batch", type=int, default=32, help="pairs per process (b)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width of the loss-only measurement")
    parser.add_argument("--step-preset", default="tiny", help="CLIP preset of the whole-step measurement")
    parser.add_argument("--step-world-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_results_flag(parser)
    return parser.parse_args(argv)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still alive, over every operator call.

    Each operator's outputs are recorded by storage (views of one storage count once); storages that died are
    dropped before the next operator's outputs are added. Tensors that existed before entering are not counted.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.phase: tuple[int, int] | None = None  # (bytes live when a phase began, its peak) while one runs
        self.phase_share = 0  # what the last phase added at its peak above what was live when it began

    def begin_phase(self) -> None:
        self._drop_expired()  # what died before the phase does not offset what the phase adds
        self.phase = (self.current, self.current)

    def _drop_expired(self) -> None:
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    def end_phase(self) -> None:
        if self.phase is not None:
            self.phase_share = self.phase[1] - self.phase[0]
            self.phase = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._drop_expired()
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self._live:
                    self._live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        if self.phase is not None:
            self.phase = (self.phase[0], max(self.phase[1], self.current))
        return out


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory that `fn()` adds on `device` (see the module doc for how it is measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakMemory() as meter:
        fn()
    return meter.peak


@contextlib.contextmanager
def simulated_world(world_size: int) -> Iterator[None]:
    """This process as rank 0 of `world_size` (a fake process group: collectives allocate but move no data)."""
    if world_size == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def loss_peak(world_size: int, local_batch: int, dim: int, local_loss: bool, device: torch.device) -> int:
    """Peak bytes of `ClipLoss` forward + backward on (local_batch, dim) features as rank 0 of `world_size`."""
    from clipcond.loss import ClipLoss

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(local_batch, dim, generator=generator).to(device).requires_grad_()
    text = torch.randn(local_batch, dim, generator=generator).to(device).requires_grad_()
    logit_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    loss_fn = ClipLoss(local_loss=local_loss)

    def run():
        loss_fn(image, text, logit_scale).backward()

    with simulated_world(world_size):
        return peak_bytes(run, device)


def step_peak(world_size: int, local_batch: int, preset: str, checkpointing: bool, device: torch.device) -> dict:
    """One forward + loss + backward of the CLIP towers of `preset` as rank 0 of `world_size`: the step's peak bytes
    and, on CPU, the loss's share: what the loss's forward and backward add at their peak above the towers'
    activations live when it begins (its phase ends when the gradient reaches the towers' outputs). The step's peak
    itself may come later, in the towers' backward, after the loss's buffers are freed."""
    from transformers import CLIPModel

    from clipcond.loss import ClipLoss
    from clipcond.models.clip import clip_config
    from clipcond.train.clip import ContrastiveModel

    torch.manual_seed(0)
    config = clip_config(preset, vocab_size=1024, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    clip = CLIPModel(config)
    if checkpointing:
        clip.gradient_checkpointing_enable()
    model = ContrastiveModel(clip, with_bias=False).to(device).train()
    size, context = config.vision_config.image_size, config.text_config.max_position_embeddings
    pixels = torch.randn(local_batch, 3, size, size, device=device)
    input_ids = torch.randint(3, 1024, (local_batch, context), device=device)
    input_ids[:, -1] = 1  # the end token, where the text tower pools
    mask = torch.ones_like(input_ids)
    loss_fn = ClipLoss()

    def run(meter: PeakMemory | None = None):
        image, text, scale, _ = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
        if meter is not None:
            meter.begin_phase()
            image.register_hook(lambda grad: meter.end_phase())
        loss_fn(image.float(), text.float(), scale.float()).backward()

    with simulated_world(world_size):
        if device.type == "cuda":
            return {"peak": peak_bytes(run, device), "loss_share": None}
        with PeakMemory() as meter:
            run(meter)
        return {"peak": meter.peak, "loss_share": meter.phase_share}


def growth_exponent(world_sizes: list[int], peaks: list[int]) -> float | None:
    """log2 of the ratio of the last two increments, over the last three of world sizes that double.

    peak = a + c W gives 1; peak = a + c W^2 gives 2 (increments over W/4 -> W/2 -> W grow 2x or 4x)."""
    if len(world_sizes) < 3 or world_sizes[-1] != 2 * world_sizes[-2] or world_sizes[-2] != 2 * world_sizes[-3]:
        return None
    last, middle = peaks[-1] - peaks[-2], peaks[-2] - peaks[-3]
    return math.log2(last / middle) if last > 0 and middle > 0 else None


def loss_law(world_sizes: list[int], local_batch: int, dim: int, device: torch.device) -> dict:
    """The loss-only table, the growth exponents, and bytes per logit entry at the largest world size."""
    table = {"local": [], "full": []}
    for world_size in world_sizes:
        table["local"].append(loss_peak(world_size, local_batch, dim, True, device))
        table["full"].append(loss_peak(world_size, local_batch, dim, False, device))
    top = world_sizes[-1] * local_batch  # the global batch B at the largest world size
    return {
        "world_sizes": world_sizes,
        "global_batch": [w * local_batch for w in world_sizes],
        "peak_bytes_local_loss": table["local"],
        "peak_bytes_full_loss": table["full"],
        "growth_exponent_local_loss": _round(growth_exponent(world_sizes, table["local"])),
        "growth_exponent_full_loss": _round(growth_exponent(world_sizes, table["full"])),
        "bytes_per_local_x_global": round(table["local"][-1] / (local_batch * top), 2),
        "bytes_per_global_squared": round(table["full"][-1] / (top * top), 2),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    world_sizes = sorted(set(args.world_sizes))
    report = {
        "benchmark": "loss_memory",
        "unit": "bytes",
        "goal": "local loss grows with local x global batch (exponent 1 in W), not global^2 (exponent 2)",
        "method": "cuda max_memory_allocated" if device.type == "cuda" else "live tensor storage bytes (PeakMemory)",
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "save_results"},
        "command": command_line("loss_memory", argv),
        "loss": loss_law(world_sizes, args.local_batch, args.dim, device),
        "step": {},
    }
    print("loss", json.dumps(report["loss"]), file=sys.stderr, flush=True)
    for checkpointing in (False, True):
        name = f"{args.step_preset}_checkpointing_{'on' if checkpointing else 'off'}"
        report["step"][name] = {
            str(w): step_peak(w, args.local_batch, args.step_preset, checkpointing, device)
            for w in sorted(set(args.step_world_sizes))
        }
        print(name, json.dumps(report["step"][name]), file=sys.stderr, flush=True)
    law = report["loss"]
    report["meets_goal"] = (
        law["growth_exponent_local_loss"] is not None and abs(law["growth_exponent_local_loss"] - 1) < 0.25
    )
    print(json.dumps(report, indent=2))
    if args.save_results:
        save_results("loss_memory", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
