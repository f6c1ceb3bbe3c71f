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
    order = list(STAGE_RECORDS)  # finetune, export, quantize, bench, report: the order data flows
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


def scan_images(paths: Iterable[Path], shown: int = 3) -> int:
    """Open every image's header (cheap: no pixels are decoded): unreadable, empty, zero-sized or oversized files are
    one error that names them, before any training. Returns the number checked. Truncated pixel data is only seen
    when decoded (:func:`tledge.data.images.load_image` reports it, still before any file is written)."""
    from tledge.data.images import open_image

    problems, count = [], 0
    for path in paths:
        count += 1
        try:
            with open_image(path):
                pass
        except TledgeError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
        raise TledgeError(f"{len(problems)} of {count} images cannot be used: {'; '.join(problems[:shown])}{more}")
    return count


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


def onnx_metadata(path: str | os.PathLike, proto=None) -> dict:
    """The tledge metadata of an ONNX file, checked against the graph: well-formed, its input named and shaped as
    the preprocessing says (batch, 3, size, size), its output one logit per class."""
    from tledge.data.images import Preprocess
    from tledge.export.onnx_export import load_onnx, read_metadata

    path = Path(path)
    proto = proto if proto is not None else load_onnx(path, load_external_data=False)
    meta = read_metadata(proto)
    if not isinstance(meta, dict) or not all(k in meta for k in ("classes", "preprocess", "input", "output")):
        raise TledgeError(f"{path}: its tledge metadata is incomplete (needs classes, preprocess, input, output); export it again")
    try:
        pre = Preprocess.from_dict(meta["preprocess"])
    except (TypeError, AttributeError) as exc:
        raise TledgeError(f"{path}: its tledge metadata has a malformed preprocess entry ({exc})") from None
    if not isinstance(meta["classes"], list) or len(meta["classes"]) < 2:
        raise TledgeError(f"{path}: its tledge metadata lists no classes")
    graph = proto.graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if meta["input"] not in inputs or meta["output"] not in outputs:
        raise TledgeError(f"{path}: the graph has no input {meta['input']!r} or no output {meta['output']!r} as its metadata says "
                          f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})")

    def dims(value_info):
        return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]

    shape, want = dims(inputs[meta["input"]]), [None, *pre.input_shape]
    if len(shape) != 4 or any(s is not None and w is not None and s != w for s, w in zip(shape[1:], want[1:])):
        raise TledgeError(f"{path}: the graph's input {meta['input']!r} has shape {['batch' if s is None else s for s in shape]}, "
                          f"its metadata says {['batch', *pre.input_shape]}; the file was edited or mixed up. Export it again")
    out_shape = dims(outputs[meta["output"]])
    if out_shape and out_shape[-1] is not None and out_shape[-1] != len(meta["classes"]):
        raise TledgeError(f"{path}: the graph gives {out_shape[-1]} logits, its metadata lists {len(meta['classes'])} classes")
    return meta


def finite_onnx_weights(proto, path: str | os.PathLike) -> None:
    """Every float initializer of an ONNX graph is finite (a NaN weight makes every output NaN)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    for init in proto.graph.initializer:
        if init.data_type in floats and init.data_location != TensorProto.EXTERNAL:
            if not bool(np.isfinite(numpy_helper.to_array(init).astype(np.float32)).all()):
                raise TledgeError(f"{path} holds non-finite weights (NaN or inf) in {init.name}; it cannot be used. Export it from a sound checkpoint")


# --- artifacts before signing ----------------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(text) -> bool:
    return isinstance(text, str) and bool(_SHA256.match(text))


def digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` of files a stage just wrote, for its record: ``bundle`` refuses a file changed since."""
    from tledge.artifacts import sha256_file

    return {name: sha256_file(Path(folder) / name) for name in names if (Path(folder) / name).is_file()}


def check_artifact(path: Path) -> None:
    """What a file must pass before a manifest vouches for it: it parses as what its name says, an ONNX model's
    metadata agrees with its graph, a checkpoint holds finite weights. A corrupted file is an error, never signed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise TledgeError(f"{path} is empty; re-run the stage that writes it")
    if suffix == ".onnx":
        from tledge.export.onnx_export import load_onnx

        import onnx

        proto = load_onnx(path)
        onnx_metadata(path, proto)
        finite_onnx_weights(proto, path)
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:  # onnx raises ValidationError and friends
            raise TledgeError(f"{path} fails the ONNX checker ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})") from None
    elif suffix == ".json":
        from tledge.artifacts import read_json

        read_json(path)
    elif suffix == ".pt":
        try:
            from tledge.models import _torch_load
        except ImportError:
            # The device install has no torch: there a checkpoint is only carried along (verify checked its sha256
            # against the build machine's manifest); it must still be the zip archive torch.save writes.
            import zipfile

            if not zipfile.is_zipfile(path):
                raise TledgeError(f"{path} is not a PyTorch checkpoint (not a zip archive); copy the bundle again") from None
            return
        payload = _torch_load(path)
        state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
        if not isinstance(state, dict):
            raise TledgeError(f"{path} does not hold a state dict")
        finite_state(state, str(path))
    elif suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as archive:
                for name in archive.files:
                    archive[name]
        except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, ...
            raise TledgeError(f"{path} is not a readable .npz archive ({type(exc).__name__}: {exc})") from None
