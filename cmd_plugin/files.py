"""Writing files so that a crash never leaves a half-written one: every file cmd_plugin writes
goes through :func:`atomic_write`.

The recipe: write a temporary file in the target's directory (a rename across file systems is not
atomic), flush it to disk (``fsync``), rename it over the target (``os.replace``, atomic on POSIX),
then flush the directory entry. A reader sees the old file or the new one, never a mix; after a
power cut the new file is there whole or not at all. On any error the temporary file is removed
and the target is left as it was.

The helpers below are :func:`atomic_write` with a writer for one kind of content (text, JSON, a
copy of another file); ``torch.save`` is ``atomic_write(path, lambda tmp: torch.save(obj, tmp))``.
This module imports no torch: data preparation writes through it without loading torch.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Callable

__all__ = ["atomic_copy", "atomic_write", "atomic_write_json", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], stable_temp: bool = False) -> None:
    """Call ``write(tmp)`` with a temporary path next to ``path``, flush it to disk, rename it to ``path``.

    The file gets the permissions of an ordinary new file (0666 less the umask; ``mkstemp`` alone
    would leave 0600). ``stable_temp`` uses ``<path>.tmp`` as the temporary name instead of a
    fresh hidden one, so that a run killed mid-write leaves a file the next write overwrites
    rather than a new orphan each time (for large files only one process writes, e.g. checkpoints).
    On any error the temporary file is removed and ``path`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if stable_temp:
        tmp = f"{path}.tmp"
    else:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_path(directory)  # the rename itself reaches the disk


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str, obj: Any, indent: int = 2, **dump_kwargs) -> None:
    """Write ``obj`` as JSON (``json.dump(obj, indent=indent, **dump_kwargs)`` and a final newline) atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, **dump_kwargs)
            f.write("\n")

    atomic_write(path, write)


def atomic_copy(src: str, dst: str, stable_temp: bool = False) -> None:
    """Copy the file ``src`` to ``dst`` atomically (contents only, as ``shutil.copyfile``)."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp), stable_temp=stable_temp)
