"""library/atomic.py: a written file is complete or untouched, never half-written."""

from __future__ import annotations

import os
import stat

import pytest

from library.atomic import atomic_output


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
    with pytest.raises(OSError, match="disk full"):
        with atomic_output(path) as file:
            file.write(b"half")
            raise OSError("disk full")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_only_write_modes():
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_output("x", "a"):
            pass
