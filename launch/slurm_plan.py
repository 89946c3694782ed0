"""Which job arrays a study becomes on SLURM, and what each waits for (pure logic, no sbatch)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Set

from kdflow.launch.slurm_config import Resources
from kdflow.orchestrator.pack import form_packs
from kdflow.orchestrator.study import JobGraph


@dataclass
class ArrayPlan:
    """One ``sbatch --array`` call.

    job_ids:      the kdflow jobs of the array, in graph order.
    tasks:        the jobs each array task runs (task i runs the pack tasks[i]; one job each
                  with a pack size of 1).
    after_arrays: indices (in the plan) of earlier arrays this one waits for (``afterok``).
    after_ids:    scheduler ids of jobs submitted earlier and still queued or running that some
                  job of this array needs (``afterok`` on exactly those tasks).
    """

    stage: str
    level: int
    resources: Resources
    job_ids: List[str] = field(default_factory=list)
    tasks: List[List[str]] = field(default_factory=list)
    after_arrays: List[int] = field(default_factory=list)
    after_ids: List[str] = field(default_factory=list)


def task_pack_size(pack: int, resources: Resources) -> int:
    """How many jobs one array task with ``resources`` runs at most: ``pack``, or 1 where a job
    runs as several processes (torch.distributed), since a pack runs in one process."""
    return pack if resources.world_size == 1 else 1


def dependency_levels(graph: JobGraph, todo: Set[str]) -> Dict[str, int]:
    """For each job in ``todo``: 0 when none of its needs is in ``todo``, else one more than
    the highest level among them. Jobs of one level never need each other."""
    levels: Dict[str, int] = {}
    for job in graph.jobs:  # dependency order: needs come first
        if job.job_id in todo:
            levels[job.job_id] = 1 + max((levels[n] for n in job.needs if n in todo), default=-1)
    return levels


def plan_arrays(graph: JobGraph, todo: Set[str], in_flight: Mapping[str, str],
                resources_of: Callable[[str], Resources], pack: int = 1) -> List[ArrayPlan]:
    """Group the jobs of ``todo`` into arrays by (dependency level, stage, resources), and the
    jobs of each array into its tasks: packs of at most ``pack`` jobs of one teacher and batch
    stream (:func:`orchestrator.pack.form_packs`, :func:`task_pack_size`). ``time_min`` is a
    job's limit: an array whose largest task runs k jobs asks for k times it.

    ``in_flight`` maps jobs already queued or running to their scheduler ids: they are not
    submitted again, and arrays that need them wait for those ids. Needs that are neither in
    ``todo`` nor in flight are done. Arrays come in submission order (levels ascending).
    """
    levels = dependency_levels(graph, todo)
    by_id = graph.by_id()
    arrays: Dict[tuple, ArrayPlan] = {}
    for job in graph.jobs:
        if job.job_id not in todo:
            continue
        resources = resources_of(job.stage)
        key = (levels[job.job_id], job.stage, resources.shape())
        if key not in arrays:
            arrays[key] = ArrayPlan(job.stage, levels[job.job_id], resources)
        arrays[key].job_ids.append(job.job_id)
    plan = sorted(arrays.values(), key=lambda a: a.level)
    for array in plan:
        packs = form_packs([by_id[job_id] for job_id in array.job_ids],
                           task_pack_size(pack, array.resources))
        array.tasks = [[spec.job_id for spec in members] for members in packs]
        largest = max(len(task) for task in array.tasks)
        if largest > 1:  # time_min is per job: a task of k jobs asks for k times it
            array.resources = replace(array.resources,
                                      time_min=array.resources.time_min * largest)
    index_of = {job_id: i for i, array in enumerate(plan) for job_id in array.job_ids}
    for i, array in enumerate(plan):
        for job_id in array.job_ids:
            for need in by_id[job_id].needs:
                if need in index_of and index_of[need] not in array.after_arrays:
                    array.after_arrays.append(index_of[need])
                elif need in in_flight and in_flight[need] not in array.after_ids:
                    array.after_ids.append(in_flight[need])
        assert all(j < i for j in array.after_arrays), "arrays must come after what they need"
    return plan
