"""The model zoo: importing this package registers every family in ``MODELS``."""
from kdflow.methods.models.base import (MODELS, ModelEntry, TappedModel, build_model, count_parameters,
                                 probe_taps, register_model)
from kdflow.methods.models import (cifar_resnet, cifar_resnet50, imagenet,  # noqa: F401
                            mobilenetv2, segmentation, shufflenetv1, shufflenetv2, vgg, wrn)

__all__ = ["MODELS", "TappedModel", "ModelEntry", "register_model", "build_model", "probe_taps",
           "count_parameters"]
