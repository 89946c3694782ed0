"""Compose kdflow's Hydra config from ``configs/`` and command-line overrides."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

from omegaconf import DictConfig, OmegaConf

import configs
from methods.errors import ConfigError

CONFIG_DIR = Path(configs.__file__).parent


def group_options(group: str) -> List[str]:
    """The config names available in ``configs/<group>/``."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(overrides: List[str]) -> DictConfig:
    """The composed config for ``overrides`` (Hydra syntax: ``study=demo``, ``a.b=1``).

    Hydra's own errors (an unknown study, a misspelt key) are turned into :class:`ConfigError`
    naming the setting and, for config groups, the allowed values.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose("config", overrides=overrides)
    except HydraException as err:
        raise _as_config_error(err, overrides) from None


def _as_config_error(err: Exception, overrides: List[str]) -> ConfigError:
    message = str(err)
    missing = re.search(r"Could not find '([\w/]+)/([\w.-]+)'", message)
    if missing:
        group, name = missing.groups()
        group = group.split("/")[-1]
        return ConfigError(group, f"unknown {group} {name!r}", allowed=group_options(group),
                           fix=f"pass {group}=<one of the allowed values>")
    key = re.search(r"override '([^']+)'", message) or re.search(r"Key '([^']+)'", message)
    field = key.group(1) if key else "overrides"
    allowed = _sibling_keys(field, overrides)
    fix = "check the spelling against `kdflow run --cfg` or the files in configs/"
    if not allowed:
        allowed = None
        fix = (f"to add a setting the config does not have yet, prefix it with '+' "
               f"(+{field}=...); else {fix}")
    return ConfigError(field, message.splitlines()[0].rstrip("."), allowed=allowed, fix=fix)


def _sibling_keys(field: str, overrides: List[str]) -> List[str] | None:
    """The keys that exist beside the misspelt ``field``, from the config without it."""
    parent, _, _ = field.rpartition(".")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(field + "=")]
    if not parent or kept == overrides:
        return None
    try:
        node = OmegaConf.select(compose_config(kept), parent)
    except ConfigError:
        return None
    return sorted(node.keys()) if isinstance(node, DictConfig) else None
