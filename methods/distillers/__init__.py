"""Distillation methods: the ``Distiller`` contract and every registered method.

Every module here that calls ``register_distiller`` is imported (and so registered) when the
package is: a new method is one new file, no list to edit (:mod:`kdflow.methods.discovery`).
"""
from kdflow.methods.discovery import import_registering_modules
from kdflow.methods.distillers.base import (DISTILLERS, DataInfo, Distiller, LossTerms,
                                            TeacherRequest, register_distiller)

import_registering_modules(__name__, __path__, ("register_distiller",))

__all__ = ["DISTILLERS", "DataInfo", "Distiller", "LossTerms", "TeacherRequest",
           "register_distiller"]
