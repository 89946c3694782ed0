"""The demo study as `make demo` runs it (about 8 minutes on 2 cores)."""
from __future__ import annotations

import json
import subprocess
import sys


def test_demo_study_end_to_end(tmp_path):
    run = [sys.executable, "-m", "launch.cli", "run", f"output_dir={tmp_path}", "progress=false"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    # 1 teacher + its HSAKD heads; per student and seed: the student alone, 8 methods and
    # the standard-projector ablation (2 students x 2 seeds x 10 = 40)
    assert "42 run, 0 skipped, 0 failed" in first.stdout.replace(" (already done)", "")
    results = [json.loads(p.read_text()) for p in (tmp_path / "jobs").glob("*/result.json")]
    assert len(results) == 42
    teacher = [r for r in results if r["stage"] == "teacher" and r["method"] == "vanilla"]
    assert len(teacher) == 1 and teacher[0]["metrics"]["top1"] >= 95.0
    assert {r["method"] for r in results if r["stage"] != "teacher"} == {
        "vanilla", "kd", "fitnet", "crd", "msdcrd", "hsakd", "inverted_projection", "spectral_reg",
        "stablekd"}
    for row in ("| Teacher |", "| Student (alone) |", "| KD |", "| FitNet |", "| CRD |",
                "| MSDCRD |", "| HSAKD |", "| Projection KD (direction=inverted) |",
                "| Projection KD (direction=standard) |", "| Spectral reg. |", "| StableKD |"):
        assert row in first.stdout

    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert "0 run, 42 skipped" in again.stdout
