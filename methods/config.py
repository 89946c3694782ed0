"""Typed method settings: a dataclass per method, built from a plain mapping with clear errors."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Type, TypeVar

from methods.errors import ConfigError

C = TypeVar("C")


def parse_config(cls: Type[C], values: Mapping[str, Any] | None, field: str) -> C:
    """Build dataclass ``cls`` from ``values``; unknown keys and bad values raise ConfigError.

    ``field`` is the dotted path of ``values`` in the user's config, used in error messages.
    After construction, ``cls.validate()`` (when defined) checks value ranges and raises
    ConfigError with a field relative to ``field``.
    """
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"{field}.{key}", "unknown setting", allowed=names)
    try:
        cfg = cls(**values)
    except TypeError as err:
        raise ConfigError(field, str(err)) from err
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            raise err.under(field) from None
    return cfg


def require_positive(name: str, value: float) -> None:
    """Raise ConfigError for ``value <= 0`` (temperatures, weights that must be > 0...)."""
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(name, f"must be a positive number, got {value!r}",
                          fix=f"set {name} to a value > 0")


def require_non_negative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(name, f"must be >= 0, got {value!r}", fix=f"set {name} to a value >= 0")


def require_one_line(name: str, value: str) -> None:
    """Raise ConfigError when text ``value`` holds a line break or another control character:
    names, paths and scheduler flags are written into files a shell reads line by line."""
    bad = sorted({c for c in value if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ConfigError(name, f"holds the control character(s) {', '.join(repr(c) for c in bad)} "
                          f"in {value!r}", fix=f"write {name} on one line, without control characters")


def config_record(cfg: Any) -> Dict[str, Any]:
    """Dataclass ``cfg`` as the plain dict a job spec holds (and hashes into the job id).

    Fields the class lists in ``omitted_at_default`` are left out while at their default, so
    adding such a setting leaves the ids of existing jobs unchanged; :func:`parse_config` fills
    them back in.
    """
    record = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name in getattr(cfg, "omitted_at_default", ()):
        if record[name] == defaults[name]:
            del record[name]
    return record
