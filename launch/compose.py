"""Compose kdflow's Hydra config from ``configs/`` and command-line overrides."""
from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import yaml
from omegaconf import DictConfig, OmegaConf

from kdflow import configs
from kdflow.methods.config import require_one_line
from kdflow.methods.errors import ConfigError

CONFIG_DIR = Path(configs.__file__).parent
#: URI schemes MLflow can store runs under ("" is a local folder).
TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql",
                    "databricks")
#: Top-level config groups that config.yaml's defaults do not list: ``search`` (kdflow tune).
EXTRA_GROUPS = ("search",)
#: The setting that lets cluster jobs write to a SQLite (or file) tracking store anyway.
CLUSTER_FILE_STORE_OPT_IN = "tracking_sqlite_on_cluster"
OVERRIDE_SYNTAX = ("write key=value (a list as key=[0,1], a text with spaces or brackets in "
                   "quotes: key='a b'; a setting the config lacks as +key=value)")


def group_options(group: str) -> List[str]:
    """The config names available in ``configs/<group>/``."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(overrides: List[str]) -> DictConfig:
    """The composed config for ``overrides`` (Hydra syntax: ``study=demo``, ``a.b=1``).

    Hydra's own errors (an unknown study, a misspelt key, an override it cannot parse, a config
    file that is not valid YAML, an interpolation naming no setting) and top-level settings of
    the wrong kind are turned into :class:`ConfigError` naming the setting and, for config
    groups, the allowed values.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    check_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose("config", overrides=overrides)
    except HydraException as err:
        if isinstance(err.__cause__, yaml.YAMLError):
            raise _yaml_error(err.__cause__) from None
        raise _as_config_error(err, overrides) from None
    except yaml.YAMLError as err:
        raise _yaml_error(err) from None
    settings = _resolved(cfg)
    check_top_level(settings)
    check_settings(settings)
    check_local_device(settings)
    check_cluster_tracking(settings)
    return cfg


@functools.lru_cache(maxsize=None)
def top_level_keys() -> Tuple[str, ...]:
    """The settings the top-level config may hold: config.yaml's own keys, the config groups
    its defaults list chooses (study, launcher) and :data:`EXTRA_GROUPS`."""
    top = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    groups = [next(iter(d)) if isinstance(d, Mapping) else d for d in top.pop("defaults", [])]
    return tuple(sorted({*top, *groups, *EXTRA_GROUPS} - {"_self_"}))


def did_you_mean(key: str, options: Sequence[str]) -> str:
    """``"did you mean X? If not, "`` for the option closest to the last part of dotted
    ``key`` (difflib), else ``""``: the start of a fix."""
    close = difflib.get_close_matches(key.rpartition(".")[2], options, n=1)
    return f"did you mean {close[0]}? If not, " if close else ""


def check_top_level(cfg: Mapping[str, Any]) -> None:
    """ConfigError naming the first top-level key kdflow does not read (a misspelt setting
    added with ``+``, such as ``+outptu_dir=...``, would be silently ignored)."""
    for key in cfg:
        if key not in top_level_keys():
            raise ConfigError(key, "kdflow has no such top-level setting, so it would be ignored",
                              allowed=top_level_keys(),
                              fix=f"{did_you_mean(key, top_level_keys())}set an existing "
                                  f"setting without '+' (e.g. output_dir=/path/to/outputs)")


def check_local_device(cfg: Mapping[str, Any]) -> None:
    """With the local launcher every job runs on this machine: ConfigError naming the first
    recipe (``study.teacher_recipe``, ``study.student_recipe``, ``study.method_recipes.<m>``)
    that asks for ``device: cuda`` when this machine has no CUDA GPU. Other launchers run
    jobs elsewhere and are not checked here."""
    import torch

    if (cfg.get("launcher") or {}).get("name") != "local" or torch.cuda.is_available():
        return
    study = cfg.get("study") or {}
    recipes = {f"study.{key}": study.get(key) for key in ("teacher_recipe", "student_recipe")}
    method_recipes = study.get("method_recipes")
    if isinstance(method_recipes, Mapping):
        recipes.update({f"study.method_recipes.{m}": r for m, r in method_recipes.items()})
    for field, recipe in recipes.items():
        if isinstance(recipe, Mapping) and recipe.get("device") == "cuda":
            raise ConfigError(f"{field}.device", "is cuda, and this machine has no CUDA GPU "
                              "(launcher=local runs every job here)",
                              fix=f"set {field}.device=auto (a GPU when there is one, else the "
                                  "CPU) or cpu, or run on a GPU machine or with launcher=slurm")


def cluster_launch(cfg: Mapping[str, Any]) -> Optional[str]:
    """The setting that sends ``cfg``'s jobs or trials to other machines (``launcher=slurm``,
    ``launcher.address=...`` of launcher=ray, ``search.ray_address=...`` of kdflow tune);
    None when everything runs on this machine. The launcher's own settings are checked first,
    so that their errors come before the tracking store's."""
    from kdflow.launch.ray_config import parse_ray_settings
    from kdflow.launch.slurm_config import parse_slurm_settings

    launcher = cfg.get("launcher") or {}
    address = (cfg.get("search") or {}).get("ray_address")
    if launcher.get("name") == "slurm":
        parse_slurm_settings(launcher)
        return "launcher=slurm"
    if launcher.get("name") == "ray" and parse_ray_settings(launcher).address:
        return f"launcher.address={launcher['address']}"
    return f"search.ray_address={address}" if address else None


def check_cluster_tracking(cfg: Mapping[str, Any]) -> None:
    """ConfigError (field ``tracking_uri``) when jobs run on cluster nodes (:func:`cluster_launch`)
    and would track into a SQLite or file store, unless ``tracking_sqlite_on_cluster=true``:
    such a store lives on the shared (network) file system, where SQLite is slow and its
    locking unreliable. Nothing has been submitted when it is raised."""
    from kdflow.orchestrator.tracking import is_file_store

    opt_in = cfg.get(CLUSTER_FILE_STORE_OPT_IN, False)
    if not isinstance(opt_in, bool):
        raise ConfigError(CLUSTER_FILE_STORE_OPT_IN, f"must be true or false, got {opt_in!r}",
                          allowed=[True, False])
    where = cluster_launch(cfg)
    uri = cfg.get("tracking_uri")
    if where is None or opt_in or not is_file_store(uri):
        return
    store = "the embedded SQLite store <output_dir>/mlflow.db" if not uri else "a file store"
    raise ConfigError("tracking_uri", f"is {store}, and {where} runs jobs on other nodes, which "
                      "would write it over the shared file system (slow, and SQLite's locking "
                      "breaks on network file systems)",
                      fix="start a tracking server on a host the nodes reach: `kdflow server "
                          "--host 0.0.0.0 --port 5000 output_dir=...` (or `mlflow server`), and "
                          "pass tracking_uri=http://<that host>:5000; or, to keep the file "
                          f"store anyway, pass {CLUSTER_FILE_STORE_OPT_IN}=true")


def check_overrides(overrides: List[str]) -> None:
    """ConfigError naming the key of the first override Hydra's grammar cannot parse (sweeps
    such as ``a=1,2`` parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~").split("@")[0].strip("'\" ")
        try:
            (parsed,) = parser.parse_overrides([text])
        except HydraException as err:
            problem = str(err).splitlines()[0].rstrip(".")
            raise ConfigError(key or text, f"cannot parse the override {text!r} ({problem})",
                              fix=OVERRIDE_SYNTAX) from None
        if not parsed.key_or_group:
            raise ConfigError(text, "the override names no setting", fix=OVERRIDE_SYNTAX)


def _yaml_error(err: yaml.YAMLError) -> ConfigError:
    """A config file that is not YAML: the field is its config group (the folder it is in)."""
    mark = getattr(err, "problem_mark", None)
    path = Path(mark.name) if mark is not None else None
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if path else "a config file"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    group = path.parent.name if path else "overrides"
    return ConfigError(group, f"{where} is not valid YAML: {problem}",
                       fix=f"correct that line of {path.name if path else 'the file'} (close "
                           "brackets and quotes, indent with spaces), or choose another "
                           f"{group}=<name>")


def _resolved(cfg: DictConfig) -> Mapping[str, Any]:
    """``cfg`` as plain containers with every interpolation resolved; ConfigError naming the
    setting whose interpolation cannot be resolved."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        problem = str(err).splitlines()[0].rstrip(".")
        raise ConfigError(getattr(err, "full_key", None) or "overrides",
                          f"cannot be resolved: {problem}",
                          fix="an interpolation ${...} must name an existing setting, e.g. "
                              "${output_dir}; write a literal $ as \\$") from None


def check_settings(cfg: Mapping[str, Any]) -> None:
    """The top-level settings (``output_dir``, ``tracking_uri``, ``progress``, ``data.loader``)
    have the right kind of value; ConfigError naming the first that does not."""
    from kdflow.orchestrator.data.registry import loader_names

    output_dir = cfg.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir.strip():
        raise ConfigError("output_dir", f"must be a folder path, got {output_dir!r}",
                          fix="set output_dir=/path/to/outputs")
    require_one_line("output_dir", output_dir)
    uri = cfg.get("tracking_uri")
    if uri is not None:
        if not isinstance(uri, str):
            raise ConfigError("tracking_uri", f"must be a URI, got {uri!r}",
                              fix="set tracking_uri=http://host:5000, or null for the embedded store")
        require_one_line("tracking_uri", uri)
        scheme = urlparse(uri).scheme
        if scheme not in TRACKING_SCHEMES:
            raise ConfigError("tracking_uri", f"MLflow cannot store runs under a {scheme}:// URI",
                              allowed=[f"{s}://..." for s in TRACKING_SCHEMES if s],
                              fix="point tracking_uri at an `mlflow server` (http://host:5000), "
                                  "or set it to null for the embedded store")
    progress = cfg.get("progress", True)
    if not isinstance(progress, bool):
        raise ConfigError("progress", f"must be true or false, got {progress!r}",
                          allowed=[True, False])
    loader = (cfg.get("data") or {}).get("loader")
    if loader is not None and loader not in loader_names():
        raise ConfigError("data.loader", f"unknown loader {loader!r}", allowed=loader_names(),
                          fix="set data.loader=torchvision (or ffcv after `kdflow data prepare`)")


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
    no_such_key = "not in struct" in f"{message} {err.__cause__}"
    problem = "there is no such setting" if no_such_key else message.splitlines()[0].rstrip(".")
    allowed = (top_level_keys() if no_such_key and "." not in field
               else _sibling_keys(field, overrides))
    fix = "check the spelling against `kdflow run --cfg` or the files in configs/"
    if "An item is already at" in message:
        allowed, fix = None, f"the setting exists: set it without '+' ({field}=...)"
    elif not allowed:
        allowed = None
        fix = (f"to add a setting the config does not have yet, prefix it with '+' "
               f"(+{field}=...); else {fix}")
    return ConfigError(field, problem, allowed=allowed,
                       fix=did_you_mean(field, allowed or []) + fix)


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
