"""A model made by name (pretrained weights loaded into the backbone, a new head), and fine-tuned checkpoints: plain
tensors and JSON-like metadata that load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tledge.data.images import Preprocess
from tledge.errors import TledgeError
from tledge.models.registry import get_spec

CHECKPOINT_FORMAT = "tledge.checkpoint/1"


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
        state = torch_load(path)
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


def torch_load(path: Path):
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
    payload = torch_load(path)
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
