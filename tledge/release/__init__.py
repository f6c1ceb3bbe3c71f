"""What ships: the signed bundle (:mod:`.bundle`, :mod:`.check`), its verification on the device (:mod:`.verify`), one-file
archives (:mod:`.archive`), and engines built into a bundle (:mod:`.engines`)."""

from tledge.release.bundle import bundle
from tledge.release.engines import build_engine
from tledge.release.verify import verify

__all__ = ["build_engine", "bundle", "verify"]
