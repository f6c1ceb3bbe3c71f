"""How the models fail, in bench.json, the report and the manifest: calibration error, high-confidence errors, the
accuracy-coverage curve and the confidence below which a device abstains to reach a target accuracy."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnxruntime as ort
import pytest

from tledge.bench.benchmark import BenchConfig, bench
from tledge.bench.reliability import expected_calibration_error, softmax
from tledge.errors import TledgeError
from tledge.export.onnx_io import read_metadata
from tledge.release.bundle import bundle
from tledge.report.summary import write_report

FAST = dict(iterations=4, rounds=1, warmup=0, throughput_batch=2)


@pytest.fixture(scope="module")
def benched(tiny_pipeline, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("failure") / "out"
    shutil.copytree(tiny_pipeline, out)
    models = {"fp32": out / "model.fp32.onnx", "int8-cpu": out / "model.int8.cpu.onnx"}
    record = bench(BenchConfig(models=models, data=tiny_dataset, out_dir=out, target_accuracy=0.6, high_confidence=0.5, **FAST))
    return out, record


def _test_logits(folder, dataset):
    from tledge.data.images import Preprocess, load_array
    from tledge.data.splits import load_splits

    pre = Preprocess.from_dict(read_metadata(folder / "model.fp32.onnx")["preprocess"])
    samples = load_splits(dataset).test
    x, y = load_array(samples, pre)
    sess = ort.InferenceSession(str(folder / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0], y, samples


def test_failure_figures_match_the_logits(benched, tiny_dataset):
    out, record = benched
    logits, y, samples = _test_logits(out, tiny_dataset)
    fp32 = record["variants"]["fp32"]["failure"]
    probs = softmax(logits)
    assert fp32["ece"] == pytest.approx(expected_calibration_error(probs, y)["ece"], abs=1e-4)
    confident_wrong = (probs.max(1) >= 0.5) & (probs.argmax(1) != y)
    assert fp32["high_confidence_error_count"] == int(confident_wrong.sum())
    classes = read_metadata(out / "model.fp32.onnx")["classes"]
    expected = {str(samples[i].path.relative_to(tiny_dataset)) for i in np.flatnonzero(confident_wrong)}
    assert {e["file"] for e in fp32["high_confidence_errors"]} == expected
    assert all(e["label"] != e["predicted"] and e["label"] in classes for e in fp32["high_confidence_errors"])


def test_the_abstain_threshold_reaches_the_target_on_what_it_accepts(benched, tiny_dataset):
    out, record = benched
    logits, y, _ = _test_logits(out, tiny_dataset)
    target = record["variants"]["fp32"]["failure"]["selective_prediction"]["target"]
    if target["threshold"] is None:  # a tiny model may not reach 0.6 on any subset; then it says so
        assert target["reason"]
        return
    probs = softmax(logits)
    accepted = probs.max(1) >= target["threshold"]
    assert np.mean(probs.argmax(1)[accepted] == y[accepted]) >= 0.6
    assert target["coverage"] == pytest.approx(accepted.mean(), abs=1e-4)
    int8 = record["variants"]["int8-cpu"]["failure"]
    assert int8["ece_change_vs_reference"] == pytest.approx(int8["ece"] - record["variants"]["fp32"]["failure"]["ece"], abs=2e-5)


def test_the_report_and_the_manifest_carry_it(benched):
    out, record = benched
    summary = write_report(out)
    md = (out / "report.md").read_text()
    assert "## Failure behaviour" in md and "high-confidence errors" in md
    assert "reliability.svg" in summary["artifacts"]
    svg = ET.parse(out / "reliability.svg").getroot()
    assert svg.tag.endswith("svg") and len(svg.findall("{http://www.w3.org/2000/svg}svg")) == 2  # one diagram per variant
    page = (out / "report.html").read_text()
    assert "Failure behaviour" in page
    listed = record["variants"]["fp32"]["failure"]["high_confidence_errors"][:10]
    assert page.count('src="data:image/jpeg;base64,') >= len(listed)  # each listed mistake with its picture
    manifest = bundle(out)
    target = record["variants"]["fp32"]["failure"]["selective_prediction"]["target"]
    if target["threshold"] is not None:
        assert manifest["abstain_below"]["model.fp32.onnx"]["min_confidence"] == target["threshold"]
    else:
        assert "model.fp32.onnx" not in manifest.get("abstain_below", {})
    assert json.loads((out / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize("kwargs, message", [(dict(target_accuracy=1.5), "--target-accuracy"), (dict(high_confidence=0), "--high-confidence")])
def test_bad_failure_settings_are_refused(tiny_pipeline, tiny_dataset, tmp_path, kwargs, message):
    with pytest.raises(TledgeError, match=message):
        BenchConfig(models={"fp32": tiny_pipeline / "model.fp32.onnx"}, data=tiny_dataset, out_dir=tmp_path, **kwargs)


def test_temperature_scaling_is_fitted_on_validation_and_reported_beside_the_raw_figures(tiny_pipeline, tiny_dataset, tmp_path):
    from tledge.bench.temperature import fit_temperature

    out = tmp_path / "out"
    shutil.copytree(tiny_pipeline, out)
    record = bench(BenchConfig(models={"fp32": out / "model.fp32.onnx"}, data=tiny_dataset, out_dir=out, temperature_scaling=True,
                               target_accuracy=0.5, **FAST))
    failure = record["variants"]["fp32"]["failure"]
    scaled = failure["temperature_scaled"]
    assert scaled["fitted_on"]["split"] == "val"
    # the temperature is the validation split's, not the test split's
    from tledge.data.images import Preprocess, load_array
    from tledge.data.splits import load_splits

    x, y = load_array(load_splits(tiny_dataset).val, Preprocess.from_dict(read_metadata(out / "model.fp32.onnx")["preprocess"]))
    val_logits = ort.InferenceSession(str(out / "model.fp32.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert scaled["temperature"] == pytest.approx(fit_temperature(val_logits, y)["temperature"], rel=1e-4)
    logits, y_test, _ = _test_logits(out, tiny_dataset)
    assert failure["ece"] == pytest.approx(expected_calibration_error(softmax(logits), y_test)["ece"], abs=1e-4)  # raw stays raw
    assert scaled["ece"] == pytest.approx(expected_calibration_error(softmax(logits / scaled["temperature"]), y_test)["ece"], abs=1e-4)
    write_report(out)
    assert "After temperature scaling" in (out / "report.md").read_text()
