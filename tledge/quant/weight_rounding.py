"""Int8 weight rounding chosen by each layer's output error on the calibration images, not by nearest value.

Rounding every weight to its nearest int8 level minimises the error of each weight alone; what matters is the
error of the layer's output, ``(W_q - W) x``, over the inputs the layer really sees. For one output channel with
weight error ``e`` that is ``e^T H e`` with ``H = E[x x^T]`` over the calibration inputs (for a convolution: its
input patches). Each weight may round down or up (AdaRound's search space, Nagel et al. 2020); we start from the
nearest level and flip a weight to its other level wherever that lowers ``e^T H e``, sweep after sweep, with the
closed-form change of the quadratic (no learned relaxation, seconds on a CPU). The largest weight of each channel
is held on +-127, so the per-channel scale (max |w| / 127) is unchanged and any symmetric per-channel quantizer
(ONNX Runtime's, TensorRT's) reproduces the chosen levels exactly. What mean error remains is moved into the bias.

The result is a float model whose weights already lie on the int8 grid. It helps depthwise convolutions most
(9 or 25 weights per channel: nearest rounding leaves a large error there) and costs nothing at run time.
"""

from __future__ import annotations

import time

import numpy as np

LEVEL = 127  # symmetric int8 weights: -127..127
MIN_SAMPLES_PER_INPUT = 4  # a layer is rounded by output error only with this many input samples per weight
DAMPING = 0.01  # share of the mean diagonal added to E[xx^T] (as GPTQ damps its Hessian)


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else a.i
    return default


def _patches(x: np.ndarray, node) -> np.ndarray:
    """Input patches of a batch for a Conv: (positions, C_in, kh * kw) in the weight's (C, kh, kw) order."""
    kh, kw = _attr(node, "kernel_shape", None)
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    top, left, bottom, right = _attr(node, "pads", [0, 0, 0, 0])
    n, c = x.shape[:2]
    if kh == kw == 1 and sh == sw == 1 and not (top or left or bottom or right):
        return x.transpose(0, 2, 3, 1).reshape(-1, c, 1)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, c, kh * kw)


class _LayerStats:
    """Running ``E[x x^T]`` and ``E[x]`` of one layer's inputs (per channel for a depthwise convolution)."""

    def __init__(self, node, depthwise: bool):
        self.node, self.depthwise = node, depthwise
        self.gram, self.total, self.count = 0.0, 0.0, 0

    def add(self, activations: np.ndarray) -> None:
        """Add a batch of the layer's inputs, (N, C, H, W) or (N, features). Products in float32, sums in float64."""
        a = activations.astype(np.float32, copy=False)
        if self.node.op_type == "Conv":
            p = _patches(a, self.node)  # (L, C, kk)
            if self.depthwise:
                per_channel = np.ascontiguousarray(p.transpose(1, 0, 2))  # (C, L, kk): one batched matrix product
                gram = np.matmul(per_channel.transpose(0, 2, 1), per_channel)
            else:
                p = p.reshape(p.shape[0], -1)
                gram = p.T @ p
        else:
            p = a.reshape(a.shape[0], -1)
            gram = p.T @ p
        self.gram = self.gram + gram.astype(np.float64)
        self.total = self.total + p.sum(0, dtype=np.float64)
        self.count += p.shape[0]


def round_channels(w: np.ndarray, scale: np.ndarray, gram: np.ndarray, depthwise: bool, sweeps: int = 4) -> tuple[np.ndarray, int]:
    """Int8 levels for ``w`` (channels x inputs) at ``scale`` (per channel) that lower ``e^T H e``; flips made.

    ``gram``: one (inputs x inputs) matrix shared by every channel, or (channels x inputs x inputs) for a depthwise
    convolution. Never raises the error: a flip is taken only where it lowers the quadratic.
    """
    q = np.clip(np.round(w / scale[:, None]), -LEVEL, LEVEL)
    nearest = q.copy()
    err = q * scale[:, None] - w
    g = np.einsum("cd,cde->ce", err, gram) if depthwise else err @ gram
    held = np.zeros(q.shape, bool)
    held[np.arange(len(w)), np.abs(w).argmax(1)] = True  # keeps max |level| = 127, so the scale stays
    rows = np.arange(len(w))
    for _ in range(sweeps):
        flipped = 0
        for j in range(w.shape[1]):
            other = q[:, j] - np.sign(err[:, j])  # the weight's other neighbouring level
            step = (other - q[:, j]) * scale
            diag = gram[:, j, j] if depthwise else gram[j, j]
            change = 2 * step * g[:, j] + step * step * diag
            take = (change < 0) & (step != 0) & (np.abs(other) <= LEVEL) & ~held[:, j]
            if not take.any():
                continue
            idx = rows[take]
            flipped += len(idx)
            q[idx, j] = other[idx]
            err[idx, j] += step[idx]
            g[idx] += step[idx, None] * (gram[idx, j, :] if depthwise else gram[j][None, :])
        if not flipped:
            break
    return q, int((q != nearest).sum())


def round_weights(model, images: np.ndarray, batch: int = 8) -> tuple[object, dict]:
    """A copy of FP32 ``model`` whose Conv and Gemm weights lie on the int8 grid the output error chose.

    ``images``: preprocessed calibration images (N, C, H, W). Returns the model and a JSON-ready record.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    started = time.perf_counter()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}

    def handled(n) -> bool:  # plain and depthwise convolutions, and Gemm as torch exports it (x @ W^T)
        if len(n.input) < 2 or n.input[1] not in inits:
            return False
        if n.op_type == "Conv":
            group, dims = _attr(n, "group", 1), inits[n.input[1]].dims
            return group == 1 or (dims[1] == 1 and group == dims[0])
        return n.op_type == "Gemm" and _attr(n, "transB", 0) == 1 and _attr(n, "transA", 0) == 0

    layers = [n for n in out.graph.node if n.op_type in ("Conv", "Gemm") and handled(n)]
    stats = {n.name: _LayerStats(n, n.op_type == "Conv" and _attr(n, "group", 1) > 1) for n in layers}

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = sorted({n.input[0] for n in layers} - {o.name for o in probe.graph.output})
    for name in wanted:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    for start in range(0, len(images), batch):
        results = dict(zip(names, session.run(None, {input_name: images[start:start + batch]})))
        for n in layers:
            stats[n.name].add(results[n.input[0]])

    flipped = total = 0
    too_few = []
    for n in layers:
        s = stats[n.name]
        weight = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        w = weight.reshape(weight.shape[0], -1)  # Conv (C_out, C_in/g * kh * kw); Gemm with transB (N, K)
        if s.count < MIN_SAMPLES_PER_INPUT * w.shape[1]:
            # E[xx^T] from fewer samples than inputs is rank-deficient: flips would fit those images, not the layer
            too_few.append(n.name)
            continue
        scale = np.abs(w).max(1) / LEVEL
        scale[scale == 0] = 1.0
        gram, mean = s.gram / s.count, s.total / s.count
        diag = np.einsum("cii->ci", gram) if s.depthwise else np.diag(gram)
        damp = DAMPING * diag.mean(-1)  # a little of nearest rounding's own objective, against noise in E[xx^T]
        gram = gram + (damp[:, None, None] * np.eye(w.shape[1]) if s.depthwise else damp * np.eye(w.shape[1]))
        q, flips = round_channels(w, scale, gram, s.depthwise)
        flipped, total = flipped + flips, total + q.size
        rounded = q * scale[:, None]
        mean_error = ((rounded - w) * mean.reshape(len(w), -1)).sum(1) if s.depthwise else (rounded - w) @ mean
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(rounded.reshape(weight.shape).astype(np.float32), n.input[1]))
        if len(n.input) > 2 and n.input[2] in inits:  # the bias absorbs the mean error left (bias correction)
            bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
            inits[n.input[2]].CopyFrom(numpy_helper.from_array((bias - mean_error).astype(np.float32), n.input[2]))
    return out, {
        "method": "levels chosen by each layer's output error on calibration inputs (greedy flips of e^T E[xx^T] e); "
                  "scales unchanged; mean error moved into the bias",
        "layers": len(layers) - len(too_few), "weights": total, "flipped": flipped, "images": len(images),
        "nearest_rounding": too_few,  # too few samples of their inputs to choose by
        "seconds": round(time.perf_counter() - started, 2),
    }


def restore_float_layers(model, fp32_model, node_names) -> int:
    """Give the layers ``node_names`` of ``model`` (kept in float) their FP32 weights and bias back; how many tensors.

    A layer left in float gains nothing from int8 levels, and its bias carries a correction meant for them.
    """
    names = set(node_names)
    original = {i.name: i for i in fp32_model.graph.initializer}
    restored = 0
    for node in model.graph.node:
        if node.name not in names:
            continue
        for init in model.graph.initializer:
            if init.name in node.input[1:] and init.name in original:
                init.CopyFrom(original[init.name])
                restored += 1
    return restored
