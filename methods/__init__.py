"""kdflow's method core: model zoo with feature taps, losses and distillers. Pure PyTorch.

Importing ``kdflow.methods`` is cheap: it imports neither torch nor the zoo, so the command
line can parse arguments and refuse bad ones at once. The names below are loaded on first
access (``from kdflow.methods import MODELS`` imports the model zoo and fills its registry);
the light modules ``kdflow.methods.errors`` and ``kdflow.methods.config`` never need torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:
    from kdflow.methods.distillers import DISTILLERS, DataInfo, Distiller
    from kdflow.methods.errors import ConfigError
    from kdflow.methods.features import Features, TapShapes
    from kdflow.methods.models import MODELS, TappedModel, build_model, probe_taps

#: Each exported name -> the submodule that defines it, imported on first access.
_HOMES: Dict[str, str] = {
    "ConfigError": "errors",
    "Features": "features", "TapShapes": "features",
    "MODELS": "models", "TappedModel": "models", "build_model": "models", "probe_taps": "models",
    "DISTILLERS": "distillers", "DataInfo": "distillers", "Distiller": "distillers",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` and return it (PEP 562); cached afterwards."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted({*globals(), *__all__})
