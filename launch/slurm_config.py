"""The slurm launcher's settings (``configs/launcher/slurm*.yaml``), typed and checked."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from kdflow.methods.config import parse_config, require_one_line, require_positive
from kdflow.methods.errors import ConfigError
from kdflow.launch.stages import check_stages, stage_resources
from kdflow.orchestrator.data.checks import require_bool, require_int
from kdflow.orchestrator.pack import parse_pack_size

#: sbatch flags kdflow sets itself: ``additional`` may not set them too. Flag -> the typed
#: setting that sets it, or None for those kdflow sets for its arrays, logs and dependencies.
OWNED_FLAGS = {
    "partition": "partition", "nodes": "nodes", "ntasks-per-node": "tasks_per_node",
    "gpus-per-node": "gpus_per_node", "cpus-per-task": "cpus_per_task", "mem": "mem_gb",
    "time": "time_min", "account": "account", "qos": "qos", "constraint": "constraint",
    "signal": "signal_delay_s", "job-name": "launcher.job_name", "array": None, "output": None,
    "error": None, "open-mode": None, "dependency": None, "wrap": None,
}


def require_text(name: str, value: Any, optional: bool = True) -> None:
    """ConfigError unless ``value`` is one line of text (or None when ``optional``): the
    value is written into an sbatch script."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(name, f"must be text, got {value!r}",
                          fix=f"set {name} to a string" + (" or null" if optional else ""))
    require_one_line(name, value)


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
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            require_int(name, getattr(self, name), 1)
        require_positive("mem_gb", self.mem_gb)
        for name in ("gpus_per_node", "signal_delay_s"):
            require_int(name, getattr(self, name), 0)
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError("signal_delay_s", f"{self.signal_delay_s} s is not shorter than the "
                              f"time limit ({self.time_min} min)",
                              fix="lower signal_delay_s or raise time_min")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ConfigError("tasks_per_node", f"{self.tasks_per_node} tasks on nodes with "
                              f"{self.gpus_per_node} GPUs: a job runs one task per GPU",
                              fix=f"set tasks_per_node={self.gpus_per_node}, or gpus_per_node="
                                  f"{self.tasks_per_node}")
        for name in ("partition", "account", "qos", "constraint"):
            require_text(name, getattr(self, name))
        self._check_additional()

    def _check_additional(self) -> None:
        if not isinstance(self.additional, Mapping):
            raise ConfigError("additional", f"must be a mapping of sbatch flags, got {self.additional!r}",
                              fix="write e.g. additional: {exclude: node3}")
        for key, value in self.additional.items():
            require_text(f"additional.{key}", str(key), optional=False)
            flag = str(key).replace("_", "-")
            if flag in OWNED_FLAGS:
                owner = OWNED_FLAGS[flag]
                raise ConfigError(f"additional.{key}", f"--{flag} is set by kdflow"
                                  + (f" from {owner}" if owner else " itself"),
                                  fix=f"set {owner} instead" if owner else f"remove additional.{key}")
            if not isinstance(value, (str, int, float, bool)):
                raise ConfigError(f"additional.{key}", f"must be one sbatch value, got {value!r}",
                                  fix=f"write e.g. additional.{key}: value (true for a bare flag)")
            require_one_line(f"additional.{key}", str(value))

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
    pack:    how many distillation jobs of one teacher and batch stream one array task runs
             together (:mod:`orchestrator.pack`); null: DEFAULT_PACK, 1: one job per task.
             Once validated it holds the size. Arrays of multi-process jobs run one job per
             task whatever it says (:func:`launch.slurm_plan.task_pack_size`).
    python, setup: the interpreter command on the nodes and the lines run before it are shell
             code the user writes, run as written; every other value reaches sbatch quoted, and
             none may hold a line break (it would end the #SBATCH line it is written on).
    """

    name: str = "slurm"
    folder: Optional[str] = None
    wait: bool = False
    poll_s: float = 10.0
    retries: int = 1
    max_requeues: int = 3
    pack: Optional[int] = None
    array_parallelism: int = 256
    job_name: str = "kdflow"
    python: Optional[str] = None
    setup: List[str] = field(default_factory=list)
    resources: Dict[str, Any] = field(default_factory=dict)
    stages: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        require_bool("wait", self.wait)
        require_text("job_name", self.job_name, optional=False)
        require_text("python", self.python)
        require_text("folder", self.folder)
        if not isinstance(self.setup, list) or not all(isinstance(line, str) for line in self.setup):
            raise ConfigError("setup", f"must be a list of shell lines, got {self.setup!r}",
                              fix="write e.g. setup: ['module load cuda']")
        for i, line in enumerate(self.setup):
            require_one_line(f"setup[{i}]", line)
        require_positive("poll_s", self.poll_s)
        require_int("retries", self.retries, 0)
        require_int("max_requeues", self.max_requeues, 0)
        require_int("array_parallelism", self.array_parallelism, 1)
        self.pack = _pack_size(self.pack)
        check_stages(Resources, self.resources, self.stages)

    def stage_resources(self, stage: str) -> Resources:
        """The resources of the jobs of ``stage``: ``resources`` updated by ``stages.<stage>``."""
        return stage_resources(Resources, self.resources, self.stages, stage)


def _pack_size(value: Any) -> int:
    """The ``pack`` setting as a size (:func:`parse_pack_size`); its ConfigError names the field
    ``pack``, which :func:`parse_config` puts under ``launcher``."""
    try:
        return parse_pack_size(value, "launcher.pack")
    except ConfigError as err:
        raise ConfigError("pack", err.problem, err.allowed, err.fix) from None


def parse_slurm_settings(launcher: Mapping[str, Any]) -> SlurmSettings:
    """``SlurmSettings`` from the composed ``launcher`` node; errors name ``launcher.<field>``."""
    return parse_config(SlurmSettings, launcher, "launcher")
