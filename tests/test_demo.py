"""`clipcond demo --quick`: every stage runs, the samples and the report are written, and a second run reuses
finished stages."""

import json

import pytest

from clipcond.data.shapes import class_names
from clipcond.demo import main

# The numpy-2 `__array__` copy DeprecationWarning of diffusers' DPM-Solver, which the samples are drawn with.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def test_quick_demo_writes_report_and_reuses_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output-dir", str(out), "--quick"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True
    stages = {"data", "clip", "clip_eval", "decoder", "samples", "generation_eval"}
    assert set(report["seconds"]) == stages and set(report["timings"]) == stages
    assert all(t["wall"] >= 0 and t["cpu"] >= 0 for t in report["timings"].values())
    assert 0.0 <= report["clip_eval"]["zero_shot_top1"] <= 1.0
    assert report["decoder"]["steps"] == 4 and report["decoder"]["model"] == "test"
    assert (out / "clip" / "eval" / "confusion_matrix.png").is_file()

    # samples: every colour-shape prompt (held-out ones included), as `clipcond generate` writes them
    prompts = [f"a {name}" for name in class_names(json.loads((out / "data" / "dataset_info.json").read_text()))]
    records = [json.loads(line) for line in (out / "samples" / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts  # one image per prompt in quick mode
    assert [r["seed"] for r in records] == list(range(len(prompts)))
    assert all((out / "samples" / r["file_name"]).is_file() for r in records)
    assert (out / "samples" / "grid.png").is_file()

    # the judged evaluation at guidance 1 and the default, seen and held-out apart
    generation = report["generation"]
    assert set(generation["guidance"]) == {"1.0", str(float(generation["guidance_scale"]))}
    for figures in generation["guidance"].values():
        for key in ("colour_accuracy_seen", "shape_accuracy_heldout", "both_accuracy_seen", "clip_score", "fd_clip"):
            assert figures[key] is not None
    md = (out / "report.md").read_text()
    assert md.startswith("# clipcond demo report")
    assert "![samples](samples/grid.png)" in md and "held-out" in md
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-2])["report"] == str(out / "report.md")
    assert str(out / "report.md") in printed[-1]

    stamps = {p: (out / p).stat().st_mtime_ns for p in ("clip/model.safetensors", "decoder/model_index.json")}
    stamps["samples/grid.png"] = (out / "samples" / "grid.png").stat().st_mtime_ns
    assert main(["--output-dir", str(out), "--quick"]) == 0  # finished stages are skipped, not redone
    assert {p: (out / p).stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "report.json").read_text())
    assert all(t["reused"] for t in again["timings"].values())  # ... and keep the times they took when they ran
    assert again["seconds"] == report["seconds"]
