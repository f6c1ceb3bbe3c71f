"""The release gate: its decision on timing samples with known answers, and the command end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from tledge.bench.gate import EXIT_FAILED, GateConfig, gate
from tledge.bench.intervals import accuracy_checks, latency_check, paired_ratio_interval, unpaired_ratio_interval
from tledge.bench.slower_variant import slower_variant
from tledge.cli import app
from tledge.errors import TledgeError


def noisy_blocks(n: int, ratio: float, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired block times: a drifting machine speed shared by both, per-block noise, the candidate ``ratio`` slower."""
    rng = np.random.default_rng(seed)
    machine = 5.0 * np.exp(np.cumsum(rng.normal(0, 0.03, n)))  # the runner speeds up and slows down
    base = machine * np.exp(rng.normal(0, noise, n))
    cand = ratio * machine * np.exp(rng.normal(0, noise, n))
    return base, cand


def test_the_same_model_never_fails_and_a_clearly_slower_one_always_does():
    false_failures = sum(not latency_check(paired_ratio_interval(*noisy_blocks(40, 1.0, 0.04, s), seed=s), 5.0)["passed"] for s in range(100))
    assert false_failures <= 3  # 95% two-sided intervals: about 2.5% land wholly above 1.0, far fewer above 1.05
    caught = sum(latency_check(paired_ratio_interval(*noisy_blocks(40, 1.10, 0.04, s), seed=s), 5.0)["status"] == "regression" for s in range(100))
    assert caught >= 95


def test_machine_drift_shared_by_both_models_does_not_move_the_ratio():
    base, cand = noisy_blocks(40, 1.0, 0.005, 7)
    interval = paired_ratio_interval(base, cand)
    assert interval["low"] > 0.98 and interval["high"] < 1.02  # the machine moved by far more than that
    assert np.ptp(np.log(base)) > 0.1


def test_an_interval_straddling_the_limit_is_inconclusive_and_passes():
    check = latency_check({"ratio": 1.05, "low": 1.01, "high": 1.09, "method": "m"}, 5.0)
    assert check["status"] == "inconclusive" and check["passed"]
    assert latency_check({"ratio": 1.2, "low": 1.06, "high": 1.3, "method": "m"}, 5.0)["status"] == "regression"
    assert latency_check({"ratio": 1.0, "low": 0.97, "high": 1.04, "method": "m"}, 5.0)["status"] == "within"


def test_a_stored_baseline_counts_its_own_spread():
    rng = np.random.default_rng(3)
    stored = 5 * np.exp(rng.normal(0, 0.05, 40))
    same = unpaired_ratio_interval(stored, 5 * np.exp(rng.normal(0, 0.05, 40)))
    assert same["low"] < 1.0 < same["high"]
    wide = unpaired_ratio_interval(5 * np.exp(rng.normal(0, 0.3, 40)), 5 * np.exp(rng.normal(0, 0.05, 40)))
    assert wide["high"] - wide["low"] > 2 * (same["high"] - same["low"])  # a noisy record makes a wider interval
    slower = unpaired_ratio_interval(stored, 6 * np.exp(rng.normal(0, 0.05, 40)))
    assert latency_check(slower, 5.0)["status"] == "regression"


def test_accuracy_checks_follow_the_thresholds():
    ok = accuracy_checks(0.980, 0.982, 0.995, max_drop_pp=0.5, min_agreement=0.99)
    assert all(c["passed"] for c in ok)
    dropped = accuracy_checks(0.970, 0.982, 0.995, max_drop_pp=0.5, min_agreement=0.99)
    assert [c["passed"] for c in dropped] == [False, True]
    disagree = accuracy_checks(0.982, 0.982, 0.95, max_drop_pp=0.5, min_agreement=0.99)
    assert [c["passed"] for c in disagree] == [True, False]


def test_bad_settings_and_bad_samples_are_clear_errors(tmp_path):
    with pytest.raises(TledgeError, match="confidence"):
        GateConfig(candidate="a.onnx", baseline="b.onnx", confidence=1.0)
    with pytest.raises(TledgeError, match="blocks"):
        GateConfig(candidate="a.onnx", baseline="b.onnx", blocks=3)
    with pytest.raises(TledgeError, match="positive"):
        paired_ratio_interval([1.0, 2.0], [1.0, 0.0])
    with pytest.raises(TledgeError, match="does not exist"):
        gate(GateConfig(candidate=tmp_path / "a.onnx", baseline=tmp_path / "b.onnx"))


def test_gate_command_end_to_end(tiny_pipeline, tiny_dataset, tmp_path):
    runner = CliRunner()
    fp32 = tiny_pipeline / "model.fp32.onnx"
    args = ["--data", str(tiny_dataset), "--blocks", "10", "--calls-per-block", "2"]

    same = runner.invoke(app, ["gate", str(fp32), str(fp32), *args, "--max-latency-regression", "400", "--out-dir", str(tmp_path / "base")])
    assert same.exit_code == 0, same.output
    verdict = json.loads((tmp_path / "base" / "gate.json").read_text())
    assert verdict["passed"] and [c["check"] for c in verdict["checks"]] == ["latency", "top1", "agreement"]
    assert verdict["checks"][2]["value"] == 1.0 and "PASSED" in (tmp_path / "base" / "gate.md").read_text()

    # A stricter accuracy threshold than the INT8 model can meet: a failed gate, exit 3, the summary says why
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    # (latency left out of it: not what this checks)
    strict_flags = ["--min-agreement", "1.0", "--max-top1-drop", "0", "--max-latency-regression", "1000"]
    biased = tmp_path / "model" / "biased.onnx"  # a regressed model: the classifier now leans to class 0
    biased.parent.mkdir()
    model = onnx.load(str(fp32))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = next(i for i in model.graph.initializer if i.name == gemm.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 50.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(biased))
    shutil.copy(tiny_pipeline / "splits.json", biased.parent)
    failed = runner.invoke(app, ["gate", str(biased), str(fp32), *args, *strict_flags, "--summary", str(summary)])
    assert failed.exit_code == EXIT_FAILED, failed.output
    assert "FAIL  agreement" in failed.output and summary.read_text().startswith("earlier step\n## tledge gate: FAILED")

    # The stored verdict serves as a baseline later; a model many times slower fails on latency against it
    slow = tmp_path / "slow.onnx"
    slower_variant(fp32, slow, extra_work=4.0)
    shutil.copy(tiny_pipeline / "splits.json", tmp_path)  # a model travels with the split it was trained on
    stored = runner.invoke(app, ["gate", str(slow), str(tmp_path / "base" / "gate.json"), *args])
    assert stored.exit_code == EXIT_FAILED, stored.output
    assert "latency" in stored.output and "slower by" in stored.output


def test_a_stored_baseline_from_other_images_or_classes_is_refused(tiny_pipeline, tiny_dataset, tmp_path):
    fp32 = tiny_pipeline / "model.fp32.onnx"
    gate(GateConfig(candidate=fp32, baseline=fp32, data=tiny_dataset, blocks=8, calls_per_block=1, max_images=5, out_dir=tmp_path))
    with pytest.raises(TledgeError, match="other images"):
        gate(GateConfig(candidate=fp32, baseline=tmp_path / "gate.json", data=tiny_dataset, blocks=8, calls_per_block=1))
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(TledgeError, match="not a gate.json"):
        gate(GateConfig(candidate=fp32, baseline=tmp_path / "bad.json", blocks=8))


@pytest.mark.parametrize("name", ["model.fp32.onnx", "model.int8.cpu.onnx", "model.int8.qdq.onnx"])
def test_the_slower_variant_repeats_the_share_of_work_asked_and_computes_the_same(tiny_pipeline, tmp_path, name):
    from tledge.bench.slower_variant import node_macs
    from tledge.runners.ort_runner import OrtRunner

    src = tiny_pipeline / name
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    base = sum(node_macs(onnx.load(str(src))).values())
    for extra in (0.1, 0.5, 1.0, 2.3):
        slow = slower_variant(src, tmp_path / f"slow-{extra}.onnx", extra_work=extra)
        added = sum(node_macs(onnx.load(str(slow))).values()) / base - 1
        # whole copies, then a prefix that stops at the first layer boundary past the share
        assert extra <= added < extra + 0.3, (extra, added)
        np.testing.assert_array_equal(OrtRunner(slow)(x), OrtRunner(src)(x))
    with pytest.raises(TledgeError, match="positive"):
        slower_variant(src, tmp_path / "none.onnx", extra_work=0)


def test_negative_threads_are_refused():
    with pytest.raises(TledgeError, match="threads"):
        GateConfig(candidate="a.onnx", baseline="b.onnx", threads=-1)
