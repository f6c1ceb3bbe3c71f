"""A release bundle made from the shared tiny build folder, as `tledge bundle` would ship it."""

from __future__ import annotations

import shutil
from pathlib import Path

# bench/gate/report outputs of other tests may sit in the shared folder; a shipped bundle is the build's own files
NOT_SHIPPED = shutil.ignore_patterns("manifest.json", "gate*", "bench*", "report*", "*.svg")


def copy_build(build: Path, folder: Path, sign: bool = True) -> Path:
    shutil.copytree(build, folder, ignore=NOT_SHIPPED)
    if sign:
        from tledge.release.bundle import bundle

        bundle(folder)
    return folder


def resign(folder: Path, name: str) -> None:
    """Sign ``folder`` again after a test changed ``name`` on purpose, as if its stage had written it that way:
    the stage record's digest is updated first, since `tledge bundle` refuses a file its stage did not write."""
    import json

    from tledge.artifacts import STAGE_RECORDS, sha256_file
    from tledge.release.bundle import bundle

    for record_name in STAGE_RECORDS.values():
        path = folder / record_name
        if path.is_file():
            record = json.loads(path.read_text())
            if name in (record.get("sha256") or {}):
                record["sha256"][name] = sha256_file(folder / name)
                path.write_text(json.dumps(record))
    bundle(folder)
