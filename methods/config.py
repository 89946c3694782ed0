"""Typed method settings: a dataclass per method, built from a plain mapping with clear errors."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, Dict, Mapping, Type, TypeVar, Union

from kdflow.methods.errors import ConfigError

C = TypeVar("C")


def parse_config(cls: Type[C], values: Mapping[str, Any] | None, field: str) -> C:
    """Build dataclass ``cls`` from ``values``; unknown keys and bad values raise ConfigError.

    ``field`` is the dotted path of ``values`` in the user's config, used in error messages.
    Before construction every value is checked against its field's type as far as numbers go
    (:func:`check_numbers`: a ``float``/``int`` field holds a finite number, never NaN or
    +-inf, a list of numbers is a list), so no Config can forget it. After construction,
    ``cls.validate()`` (when defined) checks value ranges and raises ConfigError with a field
    relative to ``field``.
    """
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"{field}.{key}", "unknown setting", allowed=names)
    check_numbers(cls, values, field)
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


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> Dict[str, Any]:
    """Dataclass ``cls``'s field types, evaluated once per class."""
    return typing.get_type_hints(cls)


def check_numbers(cls: type, values: Mapping[str, Any], field: str) -> None:
    """ConfigError naming ``field.<key>`` for the first value of ``values`` that does not fit
    the numeric part of its dataclass field's type (see :func:`check_value`)."""
    kinds = _field_types(cls)
    for key, value in values.items():
        check_value(f"{field}.{key}", value, kinds.get(key, Any))


def check_value(name: str, value: Any, kind: Any) -> None:
    """ConfigError at ``name`` unless ``value`` fits type ``kind`` as far as numbers go.

    ``float`` takes a finite int or float, ``int`` a finite whole number (bools are neither);
    ``Optional[X]`` also takes None; ``List[X]`` of numbers takes a list or tuple whose entries
    fit ``X``. Text and bool types are left to the Config's ``validate``; any other type
    (``Any``, dicts, untyped lists) only must hold no NaN or infinity anywhere inside.
    """
    if value is None and _allows_none(kind):
        return
    kind = _without_none(kind)
    if kind in (float, int):
        require_number(name, value, whole=kind is int)
    elif typing.get_origin(kind) in (list, tuple) and _numeric(kind):
        try:
            _check_entries(name, value, kind)
        except ConfigError as err:  # named at the setting; its entry goes into the problem
            entry = err.field[len(name):]
            raise ConfigError(name, f"entry {entry} {err.problem}" if entry else err.problem,
                              fix=err.fix) from None
    elif kind not in (str, bool) and not _is_union(kind):
        require_finite(name, value)


def _check_entries(name: str, value: Any, kind: Any) -> None:
    """ConfigError at the entry (``name[i]``, ``name[i][j]``) unless ``value`` is a list whose
    entries fit list type ``kind``'s entry type."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(name, f"must be a list of numbers, got {value!r}",
                          fix=f"write {name} as a list, e.g. [1, 2]")
    entry_kind = _without_none(typing.get_args(kind)[0])
    for i, item in enumerate(value):
        if typing.get_origin(entry_kind) in (list, tuple):
            _check_entries(f"{name}[{i}]", item, entry_kind)
        else:
            check_value(f"{name}[{i}]", item, entry_kind)


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (Union, types.UnionType)


def _allows_none(kind: Any) -> bool:
    return kind is Any or (_is_union(kind) and type(None) in typing.get_args(kind))


def _without_none(kind: Any) -> Any:
    """``X`` for ``Optional[X]``; ``kind`` itself otherwise."""
    if not _is_union(kind):
        return kind
    rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return rest[0] if len(rest) == 1 else kind


def _numeric(kind: Any) -> bool:
    """Whether ``kind`` is a number type or a (nested) list of them."""
    kind = _without_none(kind)
    if kind in (float, int):
        return True
    args = typing.get_args(kind)
    return typing.get_origin(kind) in (list, tuple) and len(args) == 1 and _numeric(args[0])


def require_number(name: str, value: Any, whole: bool = False) -> None:
    """ConfigError unless ``value`` is a finite number (a whole one when ``whole``); bools,
    text, NaN and +-inf are refused."""
    what = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            whole and not isinstance(value, numbers.Integral)):
        raise ConfigError(name, f"must be {what}, got {value!r}", fix=f"set {name} to {what}")
    require_finite(name, value)


def require_finite(name: str, value: Any) -> None:
    """ConfigError when ``value`` is, or holds (in lists and mappings), a NaN or an infinity."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            require_finite(f"{name}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            require_finite(f"{name}[{i}]", item)
    elif isinstance(value, numbers.Real) and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}",
                          fix=f"set {name} to a finite number (nan and inf are refused)")


def require_positive(name: str, value: float) -> None:
    """Raise ConfigError unless ``value`` is a finite number > 0 (temperatures, weights...)."""
    require_number(name, value)
    if value <= 0:
        raise ConfigError(name, f"must be a positive number, got {value!r}",
                          fix=f"set {name} to a value > 0")


def require_non_negative(name: str, value: float) -> None:
    """Raise ConfigError unless ``value`` is a finite number >= 0 (loss weights...)."""
    require_number(name, value)
    if value < 0:
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
