"""What ``train_network.py`` and ``sdxl_train_network.py`` share around a run: quiet import-time warnings,
console logging, and bad input reported as one line.

Standard library only, so that an entry point can call :func:`quiet_import_warnings` before it imports the
trainer (which loads diffusers, transformers and bitsandbytes).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from library.errors import INTERRUPTED_STATUS, RunStopped, UserInputError

# Loggers that warn while optional backends the trainer never uses are imported: bitsandbytes' CPU 4-bit kernels
# ("Failed to load CPU gemm_4bit_forward from kernels-community") and transformers' torchvision image
# processors. The warnings read like failures; only errors from them are shown.
IMPORT_TIME_LOGGERS = ("bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils")
# argparse's status for bad usage; the entry points use it for every error in the user's input.
USER_ERROR_STATUS = 2
# What is true of a run's files when Ctrl-C ends it outside the loop's own handling.
INTERRUPTED = "interrupted (Ctrl-C); every file already in --output_dir is complete (outputs are written atomically)"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_import_warnings() -> None:
    """Show only errors from :data:`IMPORT_TIME_LOGGERS`; call it before importing the trainer."""
    for name in IMPORT_TIME_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def configure_logging(args: argparse.Namespace) -> None:
    """Console logging as ``--console_log_level`` (default INFO) and ``--console_log_file`` ask."""
    logging.basicConfig(level=args.console_log_level or logging.INFO, format=LOG_FORMAT, filename=args.console_log_file)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a :class:`UserInputError` raised in the block into ``error: <message>`` on stderr and exit status 2,
    a :class:`RunStopped` into ``stopped: <message>`` and its own status (with ``--console_log_level DEBUG``
    the traceback is logged first), and Ctrl-C into ``stopped: interrupted ...`` and status 130. Any other
    exception is a bug and keeps its traceback."""
    try:
        yield
    except UserInputError as error:
        logging.getLogger(__name__).debug("the error's traceback", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(USER_ERROR_STATUS) from None
    except RunStopped as stop:
        logging.getLogger(__name__).debug("where the run stopped", exc_info=True)
        print(f"stopped: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_status) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the loop's own handling (e.g. the final save)
        print(f"stopped: {INTERRUPTED}", file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
