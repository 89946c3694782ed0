"""Find registering modules without a hand-kept list.

A package whose modules register entries (``@register_distiller("kd")``, ``@register_model``,
``@register_dataset``...) calls :func:`import_registering_modules` in its ``__init__``: every
module of the package whose source calls one of the named registration functions is imported,
in sorted order, so dropping a new ``methods/distillers/<name>.py`` into the folder is all it
takes to register it. Modules that register nothing (helpers, optional back ends such as FFCV's
operators) are not imported, so an optional dependency stays optional.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from typing import Iterable, List, Tuple


def calls_any(source: str, functions: Tuple[str, ...], filename: str = "<source>") -> bool:
    """Whether ``source`` calls one of ``functions`` (by bare or dotted name) anywhere,
    decorators included. A module that only defines them does not count."""
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in functions:
                return True
    return False


def import_registering_modules(package: str, path: Iterable[str],
                               registrars: Tuple[str, ...]) -> List[str]:
    """Import every plain module of ``package`` (whose ``__path__`` is ``path``) that calls one
    of ``registrars``; returns their full names, sorted.

    Subpackages are not searched. A module that cannot be imported raises as usual: a broken
    method must fail loudly, not vanish from the registry.
    """
    found = []
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if info.ispkg:
            continue
        file = Path(info.module_finder.path) / f"{info.name}.py"
        if file.is_file() and calls_any(file.read_text(encoding="utf-8"), registrars, str(file)):
            found.append(f"{package}.{info.name}")
    for name in found:
        importlib.import_module(name)
    return found
