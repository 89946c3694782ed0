"""Distillation methods: the ``Distiller`` contract and the registered baseline methods."""
from methods.distillers.base import (DISTILLERS, DataInfo, Distiller, LossTerms,
                                     TeacherRequest, register_distiller)
from methods.distillers import crd, fitnet, kd, vanilla  # noqa: F401  (fill DISTILLERS)

__all__ = ["DISTILLERS", "DataInfo", "Distiller", "LossTerms", "TeacherRequest",
           "register_distiller"]
