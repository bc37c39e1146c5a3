"""Errors the user can fix: a flag, a config value, a data folder, a model or LoRA file.

The entry points print such an error as one line, ``error: <message>``, and exit with status 2; any other
exception is a bug and keeps its traceback. The message names the flag, key or file and what was expected.

Modules that read the user's input raise :class:`UserInputError` (or a subclass). Where a library function
raises plain ``ValueError`` / ``OSError`` / ... with such a message, the caller marks the call with
:func:`reported_as_user_input`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# The shell's status for a program ended by Ctrl-C (SIGINT).
INTERRUPTED_STATUS = 130
# What the stages that read the user's input (models, data, network, optimizer) raise for bad input.
INPUT_ERROR_TYPES: tuple[type[Exception], ...] = (ValueError, OSError, ImportError, TypeError)


class UserInputError(ValueError):
    """The run's input is wrong in a way the user can fix; the message says which input and what was expected."""


class RunStopped(Exception):
    """The run stopped before its end for a reason its message explains (and what was saved); the entry points
    print the message as one line and exit with :attr:`exit_status`."""

    exit_status = 1


class OutputWriteError(RunStopped):
    """An output (a LoRA file, a state folder, a sample image, a cache file) could not be written: a full disk, a
    lost permission. Nothing partial is left under its name; the message says which file and why."""


class OutOfMemory(RunStopped):
    """The device ran out of memory; the message says where and what lowers the memory the run needs."""


class LossNotFinite(RunStopped, FloatingPointError):
    """The loss stayed non-finite for ``--nan_abort_steps`` batches in a row."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (torch's run over many lines), or its class name when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@contextmanager
def reported_as_user_input(error_types: tuple[type[Exception], ...] = INPUT_ERROR_TYPES) -> Iterator[None]:
    """Re-raise an error of ``error_types`` from the block as a :class:`UserInputError` with the same message
    (chained, so a debugger still reaches the original). ``UserInputError`` itself passes through unchanged."""
    try:
        yield
    except UserInputError:
        raise
    except error_types as error:
        raise UserInputError(str(error)) from error
