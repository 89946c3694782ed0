"""The launchers ``kdflow`` can run a study with, by ``launcher.name``.

Each launcher gets the whole ``launcher`` config node at construction (and checks it there,
before any job starts) and answers three verbs: ``run`` (start or submit the study's
unfinished jobs), ``views`` (its account of each job for ``kdflow status``) and ``cancel``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Protocol

from kdflow.methods.errors import ConfigError
from kdflow.methods.registry import Registry
from kdflow.orchestrator.report import write_report
from kdflow.orchestrator.runner import RunOptions
from kdflow.orchestrator.status import SchedulerView, status_table
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph

if TYPE_CHECKING:
    from kdflow.launch.local import Summary


@dataclass
class StudyRun:
    """What a launcher needs to know about the study it runs."""

    graph: JobGraph
    output_dir: str
    options: RunOptions
    report_dir: Path

    @property
    def store(self) -> JobStore:
        return JobStore(Path(self.output_dir) / "jobs")

    def prepare_tracking(self) -> None:
        """Create the study's MLflow experiment (a warning if the store is unreachable): once
        the launcher has accepted the study, so a refused one leaves no tracking store."""
        from kdflow.orchestrator.tracking import prepare_experiment

        if self.options.tracking_uri:
            prepare_experiment(self.options.tracking_uri, self.options.experiment)

    def write_report(self) -> None:
        print(write_report(self.graph, self.store, self.report_dir))
        print(f"report: {self.report_dir}/report.md (report.csv, summary.csv, accuracy.png, curves.png)")


class Launcher(Protocol):
    def run(self, study: StudyRun) -> int: ...

    def views(self, study: StudyRun) -> Optional[Mapping[str, SchedulerView]]: ...

    def cancel(self, study: StudyRun) -> int: ...


LAUNCHERS: Registry = Registry("launcher", "launcher")


class ForegroundLauncher:
    """A launcher that runs the graph while ``kdflow run`` waits: ``run_graph`` returns the
    summary, printed with the report; nothing outlives the command, so nothing to cancel."""

    name = "local"

    def run_graph(self, study: StudyRun) -> "Summary":
        raise NotImplementedError

    def run(self, study: StudyRun) -> int:
        study.prepare_tracking()
        summary = self.run_graph(study)
        print(summary.render())
        study.write_report()
        return 0 if summary.ok else 1

    def views(self, study: StudyRun) -> None:
        return None

    def cancel(self, study: StudyRun) -> int:
        print(f"the {self.name} launcher runs in the foreground: stop it with Ctrl-C "
              "(jobs checkpoint and resume on the next `kdflow run`)")
        return 0


@LAUNCHERS.register("local")
class LocalLauncher(ForegroundLauncher):
    """Runs the graph on this machine with ``workers`` processes (null: one per core)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        unknown = set(settings) - {"name", "workers", "pack"}
        if unknown:
            raise ConfigError(f"launcher.{sorted(unknown)[0]}", "unknown setting of the local launcher",
                              allowed=["workers", "pack"])
        self.workers = settings.get("workers")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError("launcher.workers", f"must be a positive integer or null, got {self.workers!r}",
                              fix="set launcher.workers=2, or null for one per core")
        from kdflow.orchestrator.pack import parse_pack_size

        self.pack = parse_pack_size(settings.get("pack"))

    def run_graph(self, study: StudyRun) -> "Summary":
        from kdflow.launch.local import run_local

        return run_local(study.graph, study.output_dir, study.options, self.workers, self.pack)


@LAUNCHERS.register("slurm")
class SlurmLauncher:
    """Submits the graph as job arrays and returns (``wait: true`` stays with a progress bar)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        from kdflow.launch.slurm_config import parse_slurm_settings
        from kdflow.orchestrator.pack import parse_pack_size

        self.settings = parse_slurm_settings(settings)
        self.pack = parse_pack_size(settings.get("pack"))

    def run(self, study: StudyRun) -> int:
        from kdflow.launch.slurm import submit_study, wait_for_study
        from kdflow.launch.slurm_queue import SlurmQueue

        queue = SlurmQueue()
        submission = submit_study(study.graph, study.output_dir, study.options, self.settings, queue,
                                  on_accepted=study.prepare_tracking)
        print(submission.render())
        if not self.settings.wait:
            print("SLURM runs the jobs now; this terminal may close. Follow them with "
                  "`kdflow status <same overrides>`, stop them with `kdflow cancel <same overrides>`, "
                  "and write the table with `kdflow report <same overrides>`.")
            return 0
        views = wait_for_study(study.graph, study.store, queue, self.settings.poll_s,
                               study.options.progress)
        print(status_table(study.graph, study.store, views))
        study.write_report()
        return 0 if all(view.status == "done" for view in views.values()) else 1

    def views(self, study: StudyRun) -> Dict[str, SchedulerView]:
        from kdflow.launch.slurm import reconcile
        from kdflow.launch.slurm_queue import SlurmQueue, require_slurm

        require_slurm()
        return reconcile(study.graph, study.store, SlurmQueue())

    def cancel(self, study: StudyRun) -> int:
        from kdflow.launch.slurm import cancel_study
        from kdflow.launch.slurm_queue import require_slurm

        require_slurm()
        cancelled = cancel_study(study.graph, study.store)
        print(f"cancelled {len(cancelled)} SLURM jobs of study {study.graph.study}"
              + (f": {' '.join(cancelled)}" if cancelled else ""))
        return 0


@LAUNCHERS.register("ray")
class RayLauncher(ForegroundLauncher):
    """Runs the graph as Ray tasks: on an embedded Ray, or a cluster given by ``address``."""

    name = "ray"

    def __init__(self, settings: Mapping[str, Any]) -> None:
        from kdflow.launch.ray_config import parse_ray_settings
        from kdflow.orchestrator.pack import parse_pack_size

        self.settings = parse_ray_settings(settings)
        self.pack = parse_pack_size(settings.get("pack"))

    def run_graph(self, study: StudyRun) -> "Summary":
        from kdflow.launch.ray_engine import run_ray

        return run_ray(study.graph, study.output_dir, study.options, self.settings)


def build_launcher(settings: Mapping[str, Any]) -> Launcher:
    """The launcher named by ``settings['name']``, with its settings checked."""
    return LAUNCHERS.get(str(settings.get("name", "local")), "launcher")(settings)
