"""Transfer learning: feature extraction first, then staged unfreezing that must earn its keep on validation.

Stage 0 trains the new classifier on a frozen backbone. Each later stage thaws more blocks from the top, with a
learning rate ``lr_decay`` times lower, starting from the best weights so far; it is kept only if its best
validation score beats the previous stage (otherwise the previous weights stay and staging stops). Every stage
stops early after ``patience`` epochs without improvement.

Frozen blocks run once: their output is cached and the trainable top trains on the cache, which makes CPU
fine-tuning practical. The cost is no random augmentation; batch-norm statistics stay frozen (the usual
choice for small datasets, and it keeps the cache valid).

``weights="none"`` (a from-scratch baseline) has nothing to transfer: it trains every block in one stage with
batch-norm statistics updating, and ignores ``unfreeze``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


from .data import SPLITS_FILE, Preprocess, Splits, iter_batches, load_splits, write_splits
from .errors import TledgeError


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings for :func:`finetune`. ``None`` means "the model's default"."""

    data: Path
    out: Path
    model: str = "efficientnet_lite0"
    weights: str = "pretrained"  # "pretrained", "none" or a state-dict path
    image_size: int | None = None
    resize: int | None = None  # shorter side before the center crop; None keeps the model's resize/size ratio
    unfreeze: tuple[int, ...] = (3,)  # blocks thawed (counted from the top) by each stage after feature extraction
    epochs: int = 40  # per stage, at most
    patience: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    lr_decay: float = 0.1
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "unfreeze", tuple(int(n) for n in self.unfreeze))
        if any(n < 1 for n in self.unfreeze) or list(self.unfreeze) != sorted(set(self.unfreeze)):
            raise TledgeError(f"unfreeze must list increasing positive block counts, got {self.unfreeze}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise TledgeError(f"{name} must be at least 1")
        if self.patience < 0 or self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise TledgeError("patience must be >= 0, lr > 0 and lr_decay in (0, 1]")
        from . import validate as V

        V.number("--image-size", self.image_size, minimum=8, optional=True)
        V.number("--seed", self.seed, minimum=0)  # numpy refuses negative seeds, deep inside a stage
        V.number("--resize", self.resize, minimum=8, optional=True)
        V.number("--lr", self.lr, above=0, maximum=10)  # far beyond any AdamW rate; near 1e38 the optimizer overflows float32
        V.number("--lr-decay", self.lr_decay, above=0, maximum=1)
        V.number("weight_decay", self.weight_decay, minimum=0)
        V.number("label_smoothing", self.label_smoothing, minimum=0, maximum=0.99)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(data=str(self.data), out=str(self.out), unfreeze=list(self.unfreeze))
        return d


@dataclass
class StageResult:
    name: str
    trainable_blocks: int
    lr: float
    epochs_run: int
    best_epoch: int
    val_accuracy: float
    val_loss: float
    accepted: bool
    seconds: float
    history: list[dict] = field(default_factory=list)


def resolve_preprocess(spec_pre: Preprocess, image_size: int | None, resize: int | None) -> Preprocess:
    """The model's preprocessing with the size overrides applied (resize keeps the model's crop ratio if unset)."""
    size = spec_pre.size if image_size is None else image_size
    if resize is None:
        resize = size if spec_pre.resize == spec_pre.size else round(size * spec_pre.resize / spec_pre.size)
    return Preprocess(size=size, resize=resize, mean=spec_pre.mean, std=spec_pre.std, interpolation=spec_pre.interpolation)


def _cache_activations(model, samples, pre: Preprocess, stop: int, batch_size: int, desc: str):
    """Run ``blocks[:stop]`` once over ``samples``; returns (activations, labels) tensors."""
    import torch
    from tqdm import tqdm

    feats, labels = [], []
    model.eval()  # frozen blocks must use their running statistics, never batch statistics
    with torch.inference_mode():
        for x, y in tqdm(iter_batches(samples, pre, batch_size), total=math.ceil(len(samples) / batch_size), desc=desc, unit="batch", leave=False):
            feats.append(model.forward_blocks(torch.from_numpy(x), 0, stop))
            labels.append(torch.from_numpy(y))
    return torch.cat(feats), torch.cat(labels)


def _run_blocks(model, acts, start: int, stop: int, batch_size: int = 256):
    """Carry cached activations from ``blocks[start]`` to ``blocks[stop]`` (eval mode; identity if start == stop)."""
    import torch

    if start == stop:
        return acts
    model.eval()
    with torch.inference_mode():
        return torch.cat([model.forward_blocks(acts[i : i + batch_size], start, stop) for i in range(0, len(acts), batch_size)])


def _set_train_mode(model, start: int, train_bn: bool) -> None:
    """Train mode for the thawed top (dropout on); BatchNorm keeps its pretrained statistics unless ``train_bn``."""
    from torch import nn

    model.eval()
    for block in model.blocks[start:]:
        block.train()
    model.neck.train()
    model.head.train()
    if not train_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _recompute_bn_statistics(model, start: int, acts, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to their exact average over the training set ("precise BN").

    Running averages lag far behind the weights in short from-scratch runs, and validation in eval mode would
    then judge a network that does not exist; one extra forward pass per epoch fixes that.
    """
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for i in range(0, len(acts), batch_size):
            if len(acts[i : i + batch_size]) > 1:
                model.forward_from(acts[i : i + batch_size], start)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def _evaluate(model, start: int, acts, labels, batch_size: int, loss_fn) -> tuple[float, float]:
    import torch

    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.inference_mode():
        for i in range(0, len(acts), batch_size * 4):
            logits = model.forward_from(acts[i : i + batch_size * 4], start)
            y = labels[i : i + batch_size * 4]
            loss_sum += float(loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
    return correct / len(acts), loss_sum / len(acts)


def _train_stage(model, start: int, lr: float, cfg: FinetuneConfig, train, val, desc: str, train_bn: bool = False) -> StageResult:
    import torch
    from tqdm import tqdm

    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for module in (*model.blocks[start:], model.neck, model.head) for p in module.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    eval_loss = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(cfg.seed)
    (train_x, train_y), (val_x, val_y) = train, val

    best = (-1.0, math.inf)
    best_state, best_epoch, history = None, 0, []
    started = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", leave=False)
    for epoch in bar:
        _set_train_mode(model, start, train_bn)
        order = torch.randperm(len(train_x), generator=generator)
        train_loss, seen = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if train_bn and len(idx) < 2:
                continue  # BatchNorm cannot take batch statistics of one sample
            loss = loss_fn(model.forward_from(train_x[idx], start), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_loss += loss.item() * len(idx)
            seen += len(idx)
        if train_bn:
            _recompute_bn_statistics(model, start, train_x, cfg.batch_size)
        val_acc, val_loss = _evaluate(model, start, val_x, val_y, cfg.batch_size, eval_loss)
        history.append({"epoch": epoch, "train_loss": round(train_loss / max(seen, 1), 5), "val_accuracy": round(val_acc, 5), "val_loss": round(val_loss, 5)})
        bar.set_postfix(val_acc=f"{val_acc:.4f}", val_loss=f"{val_loss:.4f}")
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, best_epoch = (val_acc, val_loss), epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    return StageResult(
        name=desc, trainable_blocks=len(model.blocks) - start, lr=lr, epochs_run=len(history), best_epoch=best_epoch,
        val_accuracy=best[0], val_loss=best[1], accepted=True, seconds=round(time.perf_counter() - started, 2), history=history,
    )


# A thawing stage must beat the previous one on validation by more than noise: higher top-1, or the same top-1
# and a loss lower by this much (relative). Otherwise last-bit differences could "earn" a stage.
MIN_LOSS_GAIN = 1e-3


def _earns_its_keep(stage: StageResult, previous: StageResult) -> bool:
    if stage.val_accuracy != previous.val_accuracy:
        return stage.val_accuracy > previous.val_accuracy
    return stage.val_loss < previous.val_loss * (1 - MIN_LOSS_GAIN)


def _check_finite_losses(stage: StageResult) -> None:
    """A NaN or infinite loss means training diverged: stop rather than save a model that computes garbage."""
    for h in stage.history:
        if not (math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])):
            raise TledgeError(f"training diverged in stage {stage.name}, epoch {h['epoch']}: the loss is {h['train_loss']} (train), "
                              f"{h['val_loss']} (val). Lower --lr, or check the weights and images; nothing was written")


def finetune(cfg: FinetuneConfig, splits: Splits | None = None) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data``; writes ``model.pt`` and ``finetune.json`` into ``cfg.out``.

    Returns the record that ``finetune.json`` holds: the resolved config, the dataset, one entry per stage (kept or
    rejected) and the final validation and evaluation-split accuracy in PyTorch FP32.

    >>> finetune(FinetuneConfig(data="my_images", out="runs/1"))  # doctest: +SKIP
    """
    import torch

    from .artifacts import write_json
    from .models import create_model, save_checkpoint

    from . import validate

    started = time.perf_counter()
    validate.output_dir(cfg.out)  # before minutes of training, not at the end
    splits = splits or load_splits(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    validate.scan_images(s.path for s in splits.train + splits.val + splits.test)
    model, spec = create_model(cfg.model, cfg.weights, num_classes=len(splits.classes), seed=cfg.seed)
    pre = resolve_preprocess(spec.preprocess, cfg.image_size, cfg.resize)
    depth = len(model.blocks)
    if cfg.weights != "none" and cfg.unfreeze and cfg.unfreeze[-1] > depth:
        raise TledgeError(f"{cfg.model} has {depth} blocks; cannot unfreeze {cfg.unfreeze[-1]}")
    torch.manual_seed(cfg.seed)

    # From scratch there is nothing to transfer: one stage trains every block, BatchNorm statistics included.
    # Otherwise: feature extraction, then each entry of ``unfreeze``.
    from_scratch = cfg.weights == "none"
    plan = [depth] if from_scratch else [0, *cfg.unfreeze]

    # Decode and run the images once, up to the deepest block any stage thaws. Each stage thaws more blocks than
    # the one before, so the blocks between that cache and a stage's thawed top are still untouched: carrying the
    # cache through them gives exactly what a fresh pass would.
    base = depth - max(plan)
    train_base = _cache_activations(model, splits.train, pre, base, cfg.batch_size, "caching train activations")
    val_base = _cache_activations(model, splits.val, pre, base, cfg.batch_size, "caching val activations")

    stages: list[StageResult] = []
    best: StageResult | None = None
    for k, thawed in enumerate(plan):
        start = depth - thawed
        name = "from-scratch" if from_scratch else "feature-extraction" if thawed == 0 else f"unfreeze-top-{thawed}"
        train = (_run_blocks(model, train_base[0], base, start), train_base[1])
        val = (_run_blocks(model, val_base[0], base, start), val_base[1])
        previous = copy.deepcopy(model.state_dict())
        result = _train_stage(model, start, cfg.lr * cfg.lr_decay**k, cfg, train, val, name, train_bn=from_scratch)
        stages.append(result)
        _check_finite_losses(result)
        if best is not None and not _earns_its_keep(result, best):
            result.accepted = False
            model.load_state_dict(previous)
            break  # validation did not earn this stage: keep the previous weights, thaw no further
        best = result
    del train, val, train_base, val_base

    model.eval()
    final = {"val_accuracy": best.val_accuracy, "val_loss": best.val_loss}
    if splits.test:
        test_x, test_y = _cache_activations(model, splits.test, pre, depth, cfg.batch_size, "evaluating test")
        acc, loss = _evaluate(model, depth, test_x, test_y, cfg.batch_size, torch.nn.CrossEntropyLoss())
        final.update(test_accuracy=acc, test_loss=loss)

    validate.finite_state(model.state_dict(), "the fine-tuned model")
    cfg.out.mkdir(parents=True, exist_ok=True)
    validate.start_rewrite(cfg.out, "finetune")
    # Written once, here: every later stage reads this split instead of re-deriving it from (seed, fractions).
    splits_sha256 = write_splits(splits, cfg.out / SPLITS_FILE, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    record = {
        "stage": "finetune",
        "artifacts": [SPLITS_FILE, "model.pt", "finetune.json"],
        "splits": {"path": SPLITS_FILE, "sha256": splits_sha256},
        "config": cfg.to_dict(),
        "model": {"arch": cfg.model, "weights": cfg.weights, "weights_source": spec.weights_source if cfg.weights == "pretrained" else cfg.weights,
                  "blocks": depth, "trainable_blocks": best.trainable_blocks, "parameters": sum(p.numel() for p in model.parameters())},
        "preprocess": pre.to_dict(),
        "dataset": splits.summary(),
        "stages": [asdict(s) for s in stages],
        "result": {k: round(v, 5) for k, v in final.items()},
        "seconds": round(time.perf_counter() - started, 2),
        "checkpoint": "model.pt",
    }
    save_checkpoint(cfg.out / "model.pt", model, cfg.model, splits.classes, pre, extra={"finetune": record["result"], "splits_sha256": splits_sha256})
    record["sha256"] = validate.digests(cfg.out, [SPLITS_FILE, "model.pt"])
    write_json(cfg.out / "finetune.json", record)
    return record
