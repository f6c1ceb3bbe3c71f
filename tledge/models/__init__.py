"""Backbones by name, all adapted to one shape: ``blocks`` (spatial stages, in order) -> ``neck`` -> ``head``.

Fine-tuning relies on that shape: feature extraction trains ``head`` on frozen blocks, staged unfreezing thaws
``blocks`` from the top. Export sees a plain ``nn.Module`` from image to logits.

>>> from tledge.models import create_model
>>> model, spec = create_model("efficientnet_lite0", num_classes=10)        # doctest: +SKIP
>>> model, spec = create_model("resnet18", weights="none", num_classes=10)  # doctest: +SKIP
"""

from tledge.data.images import IMAGENET_MEAN, IMAGENET_STD
from tledge.models import zoo  # noqa: F401  (registers the built-in backbones)
from tledge.models.checkpoint import CHECKPOINT_FORMAT, create_model, load_checkpoint, save_checkpoint, torch_load
from tledge.models.registry import ModelSpec, TransferNet, get_spec, list_models, register

__all__ = [
    "CHECKPOINT_FORMAT",
    "ModelSpec",
    "TransferNet",
    "create_model",
    "get_spec",
    "list_models",
    "load_checkpoint",
    "register",
    "save_checkpoint",
    "torch_load",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
