"""``tledge engine``: an engine built into a signed bundle, which is verified before and signed again after."""

from __future__ import annotations

from typing import Optional

from tledge.errors import TledgeError
from tledge.release.bundle import MANIFEST
from tledge.release.bundle import bundle as sign_bundle
from tledge.release.verify import verify
from tledge.trt.engine import build_in_bundle
from tledge.trt.plan import Device, EngineConfig


def build_engine(cfg: EngineConfig, trt=None, device: Optional[Device] = None) -> dict:
    """Build the engine ``cfg`` asks for with this machine's TensorRT; returns its record (also in engine.json).

    >>> build_engine(EngineConfig("release", precision="int8", batch=(1, 4, 8)))  # doctest: +SKIP
    """
    if not (cfg.bundle / MANIFEST).is_file():
        raise TledgeError(f"{cfg.bundle} has no manifest.json: run `tledge bundle {cfg.bundle}` on the build machine first")
    # Every file first: the build re-signs the bundle, which must never vouch for a file changed since it was signed.
    verify(cfg.bundle, check_device=False)
    record = build_in_bundle(cfg, trt, device)
    sign_bundle(cfg.bundle)
    return record
