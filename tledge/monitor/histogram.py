"""Histograms on decile edges with open outer bins (a value beyond the reference's range still counts), and numbers
rounded to 6 significant digits for a compact JSON reference."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np


def sig6_digits(x: float) -> float:
    """Round to 6 significant digits: the JSON stays small and its text stable across runs."""
    return float(f"{float(x):.6g}")


def sig_list(values: Any) -> List[float]:
    return [sig6_digits(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def bin_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts of ``values`` in the ``len(edges) + 1`` bins cut at the interior ``edges`` (outer bins open)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) + 1)


def histogram(values: np.ndarray, bins: int) -> Dict[str, Any]:
    """Decile-cut histogram: every bin expects the same share, which is where PSI is most even-handed."""
    cuts = np.quantile(values, np.arange(1, bins) / bins)
    # Rounded first, then counted with the rounded edges, so the device bins exactly as the reference did;
    # ties (a saturated confidence, a constant channel) merge bins rather than leave empty ones.
    edges = sorted({sig6_digits(c) for c in cuts})
    return {"edges": edges, "counts": [int(c) for c in bin_counts(values, edges)],
            "mean": sig6_digits(values.mean()), "std": sig6_digits(values.std())}
