"""Cheap value and path checks shared by the dataset configs' ``validate()`` methods."""
from __future__ import annotations

import os

from kdflow.methods.errors import ConfigError


def require_int(name: str, value: object, minimum: int) -> None:
    """Raise ConfigError unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}",
                          fix=f"set {name} to an integer >= {minimum}")


def require_bool(name: str, value: object) -> None:
    """Raise ConfigError unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {value!r}", allowed=[True, False])


def require_folder(name: str, path: str, fix: str) -> None:
    """Raise ConfigError (field ``name``) unless ``path`` is an existing folder."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        shown = os.path.abspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)
        raise ConfigError(name, f"folder {shown} does not exist", fix=fix)
