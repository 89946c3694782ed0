"""Per-stage resources shared by the launchers: ``resources`` for every job, updated by
``stages.<teacher|distill|ablation>`` for the jobs of one stage."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Type, TypeVar

from kdflow.methods.config import parse_config
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.spec import STAGES

R = TypeVar("R")


def check_stages(cls: Type[R], resources: Mapping[str, Any], stages: Mapping[str, Any]) -> None:
    """ConfigError for an unknown stage name or any stage whose merged resources are invalid."""
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(f"stages.{stage}", "unknown stage", allowed=list(STAGES),
                              fix="set resources per stage under stages.<stage>")
    for stage in STAGES:
        stage_resources(cls, resources, stages, stage)


def stage_resources(cls: Type[R], resources: Mapping[str, Any],
                    stages: Mapping[str, Dict[str, Any]], stage: str) -> R:
    """``cls`` built from ``resources`` updated by ``stages[stage]``; errors name the field the
    bad value came from (``stages.<stage>...`` when the stage overrides anything)."""
    field_name = f"stages.{stage}" if stages.get(stage) else "resources"
    merged = {**(resources or {}), **(stages.get(stage) or {})}
    return parse_config(cls, merged, field_name)
