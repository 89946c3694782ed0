"""Smoke test of the training-step benchmark (bench/step.py): runs, and writes sane JSON.

No timing targets: only that every method ran and produced a finite, positive throughput.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

STEP_PY = Path(__file__).resolve().parents[2] / "bench" / "step.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kdflow_bench_step", STEP_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_small_run_writes_one_row_per_method_and_phase(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    bench = load_bench()
    assert bench.main(["--small", "--out", str(out)]) == 0

    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [r["method"] for r in rows] == bench.row_names(bench.DEFAULT_METHODS)
    assert [r["method"] for r in rows][-3:] == [
        "stablekd[decomposed]", "stablekd[partial]", "stablekd[end-to-end]"]
    for r in rows:
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0
        assert math.isfinite(r["final_loss"])
        assert r["peak_mem_mib"] > 0
    assert rows[0]["vs_student"] == 1.0
    assert rows[1]["method"] == "kd" and rows[1]["time_vs_kd"] == 1.0
    by_method = {r["method"]: r for r in rows}
    assert record["msdcrd_over_crd_step_time"] == (by_method["msdcrd"]["ms_per_step"]
                                                   / by_method["crd"]["ms_per_step"])
    settings = record["settings"]
    assert (settings["batch_size"], settings["warmup"], settings["steps"]) == (8, 1, 2)
    assert (settings["crd_negatives"], settings["num_samples"]) == (256, 2048)
    assert record["device"] and record["torch"] and record["date"]
