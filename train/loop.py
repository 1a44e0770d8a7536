"""What the training entry points share: Accelerate set-up, a resumable sharded sampler, atomic checkpoints,
the optimisation loop with progress and logging.

The loop follows Accelerate's order (`Accelerator` -> `set_seed` -> data -> model, optimizer, scheduler ->
`prepare` -> loop with `accumulate` and `backward` -> `end_training`). Each stage (CLIP, decoder, prior) supplies a
`Stage`: how to compute the loss of a batch, what to do after an optimizer step (clamp the temperature, update
the EMA), how to validate, how to export a usable model. Everything else lives here once.

Exact resume: every source of randomness is either seeded from (seed, epoch) — the data order — or kept in
state that the checkpoint stores (the stage's generator, the global RNGs through `save_state`, the EMA), and the
sampler resumes mid-epoch. A run killed with SIGKILL and resumed therefore ends with the weights of an
uninterrupted run.

N processes train like one process on the N-times larger global batch: the sampler hands each process its slice of
the same global batches, the losses gather what they need across processes, and the stage's generator is the same on
every process, which draws the random numbers of the whole global batch and keeps its own rows (`draw_rows`). So the
weights after a step on 2 processes equal those of 1 process up to the order of float reductions, and the
checkpoint's one generator state resumes every process.

Debugging aid: with the environment variable `CLIPCOND_SAMPLE_LOG` set to a folder, each process appends the data
set indices of every micro-batch it trains on to `rank<k>.jsonl` there (one JSON line per batch:
`{"epoch", "step", "index"}`); the multi-process tests read it to check that every sample is seen once per epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm.auto import tqdm

from clipcond.allocator import keep_freed_memory
from clipcond.finite import finite_float
from clipcond.runlock import run_folder_lock
from clipcond.runs import RUN_RECORD, RunRecord
from clipcond.storage import check_free_space, dumps_json, file_sha256, writing
from clipcond.transfer import to_device

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"  # written last: a checkpoint folder without it is incomplete
EXTRA_TENSORS_FILE = "extra_state.safetensors"
MAX_AUTO_WORKERS = 8  # data loader workers per process chosen on CUDA when --dataloader-num-workers is not given
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
SDPA_BACKENDS = {  # --sdpa-backend -> torch.nn.attention.SDPBackend
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


# --------------------------------------------------------------------------------------------------- arguments


def add_training_args(
    parser: argparse.ArgumentParser, steps_help: str = "optimizer steps in total", **defaults: Any
) -> argparse.ArgumentParser:
    """The options every training entry point takes. `defaults` overrides the per-stage defaults by dest name."""
    d = {
        "train_batch_size": 64,
        "learning_rate": 1e-4,
        "max_train_steps": 1000,
        "lr_warmup_steps": 100,
        "lr_scheduler": "cosine",
        "weight_decay": 1e-2,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "checkpointing_steps": 500,
        "validation_steps": 500,
        **defaults,
    }
    g = parser.add_argument_group("training")
    _add_run_args(g, d, steps_help)
    _add_optimizer_args(g, d)
    _add_speed_args(g)
    _add_bookkeeping_args(g, d)
    return parser


def _add_run_args(g: argparse._ArgumentGroup, d: dict[str, Any], steps_help: str) -> None:
    """Where the run goes, its seed, its length and its batch."""
    g.add_argument("--output-dir", required=True, help="run folder: the final model, checkpoints/, logs/")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and noise")
    g.add_argument("--max-train-steps", type=int, default=d["max_train_steps"], help=steps_help)
    g.add_argument(
        "--train-batch-size", type=int, default=d["train_batch_size"], help="batch size per process and micro-step"
    )
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-steps per optimizer step")


def _add_optimizer_args(g: argparse._ArgumentGroup, d: dict[str, Any]) -> None:
    """AdamW, its learning-rate schedule and gradient clipping."""
    g.add_argument("--learning-rate", type=finite_float, default=d["learning_rate"], help="peak learning rate (AdamW)")
    g.add_argument(
        "--lr-scheduler",
        default=d["lr_scheduler"],
        choices=["cosine", "linear", "constant", "constant_with_warmup"],
        help="learning-rate schedule after warm-up",
    )
    g.add_argument("--lr-warmup-steps", type=int, default=d["lr_warmup_steps"], help="linear warm-up steps")
    g.add_argument("--weight-decay", type=finite_float, default=d["weight_decay"], help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=finite_float, default=d["adam_beta1"])
    g.add_argument("--adam-beta2", type=finite_float, default=d["adam_beta2"])
    g.add_argument("--adam-epsilon", type=finite_float, default=d["adam_epsilon"])
    g.add_argument(
        "--max-grad-norm", type=finite_float, default=d["max_grad_norm"], help="gradient clipping (0 disables)"
    )


def _add_speed_args(g: argparse._ArgumentGroup) -> None:
    """Precision, memory, kernels and data loading: how fast a step runs, not what it computes."""
    g.add_argument(
        "--mixed-precision",
        default=None,
        choices=["no", "bf16", "fp16"],
        help="autocast precision (default: Accelerate's config, else no)",
    )
    g.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory"
    )
    g.add_argument(
        "--allow-tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TF32 matrix products and convolutions for fp32 work on Ampere or newer GPUs (default: on with CUDA; no "
        "effect on CPU)",
    )
    g.add_argument(
        "--torch-compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        metavar="MODE",
        help="torch.compile the trained model, in MODE (default when given without one: 'default'; "
        "'reduce-overhead' replays CUDA graphs, for small models whose steps are launch-bound; pays on GPUs over "
        "long runs: the first steps compile)",
    )
    g.add_argument(
        "--sdpa-backend",
        default=None,
        choices=sorted(SDPA_BACKENDS),
        help="the kernel PyTorch's fused attention (SDPA) uses in training (default: PyTorch's choice per call)",
    )
    g.add_argument(
        "--dataloader-num-workers",
        type=int,
        default=None,
        help=f"data loading worker processes, kept across epochs (default: on CUDA up to {MAX_AUTO_WORKERS} per "
        "process, as the CPU cores allow; 0 on CPU, where they compete with the training for the same cores)",
    )
    g.add_argument(
        "--dataloader-prefetch-factor",
        type=int,
        default=None,
        help="batches each worker loads ahead (default: 4 on CUDA, else PyTorch's 2; needs workers)",
    )


def _add_bookkeeping_args(g: argparse._ArgumentGroup, d: dict[str, Any]) -> None:
    """Logging, skipped files, checkpoints, resume, validation and trackers."""
    g.add_argument(
        "--logging-steps",
        type=int,
        default=None,
        help="log the loss, averaged over processes and the last N steps, every N steps: the one moment a step "
        "waits for the device (default: 10 on CUDA, 1 on CPU)",
    )
    g.add_argument(
        "--max-skipped-fraction",
        type=finite_float,
        default=0.05,
        help="stop with an error when more than this share of the training images cannot be read or lie outside the "
        "data folder (they are skipped and counted up to it; see --allow-outside-paths)",
    )
    g.add_argument(
        "--checkpointing-steps",
        type=int,
        default=d["checkpointing_steps"],
        help="save a resumable checkpoint every N steps (0 disables)",
    )
    g.add_argument("--checkpoints-total-limit", type=int, default=2, help="keep at most this many checkpoints")
    g.add_argument(
        "--resume-from-checkpoint",
        default=None,
        help="'latest' (the newest complete checkpoint in OUTPUT_DIR/checkpoints, or a fresh start if none) or a path",
    )
    g.add_argument(
        "--validation-steps", type=int, default=d["validation_steps"], help="validate every N steps (0 disables)"
    )
    g.add_argument(
        "--report-to",
        default="none",
        choices=["none", "tensorboard", "wandb", "all"],
        help="experiment tracker for scalars (and images where the stage logs them)",
    )
    g.add_argument("--tracker-project-name", default="clipcond", help="project name given to the tracker")


def parse_training_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, check: Callable[[argparse.Namespace], None]
) -> argparse.Namespace:
    """`argv` parsed, then checked: the training options (`check_training_args`), then the stage's (`check`)."""
    args = parser.parse_args(argv)
    check_training_args(args)
    check(args)
    return args


def check_training_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later, naming the option and the value; and an `--output-dir` that cannot be
    written, before any work."""
    from clipcond.storage import check_output_dir

    check_output_dir(args.output_dir)
    positive = ["max_train_steps", "train_batch_size", "gradient_accumulation_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    non_negative = ["lr_warmup_steps", "checkpointing_steps", "validation_steps", "dataloader_num_workers"]
    for name in non_negative:
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 0, got {getattr(args, name)}")
    for name in ("logging_steps", "dataloader_prefetch_factor"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise ValueError(f"`--learning-rate` must be > 0, got {args.learning_rate}")
    if not 0.0 <= args.max_skipped_fraction <= 1.0:
        raise ValueError(f"`--max-skipped-fraction` must be in [0, 1], got {args.max_skipped_fraction}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"`--checkpoints-total-limit` must be >= 1, got {args.checkpoints_total_limit}")


@contextlib.contextmanager
def hold_output_dir(accelerator: Accelerator, args: argparse.Namespace) -> Iterator[None]:
    """Hold `--output-dir` for the run (`clipcond.runlock`; the main process, which alone writes there, takes it): a
    second run into the same folder is refused at once, on every process, instead of mixing its checkpoints with
    this one's."""
    with contextlib.ExitStack() as stack:
        on_main(accelerator, lambda: stack.enter_context(run_folder_lock(args.output_dir, flag="--output-dir")))
        yield


def make_output_dir(accelerator: Accelerator, args: argparse.Namespace) -> Path:
    """`--output-dir`, made by the main process (the one that writes there)."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def run_stage(args: argparse.Namespace, train_stage: Callable[[Accelerator, argparse.Namespace], int]) -> int:
    """The body of a training entry point's `main`, after `parse_args`: 1. the Accelerator (seeded), then
    `train_stage(accelerator, args)` while holding `--output-dir`."""
    accelerator = make_accelerator(args)
    with hold_output_dir(accelerator, args):
        return train_stage(accelerator, args)


def on_main(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """`fn()` on the main process, its result handed to every process; an error it raises is raised on every
    process, so that none waits forever at the next collective for a main process that stopped."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as err:  # re-raised below, on every process
            error = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [result if error is None else None, error]
        broadcast_object_list(shared)
        result, error = shared
    if error is not None:
        raise error
    return result


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    keep_freed_memory()  # each step reuses the last one's buffers instead of page-faulting fresh ones (allocator.py)
    output_dir = Path(args.output_dir)
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=report_to,
        project_config=project_config,
        # We step the learning-rate schedule once per optimizer step ourselves, whatever the number of processes,
        # so `--max-train-steps` and `--lr-warmup-steps` mean the same on 1 or N processes.
        step_scheduler_with_optimizer=False,
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown ours
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar per checkpoint
    resolve_device_defaults(args, accelerator.device)
    if accelerator.device.type == "cuda":  # both ways: cuDNN allows TF32 by default, and an earlier run may have
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32
    elif args.allow_tf32:
        logger.info("--allow-tf32 has no effect on %s", accelerator.device.type)
    set_seed(args.seed)
    return accelerator


def resolve_device_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill in the options whose default depends on the device (left None by the parser), in place, so the run
    record says what ran: on CUDA the loss reaches the host every 10 steps only (a step must not wait for the
    device) and fp32 work runs in TF32; on a CPU, where a loss on the host costs nothing to read, every step.
    The loader's are filled in by `resolve_loader_defaults`, which needs the data set."""
    cuda = device.type == "cuda"
    if getattr(args, "allow_tf32", None) is None:
        args.allow_tf32 = cuda
    if getattr(args, "logging_steps", None) is None:
        args.logging_steps = 10 if cuda else 1
    workers, prefetch = (
        getattr(args, "dataloader_num_workers", None),
        getattr(args, "dataloader_prefetch_factor", None),
    )
    if prefetch is not None and (workers == 0 or (workers is None and not cuda)):  # said now, before data is read
        raise ValueError(
            f"`--dataloader-prefetch-factor {prefetch}` needs workers, but `--dataloader-num-workers` is 0 here "
            "(the main process loads each batch when it needs it)"
        )


def resolve_loader_defaults(args: argparse.Namespace, device: torch.device, dataset: Dataset | None = None) -> None:
    """`--dataloader-num-workers` and `--dataloader-prefetch-factor` when not given, in place. On CUDA the step must
    never wait for data: workers that prefetch 4 batches into pinned memory, up to `MAX_AUTO_WORKERS` per process.
    For folder data as the cores allow (one each, a core left for the training process); for a streamed data set,
    whose workers decide the order of its samples, as many as its shards allow, whatever the machine, so a run
    resumed elsewhere reads what it would have read. On a CPU the same cores load and train: none."""
    cuda = device.type == "cuda"
    if args.dataloader_num_workers is None:
        if not cuda:
            workers = 0
        elif isinstance(dataset, IterableDataset):
            workers = min(MAX_AUTO_WORKERS, dataset.max_workers(PartialState().num_processes))
        else:
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by torchrun / accelerate launch
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            workers = min(MAX_AUTO_WORKERS, max(1, cores // local_processes - 1))
        args.dataloader_num_workers = workers
    if args.dataloader_num_workers == 0:
        args.dataloader_prefetch_factor = None  # a streamed data set with fewer shards than processes x 1
    elif args.dataloader_prefetch_factor is None:
        args.dataloader_prefetch_factor = 4 if cuda else 2


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so that the next `Accelerator` in this process starts afresh:
    for callers that run several trainings in one process (the demo, the benchmarks)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def compile_if_asked(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """`--torch-compile [MODE]`: compile the module's forward in place (`nn.Module.compile`), so its state dict, its
    `save_pretrained` and Accelerate's `unwrap_model` stay those of the plain module."""
    mode = getattr(args, "torch_compile", None)
    if mode:
        model.compile(mode=mode)
    return model


def attention_kernel(args: argparse.Namespace):
    """The context a training step runs in for `--sdpa-backend`: SDPA restricted to that kernel (it raises where the
    kernel cannot take a call, rather than falling back silently), or nothing."""
    backend = getattr(args, "sdpa_backend", None)
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend]))


def init_trackers(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Start `--report-to`'s trackers on the main process, with the run's arguments as its hyperparameters (the
    scalars and strings among them: tensorboard's hparams take nothing else)."""
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)}
        accelerator.init_trackers(args.tracker_project_name, config=config)


def make_optimizer(params, args: argparse.Namespace, accelerator: Accelerator) -> torch.optim.Optimizer:
    """AdamW; fused kernels on CUDA. Weight decay applies to matrices only (not to norms, biases, scales)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused AdamW: one kernel for all parameters instead of a few per tensor; CUDA only here (the CPU kernel
    # exists but was no faster on the small models these CPUs train).
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=accelerator.device.type == "cuda",
    )


def make_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=min(args.lr_warmup_steps, args.max_train_steps),
        num_training_steps=args.max_train_steps,
    )


@dataclass
class Prepared:
    """A model, its optimizer and learning-rate schedule, as Accelerate's `prepare` returned them."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any


def prepare_training(accelerator: Accelerator, args: argparse.Namespace, model: torch.nn.Module) -> Prepared:
    """The model's optimizer (its trainable parameters only) and learning-rate schedule, the model compiled when
    asked, all three prepared by Accelerate; and the trackers started."""
    optimizer = make_optimizer(model.parameters(), args, accelerator)
    lr_scheduler = make_lr_scheduler(optimizer, args)
    compile_if_asked(model, args)
    prepared = Prepared(*accelerator.prepare(model, optimizer, lr_scheduler))
    init_trackers(accelerator, args)
    return prepared


# ------------------------------------------------------------------------------------------------------- data


class ShardedEpochSampler(Sampler[list[int]]):
    """Batches of one process's share of a seeded per-epoch permutation, resumable mid-epoch.

    Epoch e shuffles all indices with a generator seeded by (seed + e) and cuts the permutation into global
    batches of `batch_size * num_processes`; process r takes the r-th slice of each. So every sample is seen once
    per epoch across processes, a run on N processes sees the same global batches as a run on one process with
    an N-times larger batch, and resuming needs only (epoch, batches done). The tail that does not fill a whole
    optimizer step is dropped.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        batches_multiple_of: int = 1,
    ):
        global_batch = batch_size * num_processes
        if num_samples < global_batch * batches_multiple_of:
            raise ValueError(
                f"the data set has {num_samples} samples, fewer than one optimizer step needs "
                f"({batch_size} per process x {num_processes} processes x {batches_multiple_of} accumulation steps)"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.num_batches = (num_samples // global_batch) // batches_multiple_of * batches_multiple_of
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        global_batch = self.batch_size * self.num_processes
        for b in range(self.start_batch, self.num_batches):
            start = b * global_batch + self.process_index * self.batch_size
            yield order[start : start + self.batch_size].tolist()


class IndexDataset(Dataset):
    """Item i is i: for stages whose training data is cached by data set index (the prior's embeddings, the
    captioner's image tokens), a step needs only the indices."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def collate_indices(indices: list[int]) -> dict:
    """`IndexDataset`'s batches: `{"index": (B,) int64, "skipped": []}`."""
    return {"index": torch.tensor(indices, dtype=torch.long), "skipped": []}


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def draw_rows(
    draw: Callable[[int], torch.Tensor], batch_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """This process's rows of random numbers drawn for the whole global batch, on `device` (default: where `draw`
    made them). `draw(n)` must return n rows from the stage's generator, on the generator's device (as diffusers'
    `randn_tensor` draws), which is seeded alike on every process (see `train`). On N processes each draws the
    N x `batch_size` rows of the global batch and keeps its slice, in the sampler's layout, so the noise of a
    sample is the same as in a 1-process run of the global batch, and the generators stay in step."""
    state = PartialState()
    if state.num_processes == 1:
        rows = draw(batch_size)
    else:
        start = state.process_index * batch_size
        rows = draw(batch_size * state.num_processes)[start : start + batch_size]
    return rows if device is None else to_device(rows, device)


class _SampleLog:
    """Appends each micro-batch's data set indices to `$CLIPCOND_SAMPLE_LOG/rank<k>.jsonl` (see the module doc)."""

    def __init__(self, process_index: int):
        folder = os.environ.get("CLIPCOND_SAMPLE_LOG")
        self.path = Path(folder) / f"rank{process_index}.jsonl" if folder else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, epoch: int, step: int, index: torch.Tensor | None) -> None:
        if self.path is None or index is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "index": index.tolist()}) + "\n")


# ------------------------------------------------------------------------------------------------ checkpoints


@dataclass
class TrainingState:
    """Counters that, with the model, optimizer, scheduler and RNG states, define where a run is."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per process)
    samples_seen: int = 0  # across all processes
    skipped_files: list[str] = field(default_factory=list)  # unreadable images met so far (unique)
    # what the run record reports, kept so that a run resumed at its last step reports them too
    last_loss: float | None = None  # the last step's loss before the checkpoint, averaged over processes
    validation: dict[str, Any] = field(default_factory=dict)  # the latest validation figures

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> TrainingState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a (nested) state dict into `tensors`, leaving JSON-able placeholders behind."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten_state(v, tensors) for v in obj]
    return obj


class Checkpoints:
    """Atomic, verified, resumable checkpoints in `OUTPUT_DIR/checkpoints/checkpoint-<step>/`.

    A checkpoint is written into a hidden scratch folder named for its writer and renamed into place only once
    complete, so a run killed while saving leaves the previous checkpoint intact. Model, optimizer, scheduler and
    global RNG states go through `accelerator.save_state` (safetensors weights; the rest loads with
    `weights_only=True`); the stage's extra state (its generator, the EMA) goes to safetensors + JSON here; `export`
    writes a `save_pretrained` copy of the model into `pretrained/`, so every checkpoint is also a usable model.
    `STATE_FILE`, written last, lists every other file with its size and SHA-256: `resolve("latest")` skips a
    checkpoint whose files no longer match (a disk error, a truncated copy) and resumes from the newest intact one.
    """

    def __init__(self, output_dir: str | os.PathLike, total_limit: int | None = None, writer: str = "0"):
        self.dir = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit
        self.writer = writer  # names this run's scratch folders: `.checkpoint-<step>.<writer>.tmp`

    def numbered(self) -> list[Path]:
        """The `checkpoint-<step>` folders, oldest first (a folder gets that name only once written whole)."""
        if not self.dir.is_dir():
            return []
        found = [
            p
            for p in self.dir.iterdir()
            if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        ]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))

    def complete(self) -> list[Path]:
        """Checkpoints whose state file exists (intact or not), oldest first."""
        return [p for p in self.numbered() if (p / STATE_FILE).is_file()]

    def resolve(self, spec: str | None) -> Path | None:
        """`latest` -> the newest intact checkpoint (None if there is none at all), saying which damaged ones it
        skipped; a path -> that checkpoint, which must be intact."""
        if spec is None:
            return None
        if spec == "latest":
            found = self.numbered()
            damaged = []
            for path in reversed(found):
                problem = damage(path)
                if problem is None:
                    return path
                logger.warning("skipping the damaged checkpoint %s: %s", path, problem)
                damaged.append(f"{path.name}: {problem}")
            if damaged:
                raise ValueError(
                    f"`--resume-from-checkpoint latest`: no intact checkpoint in {self.dir} ({'; '.join(damaged)}); "
                    "remove them to start from scratch"
                )
            return None
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"`--resume-from-checkpoint` {spec!r} does not exist")
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"`--resume-from-checkpoint` {spec!r} is not a complete checkpoint (no {STATE_FILE})")
        problem = damage(path)
        if problem is not None:
            raise ValueError(f"`--resume-from-checkpoint` {spec!r} is damaged: {problem}")
        return path

    def tidy(self) -> None:
        """Clear what a killed writer left: scratch folders, and a checkpoint moved aside while being replaced
        (restored). Only the holder of the run folder's lock may call this."""
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".old") and not (self.dir / p.name[1:-4]).exists():
                os.replace(p, self.dir / p.name[1:-4])
                logger.info("restored %s, moved aside by a run killed while replacing it", p.name[1:-4])
            elif p.name.startswith(f".{CHECKPOINT_PREFIX}") and p.name.endswith((".tmp", ".old")):
                writer = p.name[1 : -len(".tmp")].partition(".")[2]  # .checkpoint-N.HOST-PID.tmp -> HOST-PID
                if p.name.endswith(".tmp") and _writer_alive(writer):
                    continue  # another live run's scratch (only where the folder's lock is not enforced)
                shutil.rmtree(p, ignore_errors=True)
                logger.info("removed %s, left by a run killed while saving", p.name)

    def save(
        self,
        accelerator: Accelerator,
        state: TrainingState,
        extra: dict[str, Any],
        export: Callable[[Path], None] | None = None,
    ) -> Path:
        final = self.dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        tmp = self.dir / f".{final.name}.{self.writer}.tmp"
        needed = on_main(accelerator, lambda: self._make_scratch(tmp, final.name))
        with writing(final, needed=needed, scratch=[tmp] if accelerator.is_main_process else []):
            accelerator.save_state(str(tmp), safe_serialization=True)
            # Every process writes its RNG states into `tmp`: all must be done before the main process renames it.
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                tensors: dict[str, torch.Tensor] = {}
                extra_json = _flatten_state(extra, "extra", tensors)
                save_file(tensors, tmp / EXTRA_TENSORS_FILE)
                if export is not None:
                    export(tmp / "pretrained")
                payload = {
                    "state": state.to_dict(),
                    "extra": extra_json,
                    "num_processes": accelerator.num_processes,
                    "files": file_manifest(tmp),
                }
                with open(tmp / STATE_FILE, "w") as f:
                    f.write(dumps_json(payload, indent=2))
                    f.flush()
                    os.fsync(f.fileno())
        if accelerator.is_main_process:
            if final.exists():  # saving the same step again (e.g. after a resume): swap, then drop the old one
                old = self.dir / f".{final.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _make_scratch(self, tmp: Path, name: str) -> int | None:
        """Make the scratch folder `tmp` once there is room for a checkpoint about as large as the last one (refused
        before a part is written); returns that size (None before the first checkpoint)."""
        previous = self.complete()
        needed = folder_size(previous[-1]) if previous else None
        if needed is not None:
            check_free_space(self.dir, needed, name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return needed

    def load(
        self, accelerator: Accelerator, path: Path, check_extra: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[TrainingState, dict[str, Any]]:
        """The checkpoint's training state and extra state, after restoring model, optimizer, scheduler and RNGs
        through Accelerate; `check_extra(extra)` runs before that, so a checkpoint it refuses (trained on another
        encoder or VAE) fails with its message rather than with a mismatch of weight shapes."""
        with open(path / STATE_FILE) as f:
            payload = json.load(f)
        tensors = load_file(path / EXTRA_TENSORS_FILE) if (path / EXTRA_TENSORS_FILE).is_file() else {}
        extra = _unflatten_state(payload["extra"], tensors)
        if check_extra is not None:
            check_extra(extra)
        accelerator.load_state(str(path))
        return TrainingState.from_dict(payload["state"]), extra

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        found = self.complete()
        for old in found[: max(0, len(found) - self.total_limit)]:
            shutil.rmtree(old, ignore_errors=True)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE)


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `folder` but the state file."""
    manifest = {}
    for p in _files(folder):
        manifest[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return manifest


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in _files(folder))


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's files against the manifest its state file keeps, naming the file; None when
    they match (or when the checkpoint predates manifests and only its state file can be checked)."""
    if not (checkpoint / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    try:
        with open(checkpoint / STATE_FILE) as f:
            payload = json.load(f)
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} cannot be read ({err})"
    if not isinstance(payload, dict) or not {"state", "extra"} <= set(payload):
        return f"{STATE_FILE} holds no training state"
    manifest = payload.get("files")
    if manifest is None:
        return None
    for name, expected in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size} bytes, {expected['size']} when saved"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} has changed since it was saved (SHA-256 differs)"
    return None


# ---------------------------------------------------------------------------------------------------- the loop


class Stage:
    """What a training stage supplies to `train`. Override what applies; `loss` is required."""

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch and any scalars to log. Draw all randomness from `generator`."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called once per optimizer step, after the step (e.g. clamp the temperature, update the EMA)."""

    def validate(self, step: int) -> dict[str, float]:
        """Called on the main process every `--validation-steps` and at the end; returns scalars to log."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """State beyond model/optimizer/scheduler that a checkpoint must keep (tensors and JSON-able values)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def export(self, path: Path) -> None:
        """Write a usable model (`save_pretrained` layout) into `path`. Main process only."""


@dataclass
class TrainResult:
    state: TrainingState
    seconds: float
    last_loss: float
    validation: dict[str, float]
    resumed_from: str | None


def training_step(
    accelerator: Accelerator,
    stage: Stage,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    generator: torch.Generator,
    max_grad_norm: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-step of a prepared model: the stage's loss, backward, clipping and the optimizer step when
    gradients sync (Accelerate's `accumulate` skips the step on the other micro-steps). The benchmarks time this."""
    with accelerator.accumulate(model):
        loss, logs = stage.loss(batch, generator)
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, logs


def make_loader(
    accelerator: Accelerator, args: argparse.Namespace, dataset: Dataset, collate_fn: Callable
) -> tuple[DataLoader, ShardedEpochSampler | IterableDataset]:
    """This process's DataLoader of `dataset`, and what positions it (`epochs.set_epoch(epoch, start_batch)`).

    `dataset` is map-style (read through a `ShardedEpochSampler`) or a streamed
    `clipcond.data.webdataset.ShardedImageCaptionDataset`, which splits its shards across processes and workers,
    shuffles and resumes itself.
    """
    resolve_loader_defaults(args, accelerator.device, dataset)
    streamed = isinstance(dataset, IterableDataset)
    if streamed:
        dataset.configure(
            args.train_batch_size,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            num_workers=args.dataloader_num_workers,
            seed=args.seed,
            batches_multiple_of=args.gradient_accumulation_steps,
        )
        epochs = dataset
        batching = {"batch_size": args.train_batch_size}  # each worker yields whole batches of its own stream
    else:
        epochs = ShardedEpochSampler(
            len(dataset),
            args.train_batch_size,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            seed=args.seed,
            batches_multiple_of=args.gradient_accumulation_steps,
        )
        batching = {"batch_sampler": epochs}
    workers = args.dataloader_num_workers
    loader = DataLoader(
        dataset,
        **batching,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        prefetch_factor=args.dataloader_prefetch_factor if workers else None,
        # A map-style data set's epoch lives in the sampler, in this process: its workers serve every epoch. A
        # streamed one positions itself inside each worker, so those start afresh with the new epoch.
        persistent_workers=workers > 0 and not streamed,
    )
    return loader, epochs


def train(
    accelerator: Accelerator,
    args: argparse.Namespace,
    stage: Stage,
    prepared: Prepared,
    *,
    dataset: Dataset,
    collate_fn: Callable,
) -> TrainResult:
    """Run the optimisation loop of a prepared model. Returns when `args.max_train_steps` steps are done."""
    model, optimizer, lr_scheduler = prepared.model, prepared.optimizer, prepared.lr_scheduler
    loader, epochs = make_loader(accelerator, args, dataset, collate_fn)
    checkpoints = Checkpoints(args.output_dir, args.checkpoints_total_limit, writer=_writer(accelerator))
    # All the stage's randomness (noise, timesteps, caption dropout) comes from this generator, whose state the
    # checkpoint keeps; the DataLoader and sampler draw from their own seeded generators. It is seeded alike on
    # every process: stages draw for the global batch and keep their rows (`draw_rows`).
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000)
    sample_log = _SampleLog(accelerator.process_index)
    state, resume_path = _resume(accelerator, args, stage, checkpoints, generator)
    loop = _Loop(accelerator, args, stage, checkpoints, generator, state, num_samples=len(dataset))
    logger.info(
        "%d samples, %d steps per epoch; global batch %d (%d per process x %d processes x %d accumulation)",
        len(dataset),
        epochs.num_batches // args.gradient_accumulation_steps,
        loop.global_batch * args.gradient_accumulation_steps,
        args.train_batch_size,
        accelerator.num_processes,
        args.gradient_accumulation_steps,
    )
    try:
        model.train()
        while state.global_step < args.max_train_steps:
            epochs.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
            for batch in loader:
                loop.skipped.update(batch.pop("skipped", []))
                sample_log.write(state.epoch, state.global_step, batch.get("index"))
                if loop.micro_step(model, optimizer, lr_scheduler, batch):
                    break
            else:  # the epoch is over: every file was read
                loop.end_epoch()
                continue
            break
    finally:
        loop.progress.close()  # also when a step fails: the error is the last thing on the screen
    return loop.finish(resume_path)


def _resume(
    accelerator: Accelerator,
    args: argparse.Namespace,
    stage: Stage,
    checkpoints: Checkpoints,
    generator: torch.Generator,
) -> tuple[TrainingState, Path | None]:
    """Where the run starts: `--resume-from-checkpoint`'s state (model, optimizer, RNGs, the stage's generator and
    extra state restored) or a fresh one; and the checkpoint resumed from."""
    # one answer for every process: the main one tidies what a killed run left, then picks the checkpoint
    resume_path = on_main(accelerator, lambda: checkpoints.tidy() or checkpoints.resolve(args.resume_from_checkpoint))
    if resume_path is None:
        if args.resume_from_checkpoint == "latest":
            logger.info("no checkpoint in %s; starting from scratch", checkpoints.dir)
        return TrainingState(), None
    state, extra = checkpoints.load(
        accelerator, resume_path, check_extra=lambda extra: stage.load_extra_state(extra.get("stage", {}))
    )
    generator.set_state(extra["generator"].to(torch.uint8))
    logger.info("resumed from %s at step %d", resume_path, state.global_step)
    return state, resume_path


class _Loop:
    """The loop's bookkeeping between steps: counters, the log window, the progress bar, and what follows an optimizer
    step (log, validate, checkpoint), in that order on every process."""

    def __init__(
        self,
        accelerator: Accelerator,
        args: argparse.Namespace,
        stage: Stage,
        checkpoints: Checkpoints,
        generator: torch.Generator,
        state: TrainingState,
        num_samples: int,
    ):
        self.accelerator, self.args, self.stage = accelerator, args, stage
        self.checkpoints, self.generator, self.state = checkpoints, generator, state
        self.num_samples = num_samples
        self.global_batch = args.train_batch_size * accelerator.num_processes
        self.progress = tqdm(
            total=args.max_train_steps,
            initial=state.global_step,
            desc="steps",
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        self.skipped = set(state.skipped_files)
        self.window = _LogWindow()
        self.loss, self.validation = None, dict(state.validation)
        self.start_time = time.perf_counter()

    def micro_step(self, model, optimizer, lr_scheduler, batch: dict) -> bool:
        """Train on one micro-batch, and after an optimizer step do what follows it; True after the last step."""
        args, state = self.args, self.state
        with attention_kernel(args):
            self.loss, logs = training_step(
                self.accelerator, self.stage, model, optimizer, batch, self.generator, args.max_grad_norm
            )
        state.batch_in_epoch += 1
        self.window.add_samples(self.global_batch)
        if not self.accelerator.sync_gradients:
            return False

        lr_scheduler.step()
        self.stage.after_optimizer_step()
        state.global_step += 1
        state.samples_seen += self.global_batch * args.gradient_accumulation_steps
        self.window.add_step(self.loss, logs)
        self.progress.update(1)
        is_last = state.global_step >= args.max_train_steps
        if is_last or state.global_step % args.logging_steps == 0:
            self._log(lr_scheduler)
        # validation first, so that a checkpoint of this step keeps its figures
        if args.validation_steps and (state.global_step % args.validation_steps == 0 or is_last):
            self._validate(model)
        if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
            self._checkpoint()
        return is_last

    def _log(self, lr_scheduler) -> None:
        scalars = self.window.flush(self.accelerator)  # the step's one wait for the device
        scalars["train/lr"] = lr_scheduler.get_last_lr()[0]
        self.progress.set_postfix(
            loss=f"{scalars['train/loss']:.4f}",
            lr=f"{scalars['train/lr']:.2e}",
            samples_s=f"{scalars['train/samples_per_second']:.0f}",
        )
        self.accelerator.log(scalars, step=self.state.global_step)

    def _validate(self, model: torch.nn.Module) -> None:
        accelerator, step = self.accelerator, self.state.global_step
        if accelerator.is_main_process:
            self.validation = self.stage.validate(step)
            if self.validation:
                accelerator.log({f"val/{k}": v for k, v in self.validation.items()}, step=step)
                self.progress.write(f"step {step}: " + json.dumps(_round(self.validation)))
        accelerator.wait_for_everyone()
        model.train()

    def _checkpoint(self) -> None:
        accelerator, state = self.accelerator, self.state
        self._count_skipped()
        state.last_loss, state.validation = _mean_loss(accelerator, self.loss), _round(self.validation)
        extra = {"generator": self.generator.get_state(), "stage": self.stage.extra_state()}
        path = self.checkpoints.save(accelerator, state, extra, export=self.stage.export)
        logger.info("saved %s", path)

    def _count_skipped(self) -> None:
        _account_skipped(self.accelerator, self.state, self.skipped, self.num_samples, self.args.max_skipped_fraction)

    def end_epoch(self) -> None:
        self._count_skipped()
        self.state.epoch += 1
        self.state.batch_in_epoch = 0

    def finish(self, resume_path: Path | None) -> TrainResult:
        """The run's result, after the last step."""
        state = self.state
        # the last step's loss, averaged over processes (a run resumed at its last step reports its checkpoint's)
        last_loss = _mean_loss(self.accelerator, self.loss) if self.loss is not None else state.last_loss
        last_loss = float("nan") if last_loss is None else last_loss
        self._count_skipped()
        seconds = time.perf_counter() - self.start_time
        if state.skipped_files:
            logger.warning(
                "%d image files were skipped (unreadable, or outside the data folder): %s",
                len(state.skipped_files),
                state.skipped_files[:5],
            )
        return TrainResult(
            state=state,
            seconds=seconds,
            last_loss=last_loss,
            validation=self.validation,
            resumed_from=str(resume_path) if resume_path else None,
        )


def _mean_loss(accelerator: Accelerator, loss: torch.Tensor) -> float | None:
    """A step's loss averaged over the processes (a collective: every process calls it); None when not finite."""
    value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
    return value if math.isfinite(value) else None


def _writer(accelerator: Accelerator) -> str:
    """This run's name for its scratch folders (the main process's host and pid, the same on every process)."""
    token = [f"{socket.gethostname()}-{os.getpid()}"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token)
    return token[0]


def _writer_alive(writer: str) -> bool:
    """Whether the writer `HOST-PID` of a scratch folder is a live process of this host other than this one."""
    host, _, pid = writer.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class _LogWindow:
    """The losses and stage scalars of the steps since the last log, kept on the device until `flush`, so that a step
    never waits for the device to hand a number to the host (on CUDA a `.item()` per step stalls the launch queue,
    and an all-reduce per step adds a collective)."""

    def __init__(self):
        self._start()

    def _start(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.steps = 0
        self.logs: dict[str, Any] = {}
        self.samples = 0
        self.began = time.perf_counter()

    def add_samples(self, n: int) -> None:
        self.samples += n

    def add_step(self, loss: torch.Tensor, logs: dict[str, Any]) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps += 1
        self.logs = logs  # the stage's scalars (tensors or numbers) of the latest step

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        """The window's mean loss (over its steps and the processes), its samples/s and the latest stage scalars,
        as numbers; starts the next window."""
        mean = accelerator.reduce(self.loss_sum / self.steps, reduction="mean")
        elapsed = time.perf_counter() - self.began
        scalars = {
            "train/loss": mean.item(),
            "train/samples_per_second": self.samples / max(elapsed, 1e-9),
            **{k: float(v) for k, v in self.logs.items()},
        }
        self._start()
        return scalars


def _account_skipped(
    accelerator: Accelerator, state: TrainingState, skipped: set[str], num_samples: int, max_fraction: float
) -> None:
    """Bring the unreadable files every process met into `state`, and stop with an error when they are more than
    `max_fraction` of the data set: a few broken files are skipped, a broken data set is not trained on."""
    state.skipped_files = sorted(_gather_skipped(accelerator, skipped))
    count = len(state.skipped_files)
    if count > max_fraction * num_samples:
        raise ValueError(
            f"{count} of the {num_samples} training images could not be read ({count / num_samples:.1%}), more than "
            f"`--max-skipped-fraction {max_fraction:g}` allows (e.g. {state.skipped_files[:3]}); repair or remove them "
            "(those outside the data folder: see the warning, and --allow-outside-paths), or raise the limit"
        )


def _gather_skipped(accelerator: Accelerator, skipped: set[str]) -> set[str]:
    if accelerator.num_processes == 1:
        return set(skipped)
    from accelerate.utils import gather_object

    return set(gather_object(sorted(skipped)))


def _round(d: dict[str, Any]) -> dict[str, Any]:
    """Floats to 4 places, and the non-finite ones to None (they are not JSON)."""
    return {k: (round(v, 4) if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in d.items()}


def summary(result: TrainResult, **extra: Any) -> dict[str, Any]:
    """The end-of-run summary printed by the entry points and stored in the run record."""
    return {
        "steps": result.state.global_step,
        "epochs": result.state.epoch,
        "samples_seen": result.state.samples_seen,
        "seconds": round(result.seconds, 3),  # the loop's own time (set-up and export not counted)
        "final_loss": round(result.last_loss, 5) if math.isfinite(result.last_loss) else None,
        "skipped_files": len(result.state.skipped_files),
        "resumed_from": result.resumed_from,
        **_round(result.validation),
        **extra,
    }


def data_record(args: argparse.Namespace, num_samples: int, **facts: Any) -> dict[str, Any]:
    """The run record's `data` section: the data set (`--data`, `--split`) and its size, then the stage's facts."""
    return {"path": str(args.data), "split": args.split, "num_samples": num_samples, **facts}


def export_final(output_dir: Path, export: Callable[[Path], None]) -> None:
    """Write the run's final model into `output_dir` as a checkpoint is written: the run record, whose presence says
    the run finished, is removed first; the model is saved into a scratch folder and its files are then renamed into
    place. A run killed here leaves a folder without a record (which loaders refuse as unfinished, and resuming
    completes), never a model with a half-written file. The caller writes the record last."""
    (output_dir / RUN_RECORD).unlink(missing_ok=True)
    for stale in output_dir.glob(".export.*.tmp"):  # left by a run killed while exporting (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    scratch = output_dir / f".export.{os.getpid()}.tmp"
    with writing(output_dir, scratch=[scratch]):
        export(scratch)
    for item in sorted(scratch.iterdir()):
        target = output_dir / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    scratch.rmdir()


def finish_run(
    accelerator: Accelerator,
    args: argparse.Namespace,
    stage: Stage,
    result: TrainResult,
    kind: str,
    record: Callable[[], dict[str, Any]],
    **summary_extra: Any,
) -> None:
    """The end of a training entry point, after `train`: on the main process, export the stage's model into
    `--output-dir` (`export_final`), write the run record there last (`clipcond.runs.RunRecord`: `kind`, the
    arguments, the sections `record()` returns, the `summary` with `summary_extra`) and print the summary as one
    JSON line; then end the trackers on every process.

    `record` is called after the export, so its sections can hash the saved model.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        export_final(output_dir, stage.export)
        run_record = RunRecord(kind, vars(args), record(), summary(result, **summary_extra))
        run_record.write(output_dir)  # non-finite figures as null: a diverged run still finishes
        print(json.dumps(run_record.summary), file=sys.stdout)
    accelerator.end_training()
