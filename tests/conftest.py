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
