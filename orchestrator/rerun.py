"""Re-running jobs that have run: the ``rerun`` setting, what it picks, and setting old results
aside before any launcher starts.

``rerun`` (``configs/config.yaml``) is null (nothing is re-run), one term, or a list of terms:

- ``stale``: the finished jobs that are stale (:mod:`orchestrator.staleness`);
- ``failed``: the jobs whose last run failed (they start from scratch instead of resuming from
  their last checkpoint);
- ``all``: every job of the study that has run;
- ``method:<name>``, ``stage:<teacher|distill|ablation>``, ``job:<id prefix>``: the jobs that
  match (``method:`` matches student jobs, ``method:vanilla`` the student alone; teacher jobs
  are ``stage:teacher``).

The picked jobs that have run, and every job that has run and depends on one of them
(transitively: its teacher changes), are set aside with :meth:`JobStore.supersede` into
``<job>/superseded/<UTC time>/`` and get a fresh state, so every launcher runs them as
unfinished and MLflow gets a new run for each (the old one stays).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.spec import STAGES, JobSpec
from kdflow.orchestrator.staleness import Staleness, assess
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph

KEYWORDS = ("stale", "failed", "all")
SELECTORS = ("method", "stage", "job")
ALLOWED = [*KEYWORDS, "method:<name>", "stage:<teacher|distill|ablation>", "job:<id prefix>"]
FIX = "e.g. rerun=stale, rerun=failed, or 'rerun=[method:kd,stage:teacher]'; null re-runs nothing"
#: Why a job is re-run, in the order the plan line counts them.
STALE, FAILED, SELECTED, DEPENDENT = "stale", "failed", "selected", "dependent"


@dataclass(frozen=True)
class RerunRequest:
    """The validated terms of the ``rerun`` setting (none: nothing is re-run)."""

    terms: Tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: Any, graph: JobGraph) -> "RerunRequest":
        """``value`` (null, a term or a list of terms) checked against ``graph``: ConfigError
        at ``rerun`` (``rerun[i]`` for a list's item) naming the allowed values otherwise."""
        if value is None:
            return cls()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError("rerun", f"must be a term or a list of terms, got {value!r}",
                              allowed=ALLOWED, fix=FIX)
        for index, term in enumerate(items):
            _check_term(term, graph, "rerun" if isinstance(value, str) else f"rerun[{index}]")
        return cls(tuple(items))

    def reason(self, job_id: str, job: JobSpec, store: JobStore,
               staleness: Staleness) -> Optional[str]:
        """Why this request picks ``job`` (whose id is ``job_id``): :data:`STALE`,
        :data:`FAILED` or :data:`SELECTED`; None when it does not."""
        for term in self.terms:
            kind, _, value = term.partition(":")
            if kind == "stale" and job_id in staleness.stale:
                return STALE
            if kind == "failed" and store.state(job_id).status == "failed" \
                    and not store.is_done(job_id):
                return FAILED
            if (kind == "all" or (kind == "stage" and job.stage == value)
                    or (kind == "method" and job.method == value and job.stage != "teacher")
                    or (kind == "job" and job_id.startswith(value))):
                return SELECTED
        return None


def _check_term(term: str, graph: JobGraph, field: str) -> None:
    """ConfigError at ``field`` unless ``term`` is a keyword or a selector matching ``graph``."""
    kind, colon, value = term.partition(":")
    if not colon:
        if term not in KEYWORDS:
            raise ConfigError(field, f"unknown value {term!r}", allowed=ALLOWED, fix=FIX)
        return
    if kind == "method":
        methods = sorted({job.method for job in graph.jobs if job.stage != "teacher"})
        if value not in methods:
            raise ConfigError(field, f"no job of study {graph.study} has method {value!r}",
                              allowed=[f"method:{m}" for m in methods], fix=FIX)
    elif kind == "stage":
        if value not in STAGES:
            raise ConfigError(field, f"unknown stage {value!r}",
                              allowed=[f"stage:{s}" for s in STAGES], fix=FIX)
    elif kind == "job":
        if not re.fullmatch(r"[0-9a-f]{1,16}", value):
            raise ConfigError(field, f"{value!r} is not the start of a job id (hex digits)",
                              fix="copy the id from `kdflow status`, e.g. rerun=job:3fa2c1")
        if not any(job.job_id.startswith(value) for job in graph.jobs):
            raise ConfigError(field, f"no job of study {graph.study} has an id starting with "
                              f"{value!r}", fix="`kdflow status` lists the study's job ids")
    else:
        raise ConfigError(field, f"unknown value {term!r}", allowed=ALLOWED, fix=FIX)


@dataclass
class RerunPlan:
    """What one ``kdflow run`` re-runs (job id -> why, in graph order) and the stale jobs."""

    reasons: Dict[str, str]
    staleness: Staleness

    def describe(self) -> str:
        """``5 jobs (3 stale, 2 dependents)``."""
        counts = [(why, sum(r == why for r in self.reasons.values()))
                  for why in (STALE, FAILED, SELECTED, DEPENDENT)]
        parts = [f"{n} {why}{'s' if why == DEPENDENT and n > 1 else ''}" for why, n in counts if n]
        jobs = f"{len(self.reasons)} job{'s' if len(self.reasons) != 1 else ''}"
        return f"{jobs} ({', '.join(parts)})"

    def left_stale(self) -> List[str]:
        """The stale jobs this plan does not re-run."""
        return [job_id for job_id in self.staleness.stale if job_id not in self.reasons]


def plan_rerun(request: RerunRequest, graph: JobGraph, store: JobStore,
               jobs: Optional[Dict[str, JobSpec]] = None) -> RerunPlan:
    """The jobs of ``graph`` that ``request`` re-runs: those it picks that have run, then every
    job that has run and needs one of them, transitively. ``jobs``: ``graph.by_id()`` if the
    caller has it."""
    jobs = jobs or graph.by_id()
    staleness = assess(graph, store, jobs)
    reasons: Dict[str, str] = {}
    affected = set()
    for job_id, job in jobs.items():  # dependency order: a teacher before its students
        why = request.reason(job_id, job, store, staleness)
        if why is None and any(need in affected for need in job.needs):
            why = DEPENDENT
        if why is not None:
            affected.add(job_id)
            if store.has_record(job_id):
                reasons[job_id] = why
    return RerunPlan(reasons, staleness)


def utc_stamp() -> str:
    """The current UTC time as a folder name: ``20250131T142501Z``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def prepare_rerun(request: RerunRequest, graph: JobGraph, store: JobStore,
                  dry_run: bool = False) -> str:
    """Before a launcher starts: finish set-asides a crash cut short, set aside the jobs
    ``request`` re-runs (students before their teachers) and return what to print: what is
    re-run, and a warning naming the stale jobs that are not. ``dry_run``: only say it."""
    jobs = graph.by_id()
    if not dry_run:
        for job_id in jobs:
            store.complete_supersede(job_id)
    plan = plan_rerun(request, graph, store, jobs)
    lines = []
    if request.terms and not plan.reasons:
        lines.append(f"rerun={','.join(request.terms)}: no job to re-run")
    elif plan.reasons and dry_run:
        lines.append(f"would re-run {plan.describe()}")
    elif plan.reasons:
        stamp = utc_stamp()
        lines.append(f"re-running {plan.describe()}; old results kept in "
                     f"{store.root}/<job>/superseded/{stamp}/")
        for job_id in reversed(list(plan.reasons)):
            with store.lock(jobs[job_id], wait=False) as held:
                if held:
                    store.supersede(job_id, stamp)
                else:
                    lines.append(f"  {job_id} is running in another process: not re-run")
    left = plan.left_stale()
    warning = plan.staleness.warning({job_id: jobs[job_id].title for job_id in left}, left)
    if warning:
        lines += [warning, "  (skipped like every finished job: `rerun` picks what runs again)"]
    return "\n".join(lines)
