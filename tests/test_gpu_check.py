"""benchmarks/gpu_check.py runs every part on a CPU at tiny sizes (`--smoke`), writes one JSON with the commit,
and exits 1 when a part fails while keeping the others' figures: the script a GPU lease runs once must not
meet its first bug there."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_every_part_runs_small(tmp_path):
    import gpu_check

    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--output", str(out), "--workdir", str(tmp_path / "w")]) == 0
    report = json.loads(out.read_text())
    assert report["failed_parts"] == [] and len(report["commit"]) == 40
    assert list(report["parts"]) == list(gpu_check.PARTS)
    parts = report["parts"]
    assert not any("error" in part or "skipped" in part for part in parts.values())
    assert parts["tiny_clip"]["args"]["dataloader_num_workers"] == 0  # the CLI's CPU default
    assert parts["demo"]["plain"]["returncode"] == 0 and parts["demo"]["dalle2"]["returncode"] == 0
    assert "dalle2_table" in parts["demo"]["dalle2"] and parts["demo"]["plain"]["recipe"] == "quick"
    assert {"base_clip", "clip_vs_open_clip", "decoder_vs_plain", "tiny_decoder"} <= set(parts)
    assert "unavailable" in parts["options"]["clip_bf16_cudnn"]  # no cuDNN attention on a CPU: said, not failed
    assert parts["options"]["unet_bf16_sdpa"]["samples_per_s"] > 0


def test_a_failing_part_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    import gpu_check

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "tiny_clip", (broken, 0))
    out = tmp_path / "check.json"
    argv = ["--smoke", "--device", "cpu", "--output", str(out), "--parts", "tiny_clip", "decoder_vs_plain"]
    assert gpu_check.main(argv) == 1
    report = json.loads(out.read_text())
    assert report["failed_parts"] == ["tiny_clip"] and "RuntimeError: boom" in report["parts"]["tiny_clip"]["error"]
    assert "error" not in report["parts"]["decoder_vs_plain"]


def test_no_gpu_is_an_error_not_a_crash(capsys):
    import gpu_check
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_check.main(["--output", "unused.json"]) == 1
    assert "no CUDA device" in capsys.readouterr().out
