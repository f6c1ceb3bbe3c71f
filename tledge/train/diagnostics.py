"""What a fine-tune reports beside its model: whether transfer beat the from-scratch baseline, the confusion matrix,
the generalization gap, the sample-efficiency curve, and the summary printed at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tledge.data.splits import Splits

if TYPE_CHECKING:  # finetune.py's config; the diagnostics only read it
    from tledge.train.finetune import FinetuneConfig


CURVE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def transfer_baseline(best, scratch_run, runs, scratch_epochs: int, epochs: int) -> dict:
    """Transfer gain = transfer's val top-1 - scratch's, and a verdict a reader cannot miss."""
    gain = round((best.val_accuracy - scratch_run.val_accuracy) * 100, 2)
    if gain > 0:
        verdict, message = "positive transfer", f"transfer beat training from scratch by {gain:.1f} pt of val top-1"
    elif gain == 0:
        verdict = "NO TRANSFER GAIN"
        message = f"NO TRANSFER GAIN: training from scratch reached the same val top-1 ({scratch_run.val_accuracy:.4f}) as transfer"
    else:
        verdict = "NEGATIVE TRANSFER"
        message = (f"NEGATIVE TRANSFER: training from scratch beat the pretrained model by {-gain:.1f} pt of val top-1 "
                   f"({scratch_run.val_accuracy:.4f} vs {best.val_accuracy:.4f}); the pretrained features do not fit this data")
    cheap = scratch_epochs < epochs
    return {
        "scratch": scratch_run.to_dict(),
        "transfer_val_accuracy": round(best.val_accuracy, 5), "scratch_val_accuracy": round(scratch_run.val_accuracy, 5),
        "transfer_gain_pp": gain, "verdict": verdict, "message": message,
        "budget": {"scratch_epochs": scratch_epochs, "transfer_epochs_per_step": epochs, "transfer_epochs_run": sum(r.epochs_run for r in runs),
                   "scratch_epochs_run": scratch_run.epochs_run, "transfer_seconds": round(sum(r.seconds for r in runs), 2),
                   "scratch_seconds": scratch_run.seconds, "cheap": cheap},
        "fairness": ("same loop, augmentation preset, batch size, schedule and base learning rate"
                     + (f"; a cheap baseline ({scratch_epochs} epochs against up to {epochs} per transfer step): a positive gain is an upper bound, "
                        "a gain <= 0 is conclusive" if cheap else "; the same epoch cap as one transfer step")),
    }


def confusion(logits, labels, classes: list[str]) -> dict:
    import numpy as np

    pred = logits.argmax(1).numpy()
    y = labels.numpy()
    n = len(classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (y, pred), 1)
    per_class = {c: round(float(matrix[i, i] / matrix[i].sum()), 5) if matrix[i].sum() else None for i, c in enumerate(classes)}
    return {"accuracy": round(float((pred == y).mean()), 5) if len(y) else None, "per_class_accuracy": per_class,
            "confusion_matrix": {"rows": "true class", "columns": "predicted class", "classes": classes, "counts": matrix.tolist()}}


def fit_diagnostics(model, outcome, train_set, val_set, splits: Splits, pre, cfg: FinetuneConfig, device) -> dict:
    """Eval-mode accuracy on train (plain views) and val, the generalization gap, per-class accuracy and
    confusion matrices; learning curves are each run's ``history``."""
    import torch

    from tledge.train import strategies as S
    from tledge.train.loader import ImageSet
    from tledge.train.loop import predict

    model.to(device).eval()
    batch = cfg.batch_size * 2
    if outcome.base is not None and outcome.start >= outcome.base:  # nothing below the cache trained
        (tx, ty), (vx, vy) = outcome.cache_plain
        forward = lambda x: model.forward_from(x, outcome.base)  # noqa: E731  the cache holds the eval views, frozen below base
        train = predict(forward, S.tensor_batches(tx, ty, batch), device)
        val = predict(forward, S.tensor_batches(vx, vy, batch), device)
    else:
        train = predict(model, S.image_batches(train_set, batch), device)
        val = predict(model, S.image_batches(val_set, batch), device)
    out = {"train": confusion(*train, splits.classes), "val": confusion(*val, splits.classes)}
    out["generalization_gap_pp"] = round((out["train"]["accuracy"] - out["val"]["accuracy"]) * 100, 2)
    out["learning_curves"] = "stages[*].history (and baseline.scratch.history): train loss and accuracy, val loss and accuracy, lr per epoch"
    if splits.test:
        test_set = ImageSet(splits.test, pre, None, cfg.seed)
        logits, labels = predict(model, S.image_batches(test_set, batch), device)
        out["test_split"] = confusion(logits, labels, splits.classes)
        loss = float(torch.nn.functional.cross_entropy(logits, labels)) if len(labels) else float("nan")
        out["test"] = {"test_accuracy": out["test_split"]["accuracy"], "test_loss": loss}
    return out


def sample_efficiency_curve(cfg: FinetuneConfig, ctx, splits: Splits, train_set, val_set, best, baseline: dict, scratch_epochs: int, outcome) -> dict:
    """Validation top-1 of transfer (the same strategy) and of scratch at each share of the training labels."""
    from tledge.models import create_model
    from tledge.train import strategies as S
    from tledge.train.distributed import log

    rows = []
    for fraction in CURVE_FRACTIONS:
        if fraction == 1.0:
            t_acc, s_acc, n = best.val_accuracy, baseline["scratch_val_accuracy"], len(splits.train)
        else:
            sub = train_set.subset(S.subset(splits.train, fraction, cfg.seed))
            tag = f"curve-{round(fraction * 100)}"
            m, _ = create_model(cfg.model, cfg.weights, num_classes=len(splits.classes), seed=cfg.seed)
            t_acc = S.transfer(ctx, m, cfg.strategy, cfg.unfreeze, sub, val_set, track=f"{tag}/transfer").best.val_accuracy
            m, _ = create_model(cfg.model, "none", num_classes=len(splits.classes), seed=cfg.seed)
            s_acc = S.scratch(ctx, m, sub, val_set, scratch_epochs, track=f"{tag}/scratch").val_accuracy
            n = len(sub)
            del m
        rows.append({"fraction": fraction, "train_images": n, "transfer_val_accuracy": round(t_acc, 5),
                     "scratch_val_accuracy": round(s_acc, 5), "transfer_gain_pp": round((t_acc - s_acc) * 100, 2)})
        log(ctx.world, f"curve {fraction:.0%}: transfer {t_acc:.4f}, scratch {s_acc:.4f}")
    return {"fractions": list(CURVE_FRACTIONS), "strategy": cfg.strategy, "scratch_epochs": scratch_epochs, "rows": rows,
            "split": "val", "subsets": "stratified, seeded, each share a subset of the next; at least one image per class"}


def format_summary(record: dict) -> str:
    """The record for a terminal: each run, the transfer verdict, the gap, the curve."""
    lines = [f"strategy {record['strategy']['name']}: {record['strategy']['why']}"]
    for s in record["stages"]:
        lines.append(f"  {s['name']:<22} val top-1 {s['val_accuracy']:.4f}  epochs {s['epochs_run']:>3}  {s['seconds']:>7.1f} s  {'kept' if s['accepted'] else 'rejected'}")
    b = record.get("baseline")
    if b:
        lines.append(f"  {'from-scratch baseline':<22} val top-1 {b['scratch_val_accuracy']:.4f}  epochs {b['scratch']['epochs_run']:>3}  {b['scratch']['seconds']:>7.1f} s")
        lines.append(f"transfer gain {b['transfer_gain_pp']:+.1f} pt: {b['verdict']}" + (" (cheap baseline)" if b["budget"]["cheap"] else ""))
    d = record["diagnostics"]
    lines.append(f"generalization gap (train - val top-1, eval mode): {d['generalization_gap_pp']:+.1f} pt")
    if record.get("curve"):
        lines.append("fraction  images  transfer  scratch  gain (pt)")
        for r in record["curve"]["rows"]:
            lines.append(f"{r['fraction']:>8.0%}  {r['train_images']:>6}  {r['transfer_val_accuracy']:>8.4f}  {r['scratch_val_accuracy']:>7.4f}  {r['transfer_gain_pp']:>+9.1f}")
    return "\n".join(lines)
