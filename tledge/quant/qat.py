"""Quantization-aware fine-tuning: the fallback when post-training quantization cannot meet the drift budget.

A short fine-tune of the FP32 checkpoint in which every Conv/Linear sees its input and its weights rounded as the
TensorRT Q/DQ model will round them: activations symmetric int8 per tensor with the calibration images' min-max
range, weights symmetric int8 per output channel (rounding the weights before batch-norm folding lands on the same
grid per channel as after it, so the exported model's rounding is the one trained against). Gradients pass the
rounding straight through. The loss is distillation from the original FP32 model's logits, because the budget
judges agreement with that model, not the labels. Batch-norm statistics and dropout stay frozen (eval mode), as
for the small sets tledge is for.

The result is a new FP32 checkpoint; :func:`tledge.quant.quantize.quantize` exports it and applies the same recipes
(same Q/DQ format, same TensorRT checks, same budget against the original FP32 model).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tledge.errors import TledgeError

INT8_MAX = 127


@dataclass(frozen=True)
class QatConfig:
    checkpoint: Path  # the fine-tuned FP32 model (model.pt)
    out: Path  # where the quantization-aware checkpoint goes
    epochs: int = 2
    lr: float = 2e-5
    batch_size: int = 32
    max_images: int = 2048  # training images per epoch at most (evenly spaced over the train split)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "out", Path(self.out))
        if self.epochs < 1 or self.batch_size < 1 or self.max_images < 1 or not self.lr > 0:
            raise TledgeError("QAT needs epochs, batch size and images >= 1 and a positive learning rate")


def _fake_quant_weight(w):
    """Symmetric int8 per output channel, as the Q/DQ model stores it; gradient straight through."""
    import torch

    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-12)
    scale = (amax / INT8_MAX).float()
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -INT8_MAX, INT8_MAX)


def _fake_quant_activation(x, amax: float):
    import torch

    return torch.fake_quantize_per_tensor_affine(x, max(amax, 1e-12) / INT8_MAX, 0, -128, 127)


class _WeightFakeQuant:
    """A parametrization: the module's own forward (padding included) reads its weight as int8 would store it."""

    def __new__(cls):
        import torch

        class FakeQuant(torch.nn.Module):
            def forward(self, w):
                return _fake_quant_weight(w)

        return FakeQuant()


class _QuantAware:
    """Hooks and parametrizations that make each Conv/Linear of ``model`` compute with int8 rounding."""

    def __init__(self, model, amax: dict[str, float]):
        import torch
        from torch.nn.utils import parametrize

        self.handles = []
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
        for name, module in self.layers.items():
            self.handles.append(module.register_forward_pre_hook(lambda m, args, a=amax[name]: (_fake_quant_activation(args[0], a),)))
            parametrize.register_parametrization(module, "weight", _WeightFakeQuant())

    def remove(self) -> None:
        """Back to a plain FP32 model holding the trained (unrounded) weights."""
        from torch.nn.utils import parametrize

        for h in self.handles:
            h.remove()
        for module in self.layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def _input_amax(model, x: np.ndarray, batch_size: int) -> dict[str, float]:
    """Largest |input| of every Conv/Linear over the calibration images (the min-max range, symmetric)."""
    import torch

    amax: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            def record(m, args, name=name):
                amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
            handles.append(module.register_forward_pre_hook(record))
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            model(torch.from_numpy(x[i : i + batch_size]))
    for h in handles:
        h.remove()
    return amax


def qat_finetune(cfg: QatConfig, train_samples, calibration_x: np.ndarray, progress: bool = True) -> dict:
    """Fine-tune ``cfg.checkpoint`` quantization-aware on ``train_samples``; writes ``cfg.out`` and returns a record."""
    import torch
    import torch.nn.functional as F

    from tledge.data.images import iter_batches
    from tledge.models import load_checkpoint, save_checkpoint

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher, meta = load_checkpoint(cfg.checkpoint)
    student = copy.deepcopy(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    amax = _input_amax(student, calibration_x, cfg.batch_size)
    quant = _QuantAware(student, amax)
    for p in student.parameters():  # the checkpoint may come with frozen blocks
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    step = max(1, -(-len(train_samples) // cfg.max_images))
    samples = list(train_samples[::step][: cfg.max_images])
    rng = np.random.default_rng(cfg.seed)
    losses = []
    student.eval()  # batch-norm statistics and dropout frozen; gradients still flow
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for epoch in range(cfg.epochs):
        order = [samples[i] for i in rng.permutation(len(samples))]
        batches = iter_batches(order, meta["preprocess"], cfg.batch_size)
        if progress and tqdm is not None:
            batches = tqdm(batches, total=-(-len(order) // cfg.batch_size), desc=f"qat epoch {epoch + 1}/{cfg.epochs}", leave=False)
        total, seen = 0.0, 0
        for x, _ in batches:
            x = torch.from_numpy(x)
            with torch.no_grad():
                target = F.log_softmax(teacher(x), dim=1)
            out = F.log_softmax(student(x), dim=1)
            loss = F.kl_div(out, target, log_target=True, reduction="batchmean")
            if not torch.isfinite(loss):
                raise TledgeError("quantization-aware fine-tuning diverged (non-finite loss); lower --qat-lr")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
            seen += len(x)
        losses.append(round(total / max(seen, 1), 6))
    quant.remove()
    save_checkpoint(cfg.out, student, meta["arch"], meta["classes"], meta["preprocess"], extra={"qat": True, "from": cfg.checkpoint.name})
    return {"checkpoint": cfg.out.name, "epochs": cfg.epochs, "images_per_epoch": len(samples), "lr": cfg.lr,
            "loss": "KL divergence to the FP32 model's predictions", "loss_per_epoch": losses,
            "seconds": round(time.perf_counter() - started, 1)}
