"""The model zoo: importing this package registers every family in ``MODELS``.

Every module here that calls ``register_model`` is imported when the package is: a new family
is one new file, no list to edit (:mod:`kdflow.methods.discovery`).
"""
from kdflow.methods.discovery import import_registering_modules
from kdflow.methods.models.base import (MODELS, ModelEntry, TappedModel, build_model,
                                        count_parameters, probe_taps, register_model)

import_registering_modules(__name__, __path__, ("register_model",))

__all__ = ["MODELS", "TappedModel", "ModelEntry", "register_model", "build_model", "probe_taps",
           "count_parameters"]
