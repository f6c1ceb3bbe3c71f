"""A bundle as one file: a tar.gz written atomically, and extracted only if no member could land outside its folder
(absolute paths, .., links, devices are refused before anything is written)."""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath
from typing import Optional

from tledge.artifacts import atomic_path, read_json
from tledge.errors import TledgeError


def is_archive(path: Path) -> bool:
    return Path(path).is_file() and any(Path(path).name.endswith(s) for s in ARCHIVE_SUFFIXES)


def write_archive(bundle_dir: Path, archive: Path) -> Path:
    """One archive holding ``manifest.json`` and every file it signs (regular files only, no leftovers)."""
    bundle_dir, archive = Path(bundle_dir), Path(archive)
    manifest = read_json(bundle_dir / "manifest.json")
    names = ["manifest.json"] + [a["path"] for a in manifest.get("artifacts", [])]
    mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w:xz" if archive.name.endswith(".tar.xz") else "w:bz2" if archive.name.endswith(".tar.bz2") else "w"
    if not any(archive.name.endswith(s) for s in ARCHIVE_SUFFIXES):
        raise TledgeError(f"--archive must end in one of {', '.join(ARCHIVE_SUFFIXES)}, got {archive.name}")
    with atomic_path(archive) as tmp:
        with tarfile.open(tmp, mode) as tar:
            for name in names:
                info = tar.gettarinfo(str(bundle_dir / name), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(bundle_dir / name, "rb") as f:
                    tar.addfile(info, f)
    return archive


def _unsafe_reason(member: tarfile.TarInfo) -> Optional[str]:
    name = member.name
    path = PurePosixPath(name)
    if not name or path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in path.parts or "\\" in name:
        return "a path that leaves the folder"
    if member.issym() or member.islnk():
        return f"a link (to {member.linkname!r}); a bundle holds only plain files"
    if not (member.isfile() or member.isdir()):
        return "a device, pipe or other special file"
    return None


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest`` (a new folder), refusing, before anything is written, any member that
    is absolute, climbs out with ``..``, is a link or a special file."""
    archive, dest = Path(archive), Path(dest)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise TledgeError(f"{archive} is not a readable tar archive: {exc}") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise TledgeError(f"{archive} is damaged: {exc}") from None
        for m in members:
            reason = _unsafe_reason(m)
            if reason:
                raise TledgeError(f"{archive} holds {m.name!r}, {reason}: refusing to extract it (nothing was written)")
        if dest.exists() and any(dest.iterdir()):
            raise TledgeError(f"{dest} already exists and is not empty; remove it or extract elsewhere (--extract-to)")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for m in members:
            target = (root / m.name).resolve()
            if root != target and root not in target.parents:  # belt and braces: the checks above should make this impossible
                raise TledgeError(f"{archive} member {m.name!r} would land outside {dest}")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            source = tar.extractfile(m)
            with atomic_path(target) as tmp, open(tmp, "wb") as out:
                while True:
                    block = source.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
    return dest


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")
