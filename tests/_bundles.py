"""A release bundle made from the shared tiny build folder, as `tledge bundle` would ship it."""

from __future__ import annotations

import shutil
from pathlib import Path

# bench/gate/report outputs of other tests may sit in the shared folder; a shipped bundle is the build's own files
NOT_SHIPPED = shutil.ignore_patterns("manifest.json", "gate*", "bench*", "report*", "*.svg")


def copy_build(build: Path, folder: Path, sign: bool = True) -> Path:
    shutil.copytree(build, folder, ignore=NOT_SHIPPED)
    if sign:
        from tledge.bundle import bundle

        bundle(folder)
    return folder
