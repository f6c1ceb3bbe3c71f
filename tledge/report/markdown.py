"""report.md: the build's figures for people, one section per stage, with the SVG charts beside it."""

from __future__ import annotations

import html

from tledge.quant.drift_budget import expected_note, score
from tledge.quant.engine_cost import describe_float_cost


def transfer_summary(ft: dict) -> dict:
    """What the fine-tune proved: strategy and why it won, transfer gain over scratch, gap, curve (records from
    before strategies existed have none of it)."""
    out = {}
    if ft.get("strategy"):
        out["strategy"] = ft["strategy"]
    if ft.get("baseline"):
        b = ft["baseline"]
        out["transfer"] = {k: b[k] for k in ("transfer_val_accuracy", "scratch_val_accuracy", "transfer_gain_pp", "verdict", "message", "budget", "fairness")}
    if ft.get("diagnostics"):
        d = ft["diagnostics"]
        out["diagnostics"] = {"generalization_gap_pp": d["generalization_gap_pp"], "train_accuracy": d["train"]["accuracy"],
                              "val_accuracy": d["val"]["accuracy"], "val_per_class_accuracy": d["val"]["per_class_accuracy"],
                              "val_confusion_matrix": d["val"]["confusion_matrix"]}
    if ft.get("curve"):
        out["curve"] = ft["curve"]
    return out


def transfer_lines(ft: dict) -> list[str]:
    lines = []
    if "strategy" in ft:
        st = ft["strategy"]
        cache = f" after {st['cost']['cache_seconds']:.0f} s caching the frozen layers" if st["cost"].get("cache_seconds") else ""
        lines += [f"Strategy `{st['name']}` ({st['cost']['epochs']} epochs, {st['cost']['seconds']:.0f} s of training{cache}): {st['why']}.", ""]
    if "transfer" in ft:
        t = ft["transfer"]
        loud = t["transfer_gain_pp"] <= 0
        prefix = f"{t['verdict']}: "  # a loud message starts with its verdict (no str.removeprefix: Python 3.8 on JetPack 5)
        detail = t["message"][len(prefix):] if t["message"].startswith(prefix) else t["message"]
        lines += [(f"> **{t['verdict']}:** {detail}." if loud else
                   f"Transfer gain over training from scratch: **{t['transfer_gain_pp']:+.1f} pt** of val top-1 "
                   f"({t['transfer_val_accuracy']:.4f} vs {t['scratch_val_accuracy']:.4f}, {t['verdict']})."),
                  "", f"Baseline: {t['budget']['scratch_epochs_run']} epochs from scratch in {t['budget']['scratch_seconds']:.0f} s; {t['fairness']}.", ""]
    if "diagnostics" in ft:
        d = ft["diagnostics"]
        worst = sorted((v, c) for c, v in d["val_per_class_accuracy"].items() if v is not None)[:3]
        lines += [f"Generalization gap (train - val top-1, eval mode): {d['generalization_gap_pp']:+.1f} pt "
                  f"({d['train_accuracy']:.4f} vs {d['val_accuracy']:.4f}). Weakest classes on val: "
                  + ", ".join(f"{c} {v:.2f}" for v, c in worst) + " (per-class accuracy and confusion matrix in report.json).", ""]
    if "curve" in ft:
        lines += ["| share of training labels | images | transfer val top-1 | scratch val top-1 | gain (pt) |", "|---|---|---|---|---|"]
        lines += [f"| {r['fraction']:.0%} | {r['train_images']} | {r['transfer_val_accuracy']:.4f} | {r['scratch_val_accuracy']:.4f} | {r['transfer_gain_pp']:+.1f} |"
                  for r in ft["curve"]["rows"]]
        lines.append("")
    return lines


def bar_chart_svg(title: str, rows: list[tuple[str, float, str]]) -> str:
    """A small horizontal bar chart as standalone SVG (no plotting dependency); rows are (label, value, value text)."""
    width, left, bar_h, gap = 620, 150, 22, 10
    height = 40 + len(rows) * (bar_h + gap)
    top = max(v for _, v, _ in rows) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-weight="bold">{html.escape(title)}</text>',
    ]
    for i, (label, value, text) in enumerate(rows):
        y = 32 + i * (bar_h + gap)
        w = (width - left - 150) * value / top
        parts.append(f'<text x="10" y="{y + 15}">{html.escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#4878a8"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{html.escape(text)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def render_markdown(summary: dict, extra: dict | None) -> str:
    m = summary["machine"]
    ev = summary["evaluation"]
    lines = ["# tledge report", ""]
    for warning in summary.get("warnings", []):
        lines += [f"> **WARNING:** {warning}", ""]
    if extra and extra.get("build"):
        b = extra["build"]
        lines += [f"Build of `{b['model']}` on `{b['data']}` in {b['seconds']:.0f} s.", ""]
    lines += [
        f"Accuracy on the **{ev['split']}** split ({ev['images']} images, {ev['classes']} classes); latency at input "
        f"`{summary['input_shape']}` on {m['cpu']} ({m['usable_cpus']} usable cores), "
        f"onnxruntime {m['versions']['onnxruntime']}, torch {m['versions']['torch']}.",
        "",
        "| variant | runtime | top-1 | Δ top-1 (pp) | agreement with " + summary["reference"] + " | p50 ms | p90 ms | p99 ms | speed-up (p50) | throughput (img/s) | size (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        lat = v["latency_ms"]
        lines.append(
            f"| {name} | {v['runtime']} | {v['top1']:.4f} | {v['top1_delta_pp']:+.2f} | {v['agreement_with_reference']:.4f} | "
            f"{lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {v['speedup_vs_reference_p50']:.2f}x | "
            f"{v['throughput']['images_per_s']:.0f} (batch {v['throughput']['batch']}) | {v['bytes'] / 1e6:.1f} |"
        )
    drifted = [(name, v["drift"]) for name, v in summary["variants"].items() if v.get("drift", {}).get("lost_most") or v.get("drift", {}).get("confusion_shift")]
    if drifted:
        lines += ["", "Where the predictions moved against the reference:", ""]
        for name, d in drifted:
            lost = ", ".join(f"{e['class']} {e['top1_delta_pp']:+.1f} pt" for e in d["lost_most"]) or "no class lost top-1"
            moves = ", ".join(f"{c['true']} -> {c['predicted']} {c['change']:+d}" for c in d["confusion_shift"][:3])
            lines.append(f"- **{name}**: classes that lost most: {lost}" + (f"; confusion cells that moved most: {moves}" if moves else "") + ".")
    lines += [
        "",
        f"Latency: batch {summary['input_shape'][0]}, {next(iter(summary['variants'].values()))['latency_ms']['samples']} timed runs per variant in interleaved rounds.",
        "The TensorRT Q/DQ model is built for TensorRT; on the ONNX Runtime CPU provider its latency says nothing about",
        "a GPU engine (CPUs run symmetric int8 activations slowly).",
        "",
        "How each accuracy figure was computed:",
        "",
    ]
    for name, v in summary["variants"].items():
        line = f"- **{name}**: {v.get('accuracy_method') or 'ONNX Runtime on this CPU'}."
        if "simulated" in v and v.get("precision") == "int8-cpu":
            sim = v["simulated"]
            line += f" Simulated: top-1 {sim['top1']:.4f}, agreement {sim['agreement']:.4f}"
            if "fused_vs_simulated" in v:
                line += f"; this CPU's kernels agree with the simulation on {v['fused_vs_simulated']['top1_agreement']:.4f} of the images"
            line += "."
        if "cpu_target" in v:
            t = v["cpu_target"]
            where = "inside" if t["inside_target"] else "OUTSIDE" if t["inside_target"] is False else "unknown for"
            line += f" CPU target `{t['name']}`; this CPU ({t['this_cpu']}) is {where} it."
        lines.append(line)
    lines += [
        "",
        f"CPU: {m['cpu']}, int8 class `{m.get('cpu_class', 'unknown')}` (flags: {', '.join(m.get('cpu_int8_flags') or []) or 'none'}). "
        "CPU INT8 speed, and whether full 8-bit weights are computed correctly, depend on this class: x86 CPUs without "
        "VNNI add int8 products into saturating int16.",
        "",
        "![latency](latency.svg)",
        "",
        "![drift from the reference](accuracy.svg)",
        "",
    ]
    lines += failure_lines(summary)
    if "finetune" in summary:
        ft = summary["finetune"]
        ds = ft["dataset"]
        lines += [
            "## Fine-tuning",
            "",
            f"`{ft['model']['arch']}` from {ft['model']['weights_source']}; {len(ds['classes'])} classes, "
            f"{ds['counts']['train']} train / {ds['counts']['val']} val / {ds['counts']['test']} test images.",
            "",
            *hygiene_lines(ft.get("split_hygiene")),
            "| stage | trainable blocks | lr | epochs | best epoch | val top-1 | kept |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in ft["stages"]:
            lines.append(f"| {s['name']} | {s['trainable_blocks']} | {s['lr']:.2g} | {s['epochs_run']} | {s['best_epoch']} | {s['val_accuracy']:.4f} | {'yes' if s['accepted'] else 'no: validation did not improve'} |")
        lines += ["", "PyTorch FP32 result: " + ", ".join(f"{k} {v}" for k, v in ft["result"].items()), ""]
        lines += transfer_lines(ft)
    if "export" in summary:
        p = summary["export"]["parity"]
        lines += [
            "## Export",
            "",
            f"ONNX opset {summary['export']['opset']}, dynamic batch. Parity with PyTorch on {p['inputs']}: max |Δlogit| "
            f"{p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f} (batch sizes {p['batch_sizes']}).",
            "",
        ]
    if "quantize" in summary:
        q = summary["quantize"]
        lines += ["## Quantization", "", f"{q['calibration']['images']} calibration images ({q['calibration']['method']}, listed with sha256 in `calibration.json`).", ""]
        for target, info in q["models"].items():
            lines += quantized_model_lines(target, info)
        lines.append("")
    return "\n".join(lines)


def quantized_model_lines(target: str, info: dict) -> list[str]:
    """One INT8 model in the report: its format, drift budget, fallback, and what is special to its runtime."""
    method = f", ranges by {info['calibration_method']}" if "calibration_method" in info else ""
    lines = [f"- `{info['path']}` ({target}): activations {info['activations']}, weights {info['weights']}{method}."]
    if "method_choice" in info:
        c = info["method_choice"]["candidates"]
        lines.append("  Calibration method chosen on validation: " + ", ".join(
            f"{m} agreement {f['agreement']:.4f}{expected_note(f)}, top-1 {-f['top1_drop_pp']:+.2f} pt" for m, f in c.items()) + ".")
        order = info["method_choice"].get("order", [])
        closest = max(c, key=lambda m: score(c[m])) if c else None
        if order and closest and order[0] != closest and score(c[order[0]]) < score(c[closest]):
            lines.append(f"  {order[0]} went first: it met the budget with every layer in INT8, within one validation image of "
                         f"{closest}, the closest to FP32 (a float layer must earn its cost).")
        if len(info["method_choice"].get("budget_search", [])) > 1:
            lines.append("  The budget search went on to the next method when one missed: " + "; ".join(
                f"{s['method']} with {s['layers_in_float']} layer(s) in float {'met' if s['met'] else 'missed'} it" for s in info["method_choice"]["budget_search"]) + ".")
    if "cpu_target" in info:
        t = info["cpu_target"]
        requested = f" ({t['requested']})" if t["requested"] != t["name"] else ""
        lines.append(f"  CPU target `{t['name']}`{requested}: {t['description']}.")
    if "weight_rounding" in info:
        r = info["weight_rounding"]
        grid = "pair-safe grid" if r.get("grid", "").startswith("pair-safe") else "full-range grid"
        lines.append(f"  Weight levels chosen by output error on {r['images']} calibration images ({grid}): {r['flipped']} of "
                     f"{r['weights']} weights in {r['layers']} layers rounded the other way than nearest.")
    if "narrowing" in info:
        n = info["narrowing"]
        lines.append(f"  {n['narrowed_channels']} of {n['channels_checked']} output channels in {n['narrowed_layers']} of "
                     f"{n['layers_checked']} layers narrowed; {n.get('pairs_moved_to_limit', 0)} weights moved onto the pair limit.")
    if "kernel_layout" in info:
        k = info["kernel_layout"]
        lines.append(f"  {', '.join(f'`{n}`' for n in k['padded_input_channels'])} padded to {k['to']} input channels (zero weights, the same "
                     f"outputs): {k['why']}.")
    if "drift" in info:
        d = info["drift"]
        lines.append(f"  Drift budget on {d['images']} {d['split']} images ({d['method']}): top-1 {d['top1']:.4f} vs FP32 "
                     f"{d['top1_fp32']:.4f}, agreement {d['agreement']:.4f}{expected_note(d)}: **{'met' if d['met'] else 'MISSED'}** "
                     f"(drop <= {d['budget']['max_top1_drop_pp']} pt, agreement and expected agreement >= {d['budget']['min_agreement']}).")
    if info.get("fallback"):
        f = info["fallback"]
        tried = ", ".join(f"{t['layers']} layers: agreement {t['agreement']:.4f}{expected_note(t)}" for t in f["tried"])
        added = ", ".join(f"`{n}`" for n in f["kept_float_added"]) or "none"
        stopped = f" Stopped: {f['stopped']}." if f.get("stopped") else ""
        lines.append(f"  Per-layer fallback kept {len(f['kept_float_added'])} layer(s) in float ({added}); tried {tried}.{stopped}")
        if f.get("priced"):
            steps = f["priced"]["steps"]
            dear = [f"`{t['node']}` ({t['slowdown']:.2f}x slower)" for t in steps if t["kept"] == "int8" and t.get("why", "price") == "price"]
            idle = sum(t["kept"] == "int8" and t.get("why") == "no gain" for t in steps)
            lines.append(f"  Priced by latency on this CPU (a float layer may slow the model by {f['priced']['max_slowdown']:.0%} at most): "
                         f"{sum(t['kept'] == 'float' for t in steps)} of {len(steps)} layers tried kept in float, "
                         f"{'budget met' if f['priced']['met'] else 'budget missed, so the layers were then kept by sensitivity alone'}"
                         f"{'; left in INT8 as too slow: ' + ', '.join(dear) if dear else ''}"
                         f"{f'; {idle} left in INT8 as bringing the model no closer to FP32' if idle else ''}.")
        if "latency_cost" in f:
            c = f["latency_cost"]
            versus = (f"; {c['speedup_vs_fp32']['one_thread']:.2f}x FP32's speed on one thread, {c['speedup_vs_fp32']['all_cores']:.2f}x on every core"
                      if "speedup_vs_fp32" in c else "")
            lines.append(f"  Their cost on this CPU: batch-1 p50 {c['p50_ms']['without_fallback']:.2f} -> {c['p50_ms']['with_fallback']:.2f} ms "
                         f"({c['slowdown']:.2f}x){versus}.")
    if "engine_cost" in info:  # the TensorRT model: no engine here, so the cost of its float layers is read from the graph
        lines.append(f"  In a TensorRT engine: {describe_float_cost(info['engine_cost'])}.")
    if info.get("qat"):
        q = info["qat"]
        before = f" with {q['post_training_float_layers']} float layer(s)" if "post_training_float_layers" in q else ""
        after = f" with {q['float_layers']} float layer(s)" if "float_layers" in q else ""
        lines.append(f"  Quantization-aware fine-tuning{' (' + q['why'] + ')' if 'why' in q else ''}: agreement "
                     f"{q['drift']['agreement']:.4f}{expected_note(q['drift'])}{after}, {'met' if q['drift']['met'] else 'missed'}, against "
                     f"{q['post_training_drift']['agreement']:.4f} post-training{before}: "
                     f"**{'the QAT model ships' if q['chosen'] else 'post-training ships'}**.")
    if "calibration_cache" in info:
        c = info["calibration_cache"]
        lines.append(f"  `{c['path']}`: TensorRT {c['trt_version']} implicit-INT8 cache ({c['tensors']} tensors; retarget it for another version).")
    if "validation" in info:
        v = info["validation"]
        lines.append(f"  Checked on {v['cpu']} ({v['cpu_class']}, {'inside' if v['inside_target'] else 'outside'} the target): "
                     f"fused kernels agree with the simulation on {v['top1_agreement']:.4f} of {v['images']} validation images.")
    return lines


def failure_lines(summary: dict) -> list[str]:
    """How each variant fails: calibration, confident mistakes, and what abstaining buys."""
    rows = [(name, v["failure"]) for name, v in summary["variants"].items() if "failure" in v]
    if not rows:
        return []
    threshold = rows[0][1]["high_confidence_threshold"]
    lines = ["## Failure behaviour", "",
             f"On the {summary['evaluation']['split']} split: expected calibration error (ECE, 15 confidence bins), wrong answers "
             f"with confidence >= {threshold:g}, and the area under the risk-coverage curve (lower: abstaining on the least "
             "confident images removes more errors).", "",
             "| variant | ECE | ECE change vs " + summary["reference"] + " | high-confidence errors | AURC | abstain below | coverage there |",
             "|---|---|---|---|---|---|---|"]
    for name, f in rows:
        target = f["selective_prediction"].get("target") or {}
        below = (f"{target['threshold']:.3f} (for {target['target_accuracy']:g})" if target.get("threshold") is not None
                 else "target not reachable" if target else "no target set")
        coverage = f"{target['coverage']:.3f}" if target.get("coverage") is not None else ""
        change = f"{f['ece_change_vs_reference']:+.4f}" if "ece_change_vs_reference" in f else ""
        lines.append(f"| {name} | {f['ece']:.4f} | {change} | {f['high_confidence_error_count']} | "
                     f"{f['selective_prediction']['aurc']:.4f} | {below} | {coverage} |")
    scaled = [(name, f) for name, f in rows if "temperature_scaled" in f]
    if scaled:
        lines += ["", "After temperature scaling (one temperature per variant, fitted on the validation split; the logits are unchanged): "
                  + "; ".join(f"{name}: T {f['temperature_scaled']['temperature']:.3g}, ECE {f['ece']:.4f} -> {f['temperature_scaled']['ece']:.4f}"
                              for name, f in scaled) + "."]
    listed = [(name, e) for name, f in rows for e in f["high_confidence_errors"][:5]]
    if listed:
        lines += ["", "The most confident mistakes (up to 5 per variant; all of them in `bench.json`):", ""]
        lines += [f"- **{name}**: `{e['file']}` is {e['label']}, predicted {e['predicted']} at {e['confidence']:.3f}" for name, e in listed]
    lines += ["", "![reliability](reliability.svg)", ""]
    return lines


def hygiene_lines(h: dict | None) -> list[str]:
    """Whether the held-out splits are really held out, and how balanced the classes are."""
    if not h:
        return []
    ratio = h["class_balance"].get("train_imbalance_ratio")
    return [f"Split hygiene: {len(h['exact_across_splits'])} image(s) byte-identical across splits, {h['exact_within_split']} copies "
            f"within a split, {h['near_across_splits_total']} near-duplicate pair(s) across splits (perceptual hash within "
            f"{h['near_distance']} bits; listed in finetune.json), {h['label_conflicts']} duplicate pair(s) with different labels; "
            f"train classes {'imbalanced ' + format(ratio, '.1f') + ':1' if ratio else 'balance unknown'} (largest to smallest).", ""]
