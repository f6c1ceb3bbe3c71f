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


def _patches(x: np.ndarray, node, kernel: tuple[int, int]) -> np.ndarray:
    """Input patches of a batch for a Conv: (positions, C_in, kh * kw) in the weight's (C, kh, kw) order.

    ``kernel``: the weight's (kh, kw), which ONNX lets a Conv leave out of its attributes."""
    kh, kw = _attr(node, "kernel_shape", None) or kernel
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

    def __init__(self, node, depthwise: bool, kernel: tuple[int, int] = (1, 1)):
        self.node, self.depthwise, self.kernel = node, depthwise, kernel
        self.gram, self.total, self.count = 0.0, 0.0, 0

    def add(self, activations: np.ndarray) -> None:
        """Add a batch of the layer's inputs, (N, C, H, W) or (N, features). Products in float32, sums in float64."""
        a = activations.astype(np.float32, copy=False)
        if self.node.op_type == "Conv":
            p = _patches(a, self.node, self.kernel)  # (L, C, kk)
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


def pair_partners(node, shape: tuple[int, ...], padded_channels: int | None = None) -> np.ndarray | None:
    """For each weight of one output channel (in the flattened ``(C_in/g, kh, kw)`` or Gemm ``K`` order): the index
    of the weight the x86 u8s8 kernels add it to in int16, or -1 where that partner is a padding zero.

    None for a layer whose kernel has no int16 pair step (depthwise convolution). ``padded_channels``: the input
    channels the kernels see when the convolution's input is padded (:func:`tledge.quant.cpu_kernels.pad_input_channels`).
    """
    from tledge.quant.cpu_kernels import zero_padded_channels
    from tledge.quant.saturation import gemm_rows

    if node.op_type == "Conv" and shape[1] == 1 and _attr(node, "group", 1) == shape[0] > 1:
        return None  # depthwise: its own kernel, exact int32 arithmetic
    inputs = int(np.prod(shape[1:]))
    index = (np.arange(inputs) + 1).reshape(1, *shape[1:])  # 0 marks a padding zero
    if padded_channels is not None:
        index = zero_padded_channels(index, padded_channels)
    rows = gemm_rows(node.op_type, index, group=_attr(node, "group", 1), trans_b=bool(_attr(node, "transB", 0)))
    if rows is None:
        return None
    order = rows[0]
    if len(order) % 2:
        order = np.append(order, 0)
    pairs = order.reshape(-1, 2) - 1
    partner = np.full(inputs, -1)
    for a, b in ((0, 1), (1, 0)):
        real = pairs[:, a] >= 0
        partner[pairs[real, a]] = pairs[real, b]
    return partner


def round_channels(w: np.ndarray, scale: np.ndarray, gram: np.ndarray, depthwise: bool, sweeps: int = 4,
                   start: np.ndarray | None = None, partner: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Int8 levels for ``w`` (channels x inputs) at ``scale`` (per channel) that lower ``e^T H e``; flips made.

    ``gram``: one (inputs x inputs) matrix shared by every channel, or (channels x inputs x inputs) for a depthwise
    convolution. ``start``: the levels to improve on (default: nearest). ``partner``: the int16 pair partner of each
    input (:func:`pair_partners`); a flip is then taken only where the pair stays unable to saturate (the portable
    CPU model's rule). Never raises the error: a flip is taken only where it lowers the quadratic.
    """
    from tledge.quant.saturation import PAIR_LIMIT

    q = np.clip(np.round(w / scale[:, None]), -LEVEL, LEVEL) if start is None else start.astype(np.float64)
    first = q.copy()
    err = q * scale[:, None] - w
    g = np.einsum("cd,cde->ce", err, gram) if depthwise else err @ gram
    held = np.zeros(q.shape, bool)
    held[np.arange(len(w)), np.abs(w).argmax(1)] = True  # keeps the channel's largest level, so the scale stays
    rows = np.arange(len(w))
    for _ in range(sweeps):
        flipped = 0
        for j in range(w.shape[1]):
            other = q[:, j] - np.sign(err[:, j])  # one level towards the real weight: its other neighbour
            step = (other - q[:, j]) * scale
            diag = gram[:, j, j] if depthwise else gram[j, j]
            change = 2 * step * g[:, j] + step * step * diag
            take = (change < 0) & (step != 0) & (np.abs(other) <= LEVEL) & ~held[:, j]
            if partner is not None and partner[j] >= 0:
                mate = q[:, partner[j]]
                take &= (other * mate <= 0) | (np.abs(other) + np.abs(mate) <= PAIR_LIMIT)
            if not take.any():
                continue
            idx = rows[take]
            flipped += len(idx)
            q[idx, j] = other[idx]
            err[idx, j] += step[idx]
            g[idx] += step[idx, None] * (gram[idx, j, :] if depthwise else gram[j][None, :])
        if not flipped:
            break
    return q, int((q != first).sum())


def _pair_safe_grid(node, weight: np.ndarray, padded_channels: int | None):
    """The portable CPU model's grid for one layer: its per-channel scales (the ones its quantizer is given), levels
    with no int16 pair that can saturate to start from, and each weight's pair partner; None for a depthwise layer
    (no pair step: the full-range grid)."""
    from tledge.quant.cpu_kernels import zero_padded_channels
    from tledge.quant.saturation import from_gemm_rows, gemm_rows, pair_safe_scales, quantize_pair_safe

    group, trans_b = _attr(node, "group", 1), bool(_attr(node, "transB", 0))
    laid_out = zero_padded_channels(weight, padded_channels) if padded_channels else weight
    rows = gemm_rows(node.op_type, laid_out, group=group, trans_b=trans_b)
    if rows is None:
        return None
    scale = pair_safe_scales(rows)[0].astype(np.float64)  # the same scales CpuInt8.prepare gives the quantizer
    start = from_gemm_rows(node.op_type, quantize_pair_safe(rows, scale).astype(np.float64), laid_out.shape, trans_b)
    if padded_channels:
        start = start[:, : weight.shape[1]]
    return scale, start.reshape(weight.shape[0], -1), pair_partners(node, weight.shape, padded_channels)


def round_weights(model, images: np.ndarray, batch: int = 8, pair_safe: bool = False) -> tuple[object, dict]:
    """A copy of FP32 ``model`` whose Conv and Gemm weights lie on the int8 grid the output error chose.

    ``images``: preprocessed calibration images (N, C, H, W). ``pair_safe``: the portable CPU model's grid (its
    narrowed per-channel scales; no int16 weight pair that can saturate, in the layout of the padded stem) instead
    of the full-range one. Returns the model and a JSON-ready record.
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
    stats = {n.name: _LayerStats(n, n.op_type == "Conv" and _attr(n, "group", 1) > 1, tuple(inits[n.input[1]].dims[2:4])) for n in layers}

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

    padded = {}  # convolutions whose int8 copies read an input padded to more channels (cpu_kernels)
    if pair_safe:
        from tledge.quant.cpu_kernels import with_padded_stem

        padded = {i.name: i.dims[1] for i in with_padded_stem(model).graph.initializer if list(i.dims) != list(inits[i.name].dims)}
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
        grid = _pair_safe_grid(n, weight, padded.get(n.input[1])) if pair_safe else None
        if grid is None:
            scale, start, partner = np.abs(w).max(1) / LEVEL, None, None
            scale[scale == 0] = 1.0
        else:
            scale, start, partner = grid
        gram, mean = s.gram / s.count, s.total / s.count
        diag = np.einsum("cii->ci", gram) if s.depthwise else np.diag(gram)
        damp = DAMPING * diag.mean(-1)  # a little of nearest rounding's own objective, against noise in E[xx^T]
        gram = gram + (damp[:, None, None] * np.eye(w.shape[1]) if s.depthwise else damp * np.eye(w.shape[1]))
        q, flips = round_channels(w, scale, gram, s.depthwise, start=start, partner=partner)
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
        "grid": "pair-safe (portable CPU: narrowed scales, no int16 pair can saturate)" if pair_safe else "full range (max |w| / 127 per channel)",
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
