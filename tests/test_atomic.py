"""library/atomic.py: a written file is complete or untouched, never half-written."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from library.atomic import atomic_output
from library.errors import OutputWriteError


def test_success_replaces_the_file_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "out.txt"  # the folder is created
    with atomic_output(path, "w", encoding="utf-8") as file:
        file.write("first")
    with atomic_output(path) as file:
        file.write(b"second")
    assert path.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"good")
    with pytest.raises(OutputWriteError, match=rf"could not write {path}: No space left on device"):
        with atomic_output(path) as file:
            file.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_only_write_modes():
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_output("x", "a"):
            pass


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path):
    """SIGKILL inside the block (no cleanup runs): the file under the final name is still the old one."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"good")
    script = (
        "import os, signal\n"
        "from library.atomic import atomic_output\n"
        f"with atomic_output({str(path)!r}) as file:\n"
        "    file.write(b'half')\n"
        "    file.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"good"
    leftover = [p.name for p in tmp_path.iterdir() if p.name != "model.safetensors"]
    assert len(leftover) == 1 and leftover[0].startswith(".model.safetensors.") and leftover[0].endswith(".tmp")
