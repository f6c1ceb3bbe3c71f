"""The reliability diagram: accuracy per confidence bin against the diagonal a calibrated model follows (SVG, no libraries)."""

from __future__ import annotations

import html

from tledge.errors import TledgeError

SIZE, LEFT, TOP = 300, 56, 44  # the plot square and its margins
WIDTH, HEIGHT = LEFT + SIZE + 20, TOP + SIZE + 50


def reliability_svg(ece_record: dict, title: str) -> str:
    """A self-contained SVG reliability diagram: accuracy per bin as bars, the gap to confidence outlined in red,
    and the diagonal a perfectly calibrated model would follow. ``ece_record`` is what expected_calibration_error
    (or failure_summary) returns."""
    if not isinstance(ece_record, dict) or not isinstance(ece_record.get("bins"), list) or "ece" not in ece_record:
        raise TledgeError("reliability_svg needs the record from expected_calibration_error (with 'ece' and 'bins')")
    ece = float(ece_record["ece"])
    size, left, top, width, height = SIZE, LEFT, TOP, WIDTH, HEIGHT

    def x(v: float) -> float:
        return round(left + v * size, 2)

    def yv(v: float) -> float:
        return round(top + (1 - v) * size, 2)

    label = f"{title} (ECE {ece:.4f})"
    parts = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
         f'aria-label="{html.escape(label)}">'),
        f"<title>{html.escape(label)}</title>",
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-family="sans-serif" font-size="14">{html.escape(label)}</text>',
        f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#888"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{x(tick)}" y="{top + size + 16}" text-anchor="middle" font-family="sans-serif" '
                     f'font-size="10">{tick:g}</text>')
        parts.append(f'<text x="{left - 6}" y="{yv(tick) + 3}" text-anchor="end" font-family="sans-serif" '
                     f'font-size="10">{tick:g}</text>')
    for b in ece_record["bins"]:
        if not b.get("count"):
            continue
        lo, hi, acc, conf = float(b["lo"]), float(b["hi"]), float(b["accuracy"]), float(b["confidence"])
        w = round((hi - lo) * size, 2)
        parts.append(f'<rect class="accuracy" x="{x(lo)}" y="{yv(acc)}" width="{w}" height="{round(acc * size, 2)}" '
                     f'fill="#4878a8" stroke="#fff"><title>{lo:g}-{hi:g}: accuracy {acc:.3f}, confidence {conf:.3f}, '
                     f'{int(b["count"])} samples</title></rect>')
        gap_top = yv(max(acc, conf))
        parts.append(f'<rect class="gap" x="{x(lo)}" y="{gap_top}" width="{w}" height="{round(abs(acc - conf) * size, 2)}" '
                     f'fill="#c85a5a" fill-opacity="0.3" stroke="#c85a5a"/>')
    parts += [
        f'<line x1="{x(0)}" y1="{yv(0)}" x2="{x(1)}" y2="{yv(1)}" stroke="#444" stroke-dasharray="4 3"/>',
        (f'<text x="{left + size / 2}" y="{top + size + 34}" text-anchor="middle" font-family="sans-serif" '
         f'font-size="12">confidence</text>'),
        (f'<text x="14" y="{top + size / 2}" text-anchor="middle" font-family="sans-serif" font-size="12" '
         f'transform="rotate(-90 14 {top + size / 2})">accuracy</text>'),
        "</svg>",
    ]
    return "\n".join(parts)


def reliability_chart(failures: dict) -> str:
    """One reliability diagram per variant, side by side in one SVG."""
    parts = [reliability_svg(failure, name).replace("<svg ", f'<svg x="{i * WIDTH}" ', 1) for i, (name, failure) in enumerate(failures.items())]
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(parts) * WIDTH}" height="{HEIGHT}">' + "".join(parts) + "</svg>\n"
