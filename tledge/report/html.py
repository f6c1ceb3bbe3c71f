"""``report.html``: one self-contained page for people (inline SVG charts, no scripts, no external files).

Latency distributions per variant, the accuracy and drift table, per-class drift, the INT8 budget of each model
and the fine-tuning curves, all drawn from the same summary as ``report.json``.
"""

from __future__ import annotations

import html

COLORS = ("#4878a8", "#e0894a", "#5aa05a", "#c85a5a", "#8c6bb1", "#8c8c8c")


def _e(value) -> str:
    return html.escape(str(value))


def _latency_svg(variants: dict) -> str:
    """Box plots of each variant's timed runs: whiskers p1..p99, box p10..p90, the median as a line."""
    import numpy as np

    rows = [(name, np.asarray(v["latency_ms"]["samples_ms"])) for name, v in variants.items() if v["latency_ms"].get("samples_ms")]
    if not rows:
        return "<p>No latency samples were recorded.</p>"
    width, left, right, row_h = 760, 170, 40, 34
    top_ms = max(float(np.percentile(s, 99)) for _, s in rows) * 1.05
    scale = (width - left - right) / top_ms
    height = 50 + row_h * len(rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="latency distributions">']
    for tick in np.linspace(0, top_ms, 6):
        x = left + tick * scale
        parts.append(f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{height - 24}" stroke="#ddd"/>'
                     f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle" class="tick">{tick:.1f} ms</text>')
    for i, (name, s) in enumerate(rows):
        y = 28 + i * row_h
        p1, p10, p50, p90, p99 = (float(np.percentile(s, q)) for q in (1, 10, 50, 90, 99))
        color = COLORS[i % len(COLORS)]
        parts += [
            f'<text x="10" y="{y + 16}">{_e(name)}</text>',
            f'<line x1="{left + p1 * scale:.1f}" y1="{y + 12}" x2="{left + p99 * scale:.1f}" y2="{y + 12}" stroke="{color}"/>',
            f'<rect x="{left + p10 * scale:.1f}" y="{y + 2}" width="{max(1.0, (p90 - p10) * scale):.1f}" height="20" fill="{color}" fill-opacity="0.35" stroke="{color}"/>',
            f'<line x1="{left + p50 * scale:.1f}" y1="{y}" x2="{left + p50 * scale:.1f}" y2="{y + 24}" stroke="{color}" stroke-width="3"/>',
            f'<text x="{min(left + p99 * scale + 6, width - right):.1f}" y="{y + 16}" class="tick">p50 {p50:.2f}</text>',
        ]
    parts.append("</svg>")
    return "".join(parts)


def _curves_svg(stages: list[dict]) -> str:
    """Validation accuracy per epoch through the fine-tuning stages, one colour a stage (rejected stages dashed)."""
    points = []
    epoch = 0
    for k, stage in enumerate(stages):
        for h in stage.get("history", []):
            epoch += 1
            points.append((epoch, h["val_accuracy"], k))
    if not points:
        return "<p>No fine-tuning history was recorded.</p>"
    width, height, left, bottom, top = 760, 280, 50, 40, 20
    lo = min(p[1] for p in points)
    lo = max(0.0, min(lo, 1.0) - 0.02)
    sx = (width - left - 20) / max(1, epoch)
    sy = (height - bottom - top) / max(1e-9, 1.0 - lo)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="fine-tuning curves">']
    for v in (lo, (lo + 1) / 2, 1.0):
        y = top + (1.0 - v) * sy
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 20}" y2="{y:.1f}" stroke="#ddd"/><text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{v:.2f}</text>')
    for k, stage in enumerate(stages):
        pts = [(left + e * sx, top + (1.0 - a) * sy) for e, a, s in points if s == k]
        if not pts:
            continue
        color = COLORS[k % len(COLORS)]
        dash = "" if stage.get("accepted", True) else ' stroke-dasharray="5,4"'
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
        parts.append(f'<text x="{pts[0][0] + 4:.1f}" y="{height - bottom + 16 + 12 * (k % 2)}" fill="{color}" class="tick">{_e(stage["name"])}'
                     f'{"" if stage.get("accepted", True) else " (rejected)"}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 2}" text-anchor="middle" class="tick">epoch (all stages, in order); validation top-1</text></svg>')
    return "".join(parts)


def _sample_efficiency_svg(curve: dict) -> str:
    """Validation top-1 against the share of training labels, transfer and scratch: the gap is what the pretrained
    weights are worth at each data size."""
    rows = curve.get("rows") or []
    if not rows:
        return ""
    width, height, left, bottom, top, right = 560, 260, 50, 44, 20, 120
    lo = max(0.0, min(min(r["transfer_val_accuracy"], r["scratch_val_accuracy"]) for r in rows) - 0.05)
    sx = (width - left - right) / max(1e-9, max(r["fraction"] for r in rows))
    sy = (height - bottom - top) / max(1e-9, 1.0 - lo)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="sample-efficiency curve">']
    for v in (lo, (lo + 1) / 2, 1.0):
        y = top + (1.0 - v) * sy
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#ddd"/><text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{v:.2f}</text>')
    for r in rows:
        x = left + r["fraction"] * sx
        parts.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle" class="tick">{r["fraction"]:.0%} ({r["train_images"]})</text>')
    for k, (key, label) in enumerate((("transfer_val_accuracy", "transfer"), ("scratch_val_accuracy", "from scratch"))):
        pts = [(left + r["fraction"] * sx, top + (1.0 - r[key]) * sy) for r in rows]
        color = COLORS[k]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts]
        parts.append(f'<text x="{pts[-1][0] + 8:.1f}" y="{pts[-1][1] + 4:.1f}" fill="{color}">{label}</text>')
    parts.append(f'<text x="{(width - right + left) / 2}" y="{height - 4}" text-anchor="middle" class="tick">share of the training labels (images); validation top-1</text></svg>')
    return "".join(parts)


def _delta_cell(delta: float | None) -> str:
    if delta is None:
        return "<td></td>"
    # red for classes that lost, green for classes that gained; saturates at 10 points
    strength = min(1.0, abs(delta) / 10)
    color = f"rgba(200,60,60,{0.15 + 0.6 * strength:.2f})" if delta < 0 else f"rgba(60,160,60,{0.15 + 0.6 * strength:.2f})" if delta > 0 else "transparent"
    return f'<td class="num" style="background:{color}">{delta:+.1f}</td>'


def render_html(summary: dict) -> str:
    m = summary["machine"]
    ev = summary["evaluation"]
    variants = summary["variants"]
    ref = summary["reference"]
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>tledge report</title>',
        "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}"
        "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}.warn{background:#fff3cd;border:1px solid #e0b000;padding:8px;margin:8px 0}"
        "svg{font-size:12px;font-family:system-ui,sans-serif}svg .tick{font-size:11px;fill:#555}.small{color:#555;font-size:13px}.thumbs{display:flex;flex-wrap:wrap;gap:8px}.thumbs figure{margin:0;font-size:11px;color:#555;max-width:120px}</style></head><body>",
        "<h1>tledge report</h1>",
    ]
    for w in summary.get("warnings", []):
        out.append(f'<div class="warn"><b>Warning:</b> {_e(w)}</div>')
    gpu = m.get("gpu")
    out.append(f'<p class="small">Accuracy on the <b>{_e(ev["split"])}</b> split ({ev["images"]} images, {ev["classes"]} classes). '
               f'Latency at input {_e(summary["input_shape"])} on {_e(m["cpu"])} ({m["usable_cpus"]} usable cores, int8 class {_e(m.get("cpu_class", "?"))})'
               f'{"; GPU " + _e(", ".join(g["name"] for g in gpu)) if gpu else ""}; onnxruntime {_e(m["versions"]["onnxruntime"])}, torch {_e(m["versions"]["torch"])}.</p>')

    out += ["<h2>Accuracy and drift</h2>", "<table><tr><th>variant</th><th>runtime</th><th>top-1</th><th>&Delta; top-1 (pt)</th>"
            f"<th>agreement with {_e(ref)}</th><th>KL from {_e(ref)}</th><th>p50 ms</th><th>p99 ms</th><th>stdev ms</th><th>speed-up</th><th>img/s</th><th>MB</th></tr>"]
    for name, v in variants.items():
        lat = v["latency_ms"]
        out.append(f"<tr><td>{_e(name)}</td><td>{_e(v['runtime'])}</td><td class=num>{v['top1']:.4f}</td><td class=num>{v['top1_delta_pp']:+.2f}</td>"
                   f"<td class=num>{v['agreement_with_reference']:.4f}</td><td class=num>{v.get('kl_divergence_from_reference', 0):.4f}</td>"
                   f"<td class=num>{lat['p50']:.2f}</td><td class=num>{lat['p99']:.2f}</td><td class=num>{lat.get('stdev', 0):.2f}</td>"
                   f"<td class=num>{v['speedup_vs_reference_p50']:.2f}x</td><td class=num>{v['throughput']['images_per_s']:.0f}</td><td class=num>{v['bytes'] / 1e6:.1f}</td></tr>")
    out.append("</table>")
    out.append('<p class="small">' + "<br>".join(f"<b>{_e(n)}</b>: {_e(v.get('accuracy_method') or '')}" for n, v in variants.items()) + "</p>")

    out += ["<h2>Latency distributions</h2>", f'<p class="small">Batch {summary["input_shape"][0]}; box p10 to p90, whiskers p1 to p99, thick line the median.</p>',
            _latency_svg(variants)]

    classes = list(next(iter(variants.values())).get("drift", {}).get("per_class_top1_delta_pp", {}))
    if classes:
        out += ["<h2>Per-class drift</h2>", f'<p class="small">Top-1 change per class against {_e(ref)}, in points.</p>',
                "<table><tr><th>class</th>" + "".join(f"<th>{_e(n)}</th>" for n in variants) + "</tr>"]
        for c in classes:
            out.append(f"<tr><td>{_e(c)}</td>" + "".join(_delta_cell(v.get("drift", {}).get("per_class_top1_delta_pp", {}).get(c)) for v in variants.values()) + "</tr>")
        out.append("</table>")
        for name, v in variants.items():
            shift = v.get("drift", {}).get("confusion_shift") or []
            if shift:
                out.append(f'<p class="small"><b>{_e(name)}</b>: confusion cells that moved most: '
                           + ", ".join(f"{_e(s['true'])} &rarr; {_e(s['predicted'])} {s['change']:+d}" for s in shift) + "</p>")

    failures = {n: v["failure"] for n, v in variants.items() if "failure" in v}
    if failures:
        from tledge.report.reliability_chart import reliability_svg

        out += ["<h2>Failure behaviour</h2>",
                '<p class="small">Expected calibration error, wrong answers at high confidence, and the confidence below '
                'which to abstain for the target accuracy (if one was set).</p>',
                "<table><tr><th>variant</th><th>ECE</th><th>high-confidence errors</th><th>AURC</th><th>abstain below</th><th>coverage</th></tr>"]
        for name, f in failures.items():
            target = f["selective_prediction"].get("target") or {}
            below = f"{target['threshold']:.3f}" if target.get("threshold") is not None else ("not reachable" if target else "")
            coverage = f"{target['coverage']:.3f}" if target.get("coverage") is not None else ""
            out.append(f"<tr><td>{_e(name)}</td><td>{f['ece']:.4f}</td><td>{f['high_confidence_error_count']}</td>"
                       f"<td>{f['selective_prediction']['aurc']:.4f}</td><td>{below}</td><td>{coverage}</td></tr>")
        out.append("</table>")
        out += [reliability_svg(f, n) for n, f in failures.items()]
        for name, f in failures.items():
            if f["high_confidence_errors"]:
                out.append(f'<p class="small"><b>{_e(name)}</b>, most confident mistakes:</p><div class="thumbs">' + "".join(
                    f'<figure>{_thumbnail(summary.get("data"), e["file"])}<figcaption>{_e(e["file"])}<br>{_e(e["label"])} &rarr; '
                    f'{_e(e["predicted"])}, {e["confidence"]:.3f}</figcaption></figure>'
                    for e in f["high_confidence_errors"][:10]) + "</div>")

    q = summary.get("quantize")
    if q:
        out += ["<h2>INT8 within the drift budget</h2>", "<table><tr><th>model</th><th>method</th><th>validation drop (pt)</th><th>agreement</th><th>expected agreement</th>"
                "<th>budget</th><th>layers in float</th><th>QAT</th></tr>"]
        for target, info in q["models"].items():
            d = info["drift"]
            qat = info.get("qat")
            out.append(f"<tr><td>{_e(info['path'])}</td><td>{_e(info.get('calibration_method', ''))}</td><td class=num>{d['top1_drop_pp']:+.2f}</td>"
                       f"<td class=num>{d['agreement']:.4f}</td><td class=num>{d.get('expected_agreement', d['agreement']):.4f}</td><td>{'met' if d['met'] else '<b>MISSED</b>'}</td><td class=num>{len(info['kept_float'])}</td>"
                       f"<td>{'' if not qat else 'chosen' if qat['chosen'] else 'tried, not better'}</td></tr>")
        out.append("</table>")

    ft = summary.get("finetune")
    if ft:
        out += ["<h2>Fine-tuning</h2>", f'<p class="small">{_e(ft["model"]["arch"])} ({_e(ft["model"]["weights"])} weights); '
                + "; ".join(f"{_e(s['name'])}: best val {s['val_accuracy']:.4f} at epoch {s['best_epoch']}{'' if s['accepted'] else ' (rejected)'}" for s in ft["stages"])
                + "</p>", _curves_svg(ft["stages"])]
        t = ft.get("transfer")
        if t:
            loud = t["transfer_gain_pp"] <= 0
            out.append(f'<div class="warn"><b>{_e(t["message"])}</b></div>' if loud else
                       f'<p>Transfer gain over training from scratch: <b>{t["transfer_gain_pp"]:+.1f} pt</b> of val top-1 '
                       f'({t["transfer_val_accuracy"]:.4f} vs {t["scratch_val_accuracy"]:.4f}, {_e(t["verdict"])}); {_e(t["fairness"])}.</p>')
        if ft.get("curve"):
            out += ["<h3>Sample efficiency</h3>", "<table><tr><th>share of training labels</th><th>images</th><th>transfer val top-1</th>"
                    "<th>scratch val top-1</th><th>gain (pt)</th></tr>"]
            out += [f"<tr><td class=num>{r['fraction']:.0%}</td><td class=num>{r['train_images']}</td><td class=num>{r['transfer_val_accuracy']:.4f}</td>"
                    f"<td class=num>{r['scratch_val_accuracy']:.4f}</td><td class=num>{r['transfer_gain_pp']:+.1f}</td></tr>" for r in ft["curve"]["rows"]]
            out += ["</table>", _sample_efficiency_svg(ft["curve"])]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


THUMBNAIL_PX = 96


def _thumbnail(root, file: str) -> str:
    """The image as an inline JPEG (the page stays one file), or nothing where it cannot be read any more."""
    import base64
    import io
    from pathlib import Path

    if not root:
        return ""
    try:
        from PIL import Image

        with Image.open(Path(root) / file) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            img.save(buffer, "JPEG", quality=80)
    except (OSError, ValueError):  # moved, deleted or unreadable since the bench: the caption still names it
        return ""
    return f'<img alt="{_e(file)}" src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode("ascii")}">'
