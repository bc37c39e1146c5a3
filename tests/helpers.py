"""What many test files share: argument namespaces at the real parser's defaults, training workspaces of shape
images, a skip for runs that log to TensorBoard without it, a free TCP port for multi-process runs, and the seeds'
ANLO step. ``tests/conftest.py`` offers the first two as fixtures."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest

from library.config import build_parser
from library.hina_anlo import ANLO
from shape_images import write_shape_images

COLORS = ("red", "green", "blue", "yellow")  # one 64×64 image per colour

# The seeds' normalized step, which the ANLO tests check against its reference: orthogonalize (on by default) off.
SeedANLO = partial(ANLO, orthogonalize=False)


def parser_args(sdxl: bool = False, **overrides) -> argparse.Namespace:
    """Every flag at ``library.config.build_parser(sdxl)``'s default, then ``overrides`` set as given (not
    checked, so a test can set what the parser would refuse)."""
    args = build_parser(sdxl).parse_args([])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def shape_workspace(root: Path, folder: str = "1_sks shape", colors: tuple[str, ...] = COLORS,
                    caption: str = "sks shape") -> Path:
    """``root`` with a DreamBooth folder ``root/data/<folder>`` of shape images (``tests/shape_images.py``)."""
    write_shape_images(root / "data" / folder, colors, caption)
    return root


def skip_without_tensorboard(argv: Sequence[str]) -> None:
    """Skip the calling test when ``argv`` logs to TensorBoard (``--logging_dir``) and tensorboard, a test-only
    requirement, is not installed."""
    if "--logging_dir" in argv:
        pytest.importorskip("tensorboard", reason="--logging_dir logs to TensorBoard: pip install tensorboard")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torch.distributed / accelerate launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
