"""Parts of a backbone to train: the top blocks from a given depth, their train/eval mode and learning-rate groups, the
activations of the frozen part cached once, and BatchNorm statistics recomputed for the weights that were kept."""

from __future__ import annotations

from typing import Callable

from tledge.train.loader import ImageSet

PRECISE_BN_IMAGES = 512


def top_blocks(model, start: int):
    """The module that trains: logits from the activation entering ``blocks[start]``."""
    from torch import nn

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.forward_from(x, start)

    return Top()


def set_train_mode(model, start: int, train_bn: bool) -> None:
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


def param_groups(model, start: int, lr: float, layer_decay: float) -> list[dict]:
    """Freeze all but ``blocks[start:]``, neck and head; the classifier at ``lr``, block ``d`` below the top at
    ``lr * layer_decay**d`` (discriminative learning rates: lower layers hold more general features)."""
    for p in model.parameters():
        p.requires_grad_(False)
    depth = len(model.blocks)
    groups = [{"name": "head", "params": [*model.neck.parameters(), *model.head.parameters()], "lr": lr}]
    for j in range(depth - 1, start - 1, -1):
        groups.append({"name": f"block{j}", "params": list(model.blocks[j].parameters()), "lr": lr * layer_decay ** (depth - j)})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return [g for g in groups if g["params"]]


def cache_activations(model, images: ImageSet, stop: int, views: int, device, batch_size: int, desc: str = "caching activations",
                      show: bool = True):
    """``blocks[:stop]`` run once over ``images``: view 0 is the eval input, views 1.. are augmented (seeded by
    view and image). Returns (activations, labels) on the CPU, view-major."""
    import numpy as np
    import torch
    from tqdm import tqdm

    model.eval()  # frozen blocks use their running statistics, never batch statistics
    model.to(device)
    feats, labels = [], []
    n = len(images)
    # minutes at 224 px on a CPU: a bar says how far it got
    bar = tqdm(total=views * ((n + batch_size - 1) // batch_size), desc=desc, unit="batch", leave=False, disable=not show)
    with torch.inference_mode():
        for v in range(views):
            for s in range(0, n, batch_size):
                idx = range(s, min(n, s + batch_size))
                x = np.stack([images.view(i, v, plain=v == 0) for i in idx])
                feats.append(model.forward_blocks(torch.from_numpy(x).to(device), 0, stop).cpu())
                labels.append(torch.from_numpy(images.labels[list(idx)]))
                bar.update()
    bar.close()
    return torch.cat(feats), torch.cat(labels)


def carry(model, acts, start: int, stop: int, device, batch_size: int = 256):
    """Carry cached activations from ``blocks[start]`` to ``blocks[stop]`` (eval mode; identity if equal)."""
    import torch

    if start == stop:
        return acts
    model.eval()
    with torch.inference_mode():
        return torch.cat([model.forward_blocks(acts[i : i + batch_size].to(device), start, stop).cpu() for i in range(0, len(acts), batch_size)])


def evaluate_on(forward: Callable, batches, device) -> tuple[float, float]:
    """(top-1, plain cross-entropy) of ``forward`` over (x, y) batches, in eval/inference mode."""
    import torch

    hits, loss, n = 0, 0.0, 0
    with torch.inference_mode():
        for x, y in batches:
            logits = forward(x.to(device)).float()
            y = y.to(device)
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            hits += int((logits.argmax(1) == y).sum())
            n += len(y)
    return hits / max(n, 1), loss / max(n, 1)


def tensor_batches(x, y, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def image_batches(images: ImageSet, batch_size: int, limit: int | None = None):
    import numpy as np
    import torch

    n = len(images) if limit is None else min(limit, len(images))
    for s in range(0, n, batch_size):
        idx = range(s, min(n, s + batch_size))
        yield torch.from_numpy(np.stack([images.view(i, 0, plain=True) for i in idx])), torch.from_numpy(images.labels[list(idx)])


def recompute_bn_statistics(model, images: ImageSet, device, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to their exact average over up to PRECISE_BN_IMAGES training
    images ("precise BN"): running averages lag far behind the weights in short from-scratch runs, and
    validation in eval mode would then judge a network that does not exist."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for x, _ in image_batches(images, batch_size, PRECISE_BN_IMAGES):
            if len(x) > 1:
                model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
