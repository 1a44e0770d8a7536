"""The shared training machinery: sharded sampler, checkpoint atomicity and round trips."""

import argparse
import json

import pytest
import torch
from accelerate import Accelerator

from clipcond.train.loop import (
    STATE_FILE,
    Checkpoints,
    ShardedEpochSampler,
    TrainingState,
    _flatten_state,
    _unflatten_state,
    add_training_args,
    check_training_args,
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
    ],
)
def test_training_args_are_checked(flag, value, message):
    parser = add_training_args(argparse.ArgumentParser())
    args = parser.parse_args(["--output-dir", "x", flag, value])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_training_args(args)
