"""Atomic file writes: everything palikit writes for a user goes through a temporary file in the
same folder, fsync, then `os.replace`, so a crash or kill leaves either the old file or the new
one, never half of one; a folder (a checkpoint, an adapter) is filled under a temporary name and
renamed into place the same way (`atomic_dir`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` atomically, with the mode a plain `open()` gives (0o666 less the umask;
    mkstemp's 0o600 would hide a model folder's JSON files from a web server running as another user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=2) + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_dir(final: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Create `final` atomically: `fill(tmp_dir)` writes the content, then one rename publishes it.
    An existing `final` is replaced (moved aside first, removed after the rename)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_free_space(folder: str | os.PathLike, need: int) -> None:
    """OSError (what is needed, what is free, what to do) when the disk holding `folder` (or its nearest
    existing parent) has less than `need` bytes free: checked before a large write starts."""
    folder = Path(folder)
    probe = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OSError(f"not enough disk space at {probe}: this needs about {need / 1e9:.1f} GB while it is written "
                      f"and {free / 1e9:.1f} GB is free. Free some space or choose another destination.")


def umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, in every thread)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def plain_modes(folder: str | os.PathLike) -> None:
    """Give every file and folder under `folder` the mode a plain `open()` / `mkdir` would (0o666 / 0o777 less
    the umask): temporary files (`mkstemp`, onnx's external-data writer) are created 0o600, which a web
    server running as another user cannot read."""
    mask = umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
