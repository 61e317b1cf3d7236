"""Writing files so that a crash never leaves a half-written one: the one implementation of atomic
writes, for every file written whole (records, indexes, manifests, checkpoint copies, pages).

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
from typing import Any, Callable, Dict

__all__ = ["atomic_copy", "atomic_write", "atomic_write_all", "atomic_write_json", "atomic_write_text"]


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


def _temporary(path: str, stable_temp: bool) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if stable_temp:
        return f"{path}.tmp"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    return tmp


def atomic_write_all(writes: Dict[str, Callable[[str], None]], stable_temp: bool = False) -> None:
    """:func:`atomic_write` for files that belong together (e.g. the parallel files of a manifest
    split): each ``writes[path](tmp)`` writes its temporary, and only when every one is complete
    and on disk are they renamed into place. If any writer fails, no target is touched."""
    temps = {}
    try:
        for path, write in writes.items():
            temps[path] = _temporary(path, stable_temp)
            write(temps[path])
            _fsync_path(temps[path])
            os.chmod(temps[path], 0o666 & ~_umask())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for directory in {os.path.dirname(os.path.abspath(path)) for path in temps}:
        _fsync_path(directory)  # the renames themselves reach the disk


def atomic_write(path: str, write: Callable[[str], None], stable_temp: bool = False) -> None:
    """Call ``write(tmp)`` with a temporary path next to ``path``, flush it to disk, rename it to ``path``.

    The file gets the permissions of an ordinary new file (0666 less the umask; ``mkstemp`` alone
    would leave 0600). ``stable_temp`` uses ``<path>.tmp`` as the temporary name instead of a
    fresh hidden one, so that a run killed mid-write leaves a file the next write overwrites
    rather than a new orphan each time (for large files only one process writes, e.g. checkpoints).
    On any error the temporary file is removed and ``path`` is left as it was.
    """
    atomic_write_all({path: write}, stable_temp=stable_temp)


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
