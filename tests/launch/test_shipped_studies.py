"""Every study shipped in configs/study/ composes, validates and plans (``--dry-run``) without
its datasets' files; the segmentation studies plan the jobs their comments promise."""
from __future__ import annotations

from pathlib import Path

import pytest

from kdflow.launch.cli import main

STUDIES = sorted(p.stem for p in (Path(__file__).parents[2] / "configs" / "study").glob("*.yaml"))


@pytest.mark.parametrize("study", STUDIES)
@pytest.mark.slow
def test_shipped_study_plans(study: str, tmp_path: Path, capsys) -> None:
    code = main(["run", f"study={study}", f"output_dir={tmp_path}", f"data.root={tmp_path}/data",
                 "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith(f"plan for study {study}: ") and "dry run: nothing was started." in out
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


@pytest.mark.parametrize("study, plan", [
    # 3 teachers (plain, LAD's label-assisted, the cross-task classifier); 2 seeds x (student
    # alone, pixel KD, LAD, inverted projection, its standard-projector ablation)
    ("segmentation_demo", "13 jobs (3 teacher, 8 distill, 2 ablation)"),
    # 2 pairs x (plain + LAD teacher); student alone (shared by both pairs) + 2 x (CWD, LAD)
    ("cityscapes_lad", "9 jobs (4 teacher, 5 distill)"),
])
@pytest.mark.slow
def test_segmentation_studies_plan_their_jobs(study: str, plan: str, tmp_path: Path,
                                              capsys) -> None:
    assert main(["run", f"study={study}", f"output_dir={tmp_path}", "--dry-run"]) == 0
    assert f"plan for study {study}: {plan}" in capsys.readouterr().out


@pytest.mark.parametrize("study, plan, fractions", [
    # 4 pairs x (student alone, KD, StableKD) x 3 seeds x 2 fractions
    ("stablekd_paper", "76 jobs (4 teacher, 72 distill)", ("100%", "40%")),
    # ResNet34 -> ResNet18 x (student alone, KD, StableKD) x 3 seeds x 2 fractions
    ("stablekd_imagewoof", "19 jobs (1 teacher, 18 distill)", ("100%", "40%")),
])
def test_stablekd_studies_plan_both_data_fractions(study: str, plan: str, fractions: tuple,
                                                   tmp_path: Path, capsys) -> None:
    assert main(["run", f"study={study}", f"output_dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"plan for study {study}: {plan}" in out
    for fraction in fractions:
        assert sum("stablekd " in line and f" {fraction} s" in line
                   for line in out.splitlines()) == (12 if study == "stablekd_paper" else 3)


def _planned_ids(study: str, tmp_path: Path, capsys) -> set:
    assert main(["run", f"study={study}", f"output_dir={tmp_path}", "--dry-run"]) == 0
    rows = capsys.readouterr().out.splitlines()[3:]
    return {row.split()[0] for row in rows if row[:16].isalnum() and len(row.split()[0]) == 16}


def test_the_demo_is_a_subset_of_cifar10_quick(tmp_path: Path, capsys) -> None:
    """`kdflow run study=cifar10_quick` after `make demo` reuses the demo's teacher and
    students: the same data, recipes and settings give the same job ids."""
    demo = _planned_ids("demo", tmp_path, capsys)
    quick = _planned_ids("cifar10_quick", tmp_path, capsys)
    assert len(demo) == 16 and demo < quick


def test_the_help_describes_the_demo_that_runs():
    """`kdflow --help`'s line for the bare `kdflow run` names the demo's dataset and every
    method it composes, so the help cannot go on describing a demo that was replaced."""
    from kdflow.launch.cli import USAGE_EXAMPLES
    from kdflow.launch.compose import compose_config

    study = compose_config([]).study
    line = USAGE_EXAMPLES[USAGE_EXAMPLES.index("kdflow run  "):USAGE_EXAMPLES.index("kdflow run study=")]
    for name in (*study.datasets, *study.methods):
        assert name in line, (name, line)
