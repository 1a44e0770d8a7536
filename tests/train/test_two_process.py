"""The CLIP, decoder and captioner stages under `accelerate launch` on 2 CPU processes (gloo) against 1 process of the
same global batch.

On a CPU-only machine `accelerate launch --cpu --num_processes 2` starts one process unless an MPI hostfile is
configured, so the tests launch the way the README documents for CPUs: `ACCELERATE_USE_CPU=true accelerate launch
--multi_gpu --num_processes 2` (torchrun underneath, Accelerate's MULTI_CPU with the gloo backend).

What must hold: every training sample is seen exactly once per epoch across the two processes (read from the
`CLIPCOND_SAMPLE_LOG` that the loop writes when asked), the checkpoint is written once (one folder, one set of
weights, an RNG state per process), and the final weights equal those of a 1-process run with twice the per-process
batch. They are not bitwise equal: 2 processes sum the contrastive logits' and the parameter gradients' terms in
another order (each process reduces its half of the batch, then DDP's all-reduce adds the halves), which changes the
last bits of fp32 gradients; AdamW divides by sqrt(v), so for a gradient near zero such a rounding difference can
grow to a visible change of the update. Measured: 5e-7 at most after 6 CLIP steps, 1.2e-7 after 3 decoder steps
(EMA weights). The tolerance, 1e-5 absolute plus 1e-4 relative, stays well below what a real difference would
leave: a wrong shard, a loss without the gather, or noise drawn differently changes the gradients themselves, and
AdamW's updates are about the learning rate (5e-4-1e-3 here) per element and step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP_ARGS
from distributed_utils import find_free_port
from safetensors.torch import load_file

STEPS = 6  # CLIP: one epoch of the 96 training images at a global batch of 16
DECODER_STEPS = 3  # the decoder: half an epoch at a global batch of 16 (each step costs more)
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    """96 training images (6 steps of 16), the fewest the shapes writer allows beside its 18 test images."""
    from clipcond.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes_small")
    write_shapes_dataset(root, num_images=114, num_test_images=18, resolution=32, seed=0)
    return root


def _launch_two_processes(module: str, args: list[str], sample_log: Path, check: bool = True):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CLIPCOND_SAMPLE_LOG": str(sample_log), "OMP_NUM_THREADS": "1"}
    env["TMPDIR"] = str(sample_log.parent)  # torchrun's torchelastic_* folders land in the test's folder, not /tmp
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(find_free_port()),
        "-m",
        module,
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def _run_one_process(main, args: list[str], sample_log: Path, monkeypatch) -> None:
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("CLIPCOND_SAMPLE_LOG", str(sample_log))
    main(args)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _read_sample_log(folder: Path) -> dict[int, list[list[int]]]:
    """rank -> the index lists of its micro-batches, in order."""
    logs = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        logs[int(path.stem.removeprefix("rank"))] = [row["index"] for row in rows if row["epoch"] == 0]
    return logs


def _check_sharding(two: Path, one: Path, num_samples: int | None) -> None:
    """With `num_samples`, the runs covered one whole epoch: each sample must appear exactly once."""
    two_logs, one_logs = _read_sample_log(two), _read_sample_log(one)
    assert sorted(two_logs) == [0, 1] and sorted(one_logs) == [0]
    seen = [i for rank in (0, 1) for batch in two_logs[rank] for i in batch]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch, across the processes
    if num_samples is not None:
        assert sorted(seen) == list(range(num_samples))  # and every one of them
    # and the global batches are those of the 1-process run: rank r holds the r-th half of each
    for step, (batch0, batch1) in enumerate(zip(two_logs[0], two_logs[1], strict=True)):
        assert batch0 + batch1 == one_logs[0][step]


def _check_single_checkpoint(run: Path, steps: int, global_batch: int) -> None:
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"checkpoint-{steps}"]  # no temporary folder left by a second writer
    checkpoint = run / "checkpoints" / f"checkpoint-{steps}"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    payload = json.loads((checkpoint / "training_state.json").read_text())
    assert payload["num_processes"] == 2 and payload["state"]["global_step"] == steps
    assert payload["state"]["samples_seen"] == steps * global_batch


def _assert_same_weights(file_two: Path, file_one: Path) -> None:
    two, one = load_file(file_two), load_file(file_one)
    assert sorted(two) == sorted(one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


def _options(data: Path, out: Path, batch: int, steps: int = STEPS) -> list[str]:
    return [
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-train-steps",
        str(steps),
        "--train-batch-size",
        str(batch),
        "--lr-warmup-steps",
        "2",
        "--validation-steps",
        "0",
        "--checkpointing-steps",
        str(steps),
        "--seed",
        "0",
    ]


@pytest.mark.parametrize(
    "recipe",
    [
        [],
        [
            *("--hard-negatives", "swap-attributes,swap-relations"),
            *("--counterfactual-pairs", "swap-colours,swap-relations"),  # relation twins take grayscale draws too
            *("--random-crop-scale", "0.5", "--hflip-prob", "0.5"),  # each twin takes its original's crop draws
        ],
    ],
    ids=["plain", "hard_negatives_and_twins"],
)
def test_clip_on_two_processes_matches_one(small_shapes, tmp_path, monkeypatch, recipe):
    """With hard negatives and twins the two processes hold different numbers of each: the negatives are gathered
    like the captions, and each sample's pick comes from the shared generator (`draw_rows`), as in the 1-process
    run; the twins make the batches uneven, each pair weighing alike (`ClipLoss`'s `uneven`)."""
    from clipcond.train.clip import main

    model = [*TINY_CLIP_ARGS[:2], *recipe]  # --model test
    _launch_two_processes(
        "clipcond.train.clip", [*_options(small_shapes, tmp_path / "two", 8), *model], tmp_path / "log2"
    )
    _run_one_process(main, [*_options(small_shapes, tmp_path / "one", 16), *model], tmp_path / "log1", monkeypatch)

    _check_sharding(tmp_path / "log2", tmp_path / "log1", num_samples=96)
    _check_single_checkpoint(tmp_path / "two", STEPS, 16)
    _assert_same_weights(tmp_path / "two" / "model.safetensors", tmp_path / "one" / "model.safetensors")
    if "--counterfactual-pairs" in recipe:  # the twins made the processes' batches uneven on some step
        from clipcond.data.counterfactual import CounterfactualPairs
        from clipcond.data.folders import ImageCaptionDataset

        data = ImageCaptionDataset(small_shapes, split="train")
        kinds = ["swap-colours", "swap-relations"]
        pairs = CounterfactualPairs(kinds, data.records, data.info)
        logs = _read_sample_log(tmp_path / "log2")
        twins = [
            [
                sum(pairs.twin_caption(data.captions[i], data.records[i], k) is not None for i in batch for k in kinds)
                for batch in logs[rank]
            ]
            for rank in (0, 1)
        ]
        assert any(count0 != count1 for count0, count1 in zip(*twins, strict=True))
    record = json.loads((tmp_path / "two" / "clipcond_run.json").read_text())
    assert record["summary"]["steps"] == STEPS and record["summary"]["samples_seen"] == 96


def _check_stage_matches_one_process(module, main, data, extra, weights, tmp_path, monkeypatch) -> None:
    """`module` (a diffusion-style stage, DECODER_STEPS steps) on 2 processes of 8 against 1 process of 16: the same
    global batches, one checkpoint, and the same `weights` files (paths in the run folder)."""
    two, one = (
        _options(data, tmp_path / "two", 8, DECODER_STEPS),
        _options(data, tmp_path / "one", 16, DECODER_STEPS),
    )
    _launch_two_processes(module, [*two, *extra], tmp_path / "log2")
    _run_one_process(main, [*one, *extra], tmp_path / "log1", monkeypatch)

    _check_sharding(tmp_path / "log2", tmp_path / "log1", num_samples=None)
    _check_single_checkpoint(tmp_path / "two", DECODER_STEPS, 16)
    for path in weights:
        _assert_same_weights(tmp_path / "two" / path, tmp_path / "one" / path)


def test_decoder_on_two_processes_matches_one(small_shapes, tiny_clip_run, tmp_path, monkeypatch):
    from clipcond.train.decoder import main

    # caption dropout and EMA on: the dropout draws, the noise and the timesteps must follow the global batch;
    # 16 px images keep the UNet's steps short
    extra = ["--clip", str(tiny_clip_run), "--model", "test", "--caption-dropout", "0.25", "--resolution", "16"]
    weights = [Path("unet", "diffusion_pytorch_model.safetensors")]
    _check_stage_matches_one_process(
        "clipcond.train.decoder", main, small_shapes, extra, weights, tmp_path, monkeypatch
    )


def test_captioner_on_two_processes_matches_one(small_shapes, tiny_clip_run, tmp_path, monkeypatch):
    """Questions drawn for the global batch (`draw_rows`), the vision-token cache built once, and the loss weighted by
    each process's labelled tokens (`token_weighted`): the weights of one process of the whole batch."""
    from clipcond.train.captioner import main

    extra = ["--clip", str(tiny_clip_run), "--model", "test"]
    weights = [Path("lm", "model.safetensors"), Path("projector", "diffusion_pytorch_model.safetensors")]
    _check_stage_matches_one_process(
        "clipcond.train.captioner", main, small_shapes, extra, weights, tmp_path, monkeypatch
    )


def test_two_processes_into_a_held_folder_stop_together(small_shapes, tmp_path):
    """Only the main process takes the folder's lock; when it is refused, the other process stops too, at once,
    instead of waiting at its first collective for a main process that is gone."""
    from clipcond.runlock import run_folder_lock

    out = tmp_path / "held"
    with run_folder_lock(out):
        args = _options(small_shapes, out, 8, steps=2) + TINY_CLIP_ARGS
        done = _launch_two_processes("clipcond.train.clip", args, tmp_path / "log", check=False)
    assert done.returncode != 0
    assert done.stderr.count("is in use by another run") >= 2  # raised on both processes
