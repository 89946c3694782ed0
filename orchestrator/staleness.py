"""Which finished jobs are stale: their result no longer matches the code, or their teacher.

A finished job is stale when
- its ``result.json`` has no ``provenance`` (it finished before kdflow recorded it), or
- the code digest it recorded differs from the current one (:mod:`orchestrator.provenance`), or
- the job it depends on (its ``teacher_job``) is stale, has no result now, or was re-run after
  it: the teacher weights it read (the sha256 sealed into ``model.pt``) are not the teacher's
  weights now.
Nothing is re-run because of it unless asked (``kdflow run rerun=stale``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from kdflow.orchestrator.provenance import code_files, digest_of, weights_fingerprint
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph

#: The kinds of reasons, and how the summary line words each.
CODE, NO_PROVENANCE, TEACHER = "code", "no provenance", "teacher"
SUMMARY = {CODE: "their code changed since they ran",
           NO_PROVENANCE: "no provenance recorded (they finished before kdflow recorded it)",
           TEACHER: "their teacher job is stale or was re-run after them"}
#: How many stale jobs the warning names one by one.
SHOWN = 10


@dataclass(frozen=True)
class Stale:
    """Why one finished job is stale: ``kind`` (a key of :data:`SUMMARY`) and ``why`` in words."""

    kind: str
    why: str


@dataclass
class Staleness:
    """The stale jobs of a study (job id -> :class:`Stale`, in graph order) and how many of its
    jobs are finished."""

    stale: Dict[str, Stale]
    finished: int

    def summary(self, among: Optional[List[str]] = None) -> str:
        """``3 of 12 finished jobs are stale: their code changed since they ran; `kdflow run
        rerun=stale` re-runs them`` over the jobs ``among`` (default: every stale job); "" when
        none is stale."""
        ids = [j for j in self.stale if among is None or j in among]
        if not ids:
            return ""
        kinds: Dict[str, int] = {}
        for job_id in ids:
            kinds[self.stale[job_id].kind] = kinds.get(self.stale[job_id].kind, 0) + 1
        why = (SUMMARY[next(iter(kinds))] if len(kinds) == 1 else
               "; ".join(f"{kinds[kind]}: {SUMMARY[kind]}" for kind in SUMMARY if kind in kinds))
        return (f"{len(ids)} of {self.finished} finished jobs are stale: {why}; "
                f"`kdflow run rerun=stale` re-runs them")

    def warning(self, titles: Dict[str, str], among: Optional[List[str]] = None) -> str:
        """:meth:`summary` and a line per stale job (the first :data:`SHOWN`) with its title
        and why; "" when none is stale."""
        ids = [j for j in self.stale if among is None or j in among]
        if not ids:
            return ""
        lines = [f"warning: {self.summary(ids)}"]
        lines += [f"  {job_id}  {titles.get(job_id, '')}: {self.stale[job_id].why}"
                  for job_id in ids[:SHOWN]]
        if len(ids) > SHOWN:
            lines.append(f"  ... and {len(ids) - SHOWN} more (`kdflow status` lists them)")
        return "\n".join(lines)


def assess(graph: JobGraph, store: JobStore,
           jobs: Optional[Dict[str, JobSpec]] = None) -> Staleness:
    """The stale jobs of ``graph`` among those finished in ``store`` (graph order: a teacher is
    judged before the students that read it). ``jobs``: ``graph.by_id()`` if the caller has it
    (a job id is a hash of the spec, worth computing once)."""
    stale: Dict[str, Stale] = {}
    finished = 0
    for job_id, job in (jobs or graph.by_id()).items():
        result = store.result(job_id)
        if result is None:
            continue
        finished += 1
        found = _judge(job, result.get("provenance"), stale, store)
        if found is not None:
            stale[job_id] = found
    return Staleness(stale, finished)


def _judge(job: JobSpec, recorded: Optional[Dict[str, Any]], stale: Dict[str, Stale],
           store: JobStore) -> Optional[Stale]:
    """Why the finished ``job`` (whose result recorded ``recorded``) is stale, given the stale
    jobs found so far; None if it is not."""
    if not recorded:
        return Stale(NO_PROVENANCE,
                     "no provenance recorded (it finished before kdflow recorded it)")
    files = code_files(job)
    if recorded.get("code_digest") != digest_of(files):
        before = recorded.get("code_files") or {}
        changed = sorted(p for p in {*files, *before} if files.get(p) != before.get(p))
        return Stale(CODE, "its code changed since it ran"
                     + (f": {', '.join(changed)}" if changed else ""))
    teacher_job = job.teacher_job
    if teacher_job is None:
        return None
    if teacher_job in stale:
        return Stale(TEACHER, f"its teacher job {teacher_job} is stale")
    if not store.is_done(teacher_job):
        return Stale(TEACHER, f"its teacher job {teacher_job} has no result now (it will be "
                              "trained again)")
    if recorded.get("teacher_weights") != weights_fingerprint(store.weights_path(teacher_job)):
        return Stale(TEACHER, f"its teacher job {teacher_job} was re-run after it (other weights)")
    return None
