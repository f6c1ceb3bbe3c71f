"""The one training loop: any module, any loader, any device.

:func:`fit` trains the parameters that require grad, with AdamW, a linear warm-up then a cosine decay (per
step), label smoothing, an optional class-weighted loss, early stopping on validation, and keeps the best epoch's
weights. On CUDA it runs in mixed precision (bf16 where the GPU has it, else fp16 with a gradient scaler) and
channels_last; under torchrun it wraps the module in DistributedDataParallel. Every epoch's state can go to a
:class:`~tledge.train.resume.Progress` file, from which an interrupted run continues.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from tledge.train.distributed import World, all_sum


@dataclass(frozen=True)
class LoopSettings:
    """What every run of :func:`fit` shares; the per-run parts (lrs, epochs) are arguments."""

    patience: int = 6
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on the CPU), bf16, fp16, off
    channels_last: bool = True  # CUDA only
    seed: int = 0


@dataclass
class RunResult:
    """One run of :func:`fit`: its best validation epoch and what it cost."""

    name: str
    trainable_blocks: int
    lr: float
    epochs_run: int
    best_epoch: int
    val_accuracy: float
    val_loss: float
    accepted: bool
    seconds: float
    train_accuracy: float | None = None  # running accuracy of the best epoch, on augmented batches
    lrs: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    decision: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunResult":
        return cls(**d)


def amp_dtype(setting: str, device):
    """The autocast dtype for ``setting`` on ``device`` (None: full precision)."""
    import torch

    from tledge.errors import TledgeError

    if setting not in ("auto", "bf16", "fp16", "off"):
        raise TledgeError(f"amp must be auto, bf16, fp16 or off, got {setting!r}")
    if device.type != "cuda" or setting == "off":
        return None  # CPU autocast is slower than FP32 for these convolutions, and changes the numbers
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor at a step: linear warm-up from 1/warmup to 1, then cosine from 1 down to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def class_weights(labels, num_classes: int):
    """Inverse-frequency weights normalized to a mean of 1 per sample: every class adds the same to the loss.

    On a balanced set they are all 1 (the plain loss); a class missing from ``labels`` gets weight 0.
    """
    import numpy as np
    import torch

    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = len(labels) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def to_device(x, device, channels_last: bool):
    import torch

    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def fit(
    name: str,
    net,
    param_groups: list[dict],
    loader,
    sampler,
    evaluate: Callable[[], tuple[float, float]],
    *,
    epochs: int,
    settings: LoopSettings,
    device,
    world: World = World(),
    set_train_mode: Callable[[], None] | None = None,
    after_epoch: Callable[[], None] | None = None,
    keep_state: Callable[[], dict] | None = None,
    load_state: Callable[[dict], None] | None = None,
    loss_weights=None,
    skip_single: bool = False,
    progress=None,
    on_epoch: Callable[[str, int], None] | None = None,
    trainable_blocks: int = 0,
) -> RunResult:
    """Train ``net`` (its parameters in ``param_groups``) on ``loader`` and keep the best validation epoch.

    ``evaluate()`` returns (val top-1, val loss) in eval mode; the best epoch is the highest top-1, ties broken by
    the lower loss, and training stops after ``settings.patience`` epochs without a new best. ``keep_state`` /
    ``load_state`` save and restore the weights that count (default: ``net``'s state dict).
    ``skip_single`` drops a last batch of one image (batch-norm in train mode cannot take it).
    """
    import torch
    from tqdm import tqdm

    keep_state = keep_state or (lambda: {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
    load_state = load_state or net.load_state_dict
    set_train_mode = set_train_mode or net.train
    torch.manual_seed(settings.seed)  # dropout draws the same whatever ran before (and after a resume)

    cuda = device.type == "cuda"
    channels_last = settings.channels_last and cuda
    if channels_last:
        net.to(memory_format=torch.channels_last)
    dtype = amp_dtype(settings.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    model = net
    if world.distributed:
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers (BatchNorm statistics) are not synchronized every forward: frozen ones are equal on every rank,
        # and from scratch they are recomputed identically on each rank before validation. torch >= 2.14 renamed
        # the switch (broadcast_buffers still works there, with a warning).
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters else "broadcast_buffers")
        model = DDP(net, device_ids=[device.index] if cuda else None, **{sync: False})
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(param_groups)}  # peak rates (the schedule changes them in place)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, len(loader))
    warmup = max(1, round(settings.warmup_epochs * steps_per_epoch)) if settings.warmup_epochs > 0 else 0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs * steps_per_epoch, warmup))
    loss_fn = torch.nn.CrossEntropyLoss(weight=None if loss_weights is None else loss_weights.to(device), label_smoothing=settings.label_smoothing)

    best, best_epoch, best_state, history, start_epoch, spent = (-1.0, math.inf), 0, None, [], 1, 0.0
    resumed = progress.partial(name) if progress is not None else None
    if resumed:
        load_state(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        scaler.load_state_dict(resumed["scaler"])
        best, best_epoch, best_state = tuple(resumed["best"]), resumed["best_epoch"], resumed["best_state"]
        history, start_epoch, spent = list(resumed["history"]), resumed["epoch"] + 1, resumed["seconds"]
        torch.set_rng_state(resumed["rng"])

    started = time.perf_counter() - spent
    bar = tqdm(range(start_epoch, epochs + 1), desc=name, unit="epoch", leave=False, disable=not world.writer)
    for epoch in bar:
        if history and epoch - best_epoch > settings.patience:
            break
        set_train_mode()
        sampler.set_epoch(epoch)
        loss_sum, hits, seen = 0.0, 0, 0
        for x, y in loader:
            if skip_single and len(y) < 2:
                continue
            x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            loss_sum += float(loss.detach()) * len(y)
            hits += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
        loss_sum, hits, seen = all_sum([loss_sum, hits, seen], world, device)
        if after_epoch is not None:
            after_epoch()
        val_acc, val_loss = evaluate()
        if not (math.isfinite(loss_sum) and math.isfinite(val_loss)):
            # Training diverged (or the weights were not finite to begin with): stop before a model of NaNs is saved.
            from tledge.errors import TledgeError

            raise TledgeError(f"training diverged in {name}, epoch {epoch}: the loss is {loss_sum / max(seen, 1)} (train), {val_loss} (val). "
                              "Lower --lr, or check the weights and images; nothing was written")
        history.append({"epoch": epoch, "train_loss": round(loss_sum / max(seen, 1), 5), "train_accuracy": round(hits / max(seen, 1), 5),
                        "val_accuracy": round(val_acc, 5), "val_loss": round(val_loss, 5), "lr": optimizer.param_groups[0]["lr"],
                        "seconds": round(time.perf_counter() - started, 2)})
        bar.set_postfix(val_acc=f"{val_acc:.4f}", val_loss=f"{val_loss:.4f}")
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, best_epoch, best_state = (val_acc, val_loss), epoch, keep_state()
        if progress is not None and progress.due():
            progress.save_epoch(name, {
                "epoch": epoch, "model": keep_state(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "best": list(best), "best_epoch": best_epoch, "best_state": best_state,
                "history": history, "seconds": time.perf_counter() - started, "rng": torch.get_rng_state(),
            })
        if on_epoch is not None:
            on_epoch(name, epoch)
    bar.close()
    if channels_last:
        net.to(memory_format=torch.contiguous_format)
    load_state(best_state)
    return RunResult(
        name=name, trainable_blocks=trainable_blocks, lr=max(lrs.values()), epochs_run=len(history), best_epoch=best_epoch,
        val_accuracy=best[0], val_loss=best[1], accepted=True, seconds=round(time.perf_counter() - started, 2),
        train_accuracy=history[best_epoch - 1]["train_accuracy"], lrs=lrs, history=history,
    )


def predict(forward: Callable, batches, device) -> tuple:
    """(logits, labels) of ``forward`` over ``batches`` of (x, y), in inference mode, on the CPU."""
    import torch

    outs, labels = [], []
    with torch.inference_mode():
        for x, y in batches:
            outs.append(forward(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
    return torch.cat(outs), torch.cat(labels)


__all__ = ["LoopSettings", "RunResult", "amp_dtype", "class_weights", "fit", "predict", "warmup_cosine"]
