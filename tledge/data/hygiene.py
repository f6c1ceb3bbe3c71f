"""Split hygiene: duplicates that leak between train / val / test, label conflicts, and class balance.

A test image that is also a training image (byte for byte, or re-encoded, resized or brightened) makes the
held-out score a memory test. :func:`check_splits` finds such leaks with sha256 digests (exact copies) and a DCT
perceptual hash (near copies), and summarises the class balance; :func:`require_clean` turns exact cross-split
copies into an error, since those are never intended. Near copies are only warnings: a perceptual hash can pair
two genuinely different but very similar pictures.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tledge.artifacts import sha256_file
from tledge.data.perceptual_hash import find_near_pairs, perceptual_hash
from tledge.errors import TledgeError

NEAR_LISTED = 100  # near-duplicate pairs listed in the record (all are counted)
CLEAN_EXAMPLES = 3  # cross-split copies named in require_clean's error
MAX_IMBALANCE = 3.0  # train max/min class count above this is warned about
MIN_TRAIN_PER_CLASS = 5


# --------------------------------------------------------------------------------------------------- hashing


# --------------------------------------------------------------------------------------------------- checking

def _entries(name: str, items: Iterable[Any], n_classes: int) -> list[tuple[str, Path, int]]:
    """``(split, path, label)`` rows from ``(path, label)`` tuples or :class:`tledge.data.Sample` objects."""
    rows = []
    for item in items:
        path, label = (item.path, item.label) if hasattr(item, "path") else item
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= int(label) < n_classes:
            raise TledgeError(f"{path} in split {name!r} has label {label!r}; labels must be class indices 0..{n_classes - 1}")
        rows.append((name, Path(path), int(label)))
    return rows


def _digest(path: Path) -> str:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise TledgeError(f"image {path} does not exist") from None
    except OSError as exc:
        raise TledgeError(f"cannot read image {path}: {exc}. Remove or replace the file.") from None


def file_digests(paths: Iterable[Path], workers: int = 4) -> dict[Path, str]:
    """sha256 of every file, a few at a time (hashlib releases the GIL); an unreadable file is a TledgeError."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(paths, pool.map(_digest, paths)))


def _cross(a: Mapping[tuple[str, int], int], b: Mapping[tuple[str, int], int]) -> tuple[int, int]:
    """Ordered pairs (x in a, y in b) from different splits, and how many of those have different labels.

    ``a`` and ``b`` count files by (split, label): the near-duplicate totals are counted, not enumerated, so a
    cluster of thousands of look-alike images (blank frames) costs nothing."""
    pairs = conflicts = 0
    for (split_a, label_a), na in a.items():
        for (split_b, label_b), nb in b.items():
            if split_a != split_b:
                pairs += na * nb
                conflicts += na * nb if label_a != label_b else 0
    return pairs, conflicts


def check_splits(
    splits: Mapping[str, Sequence[tuple[Path, int]]],
    classes: Sequence[str],
    near_distance: int = 4,
    sha256: Mapping[str | os.PathLike, str] | None = None,
    *,
    workers: int = 4,
) -> dict:
    """Exact and near duplicates across splits, exact copies inside a split, label conflicts, class balance.

    ``splits`` maps a split name (``train`` first, as the record lists pairs in this order) to ``(path, label)``
    rows, label an index into ``classes``; ``sha256`` may give digests already known (``{path: hex}``). Returns a
    JSON-ready record; :func:`require_clean` decides whether it passes::

        {"images": N, "near_distance": d,
         "exact_across_splits": [{"sha256", "files": [{"split", "path", "label", "class"}, ...], "labels_differ"}],
         "exact_within_split": extra copies inside a split (a file and 2 copies of it in train count 2),
         "near_across_splits": up to NEAR_LISTED closest pairs [{"distance", "a": file, "b": file, "labels_differ"}],
         "near_across_splits_total": all such pairs (byte-identical pairs excluded: those are exact),
         "label_conflicts": file pairs with different labels: exact duplicates (any splits) and near ones (across),
         "class_balance": {"counts": {split: {class: n}}, "train_imbalance_ratio": max / min or None,
                           "largest_train_class", "smallest_train_class"},
         "warnings": [one line each]}

    A pair's ``a`` is the file in the split that comes first in ``splits``. Paths are ``str(path)`` as given.
    """
    if near_distance < 0:
        raise TledgeError(f"near-duplicate distance must be at least 0, got {near_distance}")
    classes = list(classes)
    split_order = {name: i for i, name in enumerate(splits)}
    files = [row for name, items in splits.items() for row in _entries(name, items, len(classes))]

    known = {str(k): v for k, v in (sha256 or {}).items()}
    todo = sorted({str(p) for _, p, _ in files} - set(known))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib and Pillow release the GIL
        known.update(zip(todo, pool.map(_digest, map(Path, todo))))
        digests = [known[str(p)] for _, p, _ in files]
        first_of = {}  # one file per content: identical bytes have the identical perceptual hash
        for i, d in enumerate(digests):
            first_of.setdefault(d, i)
        phash_of = dict(zip(first_of, pool.map(perceptual_hash, (files[i][1] for i in first_of.values()))))

    def describe(i: int) -> dict:
        split, path, label = files[i]
        return {"split": split, "path": str(path), "label": label, "class": classes[label]}

    warnings: list[str] = []
    conflict_example: list[tuple[int, int]] = []  # first (i, j) with different labels, for the warning

    # (a) exact duplicates: files grouped by content
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(digests):
        by_digest[d].append(i)
    exact_across, within, label_conflicts = [], 0, 0
    for d, members in by_digest.items():
        if len(members) < 2:
            continue
        per_split = Counter(files[i][0] for i in members)
        within += sum(c - 1 for c in per_split.values())
        labels = Counter(files[i][2] for i in members)
        label_conflicts += (len(members) ** 2 - sum(c * c for c in labels.values())) // 2
        if len(labels) > 1 and not conflict_example:
            a = members[0]
            conflict_example.append((a, next(j for j in members if files[j][2] != files[a][2])))
        if len(per_split) > 1:
            ordered = sorted(members, key=lambda i: (split_order[files[i][0]], str(files[i][1])))
            exact_across.append({"sha256": d, "files": [describe(i) for i in ordered], "labels_differ": len(labels) > 1})
    exact_across.sort(key=lambda g: (split_order[g["files"][0]["split"]], g["files"][0]["path"]))

    # (b) near duplicates across splits: search distinct hash values, then expand to files
    by_hash: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(digests):
        by_hash[phash_of[d]].append(i)
    values = list(by_hash)
    keyed = {v: Counter((files[i][0], files[i][2]) for i in by_hash[v]) for v in values}
    hash_pairs = [(0, v, v) for v in values if len({digests[i] for i in by_hash[v]}) > 1]  # same hash, other bytes
    hash_pairs += [(dist, values[i], values[j]) for i, j, dist in find_near_pairs(values, near_distance)]
    near_total, counted = 0, []
    for dist, u, v in hash_pairs:
        if u != v:
            pairs, conflicts = _cross(keyed[u], keyed[v])
        else:  # pairs inside one hash value, less those with identical bytes (already exact duplicates)
            pairs, conflicts = _cross(keyed[u], keyed[u])
            for d in {digests[i] for i in by_hash[u]}:
                same = Counter((files[i][0], files[i][2]) for i in by_digest[d])
                p, c = _cross(same, same)
                pairs, conflicts = pairs - p, conflicts - c
            pairs, conflicts = pairs // 2, conflicts // 2
        near_total += pairs
        label_conflicts += conflicts
        if pairs:
            counted.append((dist, u, v))

    def file_pairs(u: int, v: int) -> Iterable[tuple[int, int]]:
        """The near pairs of files behind hash values ``u`` and ``v``, the earlier split's file first. Going split
        by split never walks the same-split pairs of a large cluster, which are never listed."""
        at_u, at_v = defaultdict(list), defaultdict(list)
        for i in by_hash[u]:
            at_u[files[i][0]].append(i)
        for i in by_hash[v]:
            at_v[files[i][0]].append(i)
        for s1, s2 in itertools.permutations(split_order, 2):
            if u == v and split_order[s1] > split_order[s2]:
                continue  # inside one value each unordered pair once
            for a in at_u[s1]:
                for b in at_v[s2]:
                    if digests[a] != digests[b]:
                        yield (a, b) if split_order[s1] < split_order[s2] else (b, a)

    # List the closest pairs only: hash pairs in order of distance, each expanded until the cap is reached.
    counted.sort(key=lambda t: (t[0], min(str(files[i][1]) for i in by_hash[t[1]] + by_hash[t[2]])))
    listed_pairs = itertools.islice(((dist, a, b) for dist, u, v in counted for a, b in file_pairs(u, v)), NEAR_LISTED)
    near_listed = []
    for dist, a, b in listed_pairs:
        differ = files[a][2] != files[b][2]
        if differ and not conflict_example:
            conflict_example.append((a, b))
        near_listed.append({"distance": dist, "a": describe(a), "b": describe(b), "labels_differ": differ})
    near_listed.sort(key=lambda p: (p["distance"], split_order[p["a"]["split"]], p["a"]["path"], p["b"]["path"]))

    if exact_across:
        g = exact_across[0]["files"]
        warnings.append(f"{len(exact_across)} image(s) are byte-identical in more than one split, e.g. "
                        + " = ".join(f"{f['split']}:{f['path']}" for f in g[:3]))
    if within:
        warnings.append(f"{within} file(s) are byte-identical copies of another file in the same split; "
                        "those images count double")
    if near_total:
        p = near_listed[0]
        warnings.append(f"{near_total} near-duplicate pair(s) across splits (perceptual hash within {near_distance} bits), "
                        f"e.g. {p['a']['split']}:{p['a']['path']} ~ {p['b']['split']}:{p['b']['path']}; "
                        "the held-out score may be optimistic")
    if label_conflicts:
        example = ""
        if conflict_example:  # none when every conflicting near pair lies past the listing cap
            a, b = (describe(i) for i in conflict_example[0])
            example = f", e.g. {a['path']} is {a['class']!r}, {b['path']} is {b['class']!r}"
        warnings.append(f"{label_conflicts} duplicate pair(s) have different labels{example}")

    # (c) class balance
    balance = _class_balance(files, classes, list(splits), warnings)

    return {
        "images": len(files),
        "near_distance": near_distance,
        "exact_across_splits": exact_across,
        "exact_within_split": within,
        "near_across_splits": near_listed,
        "near_across_splits_total": near_total,
        "label_conflicts": label_conflicts,
        "class_balance": balance,
        "warnings": warnings,
    }


def _class_balance(files: list[tuple[str, Path, int]], classes: list[str], split_names: list[str], warnings: list[str]) -> dict:
    """Counts per class and split; the train ratio largest / smallest class, warned about past MAX_IMBALANCE."""
    counts = {name: {c: 0 for c in classes} for name in split_names}
    for split, _, label in files:
        counts[split][classes[label]] += 1
    balance: dict[str, Any] = {"counts": counts, "train_imbalance_ratio": None}
    train = counts.get("train")
    if not train or not classes:
        return balance
    largest = max(classes, key=lambda c: train[c])
    smallest = min(classes, key=lambda c: train[c])
    balance["largest_train_class"], balance["smallest_train_class"] = largest, smallest
    if train[smallest] > 0:  # a ratio over zero has no JSON value; the few-images warning below covers it
        ratio = train[largest] / train[smallest]
        balance["train_imbalance_ratio"] = round(ratio, 3)
        if ratio > MAX_IMBALANCE:
            warnings.append(f"train classes are imbalanced {ratio:.1f}:1 ({largest!r} has {train[largest]} images, "
                            f"{smallest!r} {train[smallest]}); consider more images of the small classes or class weights")
    few = [c for c in classes if train[c] < MIN_TRAIN_PER_CLASS]
    if few:
        warnings.append(f"class(es) with fewer than {MIN_TRAIN_PER_CLASS} training images: "
                        + ", ".join(f"{c!r} ({train[c]})" for c in few))
    return balance


def require_clean(record: dict, allow_duplicates: bool = False) -> None:
    """Raise a TledgeError when ``record`` (from :func:`check_splits`) has images in more than one split, unless
    ``allow_duplicates``. Near-duplicates never raise: a perceptual hash can pair distinct, similar pictures."""
    groups = record.get("exact_across_splits") or []
    if not groups or allow_duplicates:
        return
    named = "; ".join(" = ".join(f"{f['split']}:{f['path']}" for f in g["files"]) for g in groups[:CLEAN_EXAMPLES])
    more = f" (and {len(groups) - CLEAN_EXAMPLES} more)" if len(groups) > CLEAN_EXAMPLES else ""
    raise TledgeError(f"{len(groups)} image(s) appear in more than one split, so the model would be scored on images it "
                      f"trained on: {named}{more}. Remove the copies, or pass --allow-duplicates to keep them")


def split_hygiene(splits, near_distance: int = 4, sha256: Mapping[str | os.PathLike, str] | None = None) -> dict:
    """:func:`check_splits` of a :class:`tledge.data.splits.Splits`, with paths relative to its root (as in
    splits.json), so the record names files the same way on every machine."""
    import json

    rows = {name: [(s.path, s.label) for s in getattr(splits, name)] for name in ("train", "val", "test") if getattr(splits, name)}
    record = check_splits(rows, splits.classes, near_distance, sha256)
    root = str(Path(splits.root)).rstrip("/") + "/"
    return json.loads(json.dumps(record).replace(json.dumps(root)[1:-1], ""))
