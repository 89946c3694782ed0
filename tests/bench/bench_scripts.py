"""Loading a benchmark script of ``bench/`` as a module, for its tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_script(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as module ``kdflow_bench_<name>`` (registered in
    ``sys.modules`` first: dataclasses look their module up while the class is built)."""
    spec = importlib.util.spec_from_file_location(f"kdflow_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
