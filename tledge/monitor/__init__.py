"""Input drift monitoring after deployment: does the model still see what it was validated on?

:func:`build_reference` condenses the validation split (input statistics, embeddings, logits) into a few KB of
JSON that ships with the bundle; on the device, :func:`compare` measures new images (or a service's prediction
log) against it and returns a verdict record. numpy only: the caller runs the model and passes the arrays.
"""

from tledge.monitor.drift import (
    DEFAULT_THRESHOLDS,
    DRIFT_FORMAT,
    EXIT_DRIFT,
    EXIT_OK,
    MIN_IMAGES,
    SIGNAL_NAMES,
    compare,
    population_stability_index,
    verdict_exit_code,
)
from tledge.monitor.logs import operator_overrides, read_prediction_log
from tledge.monitor.observe import ModelTap, Monitor
from tledge.monitor.projection import projection_matrix
from tledge.monitor.reference import (
    REFERENCE_FORMAT,
    build_reference,
    check_reference,
    image_stats,
    load_reference,
    save_reference,
    signals,
)
from tledge.monitor.stage import MonitorConfig, ReferenceConfig, monitor, write_reference

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DRIFT_FORMAT",
    "EXIT_DRIFT",
    "EXIT_OK",
    "MIN_IMAGES",
    "ModelTap",
    "Monitor",
    "MonitorConfig",
    "ReferenceConfig",
    "REFERENCE_FORMAT",
    "SIGNAL_NAMES",
    "build_reference",
    "check_reference",
    "compare",
    "image_stats",
    "load_reference",
    "operator_overrides",
    "population_stability_index",
    "projection_matrix",
    "read_prediction_log",
    "save_reference",
    "signals",
    "verdict_exit_code",
    "monitor",
    "write_reference",
]
