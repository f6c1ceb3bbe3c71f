"""Fine-tuning strategies side by side on one data set: each fixed strategy (the exhaustive search), ``auto``, and
training from scratch, with the same split, loop, augmentation, epoch cap and patience; then linear probing on
cached features against the same head trained with the frozen backbone run on every batch.

    python bench/strategies.py --out bench/strategies-digits.json                                   # the default data
    python bench/strategies.py --data ../shared/data/neu-surface-defects --image-size 128 --out bench/strategies-neu.json

Compute is counted in multiply-accumulates (MACs), which no other job on the machine can change: per epoch, each
training image costs 3x the forward MACs of the layers that train (forward and backward) and each validation image
their forward MACs; a strategy that caches frozen layers pays their forward MACs once per image. The process's
CPU and wall seconds are recorded too (on a shared machine they vary with the load). "Exhaustive" is linear + staged + full: what a user would run to find the best fixed strategy.
Targets (issue 9): ``auto`` within 0.5 pt of val top-1 of the exhaustive best at <= 40% of its compute; cached
features >= 10x faster per epoch than running the backbone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

FIXED = ("linear", "staged", "full")


def block_macs(image_size: int, num_classes: int) -> dict:
    """Forward MACs per image of each block, and of the neck and head together, at ``image_size``."""
    import torch

    from tledge.models import create_model

    model, _ = create_model("efficientnet_lite0", "none", num_classes=num_classes)
    counts: dict[str, int] = {}

    def hook(name):
        def count(module, inputs, output):
            if isinstance(module, torch.nn.Conv2d):
                k = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
                counts[name] = counts.get(name, 0) + output.numel() * k
            elif isinstance(module, torch.nn.Linear):
                counts[name] = counts.get(name, 0) + output.numel() * module.in_features
        return count

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            part = name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks.") else "")
            module.register_forward_hook(hook(part))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    depth = len(model.blocks)
    return {"blocks": [counts.get(f"blocks.{i}", 0) for i in range(depth)], "top": counts.get("neck", 0) + counts.get("head", 0)}


def run_macs(runs: list[dict], macs: dict, n_train: int, n_val: int) -> int:
    """MACs of one strategy's runs (see the module docstring); ``runs``: ``trainable_blocks`` and ``epochs_run``."""
    blocks, depth = macs["blocks"], len(macs["blocks"])
    trained = lambda k: sum(blocks[depth - k:]) + macs["top"] if k else macs["top"]  # noqa: E731
    total = 0
    cached = [r["trainable_blocks"] for r in runs if r["trainable_blocks"] < depth]
    if cached:  # the frozen bottom below the deepest cached step, once per image
        total += (n_train + n_val) * sum(blocks[: depth - max(cached)])
    for r in runs:
        total += r["epochs_run"] * (3 * n_train + n_val) * trained(r["trainable_blocks"])
    return int(total)


def _run(cfg, splits) -> dict:
    from tledge.train.finetune import finetune

    wall, cpu = time.perf_counter(), time.process_time()
    record = finetune(cfg, splits=splits)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    st = record["strategy"]
    return {"strategy": st["name"], "plan": st["plan"], "winner": st["winner"], "why": st["why"],
            "epochs": st["cost"]["epochs"], "val_top1": record["result"]["val_accuracy"],
            "test_top1": record["result"].get("test_accuracy"), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "runs": [{k: s[k] for k in ("name", "trainable_blocks", "epochs_run", "val_accuracy", "accepted", "seconds")} for s in record["stages"]]}


def cached_vs_backbone(splits, image_size: int, batch_size: int, epochs: int) -> dict:
    """Seconds per epoch of the same linear head trained on cached features and on features computed by the frozen
    backbone from each (augmented) batch; the cache's one-off cost is recorded with it."""
    import torch

    from tledge.models import create_model
    from tledge.train.augment import preset
    from tledge.train.finetune import resolve_preprocess
    from tledge.train.loader import ImageSet
    from tledge.train.surgery import cache_activations, param_groups, set_train_mode

    model, spec = create_model("efficientnet_lite0", "pretrained", num_classes=len(splits.classes))
    pre = resolve_preprocess(spec.preprocess, image_size, None)
    images = ImageSet(splits.train, pre, preset("light"), seed=0)
    depth = len(model.blocks)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def head_step(opt, feats, y):
        loss = loss_fn(model.forward_from(feats, depth), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    feats, labels = cache_activations(model, images, depth, 1, torch.device("cpu"), batch_size, show=False)
    cache_s = time.perf_counter() - t

    opt = torch.optim.AdamW(param_groups(model, depth, 1e-3, 0.8))
    set_train_mode(model, depth, False)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            head_step(opt, feats[idx], labels[idx])
    cached_epoch_s = (time.perf_counter() - t) / epochs

    opt = torch.optim.AdamW(param_groups(model, depth, 1e-3, 0.8))
    t = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g).tolist()
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            x = torch.stack([torch.from_numpy(images.view(i, epoch)) for i in idx])
            model.eval()  # the frozen backbone: running statistics, no graph
            with torch.inference_mode():
                f = model.forward_blocks(x, 0, depth)
            set_train_mode(model, depth, False)
            head_step(opt, f.clone(), torch.from_numpy(images.labels[idx]))
    backbone_epoch_s = (time.perf_counter() - t) / epochs
    return {"train_images": len(images), "image_size": image_size, "batch_size": batch_size, "epochs_timed": epochs,
            "cache_once_s": round(cache_s, 2), "cached_epoch_s": round(cached_epoch_s, 4),
            "backbone_epoch_s": round(backbone_epoch_s, 3), "speedup_per_epoch": round(backbone_epoch_s / cached_epoch_s, 1),
            "break_even_epochs": round(cache_s / max(backbone_epoch_s - cached_epoch_s, 1e-9), 2),
            "note": "the backbone path decodes nothing (images are in memory) and runs the light augmentation, as training would"}


def main() -> None:
    from tledge.data.datasets import digits_dataset
    from tledge.data.splits import load_splits
    from tledge.machine import machine_info
    from tledge.train.finetune import FinetuneConfig
    from tledge.train.strategies import AUTO_LAST_STEP_SHARE, AUTO_LAST_STEP_WARMUP

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="ImageFolder root (default: the digits of the default build)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=15, help="per step (and for scratch), at most")
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--strategies", default="linear,staged,full,auto,scratch")
    ap.add_argument("--probe-epochs", type=int, default=2, help="epochs timed in the cached-vs-backbone comparison (0: skip it)")
    ap.add_argument("--out", default=None, help="JSON, rewritten after every row")
    ap.add_argument("--keep", default=None, help="a JSON of an earlier run of this script with the same settings: its rows are kept, not run again")
    ap.add_argument("--rerun", default="", help="with --keep: rows of it to run again (e.g. auto, after a change to it)")
    args = ap.parse_args()

    data = Path(args.data) if args.data else digits_dataset()
    splits = load_splits(data)
    started = time.perf_counter()
    result = {"machine": machine_info(), "data": str(data), "dataset": splits.summary(),
              "settings": {"model": "efficientnet_lite0", "image_size": args.image_size, "epochs": args.epochs,
                           "patience": args.patience, "batch_size": args.batch_size, "augment": "light", "seed": 0},
              "finetune_defaults": {**{k: getattr(FinetuneConfig, k) for k in ("lr", "lr_decay", "full_lr", "layer_decay", "warmup_epochs")},
                                    "auto_last_step_share": AUTO_LAST_STEP_SHARE, "auto_last_step_warmup_epochs": AUTO_LAST_STEP_WARMUP},
              "rows": {}}
    if args.keep:
        earlier = json.loads(Path(args.keep).read_text())
        if earlier["settings"] != result["settings"] or earlier["data"] != result["data"]:
            raise SystemExit(f"{args.keep} was run with other settings or data: {earlier['settings']}")
        rerun = set(filter(None, args.rerun.split(",")))
        result["rows"] = {name: {**row, "kept_from": row.get("kept_from", args.keep)} for name, row in earlier["rows"].items() if name not in rerun}
        if not args.probe_epochs and "cached_vs_backbone" in earlier:
            result["cached_vs_backbone"] = {**earlier["cached_vs_backbone"], "kept_from": args.keep}
    print(json.dumps(result["machine"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="tledge-bench-strategies-") as tmp:
        for name in args.strategies.split(","):
            if name in result["rows"]:
                continue
            common = dict(data=data, out=Path(tmp) / name, image_size=args.image_size, epochs=args.epochs, patience=args.patience,
                          batch_size=args.batch_size, resume=False)
            cfg = FinetuneConfig(**common, weights="none") if name == "scratch" else FinetuneConfig(**common, strategy=name)
            row = _run(cfg, splits)
            result["rows"][name] = row
            print(f"{name:8s} val {row['val_top1']:.4f} test {row['test_top1']:.4f} epochs {row['epochs']:3d} "
                  f"cpu {row['cpu_s']:8.1f} s wall {row['wall_s']:7.1f} s  {row['why']}", flush=True)
            if args.out:  # a long run keeps what it measured if it is stopped
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    rows = result["rows"]
    macs = block_macs(args.image_size, len(splits.classes))
    result["forward_macs_per_image"] = {"blocks": macs["blocks"], "neck_and_head": macs["top"]}
    for row in rows.values():
        if row.get("runs"):
            row["gmacs"] = round(run_macs(row["runs"], macs, len(splits.train), len(splits.val)) / 1e9, 1)
    if all(s in rows for s in (*FIXED, "auto")):
        best = max(FIXED, key=lambda s: (rows[s]["val_top1"], -rows[s].get("gmacs", 0)))
        exhaustive = sum(rows[s]["gmacs"] for s in FIXED)
        gap = round((rows[best]["val_top1"] - rows["auto"]["val_top1"]) * 100, 2)
        share = round(rows["auto"]["gmacs"] / exhaustive, 3)
        result["auto_vs_exhaustive"] = {
            "best_fixed": best, "best_val_top1": rows[best]["val_top1"], "auto_val_top1": rows["auto"]["val_top1"],
            "auto_behind_best_pp": gap, "exhaustive_gmacs": round(exhaustive, 1), "auto_gmacs": rows["auto"]["gmacs"],
            "auto_share_of_exhaustive_compute": share, "auto_chose": rows["auto"]["winner"],
            "exhaustive_cpu_s": round(sum(rows[s]["cpu_s"] for s in FIXED), 1), "auto_cpu_s": rows["auto"]["cpu_s"],
            "target_met": gap <= 0.5 and share <= 0.4}
        print(json.dumps(result["auto_vs_exhaustive"]), flush=True)
    if "scratch" in rows:
        ref = max((rows[s] for s in rows if s != "scratch"), key=lambda r: r["val_top1"])
        result["transfer_gain_pp"] = round((ref["val_top1"] - rows["scratch"]["val_top1"]) * 100, 2)
    if args.probe_epochs:
        result["cached_vs_backbone"] = cached_vs_backbone(splits, args.image_size, args.batch_size, args.probe_epochs)
        print(json.dumps(result["cached_vs_backbone"]), flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
