"""Checks that run before a stage does any work, and the checks an artifact must pass before a manifest signs it.

Every stage calls these first, so that bad input is one ``TledgeError`` (one ``tledge: error:`` line, exit 1)
before minutes of training or benchmarking, and nothing is written: option ranges, output locations, images,
checkpoint weights, ONNX files. :func:`check_artifact` is what ``bundle`` asks of each file it is about to sign.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

from tledge.errors import TledgeError

MANIFEST = "manifest.json"


# --- option ranges ----------------------------------------------------------------------------------------------


def number(flag: str, value, minimum=None, maximum=None, above=None, optional: bool = False) -> None:
    """``value`` must be a finite number within the bounds (``above``: strictly greater); ``None`` is fine if optional."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TledgeError(f"{flag} must be a finite number, got {value!r}")
    if above is not None and not value > above:
        raise TledgeError(f"{flag} must be greater than {above}, got {value}")
    if minimum is not None and value < minimum:
        raise TledgeError(f"{flag} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise TledgeError(f"{flag} must be at most {maximum}, got {value}")


# --- output locations -------------------------------------------------------------------------------------------


def _writable_location(path: Path, flag: str, shown: Path | None = None) -> None:
    """``path`` (a folder, existing or not) can be created and written in: its first existing ancestor is a folder
    that accepts a new file (a probe, removed at once, catches what permission bits do not: read-only mounts, /proc)."""
    shown = shown or path
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise TledgeError(f"{flag} {shown}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise TledgeError(f"{flag} {shown} cannot be created: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tledge-probe-", dir=existing)
    except OSError as exc:
        raise TledgeError(f"{flag} {shown}: cannot write in {existing} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder a stage will write into: an existing folder, or a place one can be created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise TledgeError(f"{flag} {path} exists and is not a folder; give a folder (or remove the file)")
    _writable_location(path, flag)
    return path


def output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A file a stage will (atomically) replace: not a folder, in a folder that exists or can be made."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise TledgeError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    if path.exists() and not path.is_file():
        raise TledgeError(f"{flag} {path} exists and is not a regular file")
    if path.name in ("", ".", ".."):
        raise TledgeError(f"{flag} {path} names no file")
    _writable_location(path.parent, flag, shown=path)
    return path


def start_rewrite(folder: Path, stage: str | None = None) -> None:
    """Before ``stage`` rewrites ``folder``: the manifest goes, and so do the records of that stage and of every stage
    after it (they describe what was made from the files about to change). Records are written last, so a failure
    or a kill midway leaves nothing that vouches for a mix of old and new files."""
    from tledge.artifacts import STAGE_RECORDS

    folder = Path(folder)
    if not folder.is_dir():
        return
    order = list(STAGE_RECORDS)  # finetune, export, quantize, bench, monitor, report, engine: the order data flows
    records = [STAGE_RECORDS[s] for s in order[order.index(stage):]] if stage else []
    for name in (MANIFEST, *records):
        (folder / name).unlink(missing_ok=True)


# What an interrupted run leaves (hidden, never signed): atomic writes' temporary files, quantize's work folders.
LEFTOVER_PATTERNS = (".*.partial", ".tledge-quantize-*", ".tledge-qat-*", ".tledge-probe-*")


def remove_partials(folder: Path) -> list[str]:
    """Remove what an interrupted run left behind in ``folder`` (:data:`LEFTOVER_PATTERNS`); returns their names."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for pattern in LEFTOVER_PATTERNS:
        for p in folder.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p.name)
    return sorted(gone)


# --- images -----------------------------------------------------------------------------------------------------


# --- checkpoints and numbers -------------------------------------------------------------------------------------


def finite_state(state: dict, source: str) -> None:
    """Every floating-point tensor of a state dict is finite (NaN weights train to NaN and export to NaN)."""
    import torch

    bad = [name for name, t in state.items() if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise TledgeError(f"{source} holds non-finite weights (NaN or inf) in {', '.join(bad[:3])}{more}; it cannot be used. "
                          "Use weights from a run that did not diverge")


def finite_array(x, what: str) -> None:
    import numpy as np

    if not bool(np.isfinite(np.asarray(x)).all()):
        raise TledgeError(f"{what} are not finite (NaN or inf); the model is broken (weights that diverged?)")


# --- ONNX models --------------------------------------------------------------------------------------------------


# --- artifacts before signing ----------------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(text) -> bool:
    return isinstance(text, str) and bool(_SHA256.match(text))


def digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` of files a stage just wrote, for its record: ``bundle`` refuses a file changed since."""
    from tledge.artifacts import sha256_file

    return {name: sha256_file(Path(folder) / name) for name in names if (Path(folder) / name).is_file()}
