"""Test-wide settings.

The tests run tiny models whose kernels are far too small to gain from intra-op threads; on a shared 2-core
machine extra threads only contend (a tiny-model step is ~10x slower with two busy threads). One thread makes
the suite fast and its timings steady.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from helpers import parser_args, shape_workspace  # noqa: E402  (tests/helpers.py)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread during the test, whatever an earlier test set: reductions may group differently with
    more (the ANLO golden fixture and the lr_free resume checks compare bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def default_args() -> Callable[..., object]:
    """``default_args(sdxl=False, **overrides)``: an ``argparse.Namespace`` with every flag at the real parser's
    default (``library.config.build_parser``), then ``overrides``; no test copies the flag defaults."""
    return parser_args


@pytest.fixture(scope="session")
def make_shape_workspace(tmp_path_factory) -> Callable[..., Path]:
    """``make_shape_workspace(name, folder="1_sks shape", colors=COLORS, caption="sks shape")``: a fresh temporary
    folder holding ``data/<folder>`` with one shape image and caption per colour (``tests/helpers.py``)."""
    def make(name: str, *args, **kwargs) -> Path:
        return shape_workspace(tmp_path_factory.mktemp(name), *args, **kwargs)
    return make
