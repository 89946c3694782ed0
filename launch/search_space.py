"""A search space in kdflow's YAML form: validated against the tuned job, applied to it, and
turned into Ray Tune sampling objects or ``kdflow run`` overrides.

A space maps parameter paths relative to the job to parameters, nested as in the YAML::

    method: {temperature: {type: loguniform, low: 1, high: 16},
             kd_weight: {type: choice, values: [0.5, 0.9]}}
    recipe: {lr: {type: loguniform, low: 0.01, high: 0.1}}

``method.<setting>`` is a setting of the tuned method's Config, ``recipe.<field>`` a field of
the student's :class:`~orchestrator.recipe.Recipe`.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

from kdflow.methods.config import parse_config
from kdflow.methods.distillers import DISTILLERS
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.spec import JobSpec


@dataclass(frozen=True)
class Target:
    """Where a path prefix points: the JobSpec field it edits, the dataclass that validates it
    (given the method's name) and the ``kdflow run`` override prefix of the same setting."""

    spec_field: str
    config: Callable[[str], type]
    override: Callable[[str], str]


TARGETS: Dict[str, Target] = {
    "method": Target("method_cfg", lambda method: DISTILLERS.get(method).Config,
                     lambda method: f"study.methods.{method}"),
    "recipe": Target("recipe", lambda _method: Recipe, lambda _method: "study.student_recipe"),
}


def _number(field: str, args: Mapping[str, Any], key: str) -> float:
    value = args.get(key)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ConfigError(f"{field}.{key}", f"must be a number, got {value!r}")
    return value


def _bounds(field: str, args: Mapping[str, Any]) -> Tuple[float, float]:
    low, high = _number(field, args, "low"), _number(field, args, "high")
    if low >= high:
        raise ConfigError(f"{field}.low", f"must be below high, got low={low} >= high={high}",
                          fix=f"set {field}.low below {field}.high")
    return low, high


def _log_bounds(field: str, args: Mapping[str, Any]) -> Tuple[float, float]:
    low, high = _bounds(field, args)
    if low <= 0:
        raise ConfigError(f"{field}.low", f"must be > 0 for a log scale, got {low}")
    return low, high


def _int_bounds(field: str, args: Mapping[str, Any]) -> Tuple[int, int]:
    low, high = _bounds(field, args)
    if int(low) != low or int(high) != high:
        raise ConfigError(f"{field}.low", f"randint bounds must be integers, got {low}, {high}")
    return int(low), int(high)


def _int_edges(field: str, args: Mapping[str, Any]) -> Tuple[int, int]:
    """The lowest and highest value a randint draws (``high`` is exclusive, as in Ray Tune)."""
    low, high = _int_bounds(field, args)
    return low, high - 1


def _values(field: str, args: Mapping[str, Any]) -> List[Any]:
    values = args.get("values")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{field}.values", f"must be a non-empty list, got {values!r}",
                          fix="list at least one value, e.g. values: [0.5, 0.9]")
    return list(values)


@dataclass(frozen=True)
class ParamType:
    """One kind of parameter.

    keys: the keys its YAML node takes besides ``type``; edges: the values validation tries
    (the bounds, or every listed value; raises ConfigError for bad arguments); sampler: the
    Ray Tune object (``ray.tune`` is passed in, so this module imports without Ray);
    discrete: whether it has a finite list of values (a grid search can enumerate it).
    """

    keys: Tuple[str, ...]
    edges: Callable[[str, Mapping[str, Any]], Sequence[Any]]
    sampler: Callable[[Any, Mapping[str, Any]], Any]
    discrete: bool


PARAM_TYPES: Dict[str, ParamType] = {
    "uniform": ParamType(("low", "high"), _bounds,
                         lambda tune, a: tune.uniform(a["low"], a["high"]), False),
    "loguniform": ParamType(("low", "high"), _log_bounds,
                            lambda tune, a: tune.loguniform(a["low"], a["high"]), False),
    # high is exclusive, as in Ray Tune: {low: 2, high: 4} draws 2 or 3
    "randint": ParamType(("low", "high"), _int_edges,
                         lambda tune, a: tune.randint(int(a["low"]), int(a["high"])), False),
    "choice": ParamType(("values",), _values, lambda tune, a: tune.choice(list(a["values"])), True),
    "grid": ParamType(("values",), _values,
                      lambda tune, a: tune.grid_search(list(a["values"])), True),
}


@dataclass(frozen=True)
class Param:
    """One tuned setting: ``path`` (``method.temperature``), its type name and arguments."""

    path: str
    type: str
    args: Dict[str, Any]

    @property
    def target(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.path.split(".", 1)[1]

    @property
    def kind(self) -> ParamType:
        return PARAM_TYPES[self.type]

    def values(self) -> List[Any]:
        """The finite list of values of a discrete parameter (choice, grid)."""
        return list(self.args["values"])


def parse_space(space: Mapping[str, Any] | None, base: JobSpec,
                field: str = "search.space") -> List[Param]:
    """The parameters of ``space``, each checked against the job ``base`` it tunes.

    Every path must name a setting of the job's method Config or Recipe, every parameter must
    be well formed, and its edge values (bounds, listed values) must give a valid job; the
    first problem raises :class:`ConfigError` naming ``<field>.<path>...``.
    """
    params = list(_walk(space or {}, field, ""))
    if not params:
        raise ConfigError(field, "is empty", fix="add at least one parameter, e.g. "
                          "method: {temperature: {type: loguniform, low: 1, high: 16}}")
    for param in params:
        _check_param(param, base, f"{field}.{param.path}")
    return params


def _walk(node: Mapping[str, Any], field: str, prefix: str):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field}.{path}", f"must be a parameter {{type: ...}}, got {value!r}",
                              allowed=list(PARAM_TYPES))
        if "type" in value:
            yield Param(path, value["type"], {k: v for k, v in value.items() if k != "type"})
        else:
            yield from _walk(value, field, path + ".")


def _check_param(param: Param, base: JobSpec, field: str) -> None:
    target = TARGETS.get(param.target)
    if target is None or "." not in param.path:
        raise ConfigError(field, "unknown parameter path",
                          allowed=[f"{t}.<setting>" for t in TARGETS])
    names = [f.name for f in dataclasses.fields(target.config(base.method))]
    if param.name not in names:
        raise ConfigError(field, f"unknown setting of {param.target}", allowed=names)
    kind = PARAM_TYPES.get(param.type)
    if kind is None:
        raise ConfigError(f"{field}.type", f"unknown parameter type {param.type!r}",
                          allowed=list(PARAM_TYPES))
    extra = sorted(set(param.args) - set(kind.keys))
    if extra:
        raise ConfigError(f"{field}.{extra[0]}", f"not a key of a {param.type} parameter",
                          allowed=["type", *kind.keys])
    for value in kind.edges(field, param.args):
        apply_settings(base, {param.path: value}, field)


def apply_settings(base: JobSpec, settings: Mapping[str, Any], field: str = "settings") -> JobSpec:
    """``base`` with ``settings`` (``{"method.temperature": 2.0, ...}``) applied: a new job
    whose id is the content hash of the result; invalid values raise ConfigError at ``field``."""
    changes: Dict[str, Dict[str, Any]] = {}
    for path, value in settings.items():
        target, name = path.split(".", 1)
        spec_field = TARGETS[target].spec_field
        changes.setdefault(spec_field, dict(getattr(base, spec_field)))[name] = value
    for target in TARGETS.values():
        if target.spec_field in changes:
            try:
                parse_config(target.config(base.method), changes[target.spec_field], "")
            except ConfigError as err:
                raise ConfigError(field, f"gives an invalid job: {err.problem}", err.allowed,
                                  err.fix) from None
    label = ", ".join(f"{path}={_short(value)}" for path, value in settings.items())
    return dataclasses.replace(base, **changes, labels={**base.labels, "variant": label})


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def tune_space(params: Sequence[Param], tune: Any, grid: bool = False) -> Dict[str, Any]:
    """The nested Ray Tune ``param_space`` (``{"method": {"temperature": <sampler>}}``).

    ``tune`` is the ``ray.tune`` module; ``grid``: every (discrete) parameter is enumerated.
    """
    space: Dict[str, Any] = {}
    for param in params:
        sampler = (tune.grid_search(param.values()) if grid
                   else param.kind.sampler(tune, param.args))
        space.setdefault(param.target, {})[param.name] = sampler
    return space


def flat_settings(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A trial's nested config (as Tune passes it) as ``{"method.temperature": value}``."""
    return {f"{target}.{name}": value for target, values in config.items()
            for name, value in values.items()}


def run_overrides(method: str, settings: Mapping[str, Any]) -> List[str]:
    """``settings`` as ``kdflow run`` overrides (``study.methods.kd.temperature=2.5``), values in
    a form Hydra parses back to the same value (floats round-trip, lists without spaces)."""
    out = []
    for path, value in settings.items():
        target, name = path.split(".", 1)
        out.append(f"{TARGETS[target].override(method)}.{name}="
                   f"{json.dumps(value, separators=(',', ':'))}")
    return out
