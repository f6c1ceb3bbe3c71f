"""A tiny model whose logits actually depend on the image, carried through export and quantize once per process.

Why not only ``tiny_pipeline``: its quality depends on what ``finetune`` does with a randomly initialised tiny
network on 48 images (with PyTorch's default init and frozen eval-mode BN its logits were the same for every
image, which makes parity and INT8-agreement checks pass trivially). Here the whole network is trained for a few
full-batch steps with BN in train mode and the BN statistics are re-estimated, which gives input-dependent logits
with healthy margins in a few seconds, whatever finetune does. Export and quantization are the real tledge
functions.
"""

from __future__ import annotations

from pathlib import Path

ARCH = "test_efficientnet_lite"
_CACHE: dict[str, Path] = {}


def train_tiny_checkpoint(data: Path, path: Path, steps: int = 15, seed: int = 0) -> Path:
    import torch

    from tledge.data.images import load_array
    from tledge.data.splits import load_splits
    from tledge.models import create_model, save_checkpoint

    splits = load_splits(data)
    model, spec = create_model(ARCH, weights="none", num_classes=len(splits.classes), seed=seed)
    x, y = load_array(splits.train, spec.preprocess)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 0.3
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    for bn in bns:  # exact BN statistics of the training set for eval mode
        bn.momentum = None
        bn.reset_running_stats()
    with torch.no_grad():
        model(xt)
    model.eval()
    return save_checkpoint(path, model, ARCH, splits.classes, spec.preprocess)


def trained_pipeline(data: Path, tmp_path_factory) -> Path:
    """Folder with model.pt, model.fp32.onnx, model.int8.qdq.onnx, model.int8.cpu.onnx, calibration.json (cached)."""
    key = str(data)
    if key not in _CACHE:
        from tledge.export.onnx_export import ExportConfig, export_onnx
        from tledge.quant.quantize import QuantizeConfig, quantize

        out = tmp_path_factory.mktemp("trained_tiny")
        train_tiny_checkpoint(data, out / "model.pt")
        export_onnx(ExportConfig(checkpoint=out / "model.pt", out=out / "model.fp32.onnx", data=data))
        quantize(QuantizeConfig(model=out / "model.fp32.onnx", data=data, out_dir=out, num_images=24, fallback_layers=0))
        _CACHE[key] = out
    return _CACHE[key]
