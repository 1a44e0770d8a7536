"""`clipcond demo --quick`: every stage runs, the report is written, and a second run reuses finished stages."""

import json

from clipcond.demo import main


def test_quick_demo_writes_report_and_reuses_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output-dir", str(out), "--quick"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True
    assert set(report["seconds"]) >= {"data", "clip", "clip_eval"}
    assert 0.0 <= report["clip_eval"]["zero_shot_top1"] <= 1.0
    assert (out / "report.md").read_text().startswith("# clipcond demo report")
    assert (out / "clip" / "eval" / "confusion_matrix.png").is_file()
    weights = (out / "clip" / "model.safetensors").stat().st_mtime_ns

    assert main(["--output-dir", str(out), "--quick"]) == 0  # finished stages are skipped, not redone
    assert (out / "clip" / "model.safetensors").stat().st_mtime_ns == weights
