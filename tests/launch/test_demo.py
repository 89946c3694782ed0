"""The demo study as `make demo` runs it (about 3.5 minutes on 2 cores)."""
from __future__ import annotations

import json
import subprocess
import sys


def test_demo_study_end_to_end(tmp_path):
    run = [sys.executable, "-m", "launch.cli", "run", f"output_dir={tmp_path}", "progress=false"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "17 run, 0 skipped, 0 failed" in first.stdout.replace(" (already done)", "")
    results = [json.loads(p.read_text()) for p in (tmp_path / "jobs").glob("*/result.json")]
    assert len(results) == 17
    (teacher,) = [r for r in results if r["stage"] == "teacher"]
    assert teacher["metrics"]["top1"] >= 95.0
    assert {r["method"] for r in results if r["stage"] == "distill"} == {"vanilla", "kd", "fitnet", "crd"}
    for row in ("| Teacher |", "| Student (alone) |", "| KD |", "| FitNet |", "| CRD |"):
        assert row in first.stdout

    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert "0 run, 17 skipped" in again.stdout
