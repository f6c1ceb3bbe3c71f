"""What a file must pass before a manifest vouches for it (``tledge bundle`` asks it of every file it signs)."""

from __future__ import annotations

from pathlib import Path

from tledge.errors import TledgeError
from tledge.export.onnx_io import finite_onnx_weights, onnx_metadata
from tledge.validate import finite_state


def check_artifact(path: Path) -> None:
    """What a file must pass before a manifest vouches for it: it parses as what its name says, an ONNX model's
    metadata agrees with its graph, a checkpoint holds finite weights. A corrupted file is an error, never signed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise TledgeError(f"{path} is empty; re-run the stage that writes it")
    if suffix == ".onnx":
        import onnx

        from tledge.export.onnx_io import load_onnx

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
            from tledge.models import torch_load
        except ImportError:
            # The device install has no torch: there a checkpoint is only carried along (verify checked its sha256
            # against the build machine's manifest); it must still be the zip archive torch.save writes.
            import zipfile

            if not zipfile.is_zipfile(path):
                raise TledgeError(f"{path} is not a PyTorch checkpoint (not a zip archive); copy the bundle again") from None
            return
        payload = torch_load(path)
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
