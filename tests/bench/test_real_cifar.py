"""The real-data check (bench/real_cifar.py) at CPU size: `kdflow run study=cifar10_he2016` on
the real CIFAR-10 images kdflow ships (the 12,000-image sample: 10,000 train, 2,000 test),
ResNet-20 teacher, ResNet-8 alone and with KD, 2 epochs on 20% of the training split at batch
32, one thread (~1.5 min). Checks the table and the JSON, and that every row learned: measured
24.1 / 26.8 / 23.4 % top-1 (teacher / alone / KD) on the 2,000 test images, where chance is
10 % (sd 0.7 points); the bar is 16 %.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "orchestrator" / "data" / "assets" / "cifar10_sample.tar.xz"
ABOVE_CHANCE = 16.0


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    import bench.real_cifar

    return bench.real_cifar


def test_cpu_run_writes_the_table_and_every_row_learns(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "real.json"
    code = bench.main(["--device", "cpu", "--cpus", "1", "--epochs", "2", "--train-fraction",
                       "0.2", "--batch-size", "32", "--teacher", "resnet20", "--student",
                       "resnet8", "--archive", str(SAMPLE), "--output-dir",
                       str(tmp_path / "kdflow"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        ("resnet20", "alone (the KD teacher)"), ("resnet8", "alone"),
        ("resnet8", "Hinton KD from resnet20 (T=4)")]
    for r in rows:
        assert r["status"] == "done" and r["epochs"] == 2, r
        assert r["top1"] > ABOVE_CHANCE, r
        assert r["wall_time_s"] > 0 and r["s_per_epoch"] > 0
        assert r["device"].startswith("cpu") and r["threads"] == 1
        assert r["recipe"].startswith("He et al. 2016 scaled x0.01: 2 of 164 ep, lr 0.1 /10 at "
                                      "[1, 2], batch 32")
    assert [r["paper_top1"] for r in rows] == [91.25, None, None]
    assert record["archive"]["full"] is False and record["kdflow_exit_code"] == 0
    assert record["settings"]["lr_milestones"] == [1, 2]
    assert record["command"].startswith("kdflow run study=cifar10_he2016 data.root=")
    assert "| model | method | recipe | epochs | top-1 (%) |" in printed
    assert "| resnet8 | Hinton KD from resnet20 (T=4) |" in printed
    assert f"wrote {out}" in printed


def test_the_schedule_scales_with_the_epochs(bench) -> None:
    assert bench.scaled_milestones(164) == [82, 123]
    assert bench.scaled_milestones(30) == [15, 23]
    assert bench.scaled_milestones(2) == [1, 2]
    assert bench.scaled_milestones(1) == [1, 2]


def test_the_gpu_command_runs_the_study_with_the_fast_path(bench, tmp_path: Path) -> None:
    args = bench.parse_args([])
    assert args.epochs == bench.DEFAULT_EPOCHS == 30
    cmd = bench.kdflow_command(args, "cuda", tmp_path / "data", tmp_path / "out")
    assert cmd[1:5] == ["-m", "kdflow.launch.cli", "run", "study=cifar10_he2016"]
    for recipe in ("teacher_recipe", "student_recipe"):
        for setting in ("epochs=30", "lr_milestones=[15,23]", "device=cuda", "compile=default",
                        "cuda_graphs=true"):
            assert f"study.{recipe}.{setting}" in cmd
    assert "study.pairs=[{teacher: resnet56, student: resnet20}]" in cmd
    assert not any("train_fraction" in c or "batch_size" in c for c in cmd)
    cpu = bench.kdflow_command(args, "cpu", tmp_path / "data", tmp_path / "out")
    assert not any("compile" in c for c in cpu)


def test_json_names_follow_the_other_bench_results(bench) -> None:
    gpu = bench.default_out("cuda", "NVIDIA H100 80GB HBM3", "2026-12-01")
    assert gpu.name == "real-cifar-nvidia-h100-80gb-hbm3-2026-12-01.json"
    assert bench.default_out("cpu", "cpu (x86_64)", "2026-12-01", "smoke").name == \
        "real-cifar-cpu-smoke-2026-12-01.cpu.json"


def test_unfinished_jobs_are_rows_too(bench, tmp_path: Path) -> None:
    job = tmp_path / "jobs" / "abc"
    job.mkdir(parents=True)
    (job / "spec.json").write_text(json.dumps({"job_id": "abc", "stage": "teacher",
                                               "method": "vanilla", "model": "resnet56"}))
    (job / "state.json").write_text(json.dumps({"status": "interrupted", "epoch": 7,
                                                "last_metric": 80.5}))
    rows = bench.collect_rows(tmp_path, "r", 30)
    assert [(r["model"], r["status"], r["epochs"], r["top1"], r["paper_top1"]) for r in rows] \
        == [("resnet56", "interrupted", 7, 80.5, 93.03)]
    assert "| 7/30 (interrupted) | 80.50 | 93.03 |" in bench.markdown_table(rows, "gpu")
