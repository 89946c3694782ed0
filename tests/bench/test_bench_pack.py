"""The pack benchmark (bench/pack.py): its jobs form one pack per pair, its small run measures
every (pair, K) and finds the packed results equal to the sequential ones, and the target and
the projection are read off the rows correctly.

No timing targets here (the full run's record lives in bench/results/): only that each row ran
and is sane.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from bench_scripts import load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("pack")


@pytest.mark.parametrize("mix", ["methods", "kd-sweep"])
def test_the_members_are_distinct_jobs_of_one_pack_per_pair(bench, mix) -> None:
    s = bench.resolve_settings(bench.parse_args(["--small", "--mix", mix]))
    for pair in bench.PAIRS:
        teacher, members = bench.plan(pair, s)
        assert teacher.stage == "teacher" and teacher.model == pair.teacher
        assert len({m.job_id for m in members}) == len(bench.MIXES[mix]) == 8
        assert {m.teacher_job for m in members} == {teacher.job_id}
        assert [m.method for m in members] == [m.method for m in bench.MIXES[mix]]
        assert len({bench.pack_key(m) for m in members}) == 1


def _row(bench, pair: str, k: int, sequential_s: float, packed_s: float):
    images = k * 640
    return bench.Row(pair=pair, k=k, members=[], images=images, sequential_s=sequential_s,
                     packed_s=packed_s, speedup=sequential_s / packed_s,
                     sequential_images_per_s=images / sequential_s,
                     packed_images_per_s=images / packed_s, equal=True, max_metric_diff=0.0)


def test_target_and_projection_are_read_off_the_rows(bench) -> None:
    rows = [_row(bench, "a->b", 1, 10.0, 10.0), _row(bench, "a->b", 8, 80.0, 32.0),
            _row(bench, "c->d", 1, 1.0, 1.0), _row(bench, "c->d", 8, 8.0, 6.0)]
    goal = bench.target(rows)
    assert goal == {"a->b": {"speedup": 2.5, "met": True},
                    "c->d": {"speedup": pytest.approx(8 / 6), "met": False}}
    timing = bench.PairTiming(pair="a->b", teacher_s=64.0, teacher_images_per_s=10.0,
                              teacher_forward_ms=1.0, teacher_forward_share=0.5)
    p = bench.projection(rows, timing)
    teacher_h = 240 * 50_000 / 10.0 / 3600
    student_images = 30 * 240 * 50_000
    assert p["teacher_h"] == pytest.approx(teacher_h)
    assert p["packed_k"] == 8
    assert p["packed_h"] == pytest.approx(teacher_h + student_images / (8 * 640 / 32.0) / 3600)
    assert p["sequential_h"] == pytest.approx(teacher_h + student_images / 64.0 / 3600)


def test_equal_results_are_told_from_different_ones(bench) -> None:
    result = {"metrics": {"top1": 50.0}, "history": [{"epoch": 0, "val/top1": 50.0}]}
    assert bench.compare({"j": result}, {"j": dict(result)}) == (True, 0.0)
    other = {"metrics": {"top1": 49.5}, "history": result["history"]}
    assert bench.compare({"j": result}, {"j": other}) == (False, 0.5)


@pytest.mark.slow
def test_small_run_measures_every_pair_and_k_and_finds_equal_results(bench, tmp_path: Path,
                                                                      capsys) -> None:
    out = tmp_path / "pack.json"
    assert bench.main(["--small", "--threads", "1", "--out", str(out),
                       "--work", str(tmp_path / "work")]) == 0
    record = json.loads(out.read_text())
    settings = record["settings"]
    assert settings["ks"] == [1, 2, 4, 8] and settings["threads"] == 1
    pairs = [p.name for p in bench.PAIRS]
    rows = record["rows"]
    assert [(r["pair"], r["k"]) for r in rows] == [(p, k) for p in pairs for k in (1, 2, 4, 8)]
    for r in rows:
        for column in ("sequential_s", "packed_s", "speedup", "sequential_images_per_s",
                       "packed_images_per_s"):
            assert r[column] > 0, (r, column)
        assert r["images"] == r["k"] * settings["epochs"] * settings["train_images"]
        assert r["equal"] is True and r["max_metric_diff"] == 0.0
        assert len(r["members"]) == r["k"]
    assert record["equal"] is True
    assert set(record["target"]) == set(pairs)
    assert [p["pair"] for p in record["projection"]] == pairs
    assert all(p["packed_h"] > p["teacher_h"] > 0 for p in record["projection"])
    assert all(t["teacher_forward_ms"] > 0 for t in record["pairs"])
    printed = capsys.readouterr().out
    assert "results of packed and sequential runs equal: yes" in printed
    assert f"target K = 8 >= 2x sequential, {pairs[0]}:" in printed
    assert printed.count("projected from this run's throughput") == len(pairs)
    assert out.with_suffix(".md").read_text().strip() in printed


def test_a_used_work_folder_is_refused(bench, tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    with pytest.raises(SystemExit, match="not empty"):
        bench.main(["--small", "--work", str(tmp_path), "--out", str(tmp_path / "x.json")])
