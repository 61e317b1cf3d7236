"""cmd_plugin.files.atomic_write: the target is replaced whole or not at all."""

import os
import stat

import pytest

from cmd_plugin.files import atomic_write


def _write_text(text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write


def test_atomic_write_replaces_the_file_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    old = os.umask(0o022)
    try:
        atomic_write(str(path), _write_text("first"))
        atomic_write(str(path), _write_text("second"))
    finally:
        os.umask(old)
    assert path.read_text() == "second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert os.listdir(path.parent) == ["out.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write(str(path), _write_text("kept"))

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), failing)
    assert path.read_text() == "kept"
    assert os.listdir(tmp_path) == ["out.txt"]
