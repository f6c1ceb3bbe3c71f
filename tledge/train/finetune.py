"""The fine-tuning stage: a strategy that has to prove itself on validation, and a baseline that says whether
transfer helped at all.

``strategy`` picks how much of the pretrained network trains (see :mod:`tledge.train.strategies`): ``auto``
(default) trains the classifier on frozen features, then every layer from there if validation shows it pays;
``linear``, ``staged`` and ``full`` are the fixed recipes. Every run goes through the one loop
(:func:`tledge.train.loop.fit`): AdamW, warm-up then cosine schedule, label smoothing, class-weighted loss, early
stopping, best epoch kept, AMP and channels_last on CUDA, DistributedDataParallel under torchrun, resumable per
epoch. Frozen layers run once and their activations
are cached (the speed-up that makes CPU fine-tuning practical); layers that train see images augmented on the fly.

With ``scratch=True`` the same loop, augmentation, batch size and schedule train a randomly initialized copy of
the model (``scratch_epochs`` epochs): transfer gain = transfer's val top-1 minus scratch's. ``curve=True``
repeats both at 10/25/50% of the training labels (the sample-efficiency curve). The record holds every run
(what it cost, why it was kept), the generalization gap, per-class accuracy and the confusion matrices.

``weights="none"`` has nothing to transfer: one run trains every block with batch-norm statistics updating.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tledge.data.hygiene import file_digests, require_clean, split_hygiene
from tledge.data.images import Preprocess, scan_images
from tledge.data.splits import SPLITS_FILE, Splits, load_splits, write_splits
from tledge.errors import TledgeError
from tledge.train.diagnostics import fit_diagnostics, sample_efficiency_curve, transfer_baseline

STRATEGY_CHOICES = ("auto", "linear", "staged", "full")
AUGMENT_CHOICES = ("none", "light", "strong")
BALANCE_CHOICES = ("loss", "none")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings for :func:`finetune`. ``None`` means "the model's default"."""

    data: Path
    out: Path
    model: str = "efficientnet_lite0"
    weights: str = "pretrained"  # "pretrained", "none" or a state-dict path
    image_size: int | None = None
    resize: int | None = None  # shorter side before the center crop; None keeps the model's resize/size ratio
    strategy: str = "auto"  # auto, linear, staged, full (tledge.train.strategies)
    unfreeze: tuple[int, ...] = (3,)  # blocks thawed (counted from the top) by each stage after feature extraction
    epochs: int = 40  # per stage, at most
    patience: int = 6
    batch_size: int = 64  # in all: under torchrun each process takes batch_size / world size
    lr: float = 3e-3
    lr_decay: float = 0.1
    full_lr: float = 2e-3  # peak rate when every layer trains (full, auto's last step): the classifier's; blocks below, layer_decay**d of it
    layer_decay: float = 0.8  # discriminative rates: a block d places below the top trains at layer_decay**d x lr
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    augment: str = "light"  # none, light, strong (tledge.train.augment)
    hflip: bool = False  # only where a mirrored image keeps its class (not digits, text, arrows)
    views: int = 1  # images per training image in an activation cache: 1 = the plain view, more add augmented ones
    balance: str = "loss"  # loss: inverse-frequency class weights in the training loss; none
    scratch: bool = False  # also train the from-scratch baseline and report the transfer gain
    scratch_epochs: int | None = None  # None: epochs (the same budget as one transfer step)
    curve: bool = False  # sample-efficiency curve: transfer and scratch at 10/25/50/100% of the training labels
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: str = "auto"  # auto: bf16 (or fp16) on CUDA, off on the CPU
    channels_last: bool = True  # CUDA only
    workers: int | None = None  # loader processes; None: 0 on the CPU, up to 8 on CUDA
    resume: bool = True  # continue from out/finetune.resume.pt when it was written by the same settings and data
    checkpoint_every_s: float = 60.0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    allow_duplicates: bool = False  # byte-identical images in more than one split are an error unless allowed

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
        for name, choices in (("strategy", STRATEGY_CHOICES), ("augment", AUGMENT_CHOICES), ("balance", BALANCE_CHOICES), ("amp", AMP_CHOICES)):
            if getattr(self, name) not in choices:
                raise TledgeError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not 0 < self.layer_decay <= 1 or self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise TledgeError("layer_decay must be in (0, 1], warmup_epochs >= 0 and label_smoothing in [0, 1)")
        if self.views < 1 or (self.scratch_epochs is not None and self.scratch_epochs < 1) or (self.workers is not None and self.workers < 0):
            raise TledgeError("views and scratch_epochs must be at least 1, workers at least 0")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise TledgeError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        from tledge import validate as V

        V.number("--image-size", self.image_size, minimum=8, optional=True)
        V.number("--seed", self.seed, minimum=0)  # numpy refuses negative seeds, deep inside a stage
        V.number("--resize", self.resize, minimum=8, optional=True)
        V.number("--lr", self.lr, above=0, maximum=10)  # far beyond any AdamW rate; near 1e38 the optimizer overflows float32
        V.number("--lr-decay", self.lr_decay, above=0, maximum=1)
        V.number("--full-lr", self.full_lr, above=0, maximum=10)
        V.number("weight_decay", self.weight_decay, minimum=0)
        V.number("label_smoothing", self.label_smoothing, minimum=0, maximum=0.99)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(data=str(self.data), out=str(self.out), unfreeze=list(self.unfreeze))
        return d


def resolve_preprocess(spec_pre: Preprocess, image_size: int | None, resize: int | None) -> Preprocess:
    """The model's preprocessing with the size overrides applied (resize keeps the model's crop ratio if unset)."""
    size = spec_pre.size if image_size is None else image_size
    if resize is None:
        resize = size if spec_pre.resize == spec_pre.size else round(size * spec_pre.resize / spec_pre.size)
    return Preprocess(size=size, resize=resize, mean=spec_pre.mean, std=spec_pre.std, interpolation=spec_pre.interpolation)


# Settings that change how a run computes but not what it should learn: a resume may change them.
_RESUME_NEUTRAL = ("resume", "checkpoint_every_s", "workers", "curve", "scratch", "out", "allow_duplicates")


def finetune(cfg: FinetuneConfig, splits: Splits | None = None, on_epoch=None) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data``; writes ``model.pt``, ``splits.json`` and ``finetune.json`` into ``cfg.out``.

    Returns the record that ``finetune.json`` holds: the resolved config, the dataset, every run of the strategy
    (kept or rejected, with its cost and learning curve), the baseline and transfer gain when asked for, the
    diagnostics and the final validation and test accuracy in PyTorch FP32. Under torchrun every rank returns
    the record and only rank 0 writes. ``on_epoch(run name, epoch)`` is called after each epoch.

    >>> finetune(FinetuneConfig(data="my_images", out="runs/1"))  # doctest: +SKIP
    >>> finetune(FinetuneConfig(data="my_images", out="runs/2", strategy="linear", scratch=True))  # doctest: +SKIP
    """
    from tledge.train import distributed as dist

    world = dist.world_from_env()
    device = dist.resolve_device(cfg.device, world)
    created = dist.init(world, device)
    try:
        return _finetune(cfg, splits, on_epoch, world, device)
    finally:
        dist.finish(created)


def _finetune(cfg: FinetuneConfig, splits: Splits | None, on_epoch, world, device) -> dict:
    import torch

    from tledge import validate
    from tledge.artifacts import write_json
    from tledge.models import create_model, save_checkpoint
    from tledge.train import strategies as S
    from tledge.train.augment import preset
    from tledge.train.distributed import log
    from tledge.train.loader import ImageSet
    from tledge.train.loop import LoopSettings, amp_dtype
    from tledge.train.resume import RESUME_FILE, Progress

    started = time.perf_counter()
    validate.output_dir(cfg.out)  # before minutes of training, not at the end
    splits = splits or load_splits(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    scan_images(s.path for s in splits.train + splits.val + splits.test)
    # Before any training: an image in two splits scores the model on what it learned (exact copies are an error).
    digests = file_digests(s.path for s in splits.train + splits.val + splits.test)  # once, for the hygiene and splits.json
    hygiene = split_hygiene(splits, sha256=digests)
    require_clean(hygiene, cfg.allow_duplicates)
    model, spec = create_model(cfg.model, cfg.weights, num_classes=len(splits.classes), seed=cfg.seed)
    pre = resolve_preprocess(spec.preprocess, cfg.image_size, cfg.resize)
    depth = len(model.blocks)
    from_scratch = cfg.weights == "none"
    if not from_scratch and cfg.strategy == "staged" and cfg.unfreeze and cfg.unfreeze[-1] > depth:
        raise TledgeError(f"{cfg.model} has {depth} blocks; cannot unfreeze {cfg.unfreeze[-1]}")

    aug = preset(cfg.augment, cfg.hflip)
    train_set = ImageSet(splits.train, pre, aug, cfg.seed)
    val_set = ImageSet(splits.val, pre, None, cfg.seed)
    fingerprint = {"config": {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_NEUTRAL}, "world": world.size,
                   "samples": [[str(s.path), s.label] for s in splits.train + splits.val]}
    progress = Progress(cfg.out / RESUME_FILE, fingerprint, writer=world.writer, every_s=cfg.checkpoint_every_s, load=cfg.resume)
    if progress.resumed:
        log(world, f"resuming from {cfg.out / RESUME_FILE}: {progress.summary()}")
    settings = LoopSettings(patience=cfg.patience, weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing,
                            warmup_epochs=cfg.warmup_epochs, amp=cfg.amp, channels_last=cfg.channels_last, seed=cfg.seed)
    ctx = S.Context(settings=settings, device=device, world=world, batch_size=cfg.batch_size, epochs=cfg.epochs, lr=cfg.lr,
                    lr_decay=cfg.lr_decay, full_lr=cfg.full_lr, layer_decay=cfg.layer_decay, views=cfg.views, num_classes=len(splits.classes),
                    balance=cfg.balance, progress=progress, on_epoch=on_epoch)
    torch.manual_seed(cfg.seed)

    warnings: list[str] = list(hygiene["warnings"])
    scratch_epochs = cfg.scratch_epochs or cfg.epochs
    if from_scratch:
        run = S.scratch(ctx, model, train_set, val_set, cfg.epochs, track="model")
        outcome = S.TransferOutcome([run], run, 0, None, "from scratch (weights none): one run of every layer", None)
    else:
        outcome = S.transfer(ctx, model, cfg.strategy, cfg.unfreeze, train_set, val_set)
        log(world, f"{cfg.strategy}: {outcome.why}")
    runs, best = outcome.runs, outcome.best

    baseline = None
    if (cfg.scratch or cfg.curve) and not from_scratch:
        scratch_model, _ = create_model(cfg.model, "none", num_classes=len(splits.classes), seed=cfg.seed)
        sc = S.scratch(ctx, scratch_model, train_set, val_set, scratch_epochs)
        baseline = transfer_baseline(best, sc, runs, scratch_epochs, cfg.epochs)
        log(world, f"transfer gain over scratch: {baseline['transfer_gain_pp']:+.1f} pt ({baseline['verdict']})")
        if baseline["transfer_gain_pp"] <= 0:
            warnings.append(baseline["message"])
        del scratch_model

    model.eval()
    diagnostics = fit_diagnostics(model, outcome, train_set, val_set, splits, pre, cfg, device)
    curve = sample_efficiency_curve(cfg, ctx, splits, train_set, val_set, best, baseline, scratch_epochs, outcome) if cfg.curve and baseline else None
    final = {"val_accuracy": best.val_accuracy, "val_loss": best.val_loss, **diagnostics.pop("test", {})}
    model.to("cpu")

    dtype = amp_dtype(cfg.amp, device)
    training = {
        "device": str(device), "world_size": world.size, "batch_per_process": ctx.rank_batch,
        "amp": str(dtype).replace("torch.", "") if dtype is not None else "off (float32)",
        "channels_last": cfg.channels_last and device.type == "cuda",
        "augment": aug.to_dict(), "views_in_cache": cfg.views if outcome.base is not None else None,
        "balance": "inverse-frequency class weights in the training loss" if cfg.balance == "loss" else "none",
        "batchnorm": ("trains; running statistics recomputed over the training images before each validation" if from_scratch
                      else "frozen: pretrained running statistics, BatchNorm layers in eval mode; their scale and shift train when their block is thawed"),
        "decode": {"images_in_memory": train_set.cached, "seconds": round(train_set.decode_seconds + val_set.decode_seconds, 2)},
        "resumed": progress.summary(),
    }
    record = {
        "stage": "finetune",
        "artifacts": [SPLITS_FILE, "model.pt", "finetune.json"],
        "config": cfg.to_dict(),
        "model": {"arch": cfg.model, "weights": cfg.weights, "weights_source": spec.weights_source if cfg.weights == "pretrained" else cfg.weights,
                  "blocks": depth, "trainable_blocks": best.trainable_blocks, "parameters": sum(p.numel() for p in model.parameters())},
        "preprocess": pre.to_dict(),
        "dataset": splits.summary(),
        "split_hygiene": hygiene,
        "strategy": {"name": "from-scratch" if from_scratch else cfg.strategy, "plan": [r.name for r in runs], "winner": best.name, "why": outcome.why,
                     "cost": {"seconds": round(sum(r.seconds for r in runs), 2), "epochs": sum(r.epochs_run for r in runs),
                              "cache_seconds": outcome.cache_seconds}},
        "stages": [r.to_dict() for r in runs],
        "baseline": baseline,
        "diagnostics": diagnostics,
        "curve": curve,
        "training": training,
        "warnings": warnings,
        "result": {k: round(v, 5) for k, v in final.items()},
        "seconds": round(time.perf_counter() - started, 2),
        "checkpoint": "model.pt",
    }
    validate.finite_state(model.state_dict(), "the fine-tuned model")
    if world.writer:
        cfg.out.mkdir(parents=True, exist_ok=True)
        validate.start_rewrite(cfg.out, "finetune")
        # Written once, here: every later stage reads this split instead of re-deriving it from (seed, fractions).
        splits_sha256 = write_splits(splits, cfg.out / SPLITS_FILE, cfg.seed, cfg.val_fraction, cfg.test_fraction, digests)
        record["splits"] = {"path": SPLITS_FILE, "sha256": splits_sha256}
        save_checkpoint(cfg.out / "model.pt", model, cfg.model, splits.classes, pre, extra={"finetune": record["result"], "splits_sha256": splits_sha256})
        record["sha256"] = validate.digests(cfg.out, [SPLITS_FILE, "model.pt"])
        write_json(cfg.out / "finetune.json", record)
        progress.remove()
    return record
