"""The shared training machinery: sharded sampler, checkpoint atomicity and round trips."""

import argparse
import json
import os
import re

import pytest
import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from clipcond import storage
from clipcond.storage import DiskFullError
from clipcond.train import loop
from clipcond.train.loop import (
    MAX_AUTO_WORKERS,
    STATE_FILE,
    Checkpoints,
    Prepared,
    ShardedEpochSampler,
    Stage,
    TrainingState,
    _flatten_state,
    _unflatten_state,
    add_training_args,
    check_training_args,
    damage,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    resolve_device_defaults,
    resolve_loader_defaults,
    train,
)


def test_sampler_shards_cover_each_sample_once_per_epoch():
    n, batch, procs = 103, 4, 3
    shards = [ShardedEpochSampler(n, batch, num_processes=procs, process_index=r, seed=7) for r in range(procs)]
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen)) == (n // (batch * procs)) * batch * procs
    assert all(len(b) == batch for s in shards for b in s)


def test_sampler_global_batches_equal_single_process():
    """Process r's slice of each global batch, concatenated over r, is the 1-process batch of the global size."""
    two = [ShardedEpochSampler(64, 4, num_processes=2, process_index=r, seed=3) for r in range(2)]
    one = ShardedEpochSampler(64, 8, seed=3)
    for s in [*two, one]:
        s.set_epoch(2)
    merged = [a + b for a, b in zip(*[list(s) for s in two])]
    assert merged == list(one)


def test_sampler_epochs_differ_and_resume_mid_epoch():
    s = ShardedEpochSampler(50, 5, seed=0)
    s.set_epoch(0)
    epoch0 = list(s)
    s.set_epoch(1)
    assert list(s) != epoch0
    s.set_epoch(0, start_batch=4)
    assert list(s) == epoch0[4:]
    assert len(s) == len(epoch0) - 4


def test_sampler_drops_tail_to_whole_optimizer_steps():
    s = ShardedEpochSampler(100, 8, batches_multiple_of=3)  # 12 batches -> 12 (multiple of 3)
    assert len(s) == 12
    s = ShardedEpochSampler(100, 9, batches_multiple_of=4)  # 11 batches -> 8
    assert len(s) == 8


def test_sampler_rejects_data_smaller_than_a_step():
    with pytest.raises(ValueError, match="10 samples, fewer than one optimizer step"):
        ShardedEpochSampler(10, 8, num_processes=2)


def test_flatten_state_round_trip():
    state = {"a": torch.arange(3), "b": [torch.ones(2), 1.5, "x"], "c": {"d": torch.zeros(1), "e": None}}
    tensors = {}
    flat = _flatten_state(state, "s", tensors)
    json.dumps(flat)  # JSON-able
    back = _unflatten_state(json.loads(json.dumps(flat)), tensors)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"][0], state["b"][0])
    assert back["b"][1:] == [1.5, "x"] and back["c"]["e"] is None


def _tiny_setup(tmp_path):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _step(model, optimizer):
    model(torch.randn(4, 3)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpoint_round_trip_and_latest(tmp_path):
    accelerator, model, optimizer = _tiny_setup(tmp_path)
    ckpts = Checkpoints(tmp_path, total_limit=2)
    assert ckpts.resolve("latest") is None
    for step in (1, 2, 3):
        _step(model, optimizer)
        ckpts.save(
            accelerator, TrainingState(global_step=step, epoch=0, batch_in_epoch=step), {"g": torch.tensor([step])}
        )
    assert [p.name for p in ckpts.complete()] == ["checkpoint-2", "checkpoint-3"]  # total limit
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, optimizer)
    state, extra = ckpts.load(accelerator, ckpts.resolve("latest"))
    assert state.global_step == 3 and int(extra["g"]) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])


def test_killed_save_leaves_last_checkpoint(tmp_path):
    accelerator, model, optimizer = _tiny_setup(tmp_path)
    ckpts = Checkpoints(tmp_path)
    _step(model, optimizer)
    good = ckpts.save(accelerator, TrainingState(global_step=1), {})

    def crash(path):
        raise KeyboardInterrupt("killed while saving")

    _step(model, optimizer)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save(accelerator, TrainingState(global_step=2), {}, export=crash)
    assert ckpts.resolve("latest") == good
    assert (good / STATE_FILE).is_file()
    assert not (ckpts.dir / "checkpoint-2").exists()


def test_resolve_rejects_incomplete_path(tmp_path):
    ckpts = Checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpts.resolve(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpts.resolve(str(tmp_path / "half"))


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-train-steps", "0", "`--max-train-steps` must be >= 1, got 0"),
        ("--learning-rate", "-1", "`--learning-rate` must be > 0, got -1.0"),
        ("--validation-steps", "-2", "`--validation-steps` must be >= 0, got -2"),
        ("--logging-steps", "0", "`--logging-steps` must be >= 1, got 0"),
        ("--dataloader-prefetch-factor", "0", "`--dataloader-prefetch-factor` must be >= 1, got 0"),
    ],
)
def test_training_args_are_checked(flag, value, message):
    parser = add_training_args(argparse.ArgumentParser())
    args = parser.parse_args(["--output-dir", "x", flag, value])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_training_args(args)


def _training_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = add_training_args(argparse.ArgumentParser(), train_batch_size=8, lr_warmup_steps=0)
    argv = ["--output-dir", str(tmp_path), "--checkpointing-steps", "0", "--validation-steps", "0", *extra]
    args = parser.parse_args(argv)
    check_training_args(args)
    return args


def test_device_defaults_on_cuda_and_cpu(monkeypatch):
    """The defaults that depend on the device are filled in (and so recorded); what the user gave stays."""
    parser = add_training_args(argparse.ArgumentParser())
    cpu = parser.parse_args(["--output-dir", "x"])
    resolve_device_defaults(cpu, torch.device("cpu"))
    resolve_loader_defaults(cpu, torch.device("cpu"))
    assert (cpu.dataloader_num_workers, cpu.dataloader_prefetch_factor) == (0, None)
    assert (cpu.logging_steps, cpu.allow_tf32) == (1, False)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cuda = parser.parse_args(["--output-dir", "x"])
    resolve_device_defaults(cuda, torch.device("cuda"))
    resolve_loader_defaults(cuda, torch.device("cuda"))
    assert (cuda.dataloader_num_workers, cuda.dataloader_prefetch_factor) == (MAX_AUTO_WORKERS, 4)
    assert (cuda.logging_steps, cuda.allow_tf32) == (10, True)

    class Shards(torch.utils.data.IterableDataset):  # a streamed data set of 3 shards: 3 workers at most
        def __iter__(self):
            return iter(())

        def max_workers(self, num_processes):
            return 3 // num_processes

    streamed = parser.parse_args(["--output-dir", "x"])
    resolve_loader_defaults(streamed, torch.device("cuda"), Shards())
    assert streamed.dataloader_num_workers == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four GPU processes share the 16 cores
    shared = parser.parse_args(["--output-dir", "x"])
    resolve_loader_defaults(shared, torch.device("cuda"))
    assert shared.dataloader_num_workers == 3

    given = parser.parse_args(["--output-dir", "x", "--dataloader-num-workers", "0", "--logging-steps", "5"])
    resolve_device_defaults(given, torch.device("cuda"))
    resolve_loader_defaults(given, torch.device("cuda"))
    assert (given.dataloader_num_workers, given.logging_steps, given.dataloader_prefetch_factor) == (0, 5, None)
    bad = parser.parse_args(["--output-dir", "x", "--dataloader-prefetch-factor", "4"])
    with pytest.raises(ValueError, match="`--dataloader-prefetch-factor 4` needs workers"):
        resolve_device_defaults(bad, torch.device("cpu"))  # at start-up, before any data is read


class _Numbers(torch.utils.data.Dataset):
    """Sample i is the vector (i, i); each records the process that loaded it."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {"x": torch.full((2,), float(i)), "index": i, "pid": os.getpid()}


def _collate(samples):
    return {
        "x": torch.stack([s["x"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
        "pid": [s["pid"] for s in samples],
    }


class _LinearStage(Stage):
    def __init__(self, model):
        self.model = model
        self.losses, self.batches = [], []

    def loss(self, batch, generator):
        loss = self.model(batch["x"] / 32).pow(2).mean()
        self.losses.append(loss.detach().clone())  # kept on the device, as the loop keeps it
        self.batches.append(batch)
        return loss, {"train/weight": self.model.weight.detach().sum()}  # a tensor: the loop reads it when it logs


class _HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (`.item()`, `float()`, `int()`): each is a wait for the
    device on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _train_linear(args, sgd=False):
    accelerator = make_accelerator(args)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    # AdamW on a CPU reads its step counters on the host; SGD reads nothing, so only the loop's reads are counted
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1) if sgd else make_optimizer(model.parameters(), args, accelerator)
    )
    scheduler = make_lr_scheduler(optimizer, args)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    stage = _LinearStage(model)
    logged = []
    accelerator.log = lambda values, step: logged.append((step, values))
    prepared = Prepared(model, optimizer, scheduler)
    with _HostReads() as reads:
        result = train(accelerator, args, stage, prepared, dataset=_Numbers(), collate_fn=_collate)
    return result, stage, logged, reads.count


def test_the_loss_reaches_the_host_only_when_logged(tmp_path):
    """No step waits for the device but the logging ones: the loss is averaged over each window of
    `--logging-steps` steps and the processes in one reduction, and the stage's scalars stay tensors until then."""
    args = _training_args(tmp_path, "--max-train-steps", "7", "--logging-steps", "3")
    result, stage, logged, reads = _train_linear(args, sgd=True)
    assert [step for step, _ in logged] == [3, 6, 7]  # every 3 steps, and the last
    # per log the mean loss and the stage's scalar, the summary's final loss, and per epoch (4 steps of 8 of the 32
    # samples) the base seed that a new loader iterator draws from a CPU tensor: nothing per step
    assert reads == 3 * 2 + 1 + 2
    losses = [float(loss) for loss in stage.losses]
    for (_, values), window in zip(logged, [losses[0:3], losses[3:6], losses[6:7]], strict=True):
        assert values["train/loss"] == pytest.approx(sum(window) / len(window), rel=1e-6)
        assert isinstance(values["train/weight"], float) and values["train/samples_per_second"] > 0
    assert result.last_loss == pytest.approx(losses[-1], rel=1e-6)


def test_loader_workers_serve_every_epoch_in_the_same_order(tmp_path):
    """Workers are kept across epochs (the sampler's epoch lives in this process) and give the batches that the
    main process gives: 3 epochs of 4 batches through 2 workers started once."""
    steps = ["--max-train-steps", "12"]
    _, alone, _, _ = _train_linear(_training_args(tmp_path / "main", *steps))
    _, workers, _, _ = _train_linear(_training_args(tmp_path / "workers", *steps, "--dataloader-num-workers", "2"))
    assert [b["index"].tolist() for b in workers.batches] == [b["index"].tolist() for b in alone.batches]
    pids = {pid for b in workers.batches for pid in b["pid"]}
    assert len(pids) == 2 and os.getpid() not in pids


# ---------------------------------------------------------------------------------- damaged checkpoints, full disks


def _three_checkpoints(tmp_path):
    accelerator, model, optimizer = _tiny_setup(tmp_path)
    ckpts = Checkpoints(tmp_path)
    for step in (1, 2, 3):
        _step(model, optimizer)
        ckpts.save(accelerator, TrainingState(global_step=step), {"g": torch.tensor([step])})
    return accelerator, ckpts


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(os.urandom(path.stat().st_size))  # same size: only the hash can tell


DAMAGES = {
    "truncated weights": ("model.safetensors", _truncate, "model.safetensors is .* bytes, .* when saved"),
    "garbage optimizer": ("optimizer.bin", _garbage, "optimizer.bin has changed since it was saved"),
    "truncated extra state": ("extra_state.safetensors", _truncate, "extra_state.safetensors is .* bytes"),
    "lost RNG state": ("random_states_0.pkl", lambda p: p.unlink(), "random_states_0.pkl is missing"),
    "garbled state file": (STATE_FILE, lambda p: p.write_text('{"state": '), f"{STATE_FILE} cannot be read"),
}


@pytest.mark.parametrize("damage_kind", list(DAMAGES))
def test_latest_skips_a_damaged_checkpoint_and_an_explicit_one_names_the_file(tmp_path, damage_kind, caplog):
    accelerator, ckpts = _three_checkpoints(tmp_path)
    name, damage_fn, message = DAMAGES[damage_kind]
    newest = ckpts.dir / "checkpoint-3"
    damage_fn(newest / name)
    with caplog.at_level("WARNING"):
        found = ckpts.resolve("latest")
    assert found == ckpts.dir / "checkpoint-2"
    assert re.search(f"skipping the damaged checkpoint .*checkpoint-3: {message}", caplog.text)
    state, extra = ckpts.load(accelerator, found)
    assert state.global_step == 2 and int(extra["g"]) == 2
    with pytest.raises(ValueError, match=f"`--resume-from-checkpoint` .*checkpoint-3.* is damaged: {message}"):
        ckpts.resolve(str(newest))


def test_latest_with_every_checkpoint_damaged_is_an_error(tmp_path):
    _, ckpts = _three_checkpoints(tmp_path)
    for path in ckpts.complete():
        _truncate(path / "model.safetensors")
    with pytest.raises(ValueError, match="no intact checkpoint in .*checkpoint-3: model.safetensors is .*; remove"):
        ckpts.resolve("latest")


def test_tidy_restores_a_checkpoint_moved_aside_and_drops_scratch(tmp_path):
    _, ckpts = _three_checkpoints(tmp_path)
    os.replace(ckpts.dir / "checkpoint-3", ckpts.dir / ".checkpoint-3.old")  # killed between the two renames
    (ckpts.dir / ".checkpoint-4.host-123.tmp").mkdir()  # killed while writing
    ckpts.tidy()
    assert sorted(p.name for p in ckpts.dir.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert ckpts.resolve("latest") == ckpts.dir / "checkpoint-3"


def _full_disk_write(path, *args, **kwargs):
    """What torch's and safetensors' writers do on a full disk: part of a file, then an error without an errno."""
    with open(path, "wb") as f:
        f.write(b"\0" * 100)
    raise RuntimeError("basic_ios::clear: iostream error")


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    accelerator, ckpts = _three_checkpoints(tmp_path)
    monkeypatch.setattr(loop, "save_file", _full_disk_write)
    monkeypatch.setattr(loop, "check_free_space", lambda *args: None)  # not refused before writing: fails writing
    monkeypatch.setattr(storage, "free_bytes", lambda path: 0)
    with pytest.raises(
        DiskFullError, match=r"no space left on device while writing .*checkpoint-4 \(.* KB needed, 0.0 KB free\)"
    ):
        ckpts.save(accelerator, TrainingState(global_step=4), {})
    assert sorted(p.name for p in ckpts.dir.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert ckpts.resolve("latest") == ckpts.dir / "checkpoint-3"


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    accelerator, ckpts = _three_checkpoints(tmp_path)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskFullError, match=r"no space left on device for checkpoint-4 .* KB needed, 1.0 KB free"):
        ckpts.save(accelerator, TrainingState(global_step=4), {})
    assert sorted(p.name for p in ckpts.dir.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_real_full_disk_while_checkpointing(small_filesystem, monkeypatch):
    """The same on a real 2 MB file system (where the test can mount one): the library's own errors are translated."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(256, 256)  # 257 KB of weights, ~0.8 MB a checkpoint with AdamW's moments
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    _step_wide = lambda: (model(torch.randn(4, 256)).pow(2).mean().backward(), optimizer.step())  # noqa: E731
    _step_wide()
    ckpts = Checkpoints(small_filesystem)
    first = ckpts.save(accelerator, TrainingState(global_step=1), {})
    (small_filesystem / "filler").write_bytes(b"\0" * (storage.free_bytes(small_filesystem) - 300_000))
    _step_wide()
    with pytest.raises(DiskFullError, match=r"no space left on device for checkpoint-2 .* MB needed"):
        ckpts.save(accelerator, TrainingState(global_step=2), {})  # refused before writing
    monkeypatch.setattr(loop, "check_free_space", lambda *args: None)
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*checkpoint-2"):
        ckpts.save(accelerator, TrainingState(global_step=2), {})  # the write itself fails
    assert [p.name for p in ckpts.dir.iterdir()] == ["checkpoint-1"] and damage(first) is None


def test_latest_says_when_it_skips_a_checkpoint_without_its_state_file(tmp_path, caplog):
    _, ckpts = _three_checkpoints(tmp_path)
    (ckpts.dir / "checkpoint-3" / STATE_FILE).unlink()  # a whole checkpoint is renamed into place with it
    with caplog.at_level("WARNING"):
        assert ckpts.resolve("latest") == ckpts.dir / "checkpoint-2"
    assert f"checkpoint-3: {STATE_FILE} is missing" in caplog.text
