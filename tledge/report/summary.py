"""Turn the stage records in an output folder into ``report.json`` (for machines) and ``report.md`` (for people)."""

from __future__ import annotations

from pathlib import Path

from tledge.artifacts import FORMATS, read_json, write_json, write_text
from tledge.errors import TledgeError
from tledge.report.html import render_html
from tledge.report.markdown import bar_chart_svg, render_markdown, transfer_summary
from tledge.report.reliability_chart import reliability_chart

STAGE_RECORDS = ("finetune", "export", "quantize", "bench", "monitor")


def collect_records(out_dir: Path) -> dict:
    return {name: read_json(out_dir / f"{name}.json") for name in STAGE_RECORDS if (out_dir / f"{name}.json").is_file()}


def _summary(records: dict) -> dict:
    bench = records["bench"]
    summary = {
        "format": FORMATS["report"],
        "stage": "report",
        "artifacts": ["report.json", "report.md", "report.html", "latency.svg", "accuracy.svg"]
                     + (["reliability.svg"] if any("failure" in v for v in bench["variants"].values()) else []),
        "reference": bench["reference"],
        "evaluation": bench["evaluation"],
        "data": bench.get("config", {}).get("data"),  # where the listed files are (thumbnails in report.html)
        "input_shape": bench["input_shape"],
        "machine": bench["machine"],
        "variants": {
            name: {
                "path": v["path"],
                "precision": v["precision"],
                "runtime": v["runtime"],
                "bytes": v["bytes"],
                "top1": v["top1"],
                "top1_delta_pp": v["top1_delta_pp"],
                "agreement_with_reference": v["agreement"],
                "latency_ms": v["latency_ms"],
                "throughput": v["throughput"],
                "speedup_vs_reference_p50": v["speedup_vs_reference_p50"],
                "accuracy_method": v.get("accuracy_method"),
                **{k: v[k] for k in ("simulated", "fused_vs_simulated", "cpu_target", "warnings", "drift", "top5",
                                      "kl_divergence_from_reference", "memory_mb_at_load", "backend", "failure") if k in v},
            }
            for name, v in bench["variants"].items()
        },
        "warnings": records.get("finetune", {}).get("warnings", []) + records.get("quantize", {}).get("warnings", []) + bench.get("warnings", [])
                    + records.get("monitor", {}).get("warnings", []),
    }
    if "finetune" in records:
        ft = records["finetune"]
        summary["finetune"] = {
            "model": ft["model"],
            "dataset": ft["dataset"],
            "stages": [{k: s[k] for k in ("name", "trainable_blocks", "lr", "epochs_run", "best_epoch", "val_accuracy", "accepted", "seconds", "history") if k in s}
                       for s in ft["stages"]],
            "result": ft["result"],
            **({"split_hygiene": {k: ft["split_hygiene"][k] for k in ("images", "exact_across_splits", "exact_within_split", "near_across_splits_total",
                                                                     "label_conflicts", "class_balance", "near_distance")}}
               if "split_hygiene" in ft else {}),
            **transfer_summary(ft),
        }
    if "export" in records:
        summary["export"] = {"opset": records["export"]["onnx"]["opset"], "parity": records["export"]["parity"]}
    if "quantize" in records:
        summary["quantize"] = {"calibration": records["quantize"]["calibration"], "models": records["quantize"]["models"]}
    return summary


def write_report(out_dir: str | Path, extra: dict | None = None) -> dict:
    """Write ``report.json``, ``report.md`` and its two SVG charts from the records in ``out_dir``."""
    out_dir = Path(out_dir)
    records = collect_records(out_dir)
    if "bench" not in records:
        raise TledgeError(f"{out_dir} has no bench.json; run `tledge bench` first")
    summary = _summary(records)
    if extra:
        summary.update(extra)
    variants = summary["variants"]
    write_text(out_dir / "latency.svg", bar_chart_svg(
        f"p50 latency, batch {summary['input_shape'][0]} (lower is better)",
        [(k, v["latency_ms"]["p50"], f"{v['latency_ms']['p50']:.2f} ms") for k, v in variants.items()],
    ))
    # Drift, not raw top-1: bars of 98% and 96% from zero look the same; 0% vs 4% of changed predictions does not.
    write_text(out_dir / "accuracy.svg", bar_chart_svg(
        f"predictions that differ from {summary['reference']} on {summary['evaluation']['split']} (lower is better)",
        [(k, (1 - v["agreement_with_reference"]) * 100, f"{(1 - v['agreement_with_reference']) * 100:.1f} % (top-1 {v['top1'] * 100:.1f} %)") for k, v in variants.items()],
    ))
    failures = {k: v["failure"] for k, v in variants.items() if "failure" in v}
    if failures:
        write_text(out_dir / "reliability.svg", reliability_chart(failures))
    write_text(out_dir / "report.md", render_markdown(summary, extra))
    write_text(out_dir / "report.html", render_html(summary))
    write_json(out_dir / "report.json", summary)
    return summary
