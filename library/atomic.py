"""Atomic file output: a file the project writes is either its old self or complete, never half-written.

    with atomic_output(path, "wb") as file:
        file.write(data)

The data goes to a temporary file in the same folder (so the final rename stays on one file system); when the
block ends without an exception the file is flushed to disk and renamed over ``path`` with ``os.replace``. When
the block raises (a full disk, Ctrl-C, a bug), the temporary file is removed and ``path`` is left as it was; an
``OSError`` (the disk, a permission) is raised as :class:`~library.errors.OutputWriteError` naming ``path``.
The folder is created when missing. Files get the permissions an ordinary ``open`` would give them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from library.errors import OutputWriteError

__all__ = ["atomic_output"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting the umask to read it is not thread-safe


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """An open temporary file (``mode`` "wb" or "w") that replaces ``path`` when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_output: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError):
            raise OutputWriteError(f"could not write {path}: {error.strerror or error}") from error
        raise
