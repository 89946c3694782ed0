"""Distillation methods: the ``Distiller`` contract and every registered method."""
from methods.distillers.base import (DISTILLERS, DataInfo, Distiller, LossTerms,
                                     TeacherRequest, register_distiller)
from methods.distillers import (crd, fitnet, hsakd, kd, msdcrd, projection,  # noqa: F401
                                spectral, stablekd, vanilla)  # (fill DISTILLERS)

__all__ = ["DISTILLERS", "DataInfo", "Distiller", "LossTerms", "TeacherRequest",
           "register_distiller"]
