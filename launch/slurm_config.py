"""The slurm launcher's settings (``configs/launcher/slurm*.yaml``), typed and checked."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from methods.config import parse_config, require_non_negative, require_positive
from methods.errors import ConfigError
from launch.stages import check_stages, stage_resources


@dataclass
class Resources:
    """What one job asks SLURM for.

    nodes x tasks_per_node processes run the job under torch.distributed when more than one
    (one task per GPU on GPU nodes). mem_gb is per node, time_min the wall-clock limit in
    minutes; SLURM sends SIGUSR2 signal_delay_s seconds before it, and the job checkpoints and
    requeues itself. ``additional`` holds any other sbatch flag, e.g. ``{exclude: node3}``.
    """

    partition: Optional[str] = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: float = 8
    time_min: int = 120
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    signal_delay_s: int = 90
    additional: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "time_min"):
            require_positive(name, getattr(self, name))
        for name in ("gpus_per_node", "signal_delay_s"):
            require_non_negative(name, getattr(self, name))
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError("signal_delay_s", f"{self.signal_delay_s} s is not shorter than the "
                              f"time limit ({self.time_min} min)",
                              fix="lower signal_delay_s or raise time_min")
        if not isinstance(self.additional, Mapping):
            raise ConfigError("additional", f"must be a mapping of sbatch flags, got {self.additional!r}",
                              fix="write e.g. additional: {exclude: node3}")

    @property
    def world_size(self) -> int:
        """Processes per job."""
        return self.nodes * self.tasks_per_node

    def shape(self) -> tuple:
        """A hashable key: jobs with equal shapes can share one job array."""
        return tuple(sorted((k, repr(v)) for k, v in dataclasses.asdict(self).items()))

    def sbatch_flags(self) -> List[str]:
        """The same request as command-line flags (for ``sbatch --test-only``)."""
        params = {**self.executor_parameters(), **self.additional}
        params.pop("signal_delay_s")
        flags = []
        for key, value in params.items():
            key = key.replace("_", "-")
            flags.append(f"--{key}" if value is True else f"--{key}={value}")
        return flags

    def executor_parameters(self) -> Dict[str, Any]:
        """Keyword arguments for ``submitit.SlurmExecutor.update_parameters``."""
        params: Dict[str, Any] = {
            "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task, "mem": f"{int(self.mem_gb * 1024)}MB",
            "time": self.time_min, "signal_delay_s": self.signal_delay_s,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name):
                params[name] = getattr(self, name)
        return params


@dataclass
class SlurmSettings:
    """The whole ``launcher`` node for ``launcher=slurm``.

    resources: defaults for every job; stages.<teacher|distill|ablation>: overrides per stage.
    retries: how many times a failed job is run again (from its last checkpoint) before it
             counts as failed for good. max_requeues: how many preemptions / time-outs a job
             survives. wait: stay and show progress until every job has ended.
    """

    name: str = "slurm"
    folder: Optional[str] = None
    wait: bool = False
    poll_s: float = 10.0
    retries: int = 1
    max_requeues: int = 3
    array_parallelism: int = 256
    job_name: str = "kdflow"
    python: Optional[str] = None
    setup: List[str] = field(default_factory=list)
    resources: Dict[str, Any] = field(default_factory=dict)
    stages: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        require_positive("poll_s", self.poll_s)
        require_non_negative("retries", self.retries)
        require_non_negative("max_requeues", self.max_requeues)
        require_positive("array_parallelism", self.array_parallelism)
        check_stages(Resources, self.resources, self.stages)

    def stage_resources(self, stage: str) -> Resources:
        """The resources of the jobs of ``stage``: ``resources`` updated by ``stages.<stage>``."""
        return stage_resources(Resources, self.resources, self.stages, stage)


def parse_slurm_settings(launcher: Mapping[str, Any]) -> SlurmSettings:
    """``SlurmSettings`` from the composed ``launcher`` node; errors name ``launcher.<field>``."""
    return parse_config(SlurmSettings, launcher, "launcher")
