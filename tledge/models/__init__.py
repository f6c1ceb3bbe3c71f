"""Backbones by name, all adapted to one shape: ``blocks`` (spatial stages, in order) -> ``neck`` -> ``head``.

Fine-tuning relies on that shape: feature extraction trains ``head`` on frozen blocks, staged unfreezing thaws
``blocks`` from the top. Export sees a plain ``nn.Module`` from image to logits.

>>> from tledge.models import create_model
>>> model, spec = create_model("efficientnet_lite0", num_classes=10)        # doctest: +SKIP
>>> model, spec = create_model("resnet18", weights="none", num_classes=10)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tledge.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from tledge.errors import TledgeError

CHECKPOINT_FORMAT = "tledge.checkpoint/1"


@dataclass(frozen=True)
class ModelSpec:
    """A registered backbone: how to build it, where its pretrained weights come from, what input it expects."""

    name: str
    build: Callable[[], nn.Module]  # -> the original architecture module (ImageNet head)
    adapt: Callable[[nn.Module], "TransferNet"]  # original module -> TransferNet
    preprocess: Preprocess
    weights_source: str  # human-readable: where "pretrained" comes from
    load_pretrained: Callable[[], dict] | None  # -> state dict of the original module; None: no pretrained weights
    offline: bool  # pretrained weights available without a network
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    _ensure_registered()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> ModelSpec:
    _ensure_registered()
    if name not in _REGISTRY:
        raise TledgeError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


class TransferNet(nn.Module):
    """``head(neck(blocks(x)))``; ``blocks`` is an ordered ModuleList so any top part can be thawed."""

    def __init__(self, blocks, neck: nn.Module, head: nn.Linear):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck
        self.head = head

    def forward_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the activation that enters ``blocks[start]`` (training on cached activations)."""
        return self.head(self.neck(self.forward_blocks(x, start)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.forward_blocks(x)))

    def reset_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_classes)


def _load_state_dict_into(module, state: dict, source: str) -> None:
    """Load ``state`` into ``module`` keeping everything but a classifier whose shape differs (it gets replaced)."""
    from tledge.validate import finite_state

    finite_state(state, f"weights file {source}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    unexpected = [k for k in state if k not in own]
    heads = _head_prefixes(module)
    head_like = {k for k in missing + mismatched if k.rsplit(".", 1)[0] in heads}  # "classifier.1.weight" -> "classifier.1"
    bad = [k for k in missing + mismatched if k not in head_like]
    if bad or unexpected:
        detail = (f"missing or mis-shaped: {bad[:5]}" if bad else "") + (f" unexpected: {unexpected[:5]}" if unexpected else "")
        raise TledgeError(f"weights in {source} do not fit this architecture ({detail.strip()})")
    keep = {k: v for k, v in state.items() if k not in head_like}
    module.load_state_dict(keep, strict=False)


def _head_prefixes(module) -> set[str]:
    # The last Linear is the classifier that transfer learning replaces.
    linear_names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    return {linear_names[-1]} if linear_names else set()


def create_model(name: str, weights: str = "pretrained", num_classes: int | None = None, seed: int = 0):
    """Build backbone ``name`` as a TransferNet.

    ``weights``: ``"pretrained"`` (the spec's source), ``"none"`` (random init, for from-scratch baselines) or a path
    to a state dict of the original architecture (loaded with ``weights_only=True``; a differently shaped
    classifier is dropped). ``num_classes`` replaces the classifier. Returns ``(model, spec)``.
    """
    spec = get_spec(name)
    torch.manual_seed(seed)
    original = spec.build()
    if weights == "pretrained":
        if spec.load_pretrained is None:
            raise TledgeError(f"{name} has no pretrained weights; use weights='none' or a checkpoint path")
        _load_state_dict_into(original, spec.load_pretrained(), spec.weights_source)
    elif weights != "none":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TledgeError(f"weights file {path} {'is a folder' if path.is_dir() else 'does not exist'} (use 'pretrained', 'none' or a checkpoint path)")
        state = _torch_load(path)
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            raise TledgeError(f"{path} is a tledge fine-tuned checkpoint; load it with tledge.models.load_checkpoint")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise TledgeError(f"{path} does not hold a state dict")
        _load_state_dict_into(original, state, str(path))
    model = spec.adapt(original)
    if num_classes is not None and num_classes != model.head.out_features:
        model.reset_head(num_classes)
    return model, spec


def _torch_load(path: Path):
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise TledgeError(
                f"{path} holds objects that are not plain tensors and containers; tledge loads checkpoints with "
                "weights_only=True and will not unpickle code. Save a state_dict instead."
            ) from None
        raise TledgeError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # torch raises EOFError, KeyError, RuntimeError... for files that are not checkpoints
        raise TledgeError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def save_checkpoint(path: str | Path, model, arch: str, classes: list[str], preprocess: Preprocess, extra: dict | None = None) -> Path:
    """Write a fine-tuned model as plain tensors and JSON-like metadata (loadable with ``weights_only=True``)."""
    from tledge.artifacts import atomic_path

    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "extra": extra or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path):
    """Read a checkpoint written by :func:`save_checkpoint`; returns ``(model in eval mode, metadata dict)``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TledgeError(f"checkpoint {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    payload = _torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TledgeError(f"{path} is not a tledge checkpoint (written by `tledge finetune`)")
    missing = [k for k in ("arch", "classes", "preprocess", "state_dict") if k not in payload]
    if missing:
        raise TledgeError(f"tledge checkpoint {path} is incomplete (no {', '.join(missing)}); fine-tune again to rewrite it")
    if not isinstance(payload["state_dict"], dict):
        raise TledgeError(f"tledge checkpoint {path} holds no state dict; fine-tune again to rewrite it")
    from tledge.validate import finite_state

    finite_state(payload["state_dict"], f"checkpoint {path}")
    model, _ = create_model(payload["arch"], weights="none", num_classes=len(payload["classes"]))
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise TledgeError(f"checkpoint {path} does not match architecture {payload['arch']}: {str(exc).splitlines()[0]}") from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["preprocess"] = Preprocess.from_dict(meta["preprocess"])
    return model, meta


_registered = False


def _ensure_registered() -> None:
    global _registered
    if not _registered:
        _registered = True
        from tledge.models import zoo  # noqa: F401  (registers the built-in backbones)


__all__ = [
    "ModelSpec",
    "TransferNet",
    "create_model",
    "get_spec",
    "list_models",
    "load_checkpoint",
    "register",
    "save_checkpoint",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
