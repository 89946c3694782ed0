"""The training-step benchmark (bench/step.py) at small size on the CPU: every case, method,
implementation and column is produced, and the targets are read off the rows correctly.

No timing targets here (they live in bench/results/): only that each row ran and is sane.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest

from bench_scripts import load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("step")


def test_small_run_measures_every_case_method_and_implementation(bench, tmp_path: Path,
                                                                 capsys) -> None:
    out = tmp_path / "s.json"
    assert bench.main(["--small", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    expected = [(case, name, impl) for case in bench.CASES
                for name in bench.row_names(bench.METHODS, bench.CASES[case])
                for impl in bench.CPU_IMPLS if bench.applies(impl, name)]
    assert [(r["case"], r["method"], r["impl"]) for r in rows] == expected
    assert [r["method"] for r in rows if r["impl"] == "torchdistill"] == ["kd"] * 3
    assert {r["method"] for r in rows} >= {"stablekd[decomposed]", "stablekd[partial]",
                                           "stablekd[end-to-end]", "hsakd", "msdcrd", "crd"}
    for r in rows:
        for column in ("images_per_s", "ms_per_step", "gflop_per_image", "tflops",
                       "peak_fraction", "peak_mem_mib"):
            assert math.isfinite(r[column]) and r[column] > 0, (r, column)
        assert math.isfinite(r["final_loss"])
        assert r["vs_plain"] == pytest.approx(
            r["images_per_s"] / next(p["images_per_s"] for p in rows if p["impl"] == "plain"
                                     and (p["case"], p["method"]) == (r["case"], r["method"])))
        assert (r["projected_min"] is not None) == r["case"].startswith("cifar")
    by = {(r["case"], r["method"], r["impl"]): r for r in rows}
    kd, vanilla = by[("cifar-b64", "kd", "kdflow")], by[("cifar-b64", "vanilla", "kdflow")]
    assert kd["gflop_per_image"] > 2 * vanilla["gflop_per_image"]  # the teacher's forward
    assert by[("imagenet-b256", "kd", "plain")]["gflop_per_image"] > 5 * kd["gflop_per_image"]
    assert kd["projected_min"] == pytest.approx(240 * 256 / 8 * kd["ms_per_step"] / 60e3)
    targets = record["targets"]
    assert targets["cifar_b64_kd_vs_plain"] == pytest.approx(kd["vs_plain"])
    assert set(targets["vs_torchdistill"]) == {"cifar-b64/kd/kdflow", "cifar-b256/kd/kdflow",
                                               "imagenet-b256/kd/kdflow"}
    assert record["peak_flops"] > 0 and record["kdflow_fast_path"]["bf16"] is False
    assert (record["settings"]["warmup"], record["settings"]["steps"]) == (1, 2)
    printed = capsys.readouterr().out
    assert "| cifar-b64 | kd | torchdistill |" in printed
    assert "projected 240-epoch cifar-b64 KD run" in printed


def test_compiled_and_fp32_kdflow_steps_run(bench, tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    assert bench.main(["--small", "--cases", "cifar-b64", "--methods", "kd",
                       "--impls", "kdflow+compile,kdflow-fp32,kdflow", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["kdflow+compile", "kdflow-fp32", "kdflow"]
    assert all(r["vs_plain"] is None and math.isfinite(r["final_loss"]) for r in rows)


def _row(bench, case, method, impl, images_per_s, projected=None):
    return bench.Row(case=case, method=method, impl=impl, batch_size=64,
                     images_per_s=images_per_s, ms_per_step=1.0, vs_plain=None,
                     gflop_per_image=1.0, tflops=1.0, peak_fraction=0.1, peak_mem_mib=1.0,
                     projected_min=projected, final_loss=0.0)


def test_targets_are_read_off_the_rows(bench) -> None:
    rows = [_row(bench, "cifar-b64", "kd", "kdflow", 900.0, projected=12.0),
            _row(bench, "cifar-b64", "kd", "plain", 300.0),
            _row(bench, "cifar-b64", "kd", "torchdistill", 400.0),
            _row(bench, "imagenet-b256", "kd", "kdflow", 100.0),
            _row(bench, "imagenet-b256", "kd", "torchdistill", 120.0)]
    t = bench.targets(rows)
    assert t["cifar_b64_kd_vs_plain"] == 3.0
    assert t["cifar_b64_kd_240_epochs_min"] == 12.0
    assert t["ahead_of_torchdistill"] is False
    assert t["vs_torchdistill"] == {"cifar-b64/kd/kdflow": 2.25,
                                    "imagenet-b256/kd/kdflow": pytest.approx(100 / 120)}
    assert "no (" in bench.targets_text(t)


def test_a_full_size_cpu_run_measures_the_cifar_batch_64_case_only(bench) -> None:
    full = bench.resolve_settings(bench.parse_args(["--device", "cpu"]))
    assert [c.name for c in full.cases] == ["cifar-b64"] and full.cases[0].batch_size == 64
    assert full.impls == list(bench.CPU_IMPLS) and full.crd_negatives is None
    small = bench.resolve_settings(bench.parse_args(["--device", "cpu", "--small"]))
    assert [c.name for c in small.cases] == list(bench.CASES)


def test_unknown_names_are_refused_before_anything_runs(bench) -> None:
    with pytest.raises(SystemExit, match="--methods: unknown \\['fitnett'\\]"):
        bench.main(["--small", "--methods", "fitnett"])
