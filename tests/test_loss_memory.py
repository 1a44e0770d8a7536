"""The contrastive loss's memory law on small sizes: b x B with `local_loss`, B^2 without.

Uses the measurement of benchmarks/loss_memory.py (a fake process group of W ranks, a tensor-bytes account on CPU).
"""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from loss_memory import PeakMemory, growth_exponent, loss_peak, simulated_world  # noqa: E402

CPU = torch.device("cpu")
LOCAL_BATCH, DIM = 8, 16
WORLD_SIZES = [1, 2, 4, 8, 16]


def test_peak_memory_counts_live_storages_once():
    a = torch.ones(10)
    with PeakMemory() as meter:
        b = a * 2  # 40 bytes
        view = b[:5]  # a view: no new storage
        c = torch.zeros(100)  # 400 bytes
        del c
        d = torch.zeros(50)  # 200 bytes, after c died
    assert meter.peak == 440 and meter.current == 240
    del b, view, d


def test_local_loss_grows_with_local_times_global_batch():
    local = [loss_peak(w, LOCAL_BATCH, DIM, local_loss=True, device=CPU) for w in WORLD_SIZES]
    full = [loss_peak(w, LOCAL_BATCH, DIM, local_loss=False, device=CPU) for w in WORLD_SIZES]
    assert local[0] == full[0]  # one process: the same (b, b) loss
    # doubling W doubles the increments of the b x B loss and quadruples those of the B x B loss
    assert growth_exponent(WORLD_SIZES, local) == pytest.approx(1.0, abs=0.2)
    assert growth_exponent(WORLD_SIZES, full) == pytest.approx(2.0, abs=0.2)
    # and against the count: two (b, B) fp32 logit matrices are 8 b B bytes; the backward holds a few more of that
    # size (softmax, gradients) plus the (B, d) gathered features
    b, B = LOCAL_BATCH, WORLD_SIZES[-1] * LOCAL_BATCH
    assert 8 * b * B <= local[-1] <= 8 * (8 * b * B + 4 * B * DIM)
    assert full[-1] > 8 * B * B > local[-1]


def test_simulated_world_is_seen_by_the_loss_and_torn_down():
    from clipcond.loss import resolve_rank_and_world_size

    with simulated_world(4):
        assert resolve_rank_and_world_size() == (0, 4)
    assert resolve_rank_and_world_size() == (0, 1)
    assert math.isfinite(loss_peak(1, 4, 8, local_loss=True, device=CPU))


def test_a_whole_step_sees_the_loss_share_grow_with_the_world():
    """The step's peak may sit in the towers' backward, after the loss's buffers are freed, so it need not move
    with W; the loss's own share of the step is what grows, and it is what the loss-only measurement gives."""
    from loss_memory import step_peak

    steps = {w: step_peak(w, LOCAL_BATCH, "test", checkpointing=False, device=CPU) for w in (1, 4)}
    assert steps[4]["loss_share"] > steps[1]["loss_share"] > 0
    assert steps[4]["peak"] >= steps[4]["loss_share"]
    projection_dim = 32  # the `test` preset's embedding width
    loss_only = loss_peak(4, LOCAL_BATCH, projection_dim, local_loss=True, device=CPU)
    assert steps[4]["loss_share"] == pytest.approx(loss_only, rel=0.5)
