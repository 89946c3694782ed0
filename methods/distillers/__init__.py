"""Distillation methods: the ``Distiller`` contract and every registered method."""
from kdflow.methods.distillers.base import (DISTILLERS, DataInfo, Distiller, LossTerms,
                                     TeacherRequest, register_distiller)
from kdflow.methods.distillers import (crd, fitnet, hsakd, kd, lad, msdcrd,  # noqa: F401
                                projection, seg_kd, spectral, stablekd,
                                vanilla)  # (fill DISTILLERS)

__all__ = ["DISTILLERS", "DataInfo", "Distiller", "LossTerms", "TeacherRequest",
           "register_distiller"]
