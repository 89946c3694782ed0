"""The ``kdflow`` command: ``kdflow VERB [hydra overrides...]``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Type

from kdflow.methods.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from kdflow.launch.launchers import StudyRun

USAGE_EXAMPLES = """examples:
  kdflow run                                   the demo: cifar10_jpeg photos; vanilla, kd, fitnet,
                                               crd, spectral_reg (configs/study/demo.yaml)
  kdflow run study=cifar100_baselines study.datasets.cifar100.root=/data/cifar
  kdflow run study.methods.kd.temperature=2 study.seeds=[0,1,2]
  kdflow status                                the jobs of the study and their states
  kdflow report                                the results table, CSV and plots
  kdflow run --cfg                             print the composed config and exit
  kdflow run study=cifar100_benchmark --dry-run  validate and show the plan without data
  kdflow run rerun=stale                       re-run the finished jobs whose code changed
  kdflow run 'rerun=[method:fitnet,stage:teacher]'  re-run those jobs and the jobs that need them
  kdflow run study=cifar100_benchmark launcher=slurm launcher.resources.partition=gpu
                                               submit the whole study to SLURM and return
  kdflow status launcher=slurm                 job states joined with squeue/sacct
  kdflow cancel launcher=slurm                 cancel the study's queued and running jobs
  kdflow sync tracking_uri=http://mlflow:5000  send what jobs kept while the server was down
  kdflow server --port 5000                    browse the study's MLflow store on 127.0.0.1
  kdflow run -m study.methods.kd.temperature=2,4,8   one study per value (a Hydra sweep)
  kdflow tune search=kd study=quick            a Ray Tune search over one KD job's settings
  kdflow tune search=kd search.num_samples=32 search.max_concurrent=4
  kdflow data prepare imagefolder data.root=/data/imagenet
                                               write FFCV .beton files (then data.loader=ffcv)
  kdflow data prepare cifar100 data.root=/data/cifar prepare.write_mode=jpg
  kdflow data download cifar100 data.root=/data/cifar data.mirror.url=https://mirror.lab/cifar
                                               fetch and verify CIFAR-100 (or data.download=true)

exit status: 0 done; 1 a job failed, or the machine did (a full disk, a SLURM cluster that
does not answer `scontrol ping`); 2 bad input (a setting, an output_dir that is a file or
cannot be written), and nothing was started
"""


def _dataset_action(actions: Any, name: str, text: str, datasets: str,
                    overrides: str) -> argparse.ArgumentParser:
    """Add `kdflow data NAME DATASET [overrides]` to ``actions``; returns its parser."""
    action = actions.add_parser(name, help=text, description=text)
    action.add_argument("dataset", help=datasets)
    action.add_argument("overrides", nargs="*", help=f"Hydra overrides: {overrides}")
    return action


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdflow", description="Knowledge-distillation studies: teachers, students, tables.",
        epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in (("run", "validate the study, then run every unfinished job and report"),
                       ("status", "show each job of the study: state, attempts, last metric"),
                       ("report", "write the study's table (markdown, CSV) and plots"),
                       ("cancel", "cancel the study's queued and running jobs (launcher=slurm)"),
                       ("sync", "send the tracking calls jobs kept while the MLflow server "
                                "was unreachable"),
                       ("server", "serve the study's MLflow store (mlflow server) on "
                                  "127.0.0.1 unless --host is given"),
                       ("tune", "search one job's settings with Ray Tune (search=<name>; "
                                "configs/search/)")):
        sub = verbs.add_parser(verb, help=text, description=text)
        sub.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. study=demo a.b=1")
        sub.add_argument("--cfg", action="store_true", help="print the composed config and exit")
        sub.add_argument("-m", "--multirun", action="store_true",
                         help="sweep: a=1,2 b=x,y runs (or shows) one study per combination")
        if verb == "run":
            sub.add_argument("--dry-run", action="store_true",
                             help="validate the study and print its job plan; run nothing "
                                  "(the datasets' files need not exist)")
        if verb == "server":
            sub.add_argument("--host", default="127.0.0.1",
                             help="address to bind (default 127.0.0.1: this machine only)")
            sub.add_argument("--port", type=int, default=5000, help="TCP port (default 5000)")
            sub.add_argument("--workers", type=int, default=1,
                             help="server processes (default 1)")
    data = verbs.add_parser("data", help="dataset files: `kdflow data prepare|check|download "
                                         "DATASET`",
                            description="dataset files")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = _dataset_action(actions, "prepare",
                           "write DATASET's train and val splits as FFCV .beton files into "
                           "<data.root>/ffcv/<DATASET>/ (finished splits are kept)",
                           "imagefolder, cifar10 or cifar100",
                           "data.root=..., prepare.max_side=256, prepare.dataset.train_dir=...")
    prep.add_argument("--force", action="store_true", help="rewrite splits already written")
    _dataset_action(actions, "check",
                    "decode every file of DATASET's splits; list those that cannot be read "
                    "(exit 1 if any)",
                    "imagefolder, imagewoof, cifar10, cifar100, voc or cityscapes",
                    "data.root=..., prepare.workers=4, prepare.dataset.train_dir=...")
    _dataset_action(actions, "download",
                    "fetch DATASET's archive into data.root, verify its checksum and unpack it "
                    "(nothing is fetched when its files are there)", "cifar10 or cifar100",
                    "data.root=..., data.mirror.url=..., data.mirror.sha256.cifar10=...")
    return parser


class Session:
    """The composed config of one command and the paths and graph derived from it.

    ``point``: for one point of a ``-m`` sweep, its name; its report goes to
    ``reports/<study>/<point>`` so that the points do not overwrite each other's tables.
    ``overrides``: the command's overrides that composed ``cfg`` (empty when not known).
    ``rerun``: the validated ``rerun`` setting (:mod:`orchestrator.rerun`).
    ``require_data``, ``probe``: as :func:`orchestrator.study.expand_study` takes them.
    """

    def __init__(self, cfg: "DictConfig", require_data: bool = True, point: str = "",
                 probe: bool = True) -> None:
        from kdflow.launch.launchers import build_launcher
        from kdflow.orchestrator.rerun import RerunRequest
        from kdflow.orchestrator.store import JobStore
        from kdflow.orchestrator.study import expand_study
        from kdflow.orchestrator.tracking import resolve_tracking_uri
        from omegaconf import OmegaConf

        self.cfg = cfg
        self.point = point
        self.plain = OmegaConf.to_container(self.cfg, resolve=True)
        self.output_dir = str(Path(self.plain["output_dir"]).resolve())
        self.graph = expand_study(self.plain["study"], require_data, probe)
        self.rerun = RerunRequest.parse(self.plain.get("rerun"), self.graph)
        self.store = JobStore(Path(self.output_dir) / "jobs")
        self.tracking_uri = resolve_tracking_uri(self.plain.get("tracking_uri"), self.output_dir)
        self.launcher = build_launcher(self.plain["launcher"])
        self.overrides: List[str] = []

    @classmethod
    def compose(cls, overrides: List[str], require_data: bool = True, point: str = "",
                probe: bool = True) -> "Session":
        from kdflow.launch.compose import compose_config

        session = cls(compose_config(overrides), require_data, point, probe)
        session.overrides = list(overrides)
        return session

    @property
    def report_dir(self) -> Path:
        return Path(self.output_dir) / "reports" / self.graph.study / self.point

    def study_run(self) -> "StudyRun":
        from kdflow.launch.launchers import StudyRun
        from kdflow.orchestrator.runner import RunOptions

        options = RunOptions(tracking_uri=self.tracking_uri, experiment=self.graph.study,
                             progress=bool(self.plain.get("progress", True)))
        return StudyRun(self.graph, self.output_dir, options, self.report_dir)


def _run(session: Session) -> int:
    from kdflow.orchestrator.rerun import prepare_rerun

    jobs = session.graph.jobs
    print(f"study {session.graph.study}: {len(jobs)} jobs "
          f"({sum(j.stage == 'teacher' for j in jobs)} of them teacher jobs), outputs in {session.output_dir}")
    _print_lines(prepare_rerun(session.rerun, session.graph, session.store))
    return session.launcher.run(session.study_run())


def _print_lines(text: str) -> None:
    if text:
        print(text, flush=True)


def _plan(session: Session) -> int:
    from collections import Counter

    from kdflow.orchestrator.pack import pack_savings
    from kdflow.orchestrator.rerun import prepare_rerun
    from kdflow.orchestrator.status import status_table

    stages = Counter(job.stage for job in session.graph.jobs)
    todo = sum(not session.store.is_done(job.job_id) for job in session.graph.jobs)
    print(f"plan for study {session.graph.study}: {len(session.graph.jobs)} jobs ("
          + ", ".join(f"{n} {stage}" for stage, n in stages.items())
          + f"); {todo} to run, {len(session.graph.jobs) - todo} already done")
    size = getattr(session.launcher, "pack", 1)
    unfinished = [job for job in session.graph.jobs if not session.store.is_done(job.job_id)]
    print(f"{pack_savings(unfinished, size).render()} (launcher.pack={size})")
    _print_lines(prepare_rerun(session.rerun, session.graph, session.store, dry_run=True))
    print(status_table(session.graph, session.store))
    print("dry run: nothing was started.")
    return 0


def _status(session: Session) -> int:
    from kdflow.orchestrator.status import status_table

    print(status_table(session.graph, session.store, session.launcher.views(session.study_run())))
    return 0


def _cancel(session: Session) -> int:
    return session.launcher.cancel(session.study_run())


def _report(session: Session) -> int:
    from kdflow.orchestrator.report import write_report

    print(write_report(session.graph, session.store, session.report_dir))
    print(f"written to {session.report_dir}")
    return 0


def _tune(session: Session) -> int:
    from kdflow.launch.tune import plan_search, run_search

    return run_search(plan_search(session))


def _sync(session: Session) -> int:
    from kdflow.launch.tracking_cli import sync_command

    return sync_command(session)


def check_output_dir(output_dir: str, writes: bool) -> None:
    """ConfigError naming ``output_dir`` when it, or the nearest folder above it that exists,
    is a file; with ``writes``, also when that folder cannot be written (read-only file system,
    no permission), found by creating and removing a file there."""
    path = Path(output_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "it" if existing == path else f"{existing}, a folder on its path,"
        raise ConfigError("output_dir", f"{path} cannot hold kdflow's outputs: {where} is a file",
                          fix="set output_dir to a folder path, or move the file away")
    if not writes:
        return
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError("output_dir", f"{path} cannot be written: {existing}: {err.strerror}",
                          fix="make it writable (mount, chmod, chown), or set output_dir to a "
                              "folder you can write") from None


def _data(args: argparse.Namespace) -> int:
    from kdflow.launch.data_cli import check_command, download_command, prepare_command

    actions = {"prepare": lambda: prepare_command(args.dataset, args.overrides, args.force),
               "check": lambda: check_command(args.dataset, args.overrides),
               "download": lambda: download_command(args.dataset, args.overrides)}
    try:
        return actions[args.action]()
    except ConfigError as err:
        print(f"kdflow: error: {err}", file=sys.stderr)
        print("Nothing was written.", file=sys.stderr)
        return 2


VERBS = {"run": _run, "status": _status, "report": _report, "cancel": _cancel, "tune": _tune,
         "sync": _sync}


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow the flags too
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    if args.verb == "data":
        return _data(args)
    if args.verb == "tune":
        from kdflow.launch.tune import tune_overrides

        args.overrides = tune_overrides(args.overrides)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its INFO lines drown the bars
    logging.basicConfig(level=os.environ.get("KDFLOW_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        dry_run = getattr(args, "dry_run", False)
        points = [(args.overrides, "")]
        if args.multirun:
            from kdflow.launch.compose import check_overrides
            from kdflow.launch.multirun import sweep_points

            check_overrides(args.overrides)  # names the override Hydra cannot parse
            points = sweep_points(args.overrides)
        # every point is composed and validated before any job starts; `status` only reads
        # the jobs' records, so it needs neither the datasets' files nor the models probed
        reads = args.verb == "status"
        sessions = [Session.compose(p, require_data=not (dry_run or reads), point=name,
                                    probe=not reads) for p, name in points]
        if args.cfg:
            from omegaconf import OmegaConf

            print("\n---\n".join(OmegaConf.to_yaml(s.cfg) for s in sessions))
            return 0
        for session in sessions:
            check_output_dir(session.output_dir, writes=args.verb != "status" and not dry_run)
        if args.verb == "server":
            from kdflow.launch.tracking_cli import server_command

            server_command(sessions[0], args.host, args.port, args.workers)
        codes = []
        for session in sessions:
            if args.multirun:
                print(f"=== sweep point {session.point}")
            codes.append(_plan(session) if dry_run else VERBS[args.verb](session))
        return max(codes)
    except ConfigError as err:
        print(f"kdflow: error: {err}", file=sys.stderr)
        print("No job was started.", file=sys.stderr)
        return 2
    except _runtime_faults() as err:
        print(f"kdflow: error: {err}", file=sys.stderr)
        return 1


def _runtime_faults() -> Tuple[Type[BaseException], ...]:
    """The faults of the machine rather than of the input, reported as one line and exit 1:
    a full disk (:class:`orchestrator.atomic.DiskFull`), a SLURM cluster that does not answer."""
    from kdflow.launch.slurm_queue import SlurmUnreachable
    from kdflow.orchestrator.atomic import DiskFull

    return DiskFull, SlurmUnreachable


if __name__ == "__main__":
    sys.exit(main())
