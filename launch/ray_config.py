"""The ray launcher's settings (``configs/launcher/ray.yaml``), typed and checked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from kdflow.methods.config import parse_config, require_non_negative, require_positive
from kdflow.methods.errors import ConfigError
from kdflow.launch.stages import check_stages, stage_resources
from kdflow.orchestrator.pack import parse_pack_size


@dataclass
class RayResources:
    """What one job asks Ray for: CPU cores (also its torch threads) and GPUs (fractions allowed)."""

    num_cpus: float = 1
    num_gpus: float = 0

    def validate(self) -> None:
        require_positive("num_cpus", self.num_cpus)
        require_non_negative("num_gpus", self.num_gpus)

    @property
    def threads(self) -> int:
        """torch intra-op threads of a job holding these resources (at least one)."""
        return max(1, int(self.num_cpus))


@dataclass
class RaySettings:
    """The whole ``launcher`` node for ``launcher=ray``.

    address: null starts an embedded Ray on this machine for the run; ``auto`` (or the value of
             ``RAY_ADDRESS``) joins a running cluster, ``ray://host:10001`` one through Ray Client.
    num_cpus: CPU cores of the embedded Ray (null: all of this machine's); not with ``address``.
    resources: defaults for every job; stages.<teacher|distill|ablation>: overrides per stage.
    retries: how many times a job is run again, from its last checkpoint, after it fails or its
             worker process dies, before it counts as failed for good.
    pack: at most this many distillation jobs of one teacher and batch stream run as one Ray
          task, sharing each batch's load and teacher forward (:mod:`orchestrator.pack`);
          1: every job alone; null: :data:`orchestrator.pack.DEFAULT_PACK`.
    """

    name: str = "ray"
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    retries: int = 1
    pack: Optional[int] = None
    resources: Dict[str, Any] = field(default_factory=dict)
    stages: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        if self.num_cpus is not None:
            if not isinstance(self.num_cpus, int) or self.num_cpus < 1:
                raise ConfigError("num_cpus", f"must be a positive integer or null, got {self.num_cpus!r}",
                                  fix="set num_cpus=2, or null for all cores")
            if self.address:
                raise ConfigError("num_cpus", "only sizes the embedded Ray, not a cluster at "
                                  f"address {self.address!r}", fix="set num_cpus=null")
        if not isinstance(self.retries, int):
            raise ConfigError("retries", f"must be an integer, got {self.retries!r}",
                              fix="set retries to a whole number >= 0, e.g. retries=1")
        require_non_negative("retries", self.retries)
        parse_pack_size(self.pack, "pack")
        check_stages(RayResources, self.resources, self.stages)

    @property
    def pack_size(self) -> int:
        """How many jobs one Ray task runs at most (``pack``, null read as the default)."""
        return parse_pack_size(self.pack, "pack")

    def stage_resources(self, stage: str) -> RayResources:
        """The resources of the jobs of ``stage``: ``resources`` updated by ``stages.<stage>``."""
        return stage_resources(RayResources, self.resources, self.stages, stage)


def parse_ray_settings(launcher: Mapping[str, Any]) -> RaySettings:
    """``RaySettings`` from the composed ``launcher`` node; errors name ``launcher.<field>``."""
    return parse_config(RaySettings, launcher, "launcher")
