"""A corpus of bad (and awkward but valid) inputs to every command, one table, one parametrized test.

Each case prepares its inputs in a fresh folder, runs the real command (in process, through the typer app) and
asserts the exact outcome: a ``TledgeError`` whose one line names the problem, with no file written anywhere (the
case folder and the shared fixtures are snapshotted before and compared after); or a success whose output is
right. Image cases of every mode and bit depth decode through :func:`tledge.data.images.load_image` and are compared
pixel for pixel. Validation fails before any work, so the whole table runs in seconds.

Outcomes counted for the issue's closing note: ``python -m pytest tests/test_corpus.py -q`` (one test per case).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import make_image_folder
from typer.testing import CliRunner

from tledge.cli import app
from tledge.errors import TledgeError

runner = CliRunner()
UNWRITABLE = "/sys/tledge-corpus/out"  # a probe there fails even for root (sysfs takes no new files)


# --- the context a case builds its inputs in ------------------------------------------------------------------------


class Ctx:
    def __init__(self, tmp: Path, data: Path, pipe: Path, weights: Path):
        self.tmp, self.data, self.pipe, self.weights = tmp, data, pipe, weights

    def p(self, rel: str) -> Path:
        return self.tmp / rel

    def file(self, rel: str, content: bytes | str = b"x") -> Path:
        path = self.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def small_data(self, name: str = "data", bad: dict[str, bytes] | None = None, **split_counts) -> Path:
        """3 classes of tiny PNGs (train 3, val 2 per class by default), plus ``bad`` files {relative path: bytes}."""
        root = make_image_folder(self.p(name), split_counts or {"train": 3, "val": 2})
        for rel, content in (bad or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        return root

    def copy_pipe(self, name: str = "build") -> Path:
        dst = self.p(name)
        shutil.copytree(self.pipe, dst)
        return dst

    def calibration(self, edit: Callable[[dict], None], name: str = "calib.json") -> Path:
        spec = json.loads((self.pipe / "calibration.json").read_text())
        edit(spec)
        return self.file(name, json.dumps(spec))

    def checkpoint(self, edit: Callable[[dict], None], name: str = "model.pt") -> Path:
        import torch

        payload = torch.load(self.pipe / "model.pt", weights_only=True)
        edit(payload)
        path = self.p(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)
        return path

    def onnx(self, edit: Callable, name: str = "model.fp32.onnx") -> Path:
        import onnx

        proto = onnx.load(str(self.pipe / "model.fp32.onnx"))
        edit(proto)
        path = self.p(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
        return path


def _png(array: np.ndarray, color_type: int, bit_depth: int, size: tuple[int, int] | None = None) -> bytes:
    """A PNG written by hand, for what Pillow will not write (16-bit RGB, 2/4-bit gray) and for forged headers."""
    h, w = array.shape[:2]
    if bit_depth < 8:
        bits = np.unpackbits(array.astype(np.uint8)[..., None], axis=-1)[..., 8 - bit_depth :].reshape(h, -1)
        rows = [np.packbits(row).tobytes() for row in bits]
    else:
        rows = [row.astype(">u2" if bit_depth == 16 else "u1").tobytes() for row in array]
    raw = b"".join(b"\x00" + r for r in rows)
    w, h = size or (w, h)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _pil_bytes(img, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _good_png() -> bytes:
    from PIL import Image

    return _pil_bytes(Image.fromarray(np.full((12, 12, 3), 90, np.uint8)), "PNG")


def _float_tiff(values) -> bytes:
    from PIL import Image

    return _pil_bytes(Image.fromarray(np.asarray(values, np.float32)), "TIFF")


# --- the table ------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    make: Callable[[Ctx], object]  # -> argv (command cases) or (image path, expected HxWx3 uint8) (pixel cases)
    expect: str = ""  # a command case: text the one-line error must contain; "" = the command must succeed
    kind: str = "cli"  # "cli", "pixels", or "call" (a library call that must raise the error)
    code: int = 1  # exit status of a failing command (2: a usage error typer reports)
    removes: tuple[str, ...] = ()  # files the failing command must remove (a stale manifest)
    check: Callable[[Ctx], None] | None = None  # a succeeding command: what must be true after
    tolerance: int = 0  # pixel cases: most difference per 8-bit value


def ft(ctx: Ctx, *extra, data=None) -> list:
    """``tledge finetune`` on a tiny dataset with the tiny model, into a fresh folder."""
    return ["finetune", "--data", data or ctx.small_data(), "--out", ctx.p("ft"), "--model", "test_efficientnet_lite",
            "--weights", "none", "--epochs", "1", "--unfreeze", "none", *extra]


def bench(ctx: Ctx, *extra, models=None) -> list:
    return ["bench", *(models or [ctx.pipe / "model.fp32.onnx"]), "--data", ctx.data, "--out-dir", ctx.p("bench"), "--iterations", "2", *extra]


def quant(ctx: Ctx, *extra, model=None) -> list:
    return ["quantize", model or ctx.pipe / "model.fp32.onnx", "--data", ctx.data, "--out-dir", ctx.p("q"), *extra]


def export(ctx: Ctx, *extra, checkpoint=None, out=None) -> list:
    return ["export", checkpoint or ctx.pipe / "model.pt", "--out", out or ctx.p("ex/model.fp32.onnx"), *extra]


def build(ctx: Ctx, *extra, data=None) -> list:
    return ["build", "--data", data or ctx.small_data(), "--out", ctx.p("release"), "--model", "test_efficientnet_lite",
            "--weights", "none", "--epochs", "1", *extra]


def gate(ctx: Ctx, *extra, candidate=None) -> list:
    return ["gate", candidate or ctx.pipe / "model.fp32.onnx", ctx.pipe / "model.fp32.onnx", *extra]


def _nan_state(ctx: Ctx) -> Path:
    import torch

    state = torch.load(ctx.weights, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and "weight" in k)
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(state, ctx.p("nan.pt"))
    return ctx.p("nan.pt")


def _negative_variance(ctx: Ctx) -> Path:
    """Finite weights that compute NaN: a batch norm's running variance below zero (its sqrt is NaN in eval mode)."""
    import torch

    state = torch.load(ctx.weights, weights_only=True)
    name = next(k for k in state if k.endswith("running_var"))
    state[name] = -torch.ones_like(state[name])
    torch.save(state, ctx.p("negvar.pt"))
    return ctx.p("negvar.pt")


def _nan_checkpoint(payload: dict) -> None:
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point() and "weight" in k)
    payload["state_dict"][name][:] = float("nan")


def _set_meta(proto, **changes) -> None:
    from tledge.export.onnx_io import read_metadata, set_metadata

    set_metadata(proto, {**read_metadata(proto), **changes})


def _corrupt_byte(path: Path, offset_fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


def _manifest_first(ctx: Ctx, name: str = "build") -> Path:
    folder = ctx.copy_pipe(name)
    (folder / "manifest.json").write_text('{"format": "tledge.manifest/2", "stale": true}')
    return folder


def _bundled_ok(ctx: Ctx) -> None:
    from tledge.artifacts import sha256_file

    folder = ctx.p("büild ok")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {a["path"] for a in manifest["artifacts"]} >= {"model.fp32.onnx", "model.int8.cpu.onnx", "model.pt", "quantize.json"}
    assert all(sha256_file(folder / a["path"]) == a["sha256"] for a in manifest["artifacts"])


def _exported_ok(ctx: Ctx) -> None:
    from tledge.export.onnx_io import onnx_metadata

    out = ctx.p("ünï cödé/my model.onnx")
    assert onnx_metadata(out)["classes"] == ["circle", "square", "stripes"]
    assert json.loads((out.parent / "export.json").read_text())["sha256"]["my model.onnx"]


def _symlinked_data(ctx: Ctx) -> Path:
    root = ctx.small_data()
    target = root / "train" / "circle" / "000.png"
    os.symlink(ctx.p("gone.png"), root / "train" / "circle" / "link.png")
    assert target.exists()
    return root


CLI_CASES = [
    # option ranges
    Case("finetune-image-size-0", lambda c: ft(c, "--image-size", "0"), "--image-size must be at least 8, got 0"),
    Case("finetune-image-size-negative", lambda c: ft(c, "--image-size", "-5"), "--image-size must be at least 8"),
    Case("finetune-resize-4", lambda c: ft(c, "--resize", "4"), "--resize must be at least 8"),
    Case("finetune-lr-nan", lambda c: ft(c, "--lr", "nan"), "--lr must be a finite number"),
    Case("finetune-lr-0", lambda c: ft(c, "--lr", "0"), "lr > 0"),
    Case("finetune-lr-decay-2", lambda c: ft(c, "--lr-decay", "2"), "lr_decay in (0, 1]"),
    Case("finetune-full-lr-0", lambda c: ft(c, "--full-lr", "0"), "--full-lr must be greater than 0"),
    Case("finetune-epochs-0", lambda c: ft(c, "--epochs", "0"), "epochs must be at least 1"),
    Case("finetune-batch-size-0", lambda c: ft(c, "--batch-size", "0"), "batch_size must be at least 1"),
    Case("finetune-unfreeze-decreasing", lambda c: ft(c, "--unfreeze", "3,2"), "increasing positive block counts"),
    Case("finetune-epochs-not-a-number", lambda c: ft(c, "--epochs", "many"), "", code=2),
    Case("bench-max-images-0", lambda c: bench(c, "--max-images", "0"), "--max-images must be at least 1, got 0"),
    Case("bench-max-images-negative", lambda c: bench(c, "--max-images", "-1"), "--max-images must be at least 1, got -1"),
    Case("bench-threads-negative", lambda c: bench(c, "--threads", "-1"), "--threads must be at least 1, got -1"),
    Case("bench-threads-0", lambda c: bench(c, "--threads", "0"), "--threads must be at least 1, got 0"),
    Case("bench-batch-size-0", lambda c: bench(c, "--batch-size", "0"), "at least 1"),
    Case("export-atol-negative", lambda c: export(c, "--atol", "-1"), "--atol must be at least 0, got -1.0"),
    Case("export-rtol-nan", lambda c: export(c, "--rtol", "nan"), "--rtol must be a finite number"),
    Case("export-opset-9", lambda c: export(c, "--opset", "9"), "opset must be within 13..21"),
    Case("build-image-size-0", lambda c: build(c, "--image-size", "0"), "--image-size must be at least 8"),
    Case("build-threads-negative", lambda c: build(c, "--threads", "-1"), "--threads must be at least 1"),
    Case("build-max-top1-drop-nan", lambda c: build(c, "--max-top1-drop", "nan"), "drift budget"),
    Case("quantize-num-calib-0", lambda c: quant(c, "--num-calib", "0"), "--num-calib"),
    Case("quantize-fallback-negative", lambda c: quant(c, "--fallback-layers", "-1"), "--fallback-layers must be 0 or more"),
    Case("quantize-fallback-price-2", lambda c: quant(c, "--fallback-max-slowdown", "2"), "--fallback-max-slowdown must be between 0 and 1"),
    Case("quantize-qat-over-negative", lambda c: quant(c, "--qat-over-float-layers", "-1"), "qat_over_float_layers >= 0"),
    Case("build-fallback-price-nan", lambda c: build(c, "--fallback-max-slowdown", "nan"), "--fallback-max-slowdown must be between 0 and 1"),
    Case("gate-threads-negative", lambda c: gate(c, "--threads", "-1"), "--threads must be at least 0, got -1"),
    Case("gate-confidence-1.5", lambda c: gate(c, "--confidence", "1.5"), "--confidence must be within"),
    # output locations
    Case("finetune-out-is-a-file", lambda c: ft(c)[:3] + ["--out", c.file("ft")] + ft(c)[5:], "exists and is not a folder"),
    Case("finetune-out-under-a-file", lambda c: ft(c)[:3] + ["--out", c.file("plain") / "sub"] + ft(c)[5:], "is a file, not a folder"),
    Case("finetune-out-unwritable", lambda c: ft(c)[:3] + ["--out", UNWRITABLE] + ft(c)[5:], "cannot write in"),
    Case("export-out-is-a-folder", lambda c: export(c, out=c.p("exdir").mkdir() or c.p("exdir")), "is a folder; give a file name"),
    Case("export-out-under-a-file", lambda c: export(c, out=c.file("plain") / "m.onnx"), "is a file, not a folder"),
    Case("export-out-unwritable", lambda c: export(c, out=UNWRITABLE + "/m.onnx"), "cannot write in"),
    Case("export-out-is-the-checkpoint", lambda c: export(c, checkpoint=c.checkpoint(lambda p: None), out=c.p("model.pt")),
         "is the checkpoint itself"),
    Case("quantize-out-dir-is-a-file", lambda c: quant(c)[:4] + ["--out-dir", c.file("q")], "exists and is not a folder"),
    Case("bench-out-dir-is-a-file", lambda c: bench(c)[:4] + ["--out-dir", c.file("bench")] + ["--iterations", "2"], "exists and is not a folder"),
    Case("bench-out-dir-unwritable", lambda c: bench(c)[:4] + ["--out-dir", UNWRITABLE], "cannot write in"),
    Case("build-out-is-a-file", lambda c: build(c)[:3] + ["--out", c.file("release")] + build(c)[5:], "exists and is not a folder"),
    Case("build-out-unwritable", lambda c: build(c)[:3] + ["--out", UNWRITABLE] + build(c)[5:], "cannot write in"),
    Case("gate-out-dir-is-a-file", lambda c: gate(c, "--out-dir", c.file("g")), "exists and is not a folder"),
    Case("gate-summary-is-a-folder", lambda c: gate(c, "--summary", c.tmp), "is a folder; give a file name"),
    Case("bundle-of-a-file", lambda c: ["bundle", c.file("notafolder")], "is not a folder"),
    # data layout
    Case("data-missing", lambda c: ft(c, data=c.p("nowhere")), "does not exist"),
    Case("data-is-a-file", lambda c: ft(c, data=c.file("data.zip")), "is not a folder"),
    Case("data-empty-folder", lambda c: ft(c, data=c.p("empty").mkdir() or c.p("empty")), "has no class folders"),
    Case("data-one-class", lambda c: ft(c, data=make_image_folder(c.p("one"), {"train": 3, "val": 2}, classes=("only",))), "has one class"),
    Case("data-loose-images", lambda c: ft(c, data=c.file("loose/a.png", _good_png()).parent), "holds 1 images directly"),
    Case("data-class-without-images", lambda c: ft(c, data=c.small_data(bad={"train/empty/notes.txt": b"x"})), "holds no images"),
    Case("data-val-has-unknown-class", lambda c: ft(c, data=c.small_data(bad={"val/zebra/0.png": _good_png()})), "classes that train does not"),
    Case("data-too-few-to-split", lambda c: ft(c, data=make_image_folder(c.p("few"), {"": 2})), "needs at least 3"),
    Case("data-broken-symlink", lambda c: ft(c, data=_symlinked_data(c)), "is a broken symbolic link"),
    # images
    Case("image-empty-file", lambda c: ft(c, data=c.small_data(bad={"train/circle/empty.png": b""})), "(an empty file)"),
    Case("image-text-named-jpg", lambda c: ft(c, data=c.small_data(bad={"train/square/x.jpg": b"not an image"})), "cannot read image"),
    Case("image-truncated-png", lambda c: ft(c, data=c.small_data(bad={"val/circle/t.png": _noise_png()[:300]})), "cannot read image"),
    Case("image-truncated-jpeg", lambda c: ft(c, data=c.small_data(bad={"train/stripes/t.jpg": _noise_jpeg()[:400]})), "cannot read image"),
    Case("image-decompression-bomb", lambda c: ft(c, data=c.small_data(bad={"train/circle/huge.png": _png(np.zeros((1, 1), np.uint8), 0, 8, size=(20000, 20000))})),
         "too large to decode safely"),
    Case("image-thin-strip", lambda c: ft(c, data=c.small_data(bad={"train/circle/strip.png": _png(np.zeros((1, 3000), np.uint8), 0, 8)})),
         "more than 50:1"),
    Case("image-float-nan", lambda c: ft(c, data=c.small_data(bad={"train/circle/nan.tif": _float_tiff([[np.nan] * 9] * 9)})), "NaN or infinite pixel"),
    Case("image-float-out-of-range", lambda c: ft(c, data=c.small_data(bad={"train/circle/f.tif": _float_tiff(np.full((9, 9), 1e4))})),
         "float image with values"),
    Case("build-bad-image-before-any-work", lambda c: build(c, data=c.small_data(bad={"train/circle/empty.png": b""})), "(an empty file)"),
    Case("bench-data-changed-since-training", lambda c: bench(c)[:2] + ["--data", c.small_data(), "--out-dir", c.p("b")], "no longer matches the split"),
    # checkpoints
    Case("finetune-nan-weights", lambda c: ft(c)[:7] + ["--weights", _nan_state(c)] + ft(c)[9:], "holds non-finite weights"),
    Case("finetune-weights-empty-file", lambda c: ft(c)[:7] + ["--weights", c.file("w.pt", b"")] + ft(c)[9:], "is not a readable PyTorch checkpoint"),
    Case("finetune-weights-truncated", lambda c: ft(c)[:7] + ["--weights", c.file("w.pt", c.weights.read_bytes()[:500])] + ft(c)[9:],
         "is not a readable PyTorch checkpoint"),
    Case("finetune-weights-with-code", lambda c: ft(c)[:7] + ["--weights", _pickled_code(c)] + ft(c)[9:], "will not unpickle code"),
    Case("finetune-weights-missing", lambda c: ft(c)[:7] + ["--weights", c.p("none.pt")] + ft(c)[9:], "does not exist"),
    Case("export-nan-checkpoint", lambda c: export(c, checkpoint=c.checkpoint(_nan_checkpoint)), "holds non-finite weights"),
    Case("export-empty-checkpoint", lambda c: export(c, checkpoint=c.file("model.pt", b"")), "is not a readable PyTorch checkpoint"),
    Case("export-truncated-checkpoint", lambda c: export(c, checkpoint=c.file("model.pt", (c.pipe / "model.pt").read_bytes()[:1000])),
         "is not a readable PyTorch checkpoint"),
    Case("export-plain-state-dict", lambda c: export(c, checkpoint=c.weights), "is not a tledge checkpoint"),
    # calibration definitions
    Case("calib-entry-without-sha256", lambda c: quant(c, "--calibration", c.calibration(lambda s: s["images"][0].pop("sha256"))), "has no sha256"),
    Case("calib-sha256-not-hex", lambda c: quant(c, "--calibration", c.calibration(lambda s: s["images"][1].update(sha256="abc"))), "not 64 lowercase hex"),
    Case("calib-entry-not-an-object", lambda c: quant(c, "--calibration", c.calibration(lambda s: s["images"].append("a.png"))), "not an object"),
    Case("calib-images-not-a-list", lambda c: quant(c, "--calibration", c.calibration(lambda s: s.update(images={"a": 1}))), '"images" must be a list'),
    Case("calib-path-escapes", lambda c: quant(c, "--calibration", c.calibration(lambda s: s["images"][0].update(path="../../etc/passwd"))),
         "paths must stay inside the dataset folder"),
    Case("calib-absolute-path", lambda c: quant(c, "--calibration", c.calibration(lambda s: s["images"][0].update(path="/etc/hostname"))),
         "paths must stay inside the dataset folder"),
    Case("calib-wrong-hash", lambda c: quant(c, "--calibration", c.calibration(lambda s: s["images"][0].update(sha256="0" * 64))), "sha256 differs"),
    Case("calib-missing-image", lambda c: quant(c, "--calibration", c.calibration(lambda s: s["images"][0].update(path="train/circle/nope.png"))), "missing"),
    Case("calib-duplicate-entry", lambda c: quant(c, "--calibration", c.calibration(lambda s: s["images"].append(s["images"][0]))), "listed twice"),
    Case("calib-other-classes", lambda c: quant(c, "--calibration", c.calibration(lambda s: s.update(classes=["a", "b", "c"]))), "was made for classes"),
    Case("calib-other-input-shape", lambda c: quant(c, "--calibration", c.calibration(lambda s: s.update(input_shape=[3, 64, 64]))), "was made for input"),
    Case("calib-not-json", lambda c: quant(c, "--calibration", c.file("calib.json", "{not json")), "is not valid JSON"),
    Case("calib-empty-file", lambda c: quant(c, "--calibration", c.file("calib.json", "")), "is not valid JSON"),
    Case("calib-wrong-format", lambda c: quant(c, "--calibration", c.file("calib.json", '{"format": "other"}')), "is not a tledge calibration definition"),
    Case("build-calibration-mismatch-before-finetune", lambda c: build(c, "--calibration", c.calibration(lambda s: None)), "does not match"),
    # ONNX files
    Case("quantize-empty-onnx", lambda c: quant(c, model=c.file("m/model.fp32.onnx", b"")), "is not a valid ONNX file (empty)"),
    Case("quantize-truncated-onnx", lambda c: quant(c, model=c.file("m/model.fp32.onnx", (c.pipe / "model.fp32.onnx").read_bytes()[:3000])),
         "ONNX"),
    Case("quantize-an-int8-model", lambda c: quant(c, model=c.pipe / "model.int8.cpu.onnx"), "is already quantized"),
    Case("bench-empty-onnx", lambda c: bench(c, models=[c.file("m.onnx", b"")]), "is not a valid ONNX file (empty)"),
    Case("bench-random-bytes-onnx", lambda c: bench(c, models=[c.file("m.onnx", np.random.default_rng(1).bytes(4096))]), "ONNX"),
    Case("bench-metadata-disagrees-with-graph", lambda c: bench(c, models=[c.onnx(lambda m: _resize_meta(m, 48))]), "its metadata says"),
    Case("bench-onnx-without-metadata", lambda c: bench(c, models=[c.onnx(lambda m: _tledge_prop(m, None))]), "has no tledge metadata"),
    Case("bench-onnx-corrupt-metadata", lambda c: bench(c, models=[c.onnx(lambda m: _tledge_prop(m, "{oops"))]), "corrupt tledge metadata"),
    Case("bench-model-missing", lambda c: bench(c, models=[c.p("missing.onnx")]), "not found"),
    Case("quantize-model-is-a-folder", lambda c: quant(c, model=c.tmp), "is a folder, not a file"),
    Case("export-checkpoint-is-a-folder", lambda c: export(c, checkpoint=c.tmp), "is a folder, not a file"),
    Case("gate-candidate-is-a-folder", lambda c: gate(c, candidate=c.tmp), "is a folder, not a model file"),
    Case("gate-empty-candidate", lambda c: gate(c, candidate=c.file("cand.onnx", b"")), "is not a valid ONNX file"),
    # config files
    Case("config-not-toml", lambda c: ft(c, "--config", c.file("tledge.toml", "[finetune\nx=")), "is not valid TOML"),
    Case("config-unknown-key", lambda c: ft(c, "--config", c.file("tledge.toml", "[finetune]\nlearning_rate = 1\n")), "unknown setting"),
    # bundle: never signs what fails its own checks; the stale manifest goes first
    Case("bundle-truncated-onnx", lambda c: ["bundle", _truncate(_manifest_first(c) / "model.int8.cpu.onnx")], "model.int8.cpu.onnx",
         removes=("build/manifest.json",)),
    Case("bundle-onnx-byte-flipped", lambda c: ["bundle", _flip(_manifest_first(c) / "model.int8.qdq.onnx")], "model.int8.qdq.onnx",
         removes=("build/manifest.json",)),
    Case("bundle-cache-edited", lambda c: ["bundle", _append(_manifest_first(c) / "calibration.cache")], "changed after the quantize stage",
         removes=("build/manifest.json",)),
    Case("bundle-nan-checkpoint", lambda c: ["bundle", _nan_in_folder(c, _manifest_first(c))], "holds non-finite weights",
         removes=("build/manifest.json",)),
    Case("bundle-empty-record", lambda c: ["bundle", _truncate(_manifest_first(c) / "export.json", 0)], "export.json",
         removes=("build/manifest.json",)),
    Case("bundle-metadata-disagrees", lambda c: ["bundle", _swap_meta(c, _manifest_first(c))], "its metadata says",
         removes=("build/manifest.json",)),
    # more files tledge reads, empty or truncated; links; negative seeds
    Case("splits-json-empty", lambda c: quant(c, model=_with_file(c, "splits.json", b"") / "model.fp32.onnx"), "is not the split the model was trained on"),
    Case("splits-json-truncated", lambda c: bench(c, models=[_with_file(c, "splits.json", (c.pipe / "splits.json").read_bytes()[:200]) / "model.fp32.onnx"]),
         "is not the split the model was trained on"),
    Case("gate-baseline-json-empty", lambda c: ["gate", c.pipe / "model.fp32.onnx", c.file("gate.json", b"")], "is not valid JSON"),
    Case("gate-baseline-json-truncated", lambda c: ["gate", c.pipe / "model.fp32.onnx", c.file("gate.json", '{"kind": "tledge-gate", "candi')],
         "is not valid JSON"),
    Case("gate-baseline-json-other", lambda c: ["gate", c.pipe / "model.fp32.onnx", c.file("gate.json", "[1, 2]")], "is not a gate.json"),
    Case("stats-npz-truncated", lambda c: _load_stats(c.file("calibration.stats.npz", (c.pipe / "calibration.stats.npz").read_bytes()[:500])),
         "is not a tledge calibration statistics file", kind="call"),
    Case("stats-npz-empty", lambda c: _load_stats(c.file("calibration.stats.npz", b"")), "is not a tledge calibration statistics file", kind="call"),
    Case("calib-truncated-json", lambda c: quant(c, "--calibration", c.file("calib.json", (c.pipe / "calibration.json").read_bytes()[:150])),
         "is not valid JSON"),
    Case("image-empty-in-unicode-folder", lambda c: ft(c, data=c.small_data("dätä mit leer", bad={"train/circle/ïmage 1.png": b""})),
         "dätä mit leer/train/circle/ïmage 1.png (an empty file)"),
    Case("data-symlink-loop", lambda c: ft(c, data=_looped_data(c)), "is a broken symbolic link"),
    Case("finetune-out-dangling-symlink", lambda c: ft(c)[:3] + ["--out", _dangling(c)] + ft(c)[5:], "is a broken symbolic link"),
    Case("finetune-out-symlink-to-a-file", lambda c: ft(c)[:3] + ["--out", _link_to(c, c.file("target.txt"))] + ft(c)[5:], "exists and is not a folder"),
    Case("finetune-seed-negative", lambda c: ft(c, "--seed", "-1"), "--seed must be at least 0"),
    Case("export-seed-negative", lambda c: export(c, "--config", c.file("t.toml", "[export]\nseed = -3\n")), "--seed must be at least 0"),
    Case("build-seed-negative", lambda c: build(c, "--seed", "-1"), "--seed must be at least 0"),
    # non-finite values stop the stage
    Case("finetune-lr-overflows-float32", lambda c: ft(c, "--lr", "1e38"), "--lr must be at most 10"),
    Case("finetune-weights-compute-nan", lambda c: ft(c)[:7] + ["--weights", _negative_variance(c)] + ft(c)[9:], "training diverged"),
    Case("quantize-nan-onnx-weights", lambda c: quant(c, model=_nan_onnx(c, "m/model.fp32.onnx")), "holds non-finite weights"),
    Case("bench-nan-logits", lambda c: bench(c, models=[_nan_onnx(c, "m/model.fp32.onnx")]), "logits are not finite"),
    Case("bundle-nan-onnx", lambda c: ["bundle", _nan_onnx_in_folder(c, _manifest_first(c))], "holds non-finite weights", removes=("build/manifest.json",)),
    # awkward but valid: these must succeed, and be right
    Case("export-unicode-and-spaces", lambda c: export(c, out=c.p("ünï cödé/my model.onnx")), "", check=_exported_ok),
    Case("bundle-unicode-folder", lambda c: ["bundle", c.copy_pipe("büild ok")], "", check=_bundled_ok),
]


def _nan_onnx(ctx: Ctx, name: str) -> Path:
    """The FP32 model with one weight tensor NaN (the file itself is well-formed)."""
    from onnx import numpy_helper

    def edit(proto):
        init = max(proto.graph.initializer, key=lambda i: len(i.raw_data))
        init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, np.nan, np.float32), init.name))

    path = ctx.onnx(edit, name=name)
    shutil.copy(ctx.pipe / "splits.json", path.parent / "splits.json")  # the split beside it, as export leaves it
    return path


def _nan_onnx_in_folder(ctx: Ctx, folder: Path) -> Path:
    shutil.copy(_nan_onnx(ctx, "nan/model.fp32.onnx"), folder / "model.fp32.onnx")
    return folder


def _with_file(ctx: Ctx, name: str, content: bytes) -> Path:
    """A copy of the pipeline folder with one file replaced."""
    folder = ctx.copy_pipe("pipe")
    (folder / name).write_bytes(content)
    return folder


def _load_stats(path: Path):
    from tledge.quant.statistics import CalibrationStats

    return lambda: CalibrationStats.load(path)


def _looped_data(ctx: Ctx) -> Path:
    root = ctx.small_data()
    os.symlink("loop.png", root / "train" / "square" / "loop.png")  # a link to itself
    return root


def _dangling(ctx: Ctx) -> Path:
    os.symlink(ctx.p("nowhere/at/all"), ctx.p("out-link"))
    return ctx.p("out-link")


def _link_to(ctx: Ctx, target: Path) -> Path:
    os.symlink(target, ctx.p("link"))
    return ctx.p("link")


def _pickled_code(ctx: Ctx) -> Path:
    import pathlib

    import torch

    torch.save({"weight": torch.zeros(2), "where": pathlib.PurePosixPath("/x")}, ctx.p("w.pt"))
    return ctx.p("w.pt")


def _truncate(path: Path, keep: int | None = None) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3 if keep is None else keep])
    return path.parent


def _flip(path: Path) -> Path:
    _corrupt_byte(path, 0.6)
    return path.parent


def _append(path: Path) -> Path:
    with open(path, "a", encoding="utf-8") as f:
        f.write("extra: 3c010a14\n")
    return path.parent


def _nan_in_folder(ctx: Ctx, folder: Path) -> Path:
    shutil.copy(ctx.checkpoint(_nan_checkpoint, name="nan/model.pt"), folder / "model.pt")
    return folder


def _resize_meta(proto, size: int) -> None:
    """Metadata that says another input size than the graph takes (a file edited or mixed up)."""
    from tledge.export.onnx_io import read_metadata

    _set_meta(proto, preprocess={**read_metadata(proto)["preprocess"], "size": size, "resize": size})


def _tledge_prop(proto, value: str | None) -> None:
    """Remove the tledge metadata entry (``None``) or overwrite its text."""
    prop = next(p for p in proto.metadata_props if p.key == "tledge")
    if value is None:
        proto.metadata_props.remove(prop)
    else:
        prop.value = value


def _noise_png() -> bytes:
    return _pil_bytes(_pil(np.random.default_rng(0).integers(0, 255, (24, 24, 3), np.uint8)), "PNG")


def _noise_jpeg() -> bytes:
    return _pil_bytes(_pil(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")


def _swap_meta(ctx: Ctx, folder: Path) -> Path:
    bad = ctx.onnx(lambda m: _resize_meta(m, 40), name="edited/m.onnx")
    shutil.copy(bad, folder / "model.fp32.onnx")
    return folder


# --- pixel cases: every mode and bit depth decodes to the right 8-bit RGB --------------------------------------------

RNG = np.random.default_rng(7)
G8 = RNG.integers(0, 256, (12, 12)).astype(np.uint8)
G16 = RNG.integers(0, 65536, (12, 12)).astype(np.uint16)
RGB8 = RNG.integers(0, 256, (12, 12, 3)).astype(np.uint8)


def _gray(g: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(g, np.uint8)[..., None], 3, axis=-1)


def _scaled16(v: np.ndarray) -> np.ndarray:
    return _gray(np.round(np.clip(v.astype(np.float64), 0, 65535) * 255 / 65535))


def _save(ctx: Ctx, name: str, data: bytes) -> Path:
    return ctx.file(name, data)


def _pil(mode_array, mode=None):
    from PIL import Image

    return Image.fromarray(mode_array, mode) if mode else Image.fromarray(mode_array)


def _palette_case(ctx: Ctx, transparency: bool):
    from PIL import Image

    index = RNG.integers(0, 16, (12, 12)).astype(np.uint8)
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.flatten().tolist())
    kw = {"transparency": 3} if transparency else {}
    return _save(ctx, "p.png", _pil_bytes(img, "PNG", **kw)), palette[index]


def _cmyk_case(ctx: Ctx):
    from PIL import Image

    cmyk = RNG.integers(0, 256, (12, 12, 4)).astype(np.uint8)
    c, m, y, k = (cmyk[..., i].astype(int) for i in range(4))
    # Pillow's (and libjpeg's) naive CMYK: each channel (255 - ink) * (255 - black) / 255
    expected = np.round(np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255).astype(np.uint8)
    return _save(ctx, "c.tif", _pil_bytes(Image.fromarray(cmyk, "CMYK"), "TIFF")), expected


def _low_bit_gray(ctx: Ctx, depth: int):
    v = RNG.integers(0, 2**depth, (12, 12)).astype(np.uint8)
    return _save(ctx, f"g{depth}.png", _png(v, 0, depth)), _gray(v.astype(int) * 255 // (2**depth - 1))


def _unicode_path(ctx: Ctx):
    return _save(ctx, "dätä mit leer/ïmage ✓ 1.png", _pil_bytes(_pil(RGB8), "PNG")), RGB8


def _symlink(ctx: Ctx):
    target = _save(ctx, "real/img.png", _pil_bytes(_pil(RGB8), "PNG"))
    link = ctx.p("link.png")
    os.symlink(target, link)
    return link, RGB8


def _tiny(ctx: Ctx):
    return _save(ctx, "one.png", _pil_bytes(_pil(np.array([[[10, 200, 30]]], np.uint8)), "PNG")), np.tile(np.array([10, 200, 30], np.uint8), (8, 8, 1))


def _large(ctx: Ctx):
    # 2400 x 1800, one colour: decodes and shrinks to the crop; every pixel keeps the colour
    return _save(ctx, "large.png", _pil_bytes(_pil(np.full((1800, 2400, 3), (40, 90, 160), np.uint8)), "PNG")), np.tile(np.array([40, 90, 160], np.uint8), (12, 12, 1))


PIXEL_CASES = [
    Case("pixels-L-8bit-png", lambda c: (_save(c, "l.png", _pil_bytes(_pil(G8), "PNG")), _gray(G8)), kind="pixels"),
    Case("pixels-I16-png-scaled-not-clipped", lambda c: (_save(c, "i16.png", _pil_bytes(_pil(G16), "PNG")), _scaled16(G16)), kind="pixels"),
    Case("pixels-I16-tiff", lambda c: (_save(c, "i16.tif", _pil_bytes(_pil(G16), "TIFF")), _scaled16(G16)), kind="pixels"),
    Case("pixels-I16B-tiff", lambda c: (_save(c, "i16b.tif", _pil_bytes(_i16b(G16), "TIFF")), _scaled16(G16)), kind="pixels"),
    Case("pixels-16bit-pgm", lambda c: (_save(c, "g.pgm", _pil_bytes(_pil(G16), "PPM")), _scaled16(G16)), kind="pixels"),
    Case("pixels-I32-tiff", lambda c: (_save(c, "i32.tif", _pil_bytes(_pil(G16.astype(np.int32) * 2), "TIFF")), _scaled16(G16.astype(np.int32) * 2)),
         kind="pixels"),
    Case("pixels-F-0-to-1", lambda c: (_save(c, "f1.tif", _float_tiff(G8 / 255.0)), _gray(G8)), kind="pixels"),
    Case("pixels-F-0-to-255", lambda c: (_save(c, "f255.tif", _float_tiff(G8.astype(np.float32))), _gray(G8)), kind="pixels"),
    Case("pixels-1bit-png", lambda c: (_save(c, "b.png", _pil_bytes(_pil(G8 > 127).convert("1"), "PNG")), _gray((G8 > 127) * 255)), kind="pixels"),
    Case("pixels-2bit-gray-png", lambda c: _low_bit_gray(c, 2), kind="pixels"),
    Case("pixels-4bit-gray-png", lambda c: _low_bit_gray(c, 4), kind="pixels"),
    Case("pixels-palette-png", lambda c: _palette_case(c, False), kind="pixels"),
    Case("pixels-palette-with-transparency", lambda c: _palette_case(c, True), kind="pixels"),
    Case("pixels-LA-png", lambda c: (_save(c, "la.png", _pil_bytes(_pil(np.stack([G8, 255 - G8], -1), "LA"), "PNG")), _gray(G8)), kind="pixels"),
    Case("pixels-RGBA-png-alpha-dropped", lambda c: (_save(c, "rgba.png", _pil_bytes(_pil(np.dstack([RGB8, G8]), "RGBA"), "PNG")), RGB8), kind="pixels"),
    Case("pixels-CMYK-tiff", _cmyk_case, kind="pixels", tolerance=1),
    Case("pixels-RGB-16bit-png", lambda c: (_save(c, "rgb16.png", _png(np.dstack([G16, G16[::-1], G16.T]), 2, 16)),
                                            np.round(np.dstack([G16, G16[::-1], G16.T]) / 257).astype(np.uint8)), kind="pixels", tolerance=1),
    Case("pixels-LA-16bit-png", lambda c: (_save(c, "la16.png", _png(np.dstack([G16, G16]), 4, 16)), _scaled16(G16)), kind="pixels", tolerance=1),
    Case("pixels-RGB-bmp", lambda c: (_save(c, "x.bmp", _pil_bytes(_pil(RGB8), "BMP")), RGB8), kind="pixels"),
    Case("pixels-RGB-ppm", lambda c: (_save(c, "x.ppm", _pil_bytes(_pil(RGB8), "PPM")), RGB8), kind="pixels"),
    Case("pixels-RGB-webp-lossless", lambda c: (_save(c, "x.webp", _pil_bytes(_pil(RGB8), "WEBP", lossless=True)), RGB8), kind="pixels"),
    Case("pixels-unicode-and-spaces-path", _unicode_path, kind="pixels"),
    Case("pixels-through-a-symlink", _symlink, kind="pixels"),
    Case("pixels-1x1-image", _tiny, kind="pixels"),
    Case("pixels-large-image", _large, kind="pixels"),
]


def _i16b(g16: np.ndarray):
    from PIL import Image

    return Image.frombytes("I;16B", (g16.shape[1], g16.shape[0]), g16.astype(">u2").tobytes())


CASES = CLI_CASES + PIXEL_CASES


# --- the test -----------------------------------------------------------------------------------------------------------


def _snapshot(*roots: Path) -> dict:
    """Every path under ``roots`` with its size and modification time: what "nothing written" compares."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                seen[str(p)] = (st.st_size, st.st_mtime_ns) if not p.is_dir() else "dir"
    return seen


def _one_line_error(exc: BaseException) -> str:
    return f"tledge: error: {exc}"


@pytest.fixture()
def ctx(tmp_path, tiny_dataset, tiny_pipeline, tiny_weights) -> Ctx:
    return Ctx(tmp_path, tiny_dataset, tiny_pipeline, tiny_weights)


def test_corpus_is_large_and_covers_every_command():
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(1 for c in CASES if c.kind != "pixels" and c.expect) >= 60, "at least 60 bad inputs that must be clear errors"
    prefixes = {c.id.split("-")[0] for c in CLI_CASES}
    assert {"finetune", "export", "quantize", "bench", "gate", "build", "bundle", "calib", "image", "data"} <= prefixes
    assert sum(1 for c in CASES if c.kind == "pixels") >= 20, "images of every mode and bit depth"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus(case: Case, ctx: Ctx):
    if case.kind == "pixels":
        from tledge.data.images import Preprocess, load_image

        path, expected = case.make(ctx)
        side = expected.shape[0]
        pre = Preprocess(size=side, resize=side, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="nearest")
        x = load_image(path, pre)
        assert x.shape == (3, side, side) and x.dtype == np.float32
        got = np.round(x.transpose(1, 2, 0) * 255).astype(int)
        diff = np.abs(got - expected.astype(int))
        assert diff.max() <= case.tolerance, f"{case.id}: {int((diff > case.tolerance).sum())} values off, by up to {diff.max()}"
        return

    if case.kind == "call":
        call = case.make(ctx)
        before = _snapshot(ctx.tmp)
        with pytest.raises(TledgeError) as info:
            call()
        assert "\n" not in str(info.value) and case.expect in str(info.value), str(info.value)
        assert _snapshot(ctx.tmp) == before
        return

    argv = [str(a) for a in case.make(ctx)]
    before = _snapshot(ctx.tmp, ctx.pipe, ctx.data)
    result = runner.invoke(app, argv)
    after = _snapshot(ctx.tmp, ctx.pipe, ctx.data)
    exc = result.exception
    if not case.expect and case.code == 1:  # must succeed
        assert result.exit_code == 0, f"{case.id}: {type(exc).__name__}: {exc}\n{result.output}"
        case.check(ctx)
        return
    # a traceback would be any exception that is not the user-error type (SystemExit is typer's exit status)
    assert exc is None or isinstance(exc, (TledgeError, SystemExit)), f"{case.id}: TRACEBACK {type(exc).__name__}: {exc}"
    assert result.exit_code == case.code, f"{case.id}: exit {result.exit_code}: {result.output[-500:]}"
    if case.code == 1:
        line = _one_line_error(exc)
        assert "\n" not in line, f"{case.id}: more than one line: {line!r}"
        assert case.expect in line, f"{case.id}: {line!r} does not say {case.expect!r}"
    removed = {str(ctx.tmp / r) for r in case.removes}
    assert removed.isdisjoint(after), f"{case.id}: {sorted(removed & set(after))} should have been removed"
    written = {p: v for p, v in after.items() if before.get(p) != v}
    vanished = set(before) - set(after) - removed
    assert not written and not vanished, f"{case.id}: files written {sorted(written)} / removed {sorted(vanished)}"


CONSOLE_SAMPLE = ("bench-max-images-0", "image-decompression-bomb", "calib-entry-without-sha256", "export-nan-checkpoint")


@pytest.mark.parametrize("case_id", CONSOLE_SAMPLE)
def test_corpus_sample_through_the_real_console(case_id: str, ctx: Ctx):
    """A few cases as a user runs them (`python -m tledge.cli`, a fresh process): stderr is exactly one line, so no
    library warning or progress bar leaks around the error, and the exit status is 1."""
    import subprocess
    import sys

    case = next(c for c in CASES if c.id == case_id)
    argv = [str(a) for a in case.make(ctx)]
    before = _snapshot(ctx.tmp, ctx.pipe, ctx.data)
    proc = subprocess.run([sys.executable, "-m", "tledge.cli", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tledge: error: ") and case.expect in lines[0], proc.stderr[-2000:]
    assert proc.stdout == ""
    assert _snapshot(ctx.tmp, ctx.pipe, ctx.data) == before
