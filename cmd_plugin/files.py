"""Writing files so that a crash never leaves a half-written one: write to a temporary name in the
same directory, then rename over the target (``os.replace`` is atomic on POSIX)."""

import os
import tempfile
from typing import Callable

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` with a temporary path next to ``path``, then rename it to ``path``.

    The file gets the permissions of an ordinary new file (0666 less the umask; ``mkstemp`` alone
    would leave 0600). On any error the temporary file is removed and ``path`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
