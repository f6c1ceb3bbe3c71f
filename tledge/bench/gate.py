"""The release gate: does a candidate model regress against a baseline beyond the thresholds, for sure?

Latency on a shared CI runner is noisy, so the gate decides on a confidence interval, never on one number:

* **both models runnable here** (the usual case): they are timed call by call in turn (A B, then B A, ...), one
  thread each and ONNX Runtime's thread spinning off, so a change of machine speed hits both alike and neither
  steals the other's cores. Each block's time of a model is the median of its calls in the block; the per-block
  ratio candidate / baseline is bootstrapped (20%-trimmed mean of the log ratios, resampled over blocks);
* **a stored baseline** (a ``gate.json`` written earlier): its recorded per-call times stand for the baseline, the
  candidate is timed now, and both medians are bootstrapped independently, so the stored spread counts too.

A latency regression is declared only when the whole interval is above ``1 + max_latency_regression_pct``; an
interval that straddles it is "inconclusive" and passes, with a note. Accuracy is exact, on the evaluation split:
the candidate's top-1 against the baseline's, and the share of images on which they agree.

Exit codes of ``tledge gate``: 0 pass, 3 the gate failed (a regression), 1 bad input, 2 bad usage.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tledge.bench.intervals import accuracy_checks, latency_check, paired_ratio_interval, unpaired_ratio_interval
from tledge.errors import TledgeError
from tledge.runners.timing import timed_blocks

GATE_FORMAT = 1
EXIT_FAILED = 3


@dataclass(frozen=True)
class GateConfig:
    """Settings for :func:`gate`. ``baseline``: an ONNX model (run here, interleaved) or a ``gate.json``."""

    candidate: Path
    baseline: Path
    data: Path | None = None  # images for accuracy (its evaluation split); None checks latency only
    out_dir: Path | None = None  # gate.json and gate.md go here
    max_latency_regression_pct: float = 5.0
    max_top1_drop_pp: float = 0.5
    min_agreement: float = 0.99
    confidence: float = 0.95
    blocks: int = 100  # timed blocks per model
    calls_per_block: int = 0  # 0: as many as fill about 50 ms a block (at least 3)
    warmup: int = 10
    batch_size: int = 1
    # One thread per model by default: on a shared 2-core runner single-threaded latency repeats within about 1%
    # between interleaved calls, two threads within 2-3% (bench/gate_reliability.py); 0 lets ONNX Runtime use every core.
    threads: int | None = 1
    max_images: int | None = None
    resamples: int = 2000
    seed: int = 0

    def __post_init__(self):
        for name in ("candidate", "baseline", "data", "out_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.max_latency_regression_pct < 0 or not 0 <= self.max_top1_drop_pp <= 100 or not 0 <= self.min_agreement <= 1:
            raise TledgeError("gate thresholds: latency regression >= 0 (%), 0 <= top-1 drop <= 100 (points), 0 <= agreement <= 1")
        if not 0.5 <= self.confidence < 1:
            raise TledgeError(f"--confidence must be within [0.5, 1), got {self.confidence}")
        if min(self.blocks, self.batch_size, self.resamples) < 1 or self.calls_per_block < 0 or self.warmup < 0:
            raise TledgeError("blocks, batch size and resamples must be at least 1, calls per block at least 0 (0: automatic)")
        if self.blocks < 8:
            raise TledgeError(f"--blocks must be at least 8 for a confidence interval worth the name, got {self.blocks}")
        if self.max_images is not None and self.max_images < 1:
            raise TledgeError(f"--max-images must be at least 1, got {self.max_images}")
        from tledge import validate as V

        V.number("--threads", self.threads, minimum=0, optional=True)  # 0: every core
        for name in ("max_latency_regression_pct", "max_top1_drop_pp", "min_agreement", "confidence"):
            V.number(name, getattr(self, name))

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


# ---- the decision, on timing samples alone (tested with synthetic samples whose answer is known) ----


# ---- running the models ----


def _runner(path: Path, threads: int | None, simulate_int8: bool = False):
    """An ONNX model in ONNX Runtime, or a TensorRT engine (``.engine``, built by `tledge engine`) on this GPU.

    ONNX Runtime's thread spinning is off: workers that spin after a run would steal the cores from the other
    model's next call."""
    from tledge.bench.backends import Variant, make_runner
    from tledge.runners.ort_runner import OrtRunner

    if path.suffix in (".engine", ".plan"):
        return make_runner(Variant(path.name, path, "tensorrt"))
    return OrtRunner(path, threads=threads, simulate_int8=simulate_int8, spinning=False)


def _accuracy_runner(path: Path):
    """How the model's accuracy is judged, as in ``bench``: a TensorRT Q/DQ model by its simulated arithmetic,
    an engine by itself (on every core: only the timing needs the gate's thread setting)."""
    from tledge.bench.benchmark import variant_metadata

    return _runner(path, None, simulate_int8=variant_metadata(path).get("precision") == "int8-tensorrt")


def _load_stored(path: Path) -> dict:
    from tledge.artifacts import read_json

    stored = read_json(path)
    if not isinstance(stored, dict) or stored.get("kind") != "tledge-gate" or "latency_samples_ms" not in stored.get("candidate", {}):
        raise TledgeError(f"{path} is not a gate.json written by `tledge gate` (give an ONNX model or a gate.json as the baseline)")
    if stored.get("format") != GATE_FORMAT:
        raise TledgeError(f"{path} has gate format {stored.get('format')}, this tledge reads {GATE_FORMAT}; re-run the gate for the baseline")
    return stored


def gate(cfg: GateConfig) -> dict:
    """Compare ``cfg.candidate`` with ``cfg.baseline``; returns the verdict (and writes gate.json/gate.md to ``out_dir``).

    >>> verdict = gate(GateConfig(candidate="new/model.int8.cpu.onnx", baseline="release/model.int8.cpu.onnx", data="my_images"))  # doctest: +SKIP
    >>> verdict["passed"]  # doctest: +SKIP
    """
    from tledge import validate
    from tledge.bench.benchmark import variant_metadata
    from tledge.data.images import Preprocess, load_array
    from tledge.data.splits import splits_for
    from tledge.machine import machine_info

    started = time.perf_counter()
    for p in (cfg.candidate, cfg.baseline):
        if not p.is_file():
            raise TledgeError(f"{p} {'is a folder, not a model file' if p.is_dir() else 'does not exist'}")
    if cfg.out_dir is not None:
        validate.output_dir(cfg.out_dir, "--out-dir")
    stored = _load_stored(cfg.baseline) if cfg.baseline.suffix == ".json" else None
    meta = variant_metadata(cfg.candidate)
    pre = Preprocess.from_dict(meta["preprocess"])
    if stored is None:
        base_meta = variant_metadata(cfg.baseline)
        if base_meta["classes"] != meta["classes"] or base_meta["preprocess"] != meta["preprocess"]:
            raise TledgeError(f"{cfg.candidate} and {cfg.baseline} were made for other classes or preprocessing: they cannot be compared")
    elif stored["classes"] != meta["classes"]:
        raise TledgeError(f"{cfg.baseline} was recorded for classes {stored['classes']}, {cfg.candidate} has {meta['classes']}")

    # Accuracy first (exact): both models' predictions on the evaluation split.
    accuracy, predictions, split_id = None, None, None
    if cfg.data is not None:
        splits = splits_for(cfg.data, cfg.candidate.parent, cfg.seed, meta.get("splits_sha256"))
        if splits.classes != meta["classes"]:
            raise TledgeError(f"{cfg.data} has classes {splits.classes}, the models were trained on {meta['classes']}")
        samples = splits.evaluation[: cfg.max_images] if cfg.max_images else splits.evaluation
        x, y = load_array(samples, pre)
        split_id = hashlib.sha256("\n".join(s.path.relative_to(splits.root).as_posix() for s in samples).encode()).hexdigest()
        predictions = _accuracy_runner(cfg.candidate).run_batches(x).argmax(1)
        top1 = float(np.mean(predictions == y))
        if stored is None:
            base_pred = _accuracy_runner(cfg.baseline).run_batches(x).argmax(1)
            base_top1, agreement = float(np.mean(base_pred == y)), float(np.mean(base_pred == predictions))
        else:
            if stored.get("accuracy") is None:
                raise TledgeError(f"{cfg.baseline} holds no accuracy (it was run without --data); run the gate without --data or re-record it")
            if stored["accuracy"]["split_sha256"] != split_id:
                raise TledgeError(f"{cfg.baseline} was scored on other images than {cfg.data}'s {splits.evaluation_name} split; re-record it on these")
            base_top1 = stored["candidate"]["top1"]
            agreement = float(np.mean(np.asarray(stored["candidate"]["predictions"]) == predictions))
        accuracy = {"split": splits.evaluation_name, "images": len(y), "split_sha256": split_id}

    # Latency on real images where there are any (the same input for both), else zeros of the model's shape.
    lat_x = x[: cfg.batch_size] if cfg.data is not None and len(x) >= cfg.batch_size else np.zeros((cfg.batch_size, *pre.input_shape), np.float32)
    cand_runner = _runner(cfg.candidate, cfg.threads)
    machine = machine_info()
    notes = []
    if stored is None:
        timed, calls = timed_blocks({"baseline": _runner(cfg.baseline, cfg.threads), "candidate": cand_runner},
                                     lat_x, cfg.blocks, cfg.calls_per_block, cfg.warmup)
        interval = paired_ratio_interval(timed["baseline"], timed["candidate"], cfg.confidence, cfg.resamples, cfg.seed)
        cand_samples = timed["candidate"]
    else:
        timed, calls = timed_blocks({"candidate": cand_runner}, lat_x, cfg.blocks, cfg.calls_per_block, cfg.warmup)
        cand_samples = timed["candidate"]
        interval = unpaired_ratio_interval(stored["candidate"]["latency_samples_ms"], cand_samples, cfg.confidence, cfg.resamples, cfg.seed)
        if stored["machine"]["cpu"] != machine["cpu"] or stored["machine"]["usable_cpus"] != machine["usable_cpus"]:
            notes.append(f"the baseline was timed on {stored['machine']['cpu']} ({stored['machine']['usable_cpus']} cores), this run on "
                         f"{machine['cpu']} ({machine['usable_cpus']} cores): the latency ratio compares machines as much as models")
        if stored.get("batch_size") != cfg.batch_size:
            raise TledgeError(f"{cfg.baseline} was timed at batch {stored.get('batch_size')}, this run at {cfg.batch_size}")

    checks = [latency_check(interval, cfg.max_latency_regression_pct)]
    if accuracy is not None:
        checks += accuracy_checks(top1, base_top1, agreement, cfg.max_top1_drop_pp, cfg.min_agreement)
    passed = all(c["passed"] for c in checks)
    verdict = {
        "kind": "tledge-gate",
        "format": GATE_FORMAT,
        "passed": passed,
        "exit_code": 0 if passed else EXIT_FAILED,
        "checks": checks,
        "notes": notes,
        "candidate": {"path": str(cfg.candidate), "latency_samples_ms": [round(t, 5) for t in cand_samples],
                      "latency_p50_ms": round(float(np.median(cand_samples)), 4),
                      **({"top1": round(top1, 6), "predictions": predictions.tolist()} if accuracy is not None else {})},
        "baseline": {"path": str(cfg.baseline), "stored": stored is not None,
                     **({"latency_p50_ms": round(float(np.median(timed["baseline"])), 4)} if stored is None else
                        {"latency_p50_ms": stored["candidate"]["latency_p50_ms"], "recorded_on": stored["machine"]["cpu"]})},
        "classes": meta["classes"],
        "accuracy": accuracy,
        "batch_size": cfg.batch_size,
        "timing": {"blocks": cfg.blocks, "calls_per_block": calls},
        "config": cfg.to_dict(),
        "machine": machine,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if cfg.out_dir is not None:
        from tledge.artifacts import write_json, write_text

        write_json(cfg.out_dir / "gate.json", verdict)
        write_text(cfg.out_dir / "gate.md", format_markdown(verdict))
    return verdict


def format_markdown(verdict: dict) -> str:
    """A summary fit for a CI step summary (GitHub's $GITHUB_STEP_SUMMARY)."""
    head = "PASSED" if verdict["passed"] else "FAILED"
    lines = [f"## tledge gate: {head}", "",
             f"Candidate `{Path(verdict['candidate']['path']).name}` against baseline `{Path(verdict['baseline']['path']).name}`"
             + (" (stored)" if verdict["baseline"]["stored"] else "") + f", batch {verdict['batch_size']}, on {verdict['machine']['cpu']}.", "",
             "| check | result | measured | limit | |", "|---|---|---|---|---|"]
    for c in verdict["checks"]:
        mark = "pass" if c["passed"] else "**FAIL**"
        if c["check"] == "latency":
            measured = f"x{c['ratio']:.3f} ({c['low']:.3f} .. {c['high']:.3f})"
            limit = f"x{c['limit']:.3f}"
        elif c["check"] == "top1":
            measured, limit = f"{-c['drop_pp']:+.2f} pt", f"-{c['limit_pp']:g} pt"
        else:
            measured, limit = f"{c['value']:.2%}", f"{c['limit']:.2%}"
        lines.append(f"| {c['check']} | {mark} | {measured} | {limit} | {c['why']} |")
    for note in verdict["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
