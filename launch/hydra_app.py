"""kdflow as a plain Hydra application, for users who sweep with Hydra's own launchers.

Each Hydra job runs one study (all its unfinished jobs) in its own process with the local
launcher, so any Hydra launcher plugin works; with hydra-submitit-launcher every sweep point
becomes a SLURM job:

    kdflow-hydra -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
        study=quick study.methods.kd.temperature=2,4,8

Points that share a job (a teacher, say) train it once: the job store's per-job lock makes the
second point wait for the first and then reuse its result. The return value of each Hydra job
(pickled back by submitit) maps job titles to final top-1.
"""
from __future__ import annotations

import os
from typing import Dict

import hydra
from omegaconf import DictConfig

from kdflow.launch.compose import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> Dict[str, float]:
    from kdflow.launch.cli import Session
    from kdflow.launch.local import run_local
    from kdflow.orchestrator.metrics import headline
    from kdflow.orchestrator.rerun import prepare_rerun

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    workers = int(cpus) if cpus else cfg.launcher.get("workers")
    session = Session(cfg, point=_sweep_point())
    notice = prepare_rerun(session.rerun, session.graph, session.store)
    if notice:
        print(notice, flush=True)
    run = session.study_run()
    run.prepare_tracking()
    summary = run_local(session.graph, session.output_dir, run.options, workers)
    print(summary.render())
    run.write_report()
    if not summary.ok:
        raise RuntimeError(summary.render())
    return {job.title: headline(session.store.result(job.job_id)) for job in session.graph.jobs}


# overrides that say where and how a study runs, not what it is: left out of report names
SETUP_KEYS = ("output_dir", "progress", "tracking_uri", "data.root", "study", "launcher")


def _sweep_point() -> str:
    """In a multirun, the point's study overrides as a folder name (its report's sub-folder)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kdflow.launch.multirun import point_name

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    kept = [o for o in hydra_cfg.overrides.task
            if o.split("=")[0].lstrip("+~") not in SETUP_KEYS and not o.startswith("launcher.")]
    return point_name(kept) if kept else str(hydra_cfg.job.num)


if __name__ == "__main__":
    main()
