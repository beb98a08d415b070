"""Model zoo: plain-torch ResNets, MobileNetV2 and a small ViT behind a name registry.

State-dict keys match torchvision's for the same architecture, so its checkpoints load.
"""

from tandem.models.mobilenet import MobileNetV2, make_divisible, mobilenet_v2
from tandem.models.registry import (
    ModelFactory,
    UnknownModelError,
    available_models,
    build_model,
    get_model_factory,
    register_model,
)
from tandem.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from tandem.models.vit import VisionTransformer, vit_small

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "MobileNetV2",
    "ModelFactory",
    "ResNet",
    "UnknownModelError",
    "VisionTransformer",
    "available_models",
    "build_model",
    "get_model_factory",
    "make_divisible",
    "mobilenet_v2",
    "register_model",
    "resnet18",
    "resnet34",
    "resnet50",
    "vit_small",
]
