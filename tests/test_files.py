"""cmd_plugin.files: the target is replaced whole or not at all, and the new file is on disk before
it replaces the old one."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from cmd_plugin.files import atomic_copy, atomic_write, atomic_write_all, atomic_write_json, atomic_write_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), failing, stable_temp=True)
    assert path.read_text() == "kept"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_files_written_together_are_replaced_only_when_every_one_is_complete(tmp_path):
    a, b = tmp_path / "s.tsv", tmp_path / "s.img"
    atomic_write_all({str(a): _write_text("a1"), str(b): _write_text("b1")})
    assert (a.read_text(), b.read_text()) == ("a1", "b1")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("b2 half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_all({str(a): _write_text("a2"), str(b): failing})
    assert (a.read_text(), b.read_text()) == ("a1", "b1")  # the first, although complete, was not renamed
    assert sorted(os.listdir(tmp_path)) == ["s.img", "s.tsv"]


def test_the_new_file_is_flushed_to_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """The real fsync runs; a wrapper records which file each call flushed and what the target held then."""
    path = tmp_path / "out.txt"
    path.write_text("old")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), path.read_text()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write(str(path), _write_text("new"))
    assert path.read_text() == "new"
    (temp, target_then), (directory, target_after) = synced
    assert os.path.dirname(temp) == str(tmp_path) and os.path.basename(temp).startswith(".out.txt.")
    assert target_then == "old"  # the temporary was flushed while the target still held the old file
    assert directory == str(tmp_path) and target_after == "new"  # then the rename itself


def test_a_writer_killed_mid_write_leaves_the_old_file_and_a_stable_temporary_is_reused(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    script = (
        "import os, signal, sys\n"
        "from cmd_plugin.files import atomic_write\n"
        "def write(tmp):\n"
        "    with open(tmp, 'w') as f:\n"
        "        f.write('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], write, stable_temp=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    run = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.txt", "out.txt.tmp"]  # the killed run's temporary
    atomic_write(str(path), _write_text("new"), stable_temp=True)  # overwrites it, leaves none
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_text_json_and_copy_helpers(tmp_path):
    atomic_write_text(str(tmp_path / "a.txt"), "h\u00e9llo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "h\u00e9llo\n"
    atomic_write_json(str(tmp_path / "r.json"), {"b": [1, 2], "a": "\u00e9"}, indent=1, ensure_ascii=False)
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and "\u00e9" in text and json.loads(text) == {"b": [1, 2], "a": "\u00e9"}
    atomic_copy(str(tmp_path / "a.txt"), str(tmp_path / "copy" / "b.txt"))
    assert (tmp_path / "copy" / "b.txt").read_bytes() == (tmp_path / "a.txt").read_bytes()
    with pytest.raises(FileNotFoundError):
        atomic_copy(str(tmp_path / "missing"), str(tmp_path / "a.txt"))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "h\u00e9llo\n"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "copy", "r.json"]
