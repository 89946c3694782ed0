"""The state of every job of a study, as a table."""
from __future__ import annotations

from orchestrator.store import JobStore
from orchestrator.study import JobGraph


def status_table(graph: JobGraph, store: JobStore) -> str:
    """One line per job: id, what it trains, state, attempts, epochs done and last val top-1."""
    width = max([len("job title")] + [len(job.title) for job in graph.jobs])
    header = (f"{'job':16}  {'stage':8}  {'job title':{width}}  {'state':11}  {'tries':>5}  "
              f"{'epoch':>5}  {'top1':>6}")
    lines = [header, "-" * len(header)]
    counts: dict[str, int] = {}
    for job in graph.jobs:
        state = store.state(job.job_id)
        status = "done" if store.is_done(job.job_id) else state.status
        counts[status] = counts.get(status, 0) + 1
        metric = "" if state.last_metric is None else f"{state.last_metric:6.2f}"
        lines.append(f"{job.job_id:16}  {job.stage:8}  {job.title:{width}}  {status:11}  "
                     f"{state.attempts:>5}  {state.epoch:>5}  {metric:>6}")
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)
