"""Input drift monitoring (tledge.monitor): a reference of a synthetic validation split, then held-in data that must
not raise an alarm and shifted data that must, each shift named by the signal that should catch it.

The synthetic world: textured 3-channel images (a random grating plus pixel noise, per-image brightness and
contrast), each class adding a colour tint whose channel sum is zero (so brightness says nothing about the class);
embeddings are a fixed linear map of per-image features plus noise; logits a fixed nearest-tint linear model.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tledge.errors import TledgeError
from tledge.monitor import (
    DEFAULT_THRESHOLDS,
    EXIT_DRIFT,
    EXIT_OK,
    REFERENCE_FORMAT,
    build_reference,
    compare,
    image_stats,
    load_reference,
    operator_overrides,
    population_stability_index,
    projection_matrix,
    read_prediction_log,
    save_reference,
    signals,
    verdict_exit_code,
)

CLASSES = ["ant", "bee", "cat", "dog", "eel"]
SIZE = 16
EMB_DIM = 24
# Five tints on a circle in the plane orthogonal to (1, 1, 1): every tint sums to zero over the channels.
_U = np.array([1.0, -1.0, 0.0]) / math.sqrt(2)
_V = np.array([1.0, 1.0, -2.0]) / math.sqrt(6)
TINTS = 0.3 * np.stack([math.cos(a) * _U + math.sin(a) * _V for a in 2 * math.pi * np.arange(5) / 5])
EMB_MAP = np.random.default_rng(1234).normal(size=(9, EMB_DIM))


def make_images(n: int, seed: int, allowed=range(len(CLASSES))) -> tuple:
    """(N, 3, SIZE, SIZE) float32 images and their classes, drawn only from ``allowed`` classes."""
    rng = np.random.default_rng(seed)
    y = rng.choice(np.asarray(list(allowed)), n)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    fx, fy = rng.uniform(0.05, 0.3, (2, n, 1, 1))
    phase = rng.uniform(0, 2 * math.pi, (n, 1, 1))
    grating = np.sin(2 * math.pi * (fx * xx + fy * yy) + phase)[:, None]
    texture = grating + rng.normal(0, 0.6, (n, 3, SIZE, SIZE))
    contrast = rng.uniform(0.8, 1.2, (n, 1, 1, 1))
    brightness = rng.normal(0, 0.15, (n, 1, 1, 1))
    x = brightness + TINTS[y][:, :, None, None] + contrast * texture
    return x.astype(np.float32), y


def features(x: np.ndarray) -> np.ndarray:
    """What a backbone might notice: channel means, channel spreads, and high-frequency energy per channel."""
    hf = np.abs(np.diff(x, axis=3)).mean(axis=(2, 3))
    return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3)), hf], axis=1)


def model(x: np.ndarray, seed: int) -> tuple:
    """(embeddings, logits) of the fixed synthetic model; the embedding noise is seeded per data set."""
    emb = features(x) @ EMB_MAP + np.random.default_rng(seed + 10_000).normal(0, 0.05, (len(x), EMB_DIM))
    means = x.mean(axis=(2, 3), dtype=np.float64)
    logits = 12.0 * means @ TINTS.T - 6.0 * (TINTS ** 2).sum(axis=1)  # nearest tint, a linear model
    return emb, logits


def blur(x: np.ndarray) -> np.ndarray:
    """3x3 box filter with wrap-around: every image keeps its channel means exactly, loses its fine texture."""
    return sum(np.roll(np.roll(x, dy, axis=2), dx, axis=3) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0


def run(x: np.ndarray, seed: int, reference: dict, **kw) -> dict:
    emb, logits = model(x, seed)
    return compare(reference, x, emb, logits, **kw)


@pytest.fixture(scope="module")
def reference() -> dict:
    x, _ = make_images(400, seed=0)
    emb, logits = model(x, 0)
    return build_reference(x, emb, logits, CLASSES)


def test_reference_is_small_json_and_round_trips(reference, tmp_path):
    text = json.dumps(reference)
    assert json.loads(text) == reference
    assert len(text.encode()) < 16 * 1024
    assert reference["format"] == REFERENCE_FORMAT and reference["images"] == 400
    assert reference["reference_size_bytes"] == len(json.dumps(reference, separators=(",", ":")).encode())
    assert set(reference["histograms"]) == {"brightness", "contrast", "sharpness", "channel_mean_0", "channel_mean_1",
                                            "channel_mean_2", "confidence"}
    assert sum(reference["class_mix"]["counts"]) == 400
    emb = reference["embedding"]
    assert emb["projection"]["shape"] == [EMB_DIM, 8] and len(emb["covariance"]) == 8
    # Decile bins: each holds about a tenth of the reference.
    assert all(abs(c - 40) <= 2 for c in reference["histograms"]["brightness"]["counts"])
    # A saved and reloaded reference judges new data exactly as the original does.
    loaded = load_reference(save_reference(reference, tmp_path / "ref.json"))
    x, _ = make_images(100, seed=5)
    assert run(x, 5, loaded) == run(x, 5, reference) == run(x, 5, str(tmp_path / "ref.json"))


def test_projection_generator_is_pinned():
    """A deployed reference stores only the projection's recipe: the generator must never change under it."""
    from tledge.monitor.projection import splitmix64

    # SplitMix64's published first outputs for seed 0.
    assert [int(v) for v in splitmix64(0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    q = projection_matrix(0, 24, 8)
    np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(q[0], [-0.38686, 0.0989611, -0.137167, 0.0216267, 0.0986723, -0.0672655, -0.135305,
                                      -0.416195], rtol=1e-5)
    assert not np.allclose(projection_matrix(1, 24, 8), q)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_held_in_data_raises_no_alarm(reference, seed):
    x, _ = make_images(200, seed=seed)
    record = run(x, seed, reference)
    assert record["verdict"] == "ok" and record["moved"] == []
    assert {s["status"] for s in record["signals"].values()} <= {"ok", "watch"}
    assert set(record["signals"]) == {"brightness", "contrast", "sharpness", "channel_mean_0", "channel_mean_1", "channel_mean_2",
                                      "confidence", "class_mix", "embedding"}
    assert record["images"] == 200 and record["warnings"] == []
    assert verdict_exit_code(record) == EXIT_OK


def test_blur_is_a_contrast_drop(reference):
    x, _ = make_images(200, seed=11)
    record = run(blur(x), 11, reference)
    assert record["verdict"] == "drift" and verdict_exit_code(record) == EXIT_DRIFT
    contrast = record["signals"]["contrast"]
    assert "contrast" in record["moved"] and contrast["detail"]["shift_in_reference_sd"] < -2
    # Blur keeps every channel mean, so brightness, the channel means and the predictions stay put.
    for name in ("brightness", "channel_mean_0", "class_mix", "confidence"):
        assert record["signals"][name]["status"] != "drift", name
    assert "embedding" in record["moved"]  # the texture features feed the embedding


def test_brightness_shift_is_named(reference):
    x, _ = make_images(200, seed=12)
    record = run(x + np.float32(0.5), 12, reference)
    assert {"brightness", "channel_mean_0", "channel_mean_1", "channel_mean_2"} <= set(record["moved"])
    assert record["signals"]["brightness"]["detail"]["shift_in_reference_sd"] > 2
    assert record["signals"]["contrast"]["status"] == "ok"  # an offset changes no spread
    assert record["signals"]["class_mix"]["status"] == "ok"  # the tints sum to zero: the model ignores brightness


def test_class_mix_shift_moves_the_prediction_signals(reference):
    x, _ = make_images(200, seed=13, allowed=[0, 1])
    record = run(x, 13, reference)
    mix = record["signals"]["class_mix"]
    assert "class_mix" in record["moved"] and mix["detail"]["p_value"] < 1e-6
    assert {c["class"] for c in mix["detail"]["largest_changes"][:2]} == {"ant", "bee"}
    assert mix["detail"]["classes_predicted"] <= 3
    assert record["signals"]["brightness"]["status"] != "drift" and record["signals"]["contrast"]["status"] != "drift"


def test_embedding_shift_alone_is_caught(reference):
    x, _ = make_images(200, seed=14)
    emb, logits = model(x, 14)
    direction = np.random.default_rng(7).normal(size=EMB_DIM)
    # Three typical feature spreads along one random direction: a new kind of scene, in feature space only.
    moved = emb + 3.0 * emb.std(axis=0).mean() * direction / np.linalg.norm(direction)
    assert compare(reference, x, emb, logits)["signals"]["embedding"]["status"] != "drift"
    record = compare(reference, x, moved, logits)
    assert record["moved"] == ["embedding"]
    assert record["signals"]["embedding"]["detail"]["share_beyond_reference_p99"] > 0.05  # 1% if unchanged


def test_log_only_mode_from_jsonl(reference, tmp_path):
    def write_log(path: Path, seed: int, allowed=range(5)) -> Path:
        x, _ = make_images(200, seed=seed, allowed=allowed)
        sig = signals(None, None, model(x, seed)[1], reference)
        lines = [json.dumps({"predicted": CLASSES[p] if i % 2 else int(p), "confidence": round(float(c), 4), "ts": i})
                 for i, (p, c) in enumerate(zip(sig["predicted"], sig["confidence"]))]
        path.write_text("\n".join(lines[:50]) + "\n\n" + "\n".join(lines[50:]) + "\n")
        return path

    preds, confs = read_prediction_log(write_log(tmp_path / "ok.jsonl", 21), classes=CLASSES)
    assert len(preds) == 200 and all(isinstance(p, int) for p in preds) and confs.shape == (200,)
    record = compare(reference, predictions=preds, confidences=confs)
    assert set(record["signals"]) == {"confidence", "class_mix"} and record["verdict"] == "ok"

    # Names are mapped by compare as well, when the log was read without classes.
    preds, confs = read_prediction_log(write_log(tmp_path / "two.jsonl", 22, allowed=[2, 3]))
    record = compare(reference, predictions=preds, confidences=confs)
    assert "class_mix" in record["moved"] and record["verdict"] == "drift"
    assert set(compare(reference, predictions=preds)["signals"]) == {"class_mix"}


def test_malformed_log_line_names_its_number(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"predicted": "cat", "confidence": 0.9}\n{"predicted": "dog", "confidence": 0.8}\n{"predicted": \n')
    with pytest.raises(TledgeError, match="line 3"):
        read_prediction_log(bad)
    bad.write_text('{"predicted": "cat", "confidence": 0.9}\n{"predicted": "cow", "confidence": 0.8}\n')
    with pytest.raises(TledgeError, match="line 2.*'cow'"):
        read_prediction_log(bad, classes=CLASSES)
    bad.write_text('{"predicted": "cat", "confidence": 0.9}\n{"confidence": 0.8}\n')
    with pytest.raises(TledgeError, match="line 2"):
        read_prediction_log(bad)
    bad.write_text('{"predicted": "cat", "confidence": 1.7}\n')
    with pytest.raises(TledgeError, match="line 1.*probability"):
        read_prediction_log(bad)


def test_operator_overrides(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,label,note\n"
                        "a.jpg,cat,\n b.jpg ,cat,\nc.jpg,dog,x\nd.jpg,dog,\ne.jpg,eel,\nf.jpg,cat,\nghost.jpg,ant,\n"
                        "h.jpg,llama,new animal\n")
    preds = {"a.jpg": "cat", "b.jpg": "dog", "c.jpg": "dog", "d.jpg": "cat", "e.jpg": 4, "f.jpg": "cat", "h.jpg": "dog"}
    out = operator_overrides(csv_path, preds, CLASSES)
    assert out["matched"] == 7 and out["disagreements"] == 3
    assert out["disagreement_rate"] == pytest.approx(3 / 7, rel=1e-5)
    assert out["per_class"]["cat"] == {"matched": 3, "disagreements": 1, "rate": pytest.approx(1 / 3, rel=1e-5)}
    assert out["per_class"]["dog"]["rate"] == 0.5 and out["per_class"]["eel"]["rate"] == 0.0
    assert out["not_found"] == ["ghost.jpg"] and out["labels_not_in_classes"] == ["llama"]
    assert {"label": "cat", "predicted": "dog", "count": 1} in out["confusions"]

    csv_path.write_text("file,operator_label\na.jpg,cat\n")
    with pytest.raises(TledgeError, match="missing column.*label"):
        operator_overrides(csv_path, preds, CLASSES)


def test_psi_values():
    assert population_stability_index([10, 20, 30], [20, 40, 60]) == 0.0
    # By hand: 0.3 ln 1.6 + 0.3 ln 2.5.
    assert population_stability_index([50, 50], [80, 20]) == pytest.approx(0.3 * math.log(1.6) + 0.3 * math.log(2.5))
    empty = population_stability_index([50, 50], [100, 0], eps=1e-4)
    assert math.isfinite(empty) and empty > 2
    # The default floor is half an image: a small sample's empty bin costs less than a fixed 1e-4 floor says.
    assert population_stability_index([50, 50], [10, 0]) < population_stability_index([50, 50], [10, 0], eps=1e-4)
    with pytest.raises(TledgeError):
        population_stability_index([1, 2], [1, 2, 3])
    with pytest.raises(TledgeError):
        population_stability_index([0, 0], [1, 2])


def test_thresholds_can_be_overridden(reference):
    x, _ = make_images(200, seed=12)
    bright = x + np.float32(0.5)
    record = run(bright, 12, reference, thresholds={"brightness": 1000.0, "channel_mean": {"watch": 500.0, "drift": 1000.0}})
    # A bare number sets the drift threshold; watch keeps its default, so the signal still shows as one to watch.
    assert record["signals"]["brightness"]["status"] == "watch" and record["signals"]["brightness"]["threshold"] == 1000.0
    assert not any(n.startswith(("brightness", "channel_mean")) for n in record["moved"])
    strict = run(make_images(200, seed=1)[0], 1, reference, thresholds={"watch": 0.001, "drift": 0.002})
    # A threshold below what sampling noise reaches is raised to that floor, so held-in data still raises no alarm.
    assert strict["verdict"] == "ok"
    for signal in strict["signals"].values():
        assert signal["threshold"] > 0.002 and signal["detail"]["psi_thresholds"] == {"watch": 0.001, "drift": 0.002}
    assert DEFAULT_THRESHOLDS == {"watch": 0.1, "drift": 0.25}
    with pytest.raises(TledgeError, match="unknown threshold"):
        run(x, 12, reference, thresholds={"brightnes": 0.3})
    with pytest.raises(TledgeError, match="watch"):
        run(x, 12, reference, thresholds={"contrast": {"watch": 0.5, "drift": 0.2}})


def test_few_images_warn_that_psi_is_noisy(reference):
    x, _ = make_images(12, seed=31)
    record = run(x, 31, reference)
    assert record["images"] == 12 and "noisy" in record["warnings"][0]
    big = run(make_images(200, seed=31)[0], 31, reference)
    assert not any("noisy" in w for w in big["warnings"])


def test_precomputed_channel_stats_match_the_images(reference):
    x, _ = make_images(150, seed=41)
    emb, logits = model(x, 41)
    assert compare(reference, image_stats(x), emb, logits) == compare(reference, x, emb, logits)


def test_bad_inputs_are_tledge_errors(reference):
    x, _ = make_images(50, seed=51)
    emb, logits = model(x, 51)
    bad_calls = [
        lambda: compare(reference, x[:0], emb[:0], logits[:0]),  # no images
        lambda: compare(reference),  # nothing at all
        lambda: compare(reference, predictions=[]),
        lambda: compare(reference, x[:, :2], emb, logits),  # 2 channels, the reference has 3
        lambda: compare(reference, x[0], None, None),  # not (N, C, H, W)
        lambda: compare(reference, x, emb[:40], logits),  # counts disagree
        lambda: compare(reference, x, emb[:, :10], logits),  # another model's embeddings
        lambda: compare(reference, None, None, logits[:, :4]),  # another class list
        lambda: compare(reference, np.where(x > 2, np.nan, x), None, None),
        lambda: compare(reference, None, None, logits, predictions=[0] * 50),  # counted twice
        lambda: compare(reference, predictions=["cat", "cow"]),
        lambda: compare(reference, confidences=[0.5, 3.0]),
        lambda: compare({**reference, "format": "something/2"}, x, emb, logits),
        lambda: compare({**reference, "embedding": {**reference["embedding"], "projection": {
            **reference["embedding"]["projection"], "seed": 1}}}, None, emb, None),  # not the reference's projection
        lambda: build_reference(x[:10], None, None, CLASSES),  # too few images
        lambda: build_reference(x, emb, logits, CLASSES[:4]),
        lambda: build_reference(x, emb, logits, CLASSES, projection_dim=20),  # 50 images cannot fit a 20-D cloud
        lambda: verdict_exit_code({"verdict": "maybe"}),
    ]
    for i, call in enumerate(bad_calls):
        try:
            call()
        except TledgeError:
            continue
        pytest.fail(f"bad call {i} raised no TledgeError")
    # Embeddings narrower than projection_dim are not an error: the projection keeps all their dimensions.
    assert build_reference(x, emb[:, :3], logits, CLASSES)["embedding"]["projection"]["shape"] == [3, 3]


def test_monitor_imports_only_numpy_and_the_standard_library():
    allowed = {"numpy", "tledge"} | set(__import__("sys").stdlib_module_names)
    root = Path(__file__).resolve().parents[1] / "tledge" / "monitor"
    for path in (root / "reference.py", root / "drift.py"):  # the statistics; observe.py and stage.py run models
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
                if node.module.startswith("tledge"):
                    assert node.module in ("tledge.errors", "tledge.artifacts") or node.module.startswith("tledge.monitor."), (path.name, node.module)
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, (path.name, name)


def test_the_sampling_floor_holds_false_alarms_to_their_rate():
    """Two samples of one distribution: PSI on the reference's decile bins exceeds the drift floor about 0.1% of the
    time and the watch floor about 5%, at the sizes where the customary 0.25 alone fires far more often."""
    from tledge.monitor.drift import FALSE_ALARM_PER_SIGNAL, sampling_floor
    from tledge.monitor.histogram import bin_counts

    rng = np.random.default_rng(0)
    n_ref, n, trials = 270, 100, 3000
    reference = rng.normal(size=n_ref)
    edges = np.quantile(reference, np.linspace(0.1, 0.9, 9))
    expected = bin_counts(reference, edges)
    psi = np.array([population_stability_index(expected, bin_counts(rng.normal(size=n), edges)) for _ in range(trials)])
    drift, watch = (sampling_floor(10, n_ref, n, FALSE_ALARM_PER_SIGNAL[k]) for k in ("drift", "watch"))
    assert np.mean(psi > drift) < 0.005
    assert 0.02 < np.mean(psi > watch) < 0.09
    assert drift > 0.25 and np.mean(psi > 0.25) > 0.01  # at these sizes the customary 0.25 alone is noise 1-2% of the time
