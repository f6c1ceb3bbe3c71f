"""bench (accuracy, agreement, latency), write_report (report.md/json, SVG charts) and bundle (manifest.json)."""

from __future__ import annotations

import html
import importlib.metadata
import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _trained_tiny import trained_pipeline

from tledge.artifacts import ARTIFACTS, sha256_file
from tledge.bench.benchmark import BenchConfig, bench
from tledge.errors import TledgeError
from tledge.export.onnx_io import read_metadata, set_metadata
from tledge.release.bundle import bundle
from tledge.report.summary import write_report

SVG = "{http://www.w3.org/2000/svg}"
FAST = dict(iterations=10, rounds=2, warmup=1, throughput_batch=4)


def _models(folder, cpu_name="int8-cpu"):
    return {"fp32": folder / "model.fp32.onnx", "int8-tensorrt-qdq": folder / "model.int8.qdq.onnx", cpu_name: folder / "model.int8.cpu.onnx"}


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    return trained_pipeline(tiny_dataset, tmp_path_factory)


@pytest.fixture(scope="module")
def measured(trained, tiny_dataset, tmp_path_factory):
    """bench of the three variants of the trained tiny model, batch 2; a variant name with XML specials."""
    out = tmp_path_factory.mktemp("bench")
    record = bench(BenchConfig(models=_models(trained, cpu_name="int8 <cpu> & 'co'"), data=tiny_dataset, out_dir=out, batch_size=2, threads=1, **FAST))
    return out, record


@pytest.fixture(scope="module")
def build_folder(tiny_pipeline, tiny_dataset, tmp_path_factory):
    """A copy of the shared pipeline folder (finetune/export/quantize records) plus bench, report and manifest."""
    out = tmp_path_factory.mktemp("build") / "out"
    shutil.copytree(tiny_pipeline, out)
    bench(BenchConfig(models=_models(out), data=tiny_dataset, out_dir=out, **FAST))
    summary = write_report(out)
    (out / "extras").mkdir()
    (out / "extras" / "notes.txt").write_text("kept with the build\n")
    (out / ".hidden").write_text("not an artifact\n")
    manifest = bundle(out)
    return out, summary, manifest


# --- bench ------------------------------------------------------------------------------------------------------


def test_bench_record_shape(measured, trained):
    out, record = measured
    assert json.loads((out / "bench.json").read_text()) == record
    assert record["reference"] == "fp32"
    assert list(record["variants"]) == ["fp32", "int8-tensorrt-qdq", "int8 <cpu> & 'co'"]
    assert record["evaluation"] == {"split": "test", "images": 18, "classes": 3}
    assert record["input_shape"] == [2, 3, 32, 32]
    for name, v in record["variants"].items():
        assert 0.0 <= v["top1"] <= 1.0 and 0.0 <= v["agreement"] <= 1.0, name
        lat = v["latency_ms"]
        assert lat["batch"] == 2
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"], (name, lat)
        assert lat["samples"] == 10  # 2 rounds x 5
        assert v["throughput"]["batch"] == 4 and v["throughput"]["images_per_s"] > 0
        assert v["bytes"] == (trained / v["path"]).stat().st_size
        assert set(v["per_class_top1"]) == {"circle", "square", "stripes"}
        assert v["speedup_vs_reference_p50"] > 0
    ref = record["variants"]["fp32"]
    assert ref["agreement"] == 1.0 and ref["top1_delta_pp"] == 0 and ref["mean_abs_logit_diff"] == 0
    assert ref["speedup_vs_reference_p50"] == 1.0
    assert record["variants"]["int8-tensorrt-qdq"]["precision"] == "int8-tensorrt"


def test_bench_records_the_machine(measured):
    _, record = measured
    machine = record["machine"]
    assert machine["usable_cpus"] >= 1 and machine["cpu"]
    versions = machine["versions"]
    assert versions["onnxruntime"] == ort.__version__
    assert versions["torch"] == importlib.metadata.version("torch")
    assert versions["onnx"] == onnx.__version__


def test_bench_accuracy_matches_an_independent_computation(measured, trained, tiny_dataset):
    from tledge.data.images import Preprocess, load_array
    from tledge.data.splits import load_splits

    _, record = measured
    pre = Preprocess.from_dict(read_metadata(trained / "model.fp32.onnx")["preprocess"])
    x, y = load_array(load_splits(tiny_dataset).test, pre)
    def run(path, simulate):
        options = ort.SessionOptions()
        if simulate:  # Q/DQ as float ops: the int8 arithmetic an int32-accumulating engine computes
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])

    models = _models(trained, cpu_name="int8 <cpu> & 'co'")
    # The TensorRT model's figures are its simulation's, never this CPU's int8 kernels'; the CPU model's are its
    # real kernels', with the simulation beside them.
    logits = {name: run(path, simulate=name == "int8-tensorrt-qdq") for name, path in models.items()}
    ref_pred = logits["fp32"].argmax(1)
    for name in ("int8-tensorrt-qdq", "int8 <cpu> & 'co'"):
        simulated = run(models[name], simulate=True)
        sim = record["variants"][name]["simulated"]
        assert sim["top1"] == pytest.approx(np.mean(simulated.argmax(1) == y), abs=1e-5), name
        assert sim["agreement"] == pytest.approx(np.mean(simulated.argmax(1) == ref_pred), abs=1e-5), name
    assert record["variants"]["int8-tensorrt-qdq"]["accuracy_method"].startswith("simulated")
    cpu = record["variants"]["int8 <cpu> & 'co'"]
    assert cpu["fused_vs_simulated"]["top1_agreement"] == pytest.approx(
        np.mean(run(models["int8 <cpu> & 'co'"], simulate=True).argmax(1) == logits["int8 <cpu> & 'co'"].argmax(1)), abs=1e-5)
    for name, out in logits.items():
        v = record["variants"][name]
        pred = out.argmax(1)
        assert v["top1"] == pytest.approx(np.mean(pred == y), abs=1e-5), name
        assert v["agreement"] == pytest.approx(np.mean(pred == ref_pred), abs=1e-5), name
        assert v["mean_abs_logit_diff"] == pytest.approx(np.abs(out - logits["fp32"]).mean(), abs=1e-4), name
        for k, cls in enumerate(["circle", "square", "stripes"]):
            assert v["per_class_top1"][cls] == pytest.approx(np.mean(pred[y == k] == k), abs=1e-4), (name, cls)
    # the trained model is better than chance-by-constant, so top-1 is a real measurement
    assert len(set(ref_pred.tolist())) > 1


def test_bench_max_images_caps_the_accuracy_set(trained, tiny_dataset, tmp_path):
    record = bench(BenchConfig(models={"fp32": trained / "model.fp32.onnx"}, data=tiny_dataset, out_dir=tmp_path,
                               max_images=5, iterations=2, rounds=1, warmup=0, throughput_batch=2))
    assert record["evaluation"]["images"] == 5
    top1 = record["variants"]["fp32"]["top1"]
    assert abs(top1 * 5 - round(top1 * 5)) < 1e-3, "top-1 is a fraction of the 5 images"


# --- bench: bad input -------------------------------------------------------------------------------------------


def test_models_made_for_other_classes_are_refused(tiny_pipeline, tiny_dataset, tmp_path):
    model = onnx.load(str(tiny_pipeline / "model.fp32.onnx"))
    set_metadata(model, {**read_metadata(model), "classes": ["a", "b", "c"]})
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(TledgeError, match="other classes"):
        bench(BenchConfig(models={"fp32": tiny_pipeline / "model.fp32.onnx", "other": tmp_path / "other.onnx"},
                          data=tiny_dataset, out_dir=tmp_path / "out", **FAST))
    assert not (tmp_path / "out" / "bench.json").exists()


def test_models_with_other_preprocessing_are_refused(tiny_pipeline, tiny_dataset, tmp_path):
    model = onnx.load(str(tiny_pipeline / "model.fp32.onnx"))
    meta = read_metadata(model)
    set_metadata(model, {**meta, "preprocess": {**meta["preprocess"], "mean": [0.4, 0.4, 0.4]}})
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(TledgeError, match="preprocessing"):
        bench(BenchConfig(models={"fp32": tiny_pipeline / "model.fp32.onnx", "other": tmp_path / "other.onnx"},
                          data=tiny_dataset, out_dir=tmp_path, **FAST))


def test_dataset_with_other_classes_is_refused(tiny_pipeline, tmp_path):
    from conftest import make_image_folder

    other = make_image_folder(tmp_path / "other", {"train": 2, "val": 2}, classes=("cat", "dog", "fox"))
    with pytest.raises(TledgeError, match="classes"):
        bench(BenchConfig(models={"fp32": tiny_pipeline / "model.fp32.onnx"}, data=other, out_dir=tmp_path / "out", **FAST))
    assert not (tmp_path / "out" / "bench.json").exists()


def test_missing_model_is_refused(tiny_pipeline, tiny_dataset, tmp_path):
    with pytest.raises(TledgeError, match="not found"):
        bench(BenchConfig(models={"fp32": tiny_pipeline / "model.fp32.onnx", "x": tmp_path / "x.onnx"}, data=tiny_dataset, out_dir=tmp_path, **FAST))


@pytest.mark.parametrize("kwargs", [dict(models={}), dict(iterations=0), dict(batch_size=0), dict(warmup=-1)])
def test_bad_bench_settings_are_refused(kwargs, tmp_path):
    base = dict(models={"a": tmp_path / "a.onnx"}, data=tmp_path, out_dir=tmp_path)
    with pytest.raises(TledgeError):
        BenchConfig(**{**base, **kwargs})


# --- report -----------------------------------------------------------------------------------------------------


def _svg(path):
    root = ET.parse(path).getroot()  # raises on malformed XML
    assert root.tag == f"{SVG}svg"
    return root


def test_report_files(measured):
    out, record = measured
    summary = write_report(out)
    names = list(record["variants"])
    md = (out / "report.md").read_text()
    assert "| variant | runtime | top-1 | Δ top-1 (pp) | agreement with fp32 | p50 ms | p90 ms | p99 ms |" in md
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant")) + 2  # the main table, after its rule
    rows = [line for line in lines[start:start + len(names) + 1] if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows] == names
    for name, row in zip(names, rows):
        assert f"{record['variants'][name]['top1']:.4f}" in row
    assert "**test** split (18 images, 3 classes)" in md
    report = json.loads((out / "report.json").read_text())
    assert report == summary
    assert list(report["variants"]) == names
    for name in names:
        v, b = report["variants"][name], record["variants"][name]
        assert v["top1"] == b["top1"] and v["agreement_with_reference"] == b["agreement"]
        assert v["latency_ms"] == b["latency_ms"]
    assert report["machine"]["versions"]["onnxruntime"] == ort.__version__
    for chart in ("latency.svg", "accuracy.svg"):
        root = _svg(out / chart)
        assert len(root.findall(f"{SVG}rect")) == len(names)
        labels = [t.text for t in root.findall(f"{SVG}text")]
        for name in names:
            assert name in labels, (chart, name)  # escaped in the file, intact after parsing
    widths = [float(r.get("width")) for r in _svg(out / "latency.svg").findall(f"{SVG}rect")]
    p50 = [record["variants"][n]["latency_ms"]["p50"] for n in names]
    assert np.argmax(widths) == np.argmax(p50), "bar lengths follow the values"


def test_report_with_stage_records(build_folder):
    out, summary, _ = build_folder
    md = (out / "report.md").read_text()
    for heading in ("## Fine-tuning", "## Export", "## Quantization"):
        assert heading in md
    assert "24 calibration images" in md and "ONNX opset 17" in md
    assert "padded to 4 input channels" in md, "the report says why the CPU model's stem reads four channels"
    assert summary["export"]["opset"] == 17 and summary["quantize"]["calibration"]["images"] == 24
    assert summary["finetune"]["model"]["arch"] == "test_efficientnet_lite"
    for name in ("fp32", "int8-tensorrt-qdq", "int8-cpu"):
        assert f"| {name} |" in md


def test_report_needs_a_bench(tmp_path):
    with pytest.raises(TledgeError, match="bench.json"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


# --- bundle -----------------------------------------------------------------------------------------------------


def test_manifest_signs_exactly_what_the_stages_declared(build_folder):
    out, _, manifest = build_folder
    assert json.loads((out / "manifest.json").read_text()) == manifest
    listed = {a["path"]: a for a in manifest["artifacts"]}
    for required in ("model.pt", "model.fp32.onnx", "model.int8.qdq.onnx", "model.int8.cpu.onnx", "calibration.json", "calibration.cache",
                     "calibration.stats.npz", "finetune.json", "export.json", "quantize.json", "report.json", "report.md",
                     "bench.json", "latency.svg", "accuracy.svg"):
        assert required in listed, required
    for rel, entry in listed.items():
        assert entry["sha256"] == sha256_file(out / rel), rel
        assert entry["bytes"] == (out / rel).stat().st_size, rel
        assert rel in ARTIFACTS, f"{rel} is signed but not named in tledge.artifacts.ARTIFACTS"
        assert entry["stage"] == ARTIFACTS[rel][0], rel
    # A file no stage wrote (a leftover, a note) is never vouched for, only listed as such
    assert "extras/notes.txt" not in listed and manifest["not_signed"] == ["extras/notes.txt"]
    assert listed["model.int8.qdq.onnx"]["kind"].startswith("onnx-int8-qdq")
    assert listed["bench.json"]["kind"] == "stage record" and listed["latency.svg"]["kind"] == "chart"
    assert json.loads((out / "report.json").read_text())["format"] == "tledge.report/1"


def test_manifest_describes_the_input_and_the_whole_preprocessing(build_folder):
    from tledge.data.images import Preprocess

    _, _, manifest = build_folder
    assert manifest["format"] == "tledge.manifest/2" and manifest["arch"] == "test_efficientnet_lite"
    assert manifest["input"]["name"] == "input" and manifest["input"]["shape"] == ["batch", 3, 32, 32]
    assert manifest["input"]["dtype"] == "float32" and manifest["input"]["layout"] == "NCHW"
    assert manifest["output"]["name"] == "logits" and manifest["output"]["shape"] == ["batch", 3]
    pre = manifest["preprocessing"]
    assert pre["center_crop"]["size"] == 32 and pre["resize"]["shorter_side"] == 32 and pre["channel_order"] == "RGB"
    assert pre["normalize"]["mean"] == [0.5, 0.5, 0.5] and pre["normalize"]["std"] == [0.5, 0.5, 0.5]
    assert pre["resize"]["interpolation"].startswith("bilinear")
    # The parameters recreate the very preprocessing the models were built with
    assert Preprocess.from_dict(pre["parameters"]) == Preprocess.from_dict(read_metadata(build_folder[0] / "model.fp32.onnx")["preprocess"])
    assert manifest["classes"] == ["circle", "square", "stripes"]
    assert manifest["versions"]["onnxruntime"] == ort.__version__


def test_bundle_again_after_a_change_and_never_over_a_missing_artifact(build_folder, tmp_path):
    out, _, _ = build_folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.md").write_text("edited by hand\n")
    manifest = bundle(copy)
    entry = next(a for a in manifest["artifacts"] if a["path"] == "report.md")
    assert entry["sha256"] == sha256_file(copy / "report.md") and entry["bytes"] == len("edited by hand\n")
    assert "manifest.json" not in {a["path"] for a in manifest["artifacts"]}
    (copy / "calibration.cache").unlink()
    with pytest.raises(TledgeError, match="calibration.cache"):
        bundle(copy)
    assert not (copy / "manifest.json").exists()  # the old manifest went first: none is better than a lying one


def test_bundle_without_fp32_model_is_refused(tiny_pipeline, tmp_path):
    shutil.copy(tiny_pipeline / "model.int8.cpu.onnx", tmp_path)
    with pytest.raises(TledgeError, match="model.fp32.onnx"):
        bundle(tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_bench_explains_drift_per_class_and_in_the_confusion_matrix(measured):
    _, record = measured
    ref = record["variants"]["fp32"]
    assert ref["kl_divergence_from_reference"] == 0.0 and ref["drift"]["changed_errors"] == 0 and ref["drift"]["lost_most"] == []
    assert "top5" not in ref  # 3 classes: top-5 would always be 1
    for name, v in record["variants"].items():
        d = v["drift"]
        for cls, delta in d["per_class_top1_delta_pp"].items():  # the per-class change is the difference of per-class top-1
            assert delta == pytest.approx((v["per_class_top1"][cls] - ref["per_class_top1"][cls]) * 100, abs=0.02), (name, cls)
        assert all(entry["top1_delta_pp"] < 0 for entry in d["lost_most"])
        assert v["kl_divergence_from_reference"] >= 0
        assert v["latency_ms"]["stdev"] >= 0 and "memory_mb_at_load" in v
    assert record["peak_rss_mb"] > 0


def test_report_html_is_one_self_contained_page(build_folder):
    out, summary, _ = build_folder
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 2  # latency distributions and fine-tuning curves
    assert "<script" not in page and "src=" not in page and "href=" not in page  # nothing to fetch, nothing to run
    for name in summary["variants"]:
        assert html.escape(name) in page
    assert "Per-class drift" in page and "INT8 within the drift budget" in page


def test_report_html_draws_the_sample_efficiency_curve_and_says_negative_transfer(build_folder):
    """The curve's table and chart, and a loud verdict when scratch beat transfer."""
    import copy

    from tledge.report.html import render_html

    _, summary, _ = build_folder
    summary = copy.deepcopy(summary)
    assert "finetune" in summary
    rows = [{"fraction": f, "train_images": n, "transfer_val_accuracy": t, "scratch_val_accuracy": s, "transfer_gain_pp": round((t - s) * 100, 2)}
            for f, n, t, s in ((0.1, 12, 0.61, 0.35), (0.5, 60, 0.74, 0.70), (1.0, 120, 0.80, 0.83))]
    summary["finetune"]["curve"] = {"rows": rows}
    summary["finetune"]["transfer"] = {"transfer_gain_pp": -3.0, "transfer_val_accuracy": 0.8, "scratch_val_accuracy": 0.83, "verdict": "NEGATIVE TRANSFER",
                                       "message": "NEGATIVE TRANSFER: training from scratch beat the pretrained model by 3.0 pt", "fairness": "same loop"}
    page = render_html(summary)
    assert "Sample efficiency" in page and 'aria-label="sample-efficiency curve"' in page
    chart = page.split('aria-label="sample-efficiency curve"')[1].split("</svg>")[0]
    assert chart.count("<polyline") == 2 and chart.count("<circle") == 6  # transfer and scratch, a point per share
    assert "10% (12)" in chart and "100% (120)" in chart
    assert '<div class="warn"><b>NEGATIVE TRANSFER' in page
    assert "-3.0" in page.split("Sample efficiency")[1]


def test_report_html_renders_in_a_real_browser(build_folder, tmp_path):
    """Headless Chromium draws the page (where the machine has it: Debian's chromium package)."""
    import shutil as sh
    import subprocess

    browser = sh.which("chromium") or sh.which("chromium-browser") or sh.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    out, _, _ = build_folder
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1100,1600", (out / "report.html").as_uri()], capture_output=True, timeout=120, check=False)
    from PIL import Image

    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"))
    assert img.size == (1100, 1600)
    assert (pixels < 128).mean() > 0.01  # text and charts were drawn, not a blank page


def test_throughput_at_several_batch_sizes(trained, tiny_dataset, tmp_path):
    record = bench(BenchConfig(models={"fp32": trained / "model.fp32.onnx"}, data=tiny_dataset, out_dir=tmp_path,
                               iterations=4, rounds=1, warmup=0, throughput_batch=(2, 6), max_images=6))
    t = record["variants"]["fp32"]["throughput"]
    assert t["batch"] == 2 and set(t["by_batch"]) == {"2", "6"}
    for b, figures in t["by_batch"].items():
        assert figures["images_per_s"] == pytest.approx(int(b) / (figures["median_batch_ms"] / 1000), rel=1e-3)
    with pytest.raises(TledgeError, match="at least 1"):
        BenchConfig(models={"fp32": trained / "model.fp32.onnx"}, data=tiny_dataset, out_dir=tmp_path, throughput_batch=(4, 0))
