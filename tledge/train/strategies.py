"""Fine-tuning strategies and the from-scratch baseline, every one a sequence of :func:`~.loop.fit` runs.

* ``linear``: feature extraction: the backbone stays frozen, a new classifier trains on cached features;
* ``staged``: the classifier first, then the top ``unfreeze`` blocks step by step, each step at ``lr_decay``
  times the previous learning rate and with discriminative rates inside it (a block ``d`` places below the top
  trains at ``layer_decay**d`` times the classifier's rate); a step is kept only if validation earns it;
* ``full``: every layer from the pretrained weights at ``full_lr`` after a warm-up;
* ``auto``: linear probing, then fine-tuning (LP-FT): the classifier on frozen features, then every layer from
  there at ``full_lr``, kept only if validation earns it. The whole-network step starts from a classifier that
  already fits the features, so the first large steps do not scramble them (Kumar et al., 2022, "Fine-Tuning can
  Distort Pretrained Features"), and it runs a shorter schedule (``AUTO_LAST_STEP_SHARE`` of the epoch cap).
  It no longer thaws the ``unfreeze`` blocks first: on digits, NEU and clothing that detour cost a quarter to a
  third of ``auto``'s compute and never ended as the winner (bench/RESULTS.md).

Frozen layers run once: a step that thaws the top ``k`` blocks trains on activations cached below them
(optionally several augmented views per image, ``views``). A step that thaws everything trains on images
augmented on the fly. BatchNorm: with pretrained weights every BatchNorm layer stays in eval mode (its running
statistics are the pretrained ones, never updated; its scale and shift train when its block is thawed): batch
statistics of small batches from a small set are noisy, and frozen statistics keep the feature cache exact.
From scratch there are no statistics to keep: BatchNorm trains, and its running statistics are recomputed as
exact averages over (up to 512) training images before each validation ("precise BN").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

from tledge.train.distributed import World
from tledge.train.loader import ImageSet, TensorSet, make_loader
from tledge.train.loop import LoopSettings, RunResult, class_weights, fit
from tledge.train.surgery import (
    cache_activations,
    carry,
    evaluate_on,
    image_batches,
    param_groups,
    recompute_bn_statistics,
    set_train_mode,
    tensor_batches,
    top_blocks,
)

STRATEGIES = ("auto", "linear", "staged", "full")
# A step must beat the previous one on validation by more than noise: higher top-1, or the same top-1 and a loss
# lower by this much (relative). Otherwise last-bit differences could "earn" a step.
MIN_LOSS_GAIN = 1e-3


@dataclass
class Context:
    """What every run of one fine-tune shares."""

    settings: LoopSettings
    device: object
    world: World
    batch_size: int
    epochs: int
    lr: float
    lr_decay: float
    full_lr: float
    layer_decay: float
    views: int
    num_classes: int
    balance: str
    progress: object = None
    on_epoch: Callable | None = None

    @property
    def rank_batch(self) -> int:
        # batch_size is global: each of the world's processes takes its share of it
        return max(1, self.batch_size // self.world.size)


def earns_its_keep(run: RunResult, previous: RunResult) -> bool:
    if run.val_accuracy != previous.val_accuracy:
        return run.val_accuracy > previous.val_accuracy
    return run.val_loss < previous.val_loss * (1 - MIN_LOSS_GAIN)


def plan(strategy: str, depth: int, unfreeze: tuple[int, ...], from_scratch: bool = False) -> list[int]:
    """Blocks thawed by each step (0: feature extraction; ``depth``: the whole network)."""
    if from_scratch or strategy == "full":
        return [depth]
    if strategy == "linear":
        return [0]
    if strategy == "staged":
        return [0, *unfreeze]
    # auto: the classifier on frozen features, then the whole network from there
    return [0, depth]


AUTO_LAST_STEP_SHARE = 0.4  # of the epoch cap, for auto's whole-network step
# ... and its warm-up, in epochs: the classifier already fits, so a whole epoch at low rates would spend a quarter
# of the short schedule protecting features that a trained classifier no longer disturbs
AUTO_LAST_STEP_WARMUP = 0.25


def step_epochs(strategy: str, thawed: int, depth: int, epochs: int) -> int:
    """The epoch cap of one step: ``epochs``, except auto's whole-network step (a shorter schedule)."""
    if strategy == "auto" and thawed == depth:
        return min(epochs, max(2, math.ceil(epochs * AUTO_LAST_STEP_SHARE)))
    return epochs


# --- the model's parts ------------------------------------------------------------------------------------------


# --- cached activations -----------------------------------------------------------------------------------------


# --- runs -------------------------------------------------------------------------------------------------------

def _weights(ctx: Context, labels):
    return class_weights(labels, ctx.num_classes) if ctx.balance == "loss" else None


def run_cached(ctx: Context, model, name: str, start: int, lr: float, train, val) -> RunResult:
    """One step on cached activations ``train`` / ``val`` = (x, y) entering ``blocks[start]``."""
    groups = param_groups(model, start, lr, ctx.layer_decay)
    net = top_blocks(model, start)
    loader, sampler = make_loader(TensorSet(*train), ctx.rank_batch, ctx.settings.seed, ctx.device, ctx.world)
    val_batches = lambda: tensor_batches(val[0], val[1], ctx.batch_size * 4)  # noqa: E731

    def evaluate():
        model.eval()
        return evaluate_on(net, val_batches(), ctx.device)

    return fit(name, net, groups, loader, sampler, evaluate, epochs=ctx.epochs, settings=ctx.settings, device=ctx.device,
               world=ctx.world, set_train_mode=lambda: set_train_mode(model, start, False),
               keep_state=lambda: _state(model), load_state=model.load_state_dict, loss_weights=_weights(ctx, train[1].numpy()),
               progress=ctx.progress, on_epoch=ctx.on_epoch, trainable_blocks=len(model.blocks) - start)


def run_images(ctx: Context, model, name: str, lr: float, train: ImageSet, val: ImageSet, train_bn: bool, epochs: int | None = None) -> RunResult:
    """One run of the whole network on images augmented on the fly (BatchNorm trains only if ``train_bn``)."""
    model.to(ctx.device)
    groups = param_groups(model, 0, lr, 1.0 if train_bn else ctx.layer_decay)
    loader, sampler = make_loader(train, ctx.rank_batch, ctx.settings.seed, ctx.device, ctx.world)

    def evaluate():
        model.eval()
        return evaluate_on(model, image_batches(val, ctx.batch_size * 2), ctx.device)

    after = (lambda: recompute_bn_statistics(model, train, ctx.device, ctx.batch_size)) if train_bn else None
    return fit(name, model, groups, loader, sampler, evaluate, epochs=epochs or ctx.epochs, settings=ctx.settings, device=ctx.device,
               world=ctx.world, set_train_mode=lambda: set_train_mode(model, 0, train_bn), after_epoch=after,
               keep_state=lambda: _state(model), load_state=model.load_state_dict, loss_weights=_weights(ctx, train.labels),
               skip_single=train_bn, progress=ctx.progress, on_epoch=ctx.on_epoch, trainable_blocks=len(model.blocks))


def _state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _replayed(ctx: Context, name: str) -> RunResult | None:
    done = ctx.progress.result(name) if ctx.progress is not None else None
    return RunResult.from_dict(done) if done is not None else None


def _finish(ctx: Context, name: str, run: RunResult, track: str, model) -> None:
    if ctx.progress is not None:
        ctx.progress.finish(name, run.to_dict(), track, model)


@dataclass
class TransferOutcome:
    runs: list[RunResult]
    best: RunResult
    start: int  # the first thawed block of the winner (len(blocks) when only the classifier trained)
    base: int | None  # where the activation cache sits (None: no cache)
    why: str
    cache_plain: tuple | None = None  # ((train x, y), (val x, y)) at base, eval views only (for the diagnostics)
    cache_seconds: float = 0.0  # running the frozen bottom once


def transfer(ctx: Context, model, strategy: str, unfreeze: tuple[int, ...], train: ImageSet, val: ImageSet,
             track: str = "transfer") -> TransferOutcome:
    """Run ``strategy`` on a pretrained ``model``; it ends holding the winner's weights. ``track`` names its runs
    in the resume file (the curve runs the same strategy on other tracks)."""
    depth = len(model.blocks)
    steps = plan(strategy, depth, unfreeze)
    cached = [k for k in steps if k < depth]
    base, t0 = None, time.perf_counter()
    if cached:
        base = depth - max(cached)
        train_base = cache_activations(model, train, base, ctx.views, ctx.device, ctx.batch_size, "caching train activations", ctx.world.writer)
        val_base = cache_activations(model, val, base, 1, ctx.device, ctx.batch_size, "caching val activations", ctx.world.writer)
    cache_seconds = round(time.perf_counter() - t0, 2)
    if ctx.progress is not None:
        ctx.progress.restore(track, model)
    model.to(ctx.device)
    runs: list[RunResult] = []
    best: RunResult | None = None
    best_start = depth
    why = ""
    for k, thawed in enumerate(steps):
        start = depth - thawed
        name = "feature-extraction" if thawed == 0 else "full" if (thawed == depth and strategy == "full") else f"unfreeze-top-{thawed}" if thawed < depth else "unfreeze-all"
        run_name = f"{track}/{name}"
        # staged: each step lr_decay times the one before; full and auto's last step: every layer at full_lr
        lr = ctx.full_lr if strategy in ("full", "auto") and thawed == depth else ctx.lr * ctx.lr_decay ** k
        previous = _state(model)
        run = _replayed(ctx, run_name)
        if run is None:
            if thawed < depth:
                run = run_cached(ctx, model, name, start, lr, (carry(model, train_base[0], base, start, ctx.device), train_base[1]),
                                 (carry(model, val_base[0], base, start, ctx.device), val_base[1]))
            else:
                step_ctx = ctx
                if strategy == "auto":
                    step_ctx = replace(ctx, settings=replace(ctx.settings, warmup_epochs=min(ctx.settings.warmup_epochs, AUTO_LAST_STEP_WARMUP)))
                run = run_images(step_ctx, model, name, lr, train, val, train_bn=False, epochs=step_epochs(strategy, thawed, depth, ctx.epochs))
            if best is not None and not earns_its_keep(run, best):
                run.accepted = False
                model.load_state_dict(previous)
            run.decision = _decision(run, best)
            _finish(ctx, run_name, run, track, model)
        runs.append(run)
        if not run.accepted:
            why = f"{best.name} won: the next step, {run.name}, was {run.decision}; thawing stopped there"
            break
        gained = best is None or run.val_accuracy > best.val_accuracy
        best, best_start = run, start
        if strategy == "auto" and not gained:
            why = f"{run.name} won: it matched the previous top-1 with a lower loss; more thawing would cost more for no top-1 so far"
            break
    if not why:
        why = (f"{best.name} won: every step that was tried improved validation" if len(runs) > 1
               else f"{best.name}: the only step of strategy {strategy}")
    plain = None
    if base is not None:
        n = len(train)
        plain = ((train_base[0][:n], train_base[1][:n]), val_base)  # view 0 comes first in the cache
    return TransferOutcome(runs, best, best_start, base, why, plain, cache_seconds)


def _decision(run: RunResult, previous: RunResult | None) -> str:
    if previous is None:
        return f"first step: val top-1 {run.val_accuracy:.4f} in {run.epochs_run} epochs, {run.seconds:.1f} s"
    delta = (run.val_accuracy - previous.val_accuracy) * 100
    verdict = "kept" if run.accepted else "rejected"
    return (f"{verdict}: val top-1 {run.val_accuracy:.4f} vs {previous.val_accuracy:.4f} ({delta:+.1f} pt), val loss "
            f"{run.val_loss:.4f} vs {previous.val_loss:.4f}, cost {run.epochs_run} epochs, {run.seconds:.1f} s")


def scratch(ctx: Context, model, train: ImageSet, val: ImageSet, epochs: int, track: str = "scratch") -> RunResult:
    """The from-scratch baseline: the same loop, augmentation, batch, schedule and lr on a randomly initialized
    model, every layer and BatchNorm training."""
    run_name = f"{track}/from-scratch"
    run = _replayed(ctx, run_name)
    if ctx.progress is not None:
        ctx.progress.restore(track, model)
    if run is None:
        run = run_images(ctx, model, "from-scratch", ctx.lr, train, val, train_bn=True, epochs=epochs)
        run.decision = f"baseline: val top-1 {run.val_accuracy:.4f} in {run.epochs_run} epochs, {run.seconds:.1f} s"
        _finish(ctx, run_name, run, track, model)
    model.to(ctx.device)
    return run


def subset(samples, fraction: float, seed: int):
    """A stratified share of ``samples`` (at least one per class); smaller shares are subsets of larger ones."""
    import random

    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out = []
    for label in sorted(by_class):
        items = list(by_class[label])
        random.Random(seed * 1000 + label).shuffle(items)
        out += items[: max(1, math.ceil(len(items) * fraction))]
    return sorted(out, key=lambda s: str(s.path))


__all__ = ["AUTO_LAST_STEP_SHARE", "AUTO_LAST_STEP_WARMUP", "Context", "STRATEGIES", "TransferOutcome", "cache_activations", "carry", "earns_its_keep", "plan",
           "recompute_bn_statistics", "run_cached", "run_images", "scratch", "set_train_mode", "step_epochs", "subset", "transfer"]
