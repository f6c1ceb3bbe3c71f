"""Split hygiene: exact and near duplicates across splits, label conflicts, class balance, unreadable files."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from tledge.data import Sample
from tledge.data.hygiene import NEAR_LISTED, check_splits, require_clean
from tledge.data.perceptual_hash import find_near_pairs, hamming, perceptual_hash
from tledge.errors import TledgeError

CLASSES = ["cat", "dog"]
KINDS = ("circle", "square", "triangle", "cross", "ring", "hbar", "vbar", "ell")
SPOTS = ((28, 28), (28, 68), (68, 28), (68, 68), (48, 48))


def texture(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A smooth random colour texture with a little pixel noise: no two alike, like unrelated photos."""
    coarse = Image.fromarray(rng.uniform(0, 255, (12, 12, 3)).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    a = np.asarray(coarse, dtype=np.float64) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def shape(kind: str, cy: int, cx: int, r: int = 18, size: int = 96) -> Image.Image:
    """A bright shape on a dark ground: structured pictures that differ only in the shape or where it is."""
    yy, xx = np.mgrid[:size, :size]
    t = r // 3
    masks = {
        "circle": lambda: (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r,
        "square": lambda: (abs(yy - cy) <= r) & (abs(xx - cx) <= r),
        "triangle": lambda: (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2),
        "cross": lambda: ((abs(yy - cy) <= t) & (abs(xx - cx) <= r)) | ((abs(xx - cx) <= t) & (abs(yy - cy) <= r)),
        "ring": lambda: ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & ((yy - cy) ** 2 + (xx - cx) ** 2 >= (0.55 * r) ** 2),
        "hbar": lambda: (abs(yy - cy) <= t) & (abs(xx - cx) <= r),
        "vbar": lambda: (abs(xx - cx) <= t) & (abs(yy - cy) <= r),
        "ell": lambda: ((abs(xx - (cx - r)) <= t) & (abs(yy - cy) <= r)) | ((abs(yy - (cy + r)) <= t) & (abs(xx - cx) <= r)),
    }
    return Image.fromarray(np.where(masks[kind](), 220, 40).astype(np.uint8)).convert("RGB")


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def altered(img: Image.Image) -> Image.Image:
    """A copy as a scraper would produce it: smaller and a little brighter (saved as a lower-quality JPEG)."""
    return ImageEnhance.Brightness(img.resize((80, 80), Image.Resampling.BILINEAR)).enhance(1.1)


def distinct_images(tmp_path: Path, rng: np.random.Generator) -> list[Path]:
    """20 random textures and 40 shapes (8 kinds at 5 spots), no two of them copies of each other."""
    paths = [save(texture(rng), tmp_path / "src" / f"tex{i:02d}.png") for i in range(20)]
    paths += [save(shape(k, cy, cx), tmp_path / "src" / f"{k}_{cy}_{cx}.png") for k in KINDS for cy, cx in SPOTS]
    return paths


def pair_names(record: dict) -> set[tuple[str, str]]:
    return {(Path(p["a"]["path"]).name, Path(p["b"]["path"]).name) for p in record["near_across_splits"]}


# ------------------------------------------------------------------------------------------------ the hash

def test_perceptual_hash_survives_reencoding_resizing_and_brightening(tmp_path):
    rng = np.random.default_rng(1)
    for i, img in enumerate([texture(rng), texture(rng), shape("cross", 30, 60), shape("ring", 50, 40)]):
        original = perceptual_hash(save(img, tmp_path / f"{i}.png"))
        assert 0 <= original < 1 << 64
        copies = [
            save(img, tmp_path / f"{i}_q30.jpg", quality=30),
            save(altered(img), tmp_path / f"{i}_small_bright.jpg", quality=60),
            save(img.resize((150, 150), Image.Resampling.BICUBIC), tmp_path / f"{i}_large.jpg", quality=85),
        ]
        for copy in copies:
            assert hamming(original, perceptual_hash(copy)) <= 4, copy.name


def test_distinct_images_are_far_apart(tmp_path):
    hashes = {p.name: perceptual_hash(p) for p in distinct_images(tmp_path, np.random.default_rng(2))}
    closest = min((hamming(hashes[a], hashes[b]), a, b) for a, b in itertools.combinations(hashes, 2))
    assert closest[0] > 4, closest  # the margin above the default near_distance, not just "not equal"


def test_hamming():
    assert hamming(0, 0) == 0
    assert hamming(0b1011, 0b0001) == 2
    assert hamming((1 << 64) - 1, 0) == 64


# ------------------------------------------------------------------------------------------------ exact duplicates

def test_identical_copy_across_train_and_test_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    a = save(texture(rng), tmp_path / "train/cat/a.png")
    b = save(texture(rng), tmp_path / "train/dog/b.png")
    leaked = copy(a, tmp_path / "test/cat/leaked.png")
    c = save(texture(rng), tmp_path / "test/dog/c.png")
    record = check_splits({"train": [(a, 0), Sample(b, 1)], "test": [(leaked, 0), Sample(c, 1)]}, CLASSES)

    json.dumps(record)  # JSON-ready as it is
    assert record["images"] == 4
    [group] = record["exact_across_splits"]
    assert [(f["split"], f["path"], f["label"], f["class"]) for f in group["files"]] == [
        ("train", str(a), 0, "cat"), ("test", str(leaked), 0, "cat")]
    assert not group["labels_differ"]
    assert record["near_across_splits"] == [] and record["near_across_splits_total"] == 0  # exact, not also near
    assert record["exact_within_split"] == 0 and record["label_conflicts"] == 0
    with pytest.raises(TledgeError, match="--allow-duplicates") as err:
        require_clean(record)
    assert str(a) in str(err.value) and str(leaked) in str(err.value)
    require_clean(record, allow_duplicates=True)


def test_duplicates_inside_one_split_are_counted_not_refused(tmp_path):
    rng = np.random.default_rng(4)
    a = save(texture(rng), tmp_path / "train/cat/a.png")
    copies = [copy(a, tmp_path / "train/cat/a2.png"), copy(a, tmp_path / "train/cat/a3.png")]
    other = save(texture(rng), tmp_path / "val/cat/v.png")
    record = check_splits({"train": [(a, 0), (copies[0], 0), (copies[1], 0)], "val": [(other, 0)]}, CLASSES)
    assert record["exact_within_split"] == 2
    assert record["exact_across_splits"] == [] and record["label_conflicts"] == 0
    assert any("same split" in w for w in record["warnings"])
    require_clean(record)


def test_known_digests_are_used_instead_of_rehashing(tmp_path):
    rng = np.random.default_rng(5)
    a = save(texture(rng), tmp_path / "a.png")
    b = save(texture(rng), tmp_path / "b.png")
    record = check_splits({"train": [(a, 0)], "val": [(b, 0)]}, CLASSES, sha256={str(a): "f" * 64, b: "f" * 64})
    assert [g["sha256"] for g in record["exact_across_splits"]] == ["f" * 64]


# ------------------------------------------------------------------------------------------------ near duplicates

def test_near_copies_across_splits_are_found_and_distinct_images_are_not(tmp_path):
    images = distinct_images(tmp_path, np.random.default_rng(6))
    split_of = ["train", "val", "test"]
    splits: dict[str, list] = {name: [] for name in split_of}
    for i, p in enumerate(images):  # 60 distinct images spread over the three splits
        splits[split_of[i % 3]].append((p, i % 2))
    tex, ring = images[0], images[20 + KINDS.index("ring") * len(SPOTS) + 2]  # both in train, as cats
    assert (tex, 0) in splits["train"] and (ring, 0) in splits["train"]
    q30 = save(Image.open(tex), tmp_path / "test/tex_q30.jpg", quality=30)
    small = save(altered(Image.open(ring)), tmp_path / "val/ring_small.jpg", quality=60)
    splits["test"].append((q30, 0))
    splits["val"].append((small, 0))

    record = check_splits(splits, CLASSES)
    assert pair_names(record) == {(tex.name, q30.name), (ring.name, small.name)}
    assert record["near_across_splits_total"] == 2
    assert all(p["a"]["split"] == "train" and 0 <= p["distance"] <= 4 for p in record["near_across_splits"])
    assert record["exact_across_splits"] == [] and record["label_conflicts"] == 0
    require_clean(record)  # near copies warn, they never refuse
    assert any("near-duplicate" in w for w in record["warnings"])


def test_near_copies_inside_one_split_are_not_listed(tmp_path):
    rng = np.random.default_rng(7)
    img = texture(rng)
    a = save(img, tmp_path / "a.png")
    b = save(img, tmp_path / "b.jpg", quality=40)
    c = save(texture(rng), tmp_path / "c.png")
    record = check_splits({"train": [(a, 0), (b, 0)], "val": [(c, 0)]}, CLASSES)
    assert record["near_across_splits_total"] == 0


def test_many_lookalikes_are_counted_in_full_and_listed_up_to_the_cap(tmp_path):
    # Flat images all hash alike (no structure): 11 x 12 cross-split pairs, less the one byte-identical copy.
    train = [save(Image.new("RGB", (16, 16), (10 * i, 0, 0)), tmp_path / f"train/{i}.png") for i in range(11)]
    test = [save(Image.new("RGB", (16, 16), (0, 10 * i, 5)), tmp_path / f"test/{i}.png") for i in range(11)]
    test.append(copy(train[0], tmp_path / "test/copy.png"))
    record = check_splits({"train": [(p, 0) for p in train], "test": [(p, 1) for p in test]}, CLASSES)
    assert record["near_across_splits_total"] == 11 * 12 - 1
    assert len(record["near_across_splits"]) == NEAR_LISTED
    assert len(record["exact_across_splits"]) == 1
    assert record["label_conflicts"] == 11 * 12  # every pair, exact or near, is cat against dog
    listed = record["near_across_splits"]
    assert all(p["labels_differ"] and (p["a"]["split"], p["b"]["split"]) == ("train", "test") for p in listed)
    assert ("0.png", "copy.png") not in pair_names(record)  # byte-identical: an exact duplicate, not also a near one


# ------------------------------------------------------------------------------------------------ labels and balance

def test_label_conflicts_are_counted(tmp_path):
    rng = np.random.default_rng(8)
    a = save(texture(rng), tmp_path / "train/cat/a.png")
    again = copy(a, tmp_path / "train/dog/a_again.png")  # the same picture under two classes
    b_img = texture(rng)
    b = save(b_img, tmp_path / "train/cat/b.png")
    b_near = save(b_img, tmp_path / "test/dog/b.jpg", quality=50)  # and a near copy under the other class
    c = save(texture(rng), tmp_path / "test/cat/c.png")
    record = check_splits({"train": [(a, 0), (again, 1), (b, 0)],
                           "test": [(b_near, 1), (c, 0)]}, CLASSES)
    assert record["label_conflicts"] == 2
    assert record["exact_within_split"] == 1
    assert [p["labels_differ"] for p in record["near_across_splits"]] == [True]
    assert any("different labels" in w for w in record["warnings"])


def test_class_imbalance_and_small_classes_are_warned_about(tmp_path):
    rng = np.random.default_rng(9)
    paths = [save(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), tmp_path / f"{i}.png") for i in range(34)]
    train = [(p, 0) for p in paths[:20]] + [(p, 1) for p in paths[20:24]]
    val = [(p, i % 2) for i, p in enumerate(paths[24:])]
    record = check_splits({"train": train, "val": val}, CLASSES)
    balance = record["class_balance"]
    assert balance["counts"] == {"train": {"cat": 20, "dog": 4}, "val": {"cat": 5, "dog": 5}}
    assert balance["train_imbalance_ratio"] == 5.0
    assert (balance["largest_train_class"], balance["smallest_train_class"]) == ("cat", "dog")
    assert any("imbalanced" in w for w in record["warnings"])
    assert any("fewer than 5" in w and "'dog' (4)" in w for w in record["warnings"])

    balanced = check_splits({"train": [(p, i % 2) for i, p in enumerate(paths[:24])], "val": val}, CLASSES)
    assert balanced["class_balance"]["train_imbalance_ratio"] == 1.0
    assert balanced["warnings"] == []


def test_a_class_missing_from_train_has_no_ratio_but_a_warning(tmp_path):
    rng = np.random.default_rng(10)
    paths = [save(texture(rng, 16), tmp_path / f"{i}.png") for i in range(7)]
    record = check_splits({"train": [(p, 0) for p in paths[:6]], "val": [(paths[6], 1)]}, CLASSES)
    assert record["class_balance"]["train_imbalance_ratio"] is None
    assert any("'dog' (0)" in w for w in record["warnings"])


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing"])
def test_unreadable_image_is_an_error_naming_it(tmp_path, damage):
    rng = np.random.default_rng(11)
    good = save(texture(rng), tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    if damage == "garbage":
        bad.write_bytes(b"this is not an image at all" * 10)
    elif damage == "truncated":
        data = save(texture(rng, 256), tmp_path / "whole.jpg", quality=90).read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    with pytest.raises(TledgeError) as err:
        check_splits({"train": [(good, 0)], "val": [(bad, 1)]}, CLASSES)
    assert str(bad) in str(err.value)


def test_label_outside_classes_is_an_error(tmp_path):
    p = save(texture(np.random.default_rng(12), 16), tmp_path / "a.png")
    with pytest.raises(TledgeError, match="label 2"):
        check_splits({"train": [(p, 2)]}, CLASSES)


# ------------------------------------------------------------------------------------------------ the band search

def brute_force(hashes: list[int], d: int) -> list[tuple[int, int, int]]:
    h = np.asarray(hashes, dtype=np.uint64)
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    return [(int(i), int(j), int(dist[i, j])) for i, j in zip(*np.nonzero(np.triu(dist <= d, 1)))]


@pytest.mark.parametrize("d", [0, 1, 3, 4, 7, 12, 70])
def test_band_search_finds_what_brute_force_finds(d):
    rng = np.random.default_rng(d)
    hashes = [int(x) for x in rng.integers(0, 1 << 64, 800, dtype=np.uint64, endpoint=False)]
    for i in range(0, 400, 2):  # plant pairs at distances up to d + 2, straddling the limit
        flips = rng.choice(64, size=min(64, int(rng.integers(0, d + 3))), replace=False)
        hashes.append(hashes[i] ^ int(sum(1 << int(b) for b in flips)))
    hashes += hashes[:5]  # repeated values: distance 0
    expected = brute_force(hashes, d)
    assert len(expected) >= 50  # the comparison means something
    assert find_near_pairs(hashes, d) == expected
