"""Export a fine-tuned checkpoint to ONNX (dynamic batch) and prove that ONNX Runtime computes what PyTorch does.

The ONNX file carries its own description in ``metadata_props["tledge"]`` (architecture, class labels,
preprocessing), so the later stages and the device need nothing but the file.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tledge import __version__
from tledge.errors import TledgeError
from tledge.export.onnx_io import set_metadata

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportConfig:
    """Settings for :func:`export_onnx`.

    ``opset`` 17 with the TorchScript-based exporter is what TensorRT 8.5/8.6 (JetPack 5 and 6.0) parse; newer
    TensorRT reads it too. ``data``: images for the parity check (its evaluation split); without it, random inputs.
    """

    checkpoint: Path
    out: Path  # the .onnx file to write
    data: Path | None = None
    opset: int = 17
    max_batch: int = 32  # recorded for engine profiles; the ONNX batch axis itself is unbounded
    parity_images: int = 64
    atol: float = 1e-4
    rtol: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "out", Path(self.out))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        from tledge import validate as V

        V.number("--atol", self.atol, minimum=0)
        V.number("--seed", self.seed, minimum=0)  # numpy refuses negative seeds, deep inside a stage
        V.number("--rtol", self.rtol, minimum=0)
        for name in ("parity_images", "max_batch"):
            V.number(name, getattr(self, name), minimum=1)
        if not 13 <= self.opset <= 21:
            raise TledgeError(f"opset must be within 13..21 (per-channel Q/DQ needs 13; TensorRT 8.x reads up to 17), got {self.opset}")

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _constant_values(graph) -> dict:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def fold_constants(model, max_elements: int = 1 << 16) -> int:
    """Evaluate nodes whose inputs are all constants and store their (small) outputs as initializers.

    The TorchScript exporter leaves some shape arithmetic unevaluated (a pad amount becomes ConstantOfShape ->
    Concat -> Slice -> Transpose -> Reshape -> Cast); TensorRT and the Pad merge below want plain constants.
    Returns the number of nodes removed.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = _constant_values(graph)
    graph_outputs = {o.name for o in graph.output}
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.node):
            if node.op_type == "Constant" or node.domain not in ("", "ai.onnx") or any(o in graph_outputs for o in node.output):
                continue
            if not all((name in known) or name == "" for name in node.input):
                continue
            if any(known[name].size > max_elements for name in node.input if name):
                continue  # never fold weight-sized tensors (they stay initializers as exported)
            single = helper.make_graph(
                [node], "fold", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(known[n].dtype), known[n].shape) for n in node.input if n],
                [helper.make_tensor_value_info(o, 0, None) for o in node.output],
            )
            opset = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
            values = ReferenceEvaluator(helper.make_model(single, opset_imports=opset)).run(None, {n: known[n] for n in node.input if n})
            for name, value in zip(node.output, values):
                value = np.asarray(value)
                known[name] = value
                graph.initializer.append(numpy_helper.from_array(value, name))
            graph.node.remove(node)
            removed += 1
            changed = True
    remove_unused(graph)
    return removed


def remove_unused(graph) -> None:
    """Drop Constant nodes and initializers that no node reads."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def fold_pads_into_convs(model) -> int:
    """Merge zero ``Pad`` nodes into the ``Conv`` they feed (asymmetric "SAME" padding); returns how many.

    A standalone Pad splits a Conv from its input quantization and adds a layer on TensorRT; Conv's own ``pads``
    attribute takes asymmetric values.
    """
    from onnx import helper

    graph = model.graph
    consts = _constant_values(graph)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    removed = []
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.output[0] in graph_outputs:
            continue
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        users = consumers.get(pad.output[0], [])
        if mode != "constant" or len(users) != 1 or users[0].op_type != "Conv" or len(pad.input) < 2:
            continue
        pads = consts.get(pad.input[1])
        value = consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        if pads is None or value is None or np.any(value != 0) or len(pad.input) > 3 and pad.input[3]:
            continue
        pads = [int(v) for v in pads]
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:  # only H/W padding, no cropping
            continue
        conv = users[0]
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]  # [top, left, bottom, right]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        removed.append(pad)
    for node in removed:
        graph.node.remove(node)
    remove_unused(graph)
    return len(removed)


def _parity_inputs(cfg: ExportConfig, pre, classes, splits_sha256: str | None) -> tuple[np.ndarray, str]:
    if cfg.data is None:
        rng = np.random.default_rng(cfg.seed)
        return rng.standard_normal((cfg.parity_images, *pre.input_shape), dtype=np.float32), "random normal"
    from tledge.data.images import load_array
    from tledge.data.splits import splits_for

    splits = splits_for(cfg.data, cfg.checkpoint.parent, cfg.seed, splits_sha256)
    if splits.classes != list(classes):
        raise TledgeError(f"{cfg.data} has classes {splits.classes}, the checkpoint was trained on {list(classes)}")
    x, _ = load_array(splits.evaluation[: cfg.parity_images], pre)
    return x, f"{len(x)} images of {cfg.data} ({splits.evaluation_name} split)"


def export_onnx(cfg: ExportConfig) -> dict:
    """Export ``cfg.checkpoint`` to ``cfg.out`` and check it against PyTorch; writes ``export.json`` beside it.

    Raises TledgeError (and writes no model) when ONNX Runtime's logits differ beyond ``atol + rtol * |torch|``.

    >>> export_onnx(ExportConfig(checkpoint="runs/1/model.pt", out="runs/1/model.fp32.onnx", data="my_images"))  # doctest: +SKIP
    """
    import onnx
    import torch

    from tledge import validate
    from tledge.artifacts import atomic_path, write_json
    from tledge.models import load_checkpoint
    from tledge.runners.ort_runner import OrtRunner
    from tledge.runners.torch_runner import TorchRunner

    started = time.perf_counter()
    validate.output_file(cfg.out)
    validate.output_file(cfg.out.parent / "export.json", flag="export record")
    if cfg.out.resolve() == cfg.checkpoint.resolve():
        raise TledgeError(f"--out {cfg.out} is the checkpoint itself; give the ONNX file another name")
    if cfg.data is not None and not cfg.data.is_dir():
        raise TledgeError(f"--data {cfg.data} is not a folder")
    model, meta = load_checkpoint(cfg.checkpoint)
    pre = meta["preprocess"]
    splits_sha256 = meta.get("extra", {}).get("splits_sha256")  # the split it was trained on (splits.json)
    x, source = _parity_inputs(cfg, pre, meta["classes"], splits_sha256)  # the data is checked before any work
    example = torch.zeros((2, *pre.input_shape))  # batch >= 2 so the exporter cannot specialize on batch 1
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    validate.start_rewrite(cfg.out.parent, "export")
    with atomic_path(cfg.out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (example,), str(tmp), dynamo=False, opset_version=cfg.opset, do_constant_folding=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        proto = onnx.load(str(tmp))
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset != cfg.opset:
            raise TledgeError(f"the exporter wrote opset {opset}, not the {cfg.opset} asked for")
        fold_constants(proto)
        folded = fold_pads_into_convs(proto)
        set_metadata(proto, {
            "arch": meta["arch"], "classes": meta["classes"], "preprocess": pre.to_dict(),
            "input": INPUT_NAME, "output": OUTPUT_NAME, "precision": "fp32", "max_batch": cfg.max_batch,
            **({"splits_sha256": splits_sha256} if splits_sha256 else {}),
        })
        proto.producer_name, proto.producer_version = "tledge", __version__
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))

        ort_runner, torch_runner = OrtRunner(tmp), TorchRunner(model)
        parity = compare_outputs(torch_runner, ort_runner, x, cfg.atol, cfg.rtol)
        if not parity["within_tolerance"]:
            raise TledgeError(
                f"ONNX Runtime disagrees with PyTorch beyond atol={cfg.atol}, rtol={cfg.rtol}: max |diff| "
                f"{parity['max_abs_diff']:.3g}, top-1 agreement {parity['top1_agreement']:.4f}. The ONNX file was not written."
            )

    record = {
        "stage": "export",
        "artifacts": [cfg.out.name, "export.json"],
        "config": cfg.to_dict(),
        "onnx": {"path": cfg.out.name, "opset": opset, "input": [INPUT_NAME, ["batch", *pre.input_shape], "float32"],
                 "output": [OUTPUT_NAME, ["batch", len(meta["classes"])], "float32"], "pads_folded_into_conv": folded},
        "parity": {"inputs": source, "atol": cfg.atol, "rtol": cfg.rtol, **parity},
        "seconds": round(time.perf_counter() - started, 2),
        "sha256": validate.digests(cfg.out.parent, [cfg.out.name]),
    }
    write_json(cfg.out.parent / "export.json", record)
    return record


def compare_outputs(reference, candidate, x: np.ndarray, atol: float, rtol: float, batch_sizes: tuple[int, ...] = (1, 8)) -> dict:
    """Run both runners on ``x`` in several batch sizes (dynamic batch must not change results) and compare.

    ``within_tolerance``: every logit of every batch size satisfies ``|candidate - reference| <= atol + rtol * |reference|``.
    """
    from tledge.validate import finite_array

    ref = np.concatenate([reference(x[i : i + 8]) for i in range(0, len(x), 8)])
    finite_array(ref, "the reference model's logits")
    diffs, agreement = [], []
    for bs in batch_sizes:
        out = np.concatenate([candidate(x[i : i + bs]) for i in range(0, len(x), bs)])
        diffs.append(np.abs(out - ref))
        agreement.append(float(np.mean(out.argmax(1) == ref.argmax(1))))
    diff = np.max(diffs, axis=0)
    ratio = float(np.max(diff / (np.abs(ref) + 1e-12)))
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": ratio,
        "top1_agreement": min(agreement),
        "batch_sizes": list(batch_sizes),
        "within_tolerance": bool(np.all(diff <= atol + rtol * np.abs(ref))),
    }
