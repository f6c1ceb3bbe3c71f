"""The commands of the release and the device: bench, gate, bundle, engine, verify, models (each parses its flags and
calls one stage function; all of them run in the device install, without torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from tledge.bench.benchmark import BenchConfig
from tledge.bench.gate import GateConfig
from tledge.cli.app import app, examples, print_warnings, typed_flags
from tledge.defaults import default as D
from tledge.errors import TledgeError
from tledge.pipeline.config import merge


def _parse_variants(specs: list[str], threads: int | None) -> list:
    """``PATH``, ``NAME=PATH`` or either with ``@BACKEND``: the variants to measure, in order."""
    from tledge.bench.backends import Variant
    from tledge.bench.benchmark import default_backend

    variants, names = [], set()
    for spec in specs:
        spec, at, backend = spec.rpartition("@") if "@" in spec else (spec, "", "")
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            stem = Path(spec).stem  # (no str.removeprefix: the device install runs on Python 3.8)
            stem = stem[len("model."):] if stem.startswith("model.") else stem
            name = stem if stem and stem != "model" else (backend or default_backend(Path(spec)))
        if name in names:
            raise TledgeError(f"two models are named {name!r}; name them: NAME=PATH")
        names.add(name)
        backend = backend or default_backend(Path(path))
        options = {"threads": threads} if backend in ("onnxruntime-cpu", "openvino-cpu") else {}
        variants.append(Variant(name, Path(path), backend, options))
    return variants


@app.command(epilog=examples(
    "tledge bench out/model.fp32.onnx out/model.int8.cpu.onnx --data my_images --out-dir out",
    "tledge bench fp32=a.onnx int8=b.onnx --data my_images --out-dir out --batch-size 8 --threads 2",
    "tledge bench out/model.fp32.onnx torch=out/model.pt@torch-cpu gpu=out/model.fp32.onnx@onnxruntime-cuda --data my_images --out-dir out",
    "tledge bench out/model.fp32.onnx out/model.int8.cpu.onnx ov=out/model.int8.cpu.onnx@openvino-cpu --data my_images --out-dir out",
))
def bench(
    ctx: typer.Context,
    models: List[str] = typer.Argument(..., help="Model files, or NAME=PATH, each optionally @BACKEND (onnxruntime-cpu, onnxruntime-cuda, onnxruntime-tensorrt, openvino-cpu, tensorrt, torch-cpu, torch-cuda; default from the file: .onnx onnxruntime-cpu, .pt torch-cpu); the first is the reference. A backend that cannot run here is skipped with its reason."),
    data: Path = typer.Option(..., "--data", "-d", help="ImageFolder root; accuracy on its test split (else val)."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Folder for bench.json and the report."),
    batch_size: int = typer.Option(D(BenchConfig, "batch_size"), help="Batch size for latency."),
    throughput_batch: List[int] = typer.Option([D(BenchConfig, "throughput_batch")], help="Batch size for throughput; repeat for several (e.g. --throughput-batch 8 --throughput-batch 32)."),
    iterations: int = typer.Option(D(BenchConfig, "iterations"), help="Timed runs per variant."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)."),
    max_images: Optional[int] = typer.Option(None, help="Cap on accuracy images."),
    high_confidence: float = typer.Option(D(BenchConfig, "high_confidence"), help="Wrong answers at least this confident are listed as high-confidence errors."),
    target_accuracy: Optional[float] = typer.Option(None, help="Find each variant's confidence threshold that reaches this accuracy on the images it accepts (a device abstains below it)."),
    temperature_scaling: bool = typer.Option(False, help="Fit a temperature per variant on the validation split and report calibration after it beside the raw figures (the manifest gets the scaled threshold too; logits are never changed)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [bench] sets any of this command's settings; flags typed here win."),
):
    """Measure top-1, agreement with the reference, latency percentiles and throughput, side by side."""
    from tledge.bench.benchmark import bench as run
    from tledge.pipeline.build import format_table
    from tledge.report.summary import write_report

    given = dict(data=data, out_dir=out_dir, batch_size=batch_size, throughput_batch=tuple(throughput_batch), iterations=iterations,
                 threads=threads, max_images=max_images, high_confidence=high_confidence, target_accuracy=target_accuracy,
                 temperature_scaling=temperature_scaling)
    settings = merge(config, "bench", given, typed_flags(ctx, {k: k for k in given}))
    run(BenchConfig(**{"models": {}, **settings, "variants": _parse_variants(models, settings["threads"])}))
    summary = write_report(out_dir)
    print_warnings(summary.get("warnings", []))
    print(format_table(summary))
    print(f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'report.json'} and {out_dir / 'report.md'}")


@app.command(name="gate", epilog=examples(
    "tledge gate new/model.int8.cpu.onnx release/model.int8.cpu.onnx --data my_images --out-dir gate",
    "tledge gate new/model.int8.cpu.onnx release/gate.json --data my_images --max-latency-regression 10",
    "tledge gate cand.onnx base.onnx --data my_images --summary \"$GITHUB_STEP_SUMMARY\"   # in a GitHub Actions step",
))
def gate_cmd(
    ctx: typer.Context,
    candidate: Path = typer.Argument(..., help="The model to release (ONNX, or a TensorRT .engine built by `tledge engine`, timed on this GPU)."),
    baseline: Path = typer.Argument(..., help="The model it must not regress from (ONNX or engine, timed here interleaved), or a gate.json recorded earlier."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="ImageFolder root: accuracy on its test split (else val). Without it, latency only."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", "-o", help="Write gate.json (the verdict; also a stored baseline for later runs) and gate.md here."),
    max_latency_regression: float = typer.Option(D(GateConfig, "max_latency_regression_pct"), help="Most latency increase allowed, in percent; a regression needs the whole confidence interval above it."),
    max_top1_drop: float = typer.Option(D(GateConfig, "max_top1_drop_pp"), help="Most top-1 the candidate may lose against the baseline, in points."),
    min_agreement: float = typer.Option(D(GateConfig, "min_agreement"), help="Least share of predictions the candidate must share with the baseline."),
    confidence: float = typer.Option(D(GateConfig, "confidence"), help="Confidence of the latency interval."),
    blocks: int = typer.Option(D(GateConfig, "blocks"), help="Timed blocks per model (more: a narrower interval)."),
    calls_per_block: int = typer.Option(D(GateConfig, "calls_per_block"), help="Calls per block (the block's time is their median); 0 fills about 50 ms a block."),
    batch_size: int = typer.Option(D(GateConfig, "batch_size"), help="Batch size for latency."),
    threads: int = typer.Option(D(GateConfig, "threads"), help="CPU threads per model (0: every core). One repeats best on shared runners."),
    max_images: Optional[int] = typer.Option(None, help="Cap on accuracy images."),
    summary: Optional[Path] = typer.Option(None, help="Append the Markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [gate] sets any of this command's settings; flags typed here win."),
):
    """Fail a release whose latency or accuracy regressed beyond the thresholds (exit 3), noise-aware."""
    from tledge.bench.gate import format_markdown, gate

    given = dict(
        candidate=candidate, baseline=baseline, data=data, out_dir=out_dir, max_latency_regression_pct=max_latency_regression,
        max_top1_drop_pp=max_top1_drop, min_agreement=min_agreement, confidence=confidence, blocks=blocks,
        calls_per_block=calls_per_block, batch_size=batch_size, threads=threads, max_images=max_images,
    )
    renames = {"max_latency_regression_pct": "max_latency_regression", "max_top1_drop_pp": "max_top1_drop"}
    if summary is not None:
        from tledge.validate import output_file

        output_file(summary, "--summary")  # before the minutes of timing, not after
    verdict = gate(GateConfig(**merge(config, "gate", given, typed_flags(ctx, {k: renames.get(k, k) for k in given}))))
    text = format_markdown(verdict)
    if summary is not None:
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            raise TledgeError(f"cannot append the summary to {summary}: {exc.strerror}") from None
    print_warnings(verdict["notes"])
    if as_json:
        print(json.dumps({**{k: v for k, v in verdict.items() if k != "candidate"}, "candidate": {
            k: v for k, v in verdict["candidate"].items() if k not in ("latency_samples_ms", "predictions")}}, indent=2))
    else:
        for c in verdict["checks"]:
            print(f"{'pass' if c['passed'] else 'FAIL'}  {c['check']:<9} {c['why']}")
        print(f"gate {'PASSED' if verdict['passed'] else 'FAILED'}" + (f"; wrote {out_dir / 'gate.json'} and {out_dir / 'gate.md'}" if out_dir else ""))
    if not verdict["passed"]:
        raise typer.Exit(verdict["exit_code"])


@app.command(name="bundle", epilog=examples("tledge bundle tledge-out", "tledge bundle tledge-out --archive release.tar.gz   # one file to copy to the device"))
def bundle_cmd(out_dir: Path = typer.Argument(..., help="A build folder."),
               archive: Optional[Path] = typer.Option(None, help="Also write one archive (.tar.gz, .tar.xz, .tar) of manifest.json and every file it signs.")):
    """Write manifest.json: every artifact with sha256 and size, input spec, preprocessing, labels, versions."""
    from tledge.release.bundle import bundle

    manifest = bundle(out_dir)
    print(f"wrote {out_dir / 'manifest.json'} ({len(manifest['artifacts'])} artifacts)")
    if archive is not None:
        from tledge.release.archive import write_archive

        write_archive(out_dir, archive)
        print(f"wrote {archive}")


def _parse_batch(text: Optional[str]):
    if text is None:
        return None
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise TledgeError(f"--batch takes N or min,opt,max such as 1,4,8, got {text!r}")
    return parts


@app.command(name="engine", epilog=examples(
    "tledge engine release                                  # INT8 from the Q/DQ model, batch 1..max",
    "tledge engine release --precision fp16 --batch 1,8,16",
    "tledge engine release --dla 0 --batch 1                # Jetson AGX/NX DLA core 0, GPU fallback",
    "tledge engine release --int8-path implicit             # from calibration.cache (TensorRT 8.5-10.x)",
    "tledge engine release --time 200                       # then time the engine here",
))
def engine_cmd(
    bundle: Path = typer.Argument(..., help="A bundle folder (manifest.json and the ONNX models), on the device that will run the engine."),
    precision: str = typer.Option("int8", help="int8, fp16 or fp32."),
    int8_path: str = typer.Option("auto", help="INT8 from the Q/DQ model (explicit; TensorRT 8.5+, the only one on 11.x), from calibration.cache (implicit; 8.5-10.x), or auto: explicit, except DLA on TensorRT 8.x."),
    batch: Optional[str] = typer.Option(None, help="Optimization profile of the batch axis: N, or min,opt,max (default 1,1,the model's max batch)."),
    dla: Optional[int] = typer.Option(None, "--dla", help="Build for this DLA core (Jetson AGX/NX), layers DLA cannot run fall back to the GPU; needs a static batch."),
    workspace: int = typer.Option(1024, help="Builder workspace limit in MiB."),
    hardware_compatible: bool = typer.Option(False, help="One engine for every Ampere-or-newer datacenter GPU (TensorRT 8.6+, not Jetson; may be slower)."),
    version_compatible: bool = typer.Option(False, help="Loadable by later TensorRT releases of the same major (8.6+)."),
    timing_cache_dir: Optional[Path] = typer.Option(None, help="Where timing caches are kept, one per GPU model and TensorRT version (default $TLEDGE_CACHE/trt-timing)."),
    time_iterations: int = typer.Option(0, "--time", help="After building, time this many runs of the engine at the profile's opt batch and print p50/p90/p99."),
    as_json: bool = typer.Option(False, "--json", help="Print the engine's record as JSON."),
):
    """Build a TensorRT engine from a bundle with this device's TensorRT; record and sign it in the bundle."""
    from tledge.release.engines import build_engine
    from tledge.trt.plan import EngineConfig

    cfg = EngineConfig(bundle, precision=precision, int8_path=int8_path, batch=_parse_batch(batch), dla_core=dla,
                       workspace_mib=workspace, hardware_compatible=hardware_compatible, version_compatible=version_compatible,
                       timing_cache_dir=timing_cache_dir)
    record = build_engine(cfg)
    print_warnings(record["notes"])
    timing = None
    if time_iterations > 0:
        from tledge.trt.runner import time_engine

        timing = time_engine(bundle / record["path"], time_iterations)
    if as_json:
        print(json.dumps({**record, **({"timing": timing} if timing else {})}, indent=2))
    else:
        p = record["profile"]
        print(f"wrote {bundle / record['path']}: TensorRT {record['tensorrt']}, {record['gpu']} (compute capability {record['compute_capability']})"
              f"{', DLA core %d' % record['dla_core'] if record['dla_core'] is not None else ''}, {record['precision']}"
              f"{' (' + record['int8_path'] + ')' if record['int8_path'] else ''}, batch {p['min'][0]}/{p['opt'][0]}/{p['max'][0]}, "
              f"{record['build_seconds']:.0f} s{' (timing cache reused)' if record['timing_cache_reused'] else ''}; manifest.json re-signed")
        if timing:
            t = timing
            print(f"latency at batch {t['batch']}: p50 {t['p50_ms']:.3f} ms, p90 {t['p90_ms']:.3f} ms, p99 {t['p99_ms']:.3f} ms ({t['iterations']} runs)")


@app.command(name="verify", epilog=examples(
    "tledge verify release                       # on the device: hashes, and whether its engines run here",
    "tledge verify release.tar.gz                # extracts it safely beside it (release/) first",
    "tledge verify release --hashes-only         # before flashing, on a machine without TensorRT",
    "tledge verify release --engine model.int8.orin-sm87.trt10.3.0.engine",
))
def verify_cmd(
    bundle: Path = typer.Argument(..., help="A bundle folder, or an archive of one (.tar.gz, .tar.xz, .tar)."),
    hashes_only: bool = typer.Option(False, help="Check only the files' sha256, not whether this machine can run the engines."),
    engine: List[str] = typer.Option([], help="An engine that must run here (repeatable); default: at least one engine must."),
    extract_to: Optional[Path] = typer.Option(None, help="Where to extract an archive (a new folder; default: beside it, named after it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check every file of a bundle against manifest.json, and whether this device can run its engines."""
    from tledge.release.verify import verify

    report = verify(bundle, check_device=not hashes_only, engines=engine or None, extract_to=extract_to)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if report["extracted_from"]:
        print(f"extracted {report['extracted_from']} to {report['bundle']}")
    print(f"{report['files_checked']} files match manifest.json")
    for e in report["engines"]:
        print(f"{'runs here' if e['runs_here'] else 'not here '}  {e['path']}" + (f"  ({e['why_not']})" if not e["runs_here"] else ""))
    if not hashes_only and not report["engines"]:
        print("no engine in the bundle yet: build one on the device with `tledge engine " + str(bundle) + "`")
    print("bundle OK")


@app.command(name="models", epilog=examples("tledge models"))
def models_cmd():
    """List the backbones tledge can fine-tune and where their pretrained weights come from."""
    from tledge.models import list_models

    for spec in list_models():
        pre = spec.preprocess
        print(f"{spec.name:<24} {'offline' if spec.offline else 'online '}  input {pre.size}  {spec.description}")
        print(f"{'':<24} weights: {spec.weights_source}")


@app.command(name="monitor", epilog=examples(
    "tledge monitor release --images /data/today            # production images, unlabelled",
    "tledge monitor release --images /data/today --labels overrides.csv   # with operators' labels (file,label)",
    "tledge monitor release --log service.jsonl --out drift.json          # a service's {predicted, confidence} lines",
))
def monitor_cmd(
    bundle: Path = typer.Argument(..., help="A bundle folder or archive with monitor.reference.json (tledge build writes it)."),
    images: Optional[Path] = typer.Option(None, "--images", help="A folder of production images (searched recursively)."),
    log: Optional[Path] = typer.Option(None, "--log", help="A JSONL prediction log: one {\"predicted\": CLASS, \"confidence\": P} a line."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="A CSV (file,label) of operators' labels for some of --images: the model's disagreement rate with them, per class."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the verdict as JSON here."),
    max_images: Optional[int] = typer.Option(None, help="Cap on images."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the model (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
):
    """Compare what a deployed model sees with its validation split: input brightness, contrast and colour, the
    embedding, confidence and predicted-class mix. Exit 0 when nothing moved, 3 on drift (like `tledge gate`)."""
    from tledge.monitor.drift import verdict_exit_code
    from tledge.monitor.stage import MonitorConfig, monitor

    record = monitor(MonitorConfig(bundle=bundle, images=images, log=log, labels=labels, out=out, max_images=max_images, threads=threads))
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{record['source']['count']} {'images' if images else 'logged predictions'} against {record['reference']['images']} "
              f"validation images ({record['reference']['model']})")
        for name, s in record["signals"].items():
            print(f"  {s['status']:<6} {name:<16} PSI {s['value']:.3f} (drift at {s['threshold']:g})")
        if "overrides" in record and record["overrides"]["matched"]:
            o = record["overrides"]
            print(f"  operators disagree with the model on {o['disagreements']} of {o['matched']} labelled images ({o['disagreement_rate']:.1%})")
        print_warnings(record.get("warnings", []))
        print(f"verdict: {record['verdict'].upper()}" + (f" ({', '.join(record['moved'])} moved)" if record["moved"] else ""))
    raise typer.Exit(verdict_exit_code(record))


@app.command(name="monitor-reference", epilog=examples("tledge monitor-reference tledge-out --data my_images   # then tledge bundle tledge-out"))
def monitor_reference_cmd(
    out_dir: Path = typer.Argument(..., help="A build folder (with model.fp32.onnx and splits.json)."),
    data: Path = typer.Option(..., "--data", "-d", help="The ImageFolder root the model was trained on."),
    max_images: Optional[int] = typer.Option(None, help="Cap on validation images."),
):
    """Write monitor.reference.json: the validation split as the model sees it, for `tledge monitor` on the device
    (tledge build writes it; run this for a folder built by the separate stages, then bundle it)."""
    from tledge.monitor.stage import ReferenceConfig, write_reference

    record = write_reference(ReferenceConfig(out_dir=out_dir, data=data, max_images=max_images))
    print(f"wrote {out_dir / 'monitor.reference.json'} ({record['bytes']} bytes, {record['images']} validation images)")
