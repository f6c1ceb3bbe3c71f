"""What a running service leaves behind for the monitor: its prediction log (JSONL), and operators' labels of some
production images (a CSV), which measure how often humans override the model."""

from __future__ import annotations

import csv
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tledge.errors import TledgeError
from tledge.monitor.drift import PathLike, sig6


def read_prediction_log(path: PathLike, classes: Optional[Sequence[str]] = None
                        ) -> Tuple[List[Any], Optional[np.ndarray]]:
    """Predictions and confidences from a service's JSONL log: one ``{"predicted": ..., "confidence": ...}`` a line.

    ``predicted`` is a class name or index (other keys are ignored, blank lines skipped). With ``classes`` (the
    reference's), names become indices and unknown ones fail here, with their line number. ``confidence`` must be
    on every line or on none (then None is returned for it).
    """
    lookup = {name: i for i, name in enumerate(classes)} if classes is not None else None
    preds: List[Any] = []
    confs: List[float] = []
    has_conf: Optional[bool] = None
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise TledgeError(f"cannot read the prediction log {path}: {exc}") from exc
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise TledgeError(f"{where}: not a JSON object ({exc})") from exc
            if not isinstance(rec, dict) or "predicted" not in rec:
                raise TledgeError(f'{where}: expected an object like {{"predicted": "cat", "confidence": 0.93}}')
            p = rec["predicted"]
            if isinstance(p, bool) or not isinstance(p, (str, int)):
                raise TledgeError(f"{where}: predicted must be a class name or index, got {p!r}")
            if lookup is not None:
                if isinstance(p, str):
                    if p not in lookup:
                        raise TledgeError(f"{where}: class {p!r} is not one of {list(classes)}")
                    p = lookup[p]
                elif not 0 <= p < len(lookup):
                    raise TledgeError(f"{where}: class index {p} is out of range for {len(lookup)} classes")
            preds.append(p)
            line_has = "confidence" in rec and rec["confidence"] is not None
            if has_conf is None:
                has_conf = line_has
            elif line_has != has_conf:
                raise TledgeError(f"{where}: confidence is on some lines and not others; log it on every line or none")
            if line_has:
                c = rec["confidence"]
                if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= 1:
                    raise TledgeError(f"{where}: confidence must be a probability in [0, 1], got {c!r}")
                confs.append(float(c))
    return preds, (np.asarray(confs, dtype=np.float64) if has_conf else None)


def operator_overrides(path: PathLike, predictions_by_file: Mapping[str, Any], classes: Sequence[str]) -> Dict[str, Any]:
    """How often the model disagrees with operators' labels of production images (a CSV with ``file,label``).

    ``predictions_by_file`` maps the CSV's file names (matched exactly, surrounding spaces ignored) to the model's
    class name or index. Returns ``{"matched", "disagreements", "disagreement_rate", "per_class": {label:
    {"matched", "disagreements", "rate"}}, "confusions": [{"label", "predicted", "count"}], "not_found": [...],
    "labels_not_in_classes": [...]}``. A label outside ``classes`` (a new kind of object) counts as a disagreement.
    """
    classes = list(classes)
    known = set(classes)
    labels: Dict[str, Tuple[str, int]] = {}
    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is no column
    except OSError as exc:
        raise TledgeError(f"cannot read the overrides CSV {path}: {exc}") from exc
    with handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("file", "label") if c not in header]
        if missing:
            raise TledgeError(f"{path}: missing column(s) {', '.join(missing)}; the header must name file and label "
                              f"(found {header or 'nothing'})")
        fi, li = header.index("file"), header.index("label")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            lineno = reader.line_num
            if len(row) <= max(fi, li) or not row[fi].strip() or not row[li].strip():
                raise TledgeError(f"{path}, line {lineno}: needs a file and a label, got {row}")
            file, label = row[fi].strip(), row[li].strip()
            if file in labels and labels[file][0] != label:
                raise TledgeError(f"{path}, line {lineno}: {file} is labelled {label!r} here and "
                                  f"{labels[file][0]!r} on line {labels[file][1]}")
            labels.setdefault(file, (label, lineno))

    matched = disagreements = 0
    per_class: Dict[str, Dict[str, Any]] = {}
    confusions: Dict[Tuple[str, str], int] = {}
    not_found: List[str] = []
    for file, (label, lineno) in labels.items():
        if file not in predictions_by_file:
            not_found.append(file)
            continue
        pred = predictions_by_file[file]
        if isinstance(pred, (int, np.integer)) and not isinstance(pred, (bool, np.bool_)) and 0 <= int(pred) < len(classes):
            pred = classes[int(pred)]
        if pred not in known:
            raise TledgeError(f"the model's prediction for {file} ({pred!r}) is not one of the classes {classes}")
        row = per_class.setdefault(label, {"matched": 0, "disagreements": 0})
        row["matched"] += 1
        matched += 1
        if pred != label:
            row["disagreements"] += 1
            disagreements += 1
            confusions[(label, pred)] = confusions.get((label, pred), 0) + 1
    for row in per_class.values():
        row["rate"] = sig6(row["disagreements"] / row["matched"])
    return {
        "matched": matched,
        "disagreements": disagreements,
        "disagreement_rate": sig6(disagreements / matched) if matched else None,
        "per_class": dict(sorted(per_class.items())),
        "confusions": [{"label": k[0], "predicted": k[1], "count": v}
                       for k, v in sorted(confusions.items(), key=lambda kv: (-kv[1], kv[0]))],
        "not_found": not_found,
        "labels_not_in_classes": sorted({label for label, _ in labels.values()} - known),
    }
