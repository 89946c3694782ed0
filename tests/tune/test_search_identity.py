"""A search is what it tunes (issue 20, item 5): a changed search, or the same with another
number of trials (which Tune cannot restore), is a new search under a name of its own instead
of resuming the old one; the best trial's overrides reproduce its job. No Ray is started."""
from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from kdflow.launch.cli import Session
from kdflow.launch.search_space import apply_settings
from kdflow.launch.tune import (SEARCH_RECORD, SearchPlan, TrialRow, best_overrides, plan_search,
                                reproduces, tune_overrides)

FOUR_EPOCHS = ["study.student_recipe.epochs=4", "study.student_recipe.lr_milestones=[3]"]


def _plan(out: Path, *overrides: str) -> SearchPlan:
    args = tune_overrides(["search=kd", "study=quick", f"output_dir={out}", *overrides])
    session = Session.compose(args, require_data=False)
    session.overrides = args
    return plan_search(session)


def _start(plan: SearchPlan) -> None:
    """What run_search records before any trial starts."""
    plan.record.write(plan.search_dir)


def test_the_same_command_finds_its_search_again(tmp_path: Path) -> None:
    first = _plan(tmp_path, *FOUR_EPOCHS)
    assert (first.name, first.renamed) == ("kd", None)
    _start(first)
    again = _plan(tmp_path, *FOUR_EPOCHS, "search.max_concurrent=1")  # how, not what
    assert (again.name, again.renamed, again.search_dir) == ("kd", None, first.search_dir)


def test_a_different_job_is_a_new_search_that_names_what_changed(tmp_path: Path) -> None:
    _start(_plan(tmp_path, *FOUR_EPOCHS))
    two_epochs = _plan(tmp_path)
    assert two_epochs.name.startswith("kd-") and two_epochs.name != "kd"
    assert "job.recipe.epochs 4 -> 2" in two_epochs.renamed
    assert two_epochs.search_dir != tmp_path / "tune" / "quick" / "kd"
    assert two_epochs.tune_path != _plan(tmp_path, *FOUR_EPOCHS).tune_path
    _start(two_epochs)
    assert _plan(tmp_path).name == two_epochs.name  # found again by the same command


def test_more_trials_is_a_new_search_because_tune_cannot_add_trials(tmp_path: Path) -> None:
    _start(_plan(tmp_path))
    more = _plan(tmp_path, "search.num_samples=12")
    assert more.name != "kd" and more.expected_trials == 12
    assert "cannot change the number of trials" in more.renamed
    assert "search.num_samples=12" in more.renamed
    assert _plan(tmp_path, "search.num_samples=12").name == more.name


def test_more_trials_of_a_renamed_search_say_so_rather_than_what_differs_from_the_first(
        tmp_path: Path) -> None:
    _start(_plan(tmp_path, *FOUR_EPOCHS))
    two_epochs = _plan(tmp_path, "search.num_samples=2")
    _start(two_epochs)
    more = _plan(tmp_path, "search.num_samples=3")
    assert more.name not in ("kd", two_epochs.name)
    assert "cannot change the number of trials" in more.renamed and two_epochs.name in more.renamed


def test_a_search_left_by_an_older_kdflow_is_not_resumed(tmp_path: Path) -> None:
    old = tmp_path / "tune" / "quick-tune-kd"
    old.mkdir(parents=True)
    plan = _plan(tmp_path)
    assert plan.name != "kd" and "no recorded definition" in plan.renamed
    assert not (tmp_path / "tune" / "quick" / "kd" / SEARCH_RECORD).exists()


def _best(plan: SearchPlan, temperature: float) -> TrialRow:
    settings = {"method.temperature": temperature, "method.kd_weight": 0.7,
                "method.ce_weight": 0.25}
    return TrialRow("t1", settings, 60.0, 59.0, 4, apply_settings(plan.base, settings).job_id)


def _without(overrides: List[str], prefix: str) -> List[str]:
    return [o for o in overrides if not o.startswith(prefix)]


@pytest.mark.parametrize("temperature", [2.5, 7.123456789])
def test_best_overrides_reproduce_the_trial_with_its_unsearched_settings(
        tmp_path: Path, temperature: float) -> None:
    plan = _plan(tmp_path, *FOUR_EPOCHS)
    best = _best(plan, temperature)
    overrides = best_overrides(plan, best)
    assert "study.student_recipe.epochs=4" in overrides
    assert not any(o.lstrip("+").startswith("search") for o in overrides)
    trial = apply_settings(plan.base, best.settings)
    assert trial.job_id == best.job_id and trial.recipe["epochs"] == 4
    assert reproduces(overrides, trial)
    # the old bug's line: the trial's settings without the epochs it was trained for
    assert not reproduces(_without(overrides, "study.student_recipe.epochs"), trial)
