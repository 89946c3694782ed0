"""kdflow's method core: model zoo with feature taps, losses and distillers. Pure PyTorch.

``import methods`` needs only torch and torchvision; the registries below are filled on import.
"""
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import Features, TapShapes
from kdflow.methods.models import MODELS, TappedModel, build_model, probe_taps
from kdflow.methods.distillers import DISTILLERS, DataInfo, Distiller

__all__ = [
    "ConfigError", "Features", "TapShapes", "MODELS", "TappedModel", "build_model", "probe_taps",
    "DISTILLERS", "DataInfo", "Distiller",
]
