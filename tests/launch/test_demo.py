"""The demo study as `make demo` runs it: real CIFAR-10 photographs, about 10 minutes on 2 cores."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys


def test_demo_study_end_to_end(tmp_path):
    run = [sys.executable, "-m", "kdflow.launch.cli", "run", f"output_dir={tmp_path}", "progress=false"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    # 1 teacher; per seed: the student alone and 4 methods (3 seeds x 5 = 15)
    assert "16 run, 0 skipped, 0 failed" in first.stdout.replace(" (already done)", "")
    results = [json.loads(p.read_text()) for p in (tmp_path / "jobs").glob("*/result.json")]
    assert len(results) == 16
    assert {r["dataset"] for r in results} == {"cifar10_jpeg"}
    teacher = [r for r in results if r["stage"] == "teacher"]
    assert len(teacher) == 1 and teacher[0]["metrics"]["top1"] >= 60.0
    top1 = {}
    for r in results:
        if r["stage"] != "teacher":
            top1.setdefault(r["method"], []).append(r["metrics"]["top1"])
    assert set(top1) == {"vanilla", "kd", "fitnet", "crd", "spectral_reg"}
    assert all(len(v) == 3 for v in top1.values())
    # what the demo is for: on real images, KD's mean beats the student alone's by more than
    # the two rows' seed spreads together (measured: 5.7 points apart, spreads 0.4 and 1.6)
    alone, kd = top1["vanilla"], top1["kd"]
    spread = statistics.stdev(alone) + statistics.stdev(kd)
    assert statistics.mean(kd) - statistics.mean(alone) > spread, (alone, kd)
    for row in ("| Teacher |", "| Student (alone) |", "| KD |", "| FitNet |", "| CRD |",
                "| Spectral reg. |"):
        assert row in first.stdout

    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert "0 run, 16 skipped" in again.stdout
