"""Outputs written whole or not at all: files through a temporary file renamed into place, run directories through
a temporary folder, replaced only when the folder in the way is an earlier run (``overwrite=true`` must never
delete a user's files). Errors name the path the user asked for, not the temporary one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dialogrl.types import DialogRLError


def check_output_dir(target: Path, overwrite: bool, inputs: Iterable[str | Path | None] = (),
                     marker: tuple[str, ...] = ("run.json",), key: str = "output_dir") -> None:
    """Fail, before any work, when ``target`` may not be written: it is not a directory; or it holds something and
    ``overwrite`` is off; or it holds something that is not an earlier run (every file of ``marker``) or that
    holds one of the run's ``inputs``. A new path or an empty folder is always fine. Errors name the setting
    ``key``."""
    folder = target.parent
    while not folder.exists() and folder != folder.parent:  # the nearest existing folder; the rest is created
        folder = folder.parent
    if not folder.is_dir():  # else "File exists" from deep inside mkdir
        raise DialogRLError(f"{key} {target}: {folder} is not a directory")
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise DialogRLError(f"{key} {target} is not a directory; overwrite=true replaces only an earlier run "
                            "directory, so nothing was deleted")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise DialogRLError(f"{key} {target} already exists (set overwrite=true to replace it)")
    if not all((target / name).is_file() for name in marker):
        raise DialogRLError(f"{key} {target} is not a run directory (no {' and '.join(marker)}); "
                            "overwrite=true replaces only an earlier run directory, so nothing was deleted")
    inside = target.resolve()
    for path in inputs:
        if path and Path(path).resolve().is_relative_to(inside):
            raise DialogRLError(f"{key} {target} holds the input {path}, which overwrite=true would delete: "
                                f"choose another {key}")


def temp_dir_beside(target: Path) -> Path:
    """A new hidden folder next to ``target`` (same file system, so the final rename is atomic), with the
    permissions an ordinary ``mkdir`` would give (``mkdtemp`` makes it owner-only)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def replace_dir(tmp: Path, target: Path, overwrite: bool, marker: tuple[str, ...] = ("run.json",),
                key: str = "output_dir") -> None:
    """Rename the finished run ``tmp`` to ``target``; an earlier run there is moved aside first (and put back if
    the rename fails), deleted after."""
    check_output_dir(target, overwrite, marker=marker, key=key)  # again: something may have appeared while the run trained
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{tmp.name}")
        target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder, then rename it into place;
    the file gets ordinary permissions (``mkstemp`` makes it owner-only)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise naming(exc, path) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise naming(exc, path) from exc
        raise
    return path


def naming(exc: OSError, path: str | Path) -> OSError:
    """The same error about the file the user asked for, not the temp file it was being written through."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))  # the errno picks the subclass, e.g. IsADirectoryError
