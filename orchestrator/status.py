"""The state of every job of a study, as a table."""
from __future__ import annotations

from typing import Mapping, Optional, Protocol

from kdflow.orchestrator.staleness import assess
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph


class SchedulerView(Protocol):
    """What a scheduler adds to a job's line (see ``launch.slurm.JobView``)."""

    status: str
    scheduler_id: str
    note: str


def status_table(graph: JobGraph, store: JobStore,
                 views: Optional[Mapping[str, SchedulerView]] = None) -> str:
    """One line per job: id, what it trains, state, attempts, epochs done, last val top-1 and
    ``yes`` under ``stale`` for a finished job that is stale (:mod:`orchestrator.staleness`);
    while jobs run in packs (:mod:`orchestrator.pack`), a ``pack`` column names each running
    job's pack.

    With ``views`` (a scheduler's account of each job), the state comes from there and a
    ``scheduler`` column shows the job's scheduler id; notes (why a job is blocked, failed or
    lost, and the faults each job survived, such as a damaged checkpoint set aside) follow the
    table, and a line counting the stale jobs.
    """
    staleness = assess(graph, store)
    width = max([len("job title")] + [len(job.title) for job in graph.jobs])
    sched = 14 if views is not None else 0
    sched_head = f"  {'scheduler':{sched}}" if sched else ""
    packs = {job.job_id: state.pack for job in graph.jobs
             if (state := store.state(job.job_id)).pack and state.status == "running"}
    pack_width = len("pack-00000000") if packs else 0
    pack_head = f"  {'pack':{pack_width}}" if pack_width else ""
    header = (f"{'job':16}  {'stage':8}  {'job title':{width}}  {'state':11}{sched_head}"
              f"{pack_head}  {'tries':>5}  {'epoch':>5}  {'metric':>6}  stale")
    lines = [header, "-" * len(header)]
    notes = []
    counts: dict[str, int] = {}
    for job in graph.jobs:
        done = store.is_done(job.job_id)  # first: setting a damaged result aside notes it
        state = store.state(job.job_id)
        view = views.get(job.job_id) if views is not None else None
        status = view.status if view else ("done" if done else state.status)
        note = view.note if view else (state.error or "")
        counts[status] = counts.get(status, 0) + 1
        metric = "" if state.last_metric is None else f"{state.last_metric:6.2f}"
        sched_col = f"  {(view.scheduler_id if view else ''):{sched}}" if sched else ""
        in_pack = packs.get(job.job_id, "") if status == "running" else ""
        sched_col += f"  {in_pack:{pack_width}}" if pack_width else ""
        stale = staleness.stale.get(job.job_id)
        stale_col = "yes" if stale else ""
        lines.append(f"{job.job_id:16}  {job.stage:8}  {job.title:{width}}  {status:11}{sched_col}  "
                     f"{state.attempts:>5}  {state.epoch:>5}  {metric:>6}  {stale_col}".rstrip())
        if note and status != "done":
            notes.append(f"  {job.job_id} ({status}): {note}")
        if stale:
            notes.append(f"  {job.job_id} (stale): {stale.why}")
        notes += [f"  {job.job_id} (survived): {survived}" for survived in state.notes]
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if staleness.stale:
        lines.append(staleness.summary())
    return "\n".join(lines + notes)
