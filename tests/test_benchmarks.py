"""The speed benchmarks run and compare like with like: both contenders on one device, with the same parameters,
each attention setting reported. Seconds-long smoke runs on the `test` presets; no figure is checked."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # open_clip / torch.compile notices


def test_clip_throughput_puts_both_on_one_device(capsys):
    import clip_throughput

    argv = ["--presets", "test", "--precision", "bf16", "--batch-size", "8", "--steps", "1", "--warmup", "0"]
    assert clip_throughput.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["cases"]) == {"test_bf16_default", "test_bf16_sdpa"}
    for name, case in report["cases"].items():
        assert case["device"] == "cpu" and case["preset"] == "test" and case["precision"] == "bf16"
        assert case["params_M"]["clipcond"] == case["params_M"]["open_clip"]
        assert case["attention"]["clipcond"] == name.rsplit("_", 1)[1] and case["rounds"] == 1
        assert case["clipcond_samples_per_s"] > 0 and case["open_clip_samples_per_s"] > 0


def test_decoder_throughput_builds_the_cache_on_the_training_device(capsys):
    import decoder_throughput

    argv = ["--presets", "test", "--precision", "fp32", "--batch-size", "2", "--steps", "1", "--warmup", "0"]
    assert decoder_throughput.main([*argv, "--resolution", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["cases"]) == {"test_fp32_default", "test_fp32_same"}
    for case in report["cases"].values():
        assert case["device"] == "cpu" and case["resolution"] == 16
        assert case["params_M"]["clipcond"] == case["params_M"]["plain"]
