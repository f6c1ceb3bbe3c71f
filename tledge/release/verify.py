"""The release bundle on its way to a device: one archive of the signed files, extracted safely, and
``tledge verify``: every hash, and whether this device can run each engine.

A TensorRT engine runs only with the TensorRT version and on the GPU model it was built for (compute capability
alone is not enough: two GPUs of one architecture can differ in SM count and tactics), unless it was built
hardware-compatible (Ampere and newer) or version-compatible (later TensorRT of the same major). ``verify``
compares each engine's record in ``manifest.json`` with this device and says what to rebuild, and how.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import List, Optional

from tledge.artifacts import FORMATS, read_json, sha256_file
from tledge.errors import TledgeError
from tledge.release.archive import ARCHIVE_SUFFIXES, is_archive, safe_extract
from tledge.trt.compat import Here, engine_mismatch, rebuild_command, this_machine

# --- what this device is -----------------------------------------------------------------------------------------


def verify(path: Path, check_device: bool = True, engines: Optional[List[str]] = None, here: Optional[Here] = None,
           extract_to: Optional[Path] = None) -> dict:
    """Check a bundle (a folder or an archive of one): every file against its sha256 and size, and, with
    ``check_device``, whether this machine can run its engines. Returns the report; raises a
    :class:`TledgeError` listing every problem and what to do about it.

    ``engines`` names engines that must run here; without it, at least one engine must (a bundle may carry
    engines for several kinds of device). ``here`` stands for this machine (default: detected).
    """
    path = Path(path)
    extracted = None
    if is_archive(path):
        name = path.name
        for suffix in ARCHIVE_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        extracted = safe_extract(path, Path(extract_to) if extract_to else path.parent / name)
        folder = extracted
    elif path.is_dir():
        folder = path
    else:
        raise TledgeError(f"{path} is neither a bundle folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    if not (folder / "manifest.json").is_file():
        raise TledgeError(f"{folder} has no manifest.json: it is not a tledge bundle (make one with `tledge bundle BUILD_FOLDER`)")
    manifest = read_json(folder / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMATS["manifest"]:
        raise TledgeError(f"{folder}/manifest.json is format {manifest.get('format') if isinstance(manifest, dict) else '?'}, "
                          f"this tledge reads {FORMATS['manifest']}: re-run `tledge bundle` with this version")

    problems, files = [], []
    for a in manifest.get("artifacts", []):
        rel = a.get("path", "")
        p = PurePosixPath(rel)
        if not rel or p.is_absolute() or ".." in p.parts:
            problems.append(f"manifest.json names {rel!r}, outside the bundle")
            continue
        f = folder / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.is_symlink():
            problems.append(f"{rel} is a link; a bundle holds plain files")
        elif f.stat().st_size != a.get("bytes") or sha256_file(f) != a.get("sha256"):
            problems.append(f"{rel} does not match its sha256 in manifest.json (altered or damaged): copy the bundle again")
        else:
            files.append(rel)

    report = {"bundle": str(folder), "extracted_from": str(path) if extracted else None, "files_checked": len(files),
              "engines": [], "device": None}
    engine_entries = [a for a in manifest.get("artifacts", []) if "engine" in a]
    if check_device and engine_entries:
        here = here or this_machine()
        report["device"] = {"tensorrt": here.tensorrt, "gpu": here.gpu, "compute_capability": here.compute_capability, "jetson": here.jetson}
        wanted = set(engines or [])
        unknown = wanted - {a["path"] for a in engine_entries}
        if unknown:
            problems.append(f"the bundle has no engine {', '.join(sorted(unknown))} (it has {', '.join(a['path'] for a in engine_entries)})")
        runnable = []
        for a in engine_entries:
            why = engine_mismatch(a["engine"], here)
            report["engines"].append({"path": a["path"], "runs_here": why is None, **({"why_not": why} if why else {})})
            if why is None:
                runnable.append(a["path"])
            elif a["path"] in wanted:
                problems.append(f"{a['path']} cannot run here: {why}. Rebuild it on this device: {rebuild_command(folder, a['engine'])}")
        if not wanted and not runnable:
            first = engine_entries[0]
            reasons = "; ".join(f"{e['path']}: {e['why_not']}" for e in report["engines"])
            hint = (" (pass --hashes-only to check only the files on a machine that will not run them)"
                    if here.tensorrt is None or here.gpu is None else f". Rebuild on this device: {rebuild_command(folder, first['engine'])}")
            problems.append(f"no engine in the bundle can run here: {reasons}{hint}")
    if problems:
        raise TledgeError(f"bundle {folder} failed verification: " + " | ".join(problems))
    report["ok"] = True
    return report
