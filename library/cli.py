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

# Loggers that warn while optional backends the trainer never uses are imported: bitsandbytes' CPU 4-bit kernels
# ("Failed to load CPU gemm_4bit_forward from kernels-community") and transformers' torchvision image
# processors. The warnings read like failures; only errors from them are shown.
IMPORT_TIME_LOGGERS = ("bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils")
# argparse's status for bad usage; the entry points use it for every error in the user's input.
USER_ERROR_STATUS = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_import_warnings() -> None:
    """Show only errors from :data:`IMPORT_TIME_LOGGERS`; call it before importing the trainer."""
    for name in IMPORT_TIME_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def configure_logging(args: argparse.Namespace) -> None:
    """Console logging as ``--console_log_level`` (default INFO) and ``--console_log_file`` ask."""
    logging.basicConfig(level=args.console_log_level or logging.INFO, format=LOG_FORMAT, filename=args.console_log_file)


@contextmanager
def exit_on_user_error(error_types: tuple[type[Exception], ...]) -> Iterator[None]:
    """Turn an error of ``error_types`` raised in the block into ``error: <message>`` on stderr and exit status 2."""
    try:
        yield
    except error_types as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(USER_ERROR_STATUS) from None
