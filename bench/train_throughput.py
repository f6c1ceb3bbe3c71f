"""Training throughput: images/s of the loader alone, the network alone and both together, FP32 vs AMP +
channels_last, so a run says whether the loader or the device is the bottleneck.

    python bench/train_throughput.py --device cuda --image-size 224 --batch-size 128      # the GPU machine
    python bench/train_throughput.py --device cpu --model test_efficientnet_lite --image-size 32 --steps 5

The loader is tledge's own (decoded images in memory, augmentation preset "light", pinned memory and
persistent workers on CUDA); the network step is the loop's (AdamW, autocast, channels_last, label smoothing).
Whole-network training, every layer trainable, BatchNorm frozen as in the ``full`` strategy.
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    import torch

    from tledge.data.datasets import digits_dataset
    from tledge.data.splits import load_splits
    from tledge.models import create_model
    from tledge.train.augment import preset
    from tledge.train.distributed import World, resolve_device
    from tledge.train.finetune import resolve_preprocess
    from tledge.train.loader import ImageSet, make_loader
    from tledge.train.loop import amp_dtype, to_device
    from tledge.train.surgery import param_groups, set_train_mode

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="ImageFolder root (default: the digits)")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="none", help="weights do not change the speed; 'none' needs no download")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement (after 5 warm-up steps)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args()

    world = World()
    device = resolve_device(args.device, world)
    data = args.data or digits_dataset()
    splits = load_splits(data)
    model, spec = create_model(args.model, args.weights, num_classes=len(splits.classes))
    pre = resolve_preprocess(spec.preprocess, args.image_size, args.image_size if args.data is None else None)
    t = time.perf_counter()
    images = ImageSet(splits.train, pre, preset("light"), seed=0)
    decode_s = time.perf_counter() - t
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                           "cpu_count": __import__("os").cpu_count()},
               "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size, "train_images": len(images),
               "decode": {"seconds": round(decode_s, 2), "images_per_s": round(len(images) / max(decode_s, 1e-9), 1), "in_memory": images.cached},
               "variants": {}}

    def batches(loader, sampler, n):
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for b in loader:
                yield b
                n -= 1
                if n <= 0:
                    return
            epoch += 1

    loader, sampler = make_loader(images, args.batch_size, 0, device, world, workers=args.workers)
    n = args.steps + 5
    it = batches(loader, sampler, n)
    for _ in range(5):
        next(it)
    t = time.perf_counter()
    seen = sum(len(y) for _, y in it)
    results["loader_images_per_s"] = round(seen / (time.perf_counter() - t), 1)

    model.to(device)
    for name, amp, cl in (("fp32", "off", False), ("amp+channels_last", "auto", True)):
        dtype = amp_dtype(amp, device)
        cl = cl and device.type == "cuda"
        if cl:
            model.to(memory_format=torch.channels_last)
        groups = param_groups(model, 0, 1e-4, 0.8)
        opt = torch.optim.AdamW(groups, weight_decay=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

        def step(x, y):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        set_train_mode(model, 0, False)
        x0, y0 = next(iter(loader))
        x0, y0 = to_device(x0, device, cl), y0.to(device)
        for _ in range(5):
            step(x0, y0)
        _sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            step(x0, y0)
        _sync(device)
        net_ips = args.steps * len(y0) / (time.perf_counter() - t)

        it = batches(loader, sampler, n)
        for _ in range(5):
            x, y = next(it)
            step(to_device(x, device, cl), y.to(device, non_blocking=True))
        _sync(device)
        t, seen = time.perf_counter(), 0
        for x, y in it:
            step(to_device(x, device, cl), y.to(device, non_blocking=True))
            seen += len(y)
        _sync(device)
        both_ips = seen / (time.perf_counter() - t)
        if cl:
            model.to(memory_format=torch.contiguous_format)
        results["variants"][name] = {
            "amp": str(dtype).replace("torch.", "") if dtype else "off", "channels_last": cl,
            "network_images_per_s": round(net_ips, 1), "end_to_end_images_per_s": round(both_ips, 1),
            # the loader keeps up when training with it runs within 10% of the network alone
            "bottleneck": "network" if both_ips >= 0.9 * net_ips else "loader",
        }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        from tledge.artifacts import write_text

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
