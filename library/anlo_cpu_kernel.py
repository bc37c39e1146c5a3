"""ANLO's fused CPU kernel: both passes of a step over all float32 tensors in one call each.

torch's ``_foreach_*`` ops run one kernel per tensor on the CPU. For a LoRA (hundreds of small tensors)
the per-tensor dispatch and the small-vector bookkeeping around it cost as much as a third of the step.
This module compiles two plain C loops with the system C compiler the first time they are needed,
caches the shared library, and calls them through ``ctypes``:

* :meth:`Batch.squared_norms` - the squared L2 norm of every gradient (pass 1, reads each gradient once);
* :meth:`Batch.update_` - ``p <- p * d + c * g`` for every tensor (pass 2, reads gradient and parameter, writes
  the parameter). It walks the tensors in reverse, so the gradients pass 1 read last are still in cache.

Nothing here is required: :func:`load` returns ``None`` where no compiler is found, compiling fails,
the platform is Windows, or ``ANLO_CPU_KERNEL=0`` is set, and ANLO then uses its ``torch._foreach_*``
path. The library is cached under ``$ANLO_CACHE_DIR``, else ``$XDG_CACHE_HOME/anlo``, else
``~/.cache/anlo``, named by a hash of the source, compiler and flags, and written atomically, so
concurrent processes (data-parallel ranks) can build it at the same time. The module depends on torch
only.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["load", "build", "batch", "Batch"]

logger = logging.getLogger(__name__)

# -ffp-contract=off: ``p * d + c * g`` rounds each product as torch's kernels do, on every CPU (no FMA).
_FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off")
_COMPILE_TIMEOUT_S = 120
_DISABLE_ENV = "ANLO_CPU_KERNEL"

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

typedef float f32x4 __attribute__((vector_size(16)));

static f32x4 load4(const float *p) { f32x4 v; memcpy(&v, p, sizeof v); return v; }

/* Sum of x[i]^2: four float vector accumulators within blocks of 4096 elements, blocks summed in double. */
static double sum_of_squares(const float *x, int64_t n) {
    double total = 0.0;
    for (int64_t start = 0; start < n; start += 4096) {
        int64_t end = start + 4096 < n ? start + 4096 : n, i = start;
        f32x4 a = {0}, b = {0}, c = {0}, d = {0};
        for (; i + 16 <= end; i += 16) {
            f32x4 u = load4(x + i), v = load4(x + i + 4), w = load4(x + i + 8), z = load4(x + i + 12);
            a += u * u; b += v * v; c += w * w; d += z * z;
        }
        f32x4 s = (a + b) + (c + d);
        float block = (s[0] + s[1]) + (s[2] + s[3]);
        for (; i < end; ++i) block += x[i] * x[i];
        total += block;
    }
    return total;
}

/* out[t] = ||tensors[t]||^2 for the `count` float32 arrays at addresses[t] of numels[t] elements. */
void anlo_squared_norms_f32(int64_t count, const int64_t *addresses, const int64_t *numels, double *out) {
    for (int64_t t = 0; t < count; ++t)
        out[t] = sum_of_squares((const float *)(intptr_t)addresses[t], numels[t]);
}

/* p <- p * decays[t] + coefs[t] * g for each tensor (decays may be NULL: no decay), last tensor first. */
void anlo_update_f32(int64_t count, const int64_t *params, const int64_t *grads, const int64_t *numels,
                     const float *coefs, const float *decays) {
    for (int64_t t = count - 1; t >= 0; --t) {
        float *restrict p = (float *)(intptr_t)params[t];
        const float *restrict g = (const float *)(intptr_t)grads[t];
        const int64_t n = numels[t];
        const float c = coefs[t];
        if (decays) {
            const float d = decays[t];
            for (int64_t i = 0; i < n; ++i) p[i] = p[i] * d + c * g[i];
        } else {
            for (int64_t i = 0; i < n; ++i) p[i] = p[i] + c * g[i];
        }
    }
}
"""


def _cache_dir() -> Path:
    if os.environ.get("ANLO_CACHE_DIR"):
        return Path(os.environ["ANLO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "anlo"


def _compile(compiler: str, target: Path) -> None:
    """Compile the kernel into ``target``, atomically: a finished library or nothing at that path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "anlo_cpu_kernel.c"
        source.write_text(_SOURCE)
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *_FLAGS, "-o", str(built), str(source)],
            check=True, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S,
        )  # fmt: skip
        os.replace(built, target)


@functools.cache
def load() -> Optional[ctypes.CDLL]:
    """The kernel library, built on first use; ``None`` where it is unavailable (logged once)."""
    if os.environ.get(_DISABLE_ENV) == "0":
        logger.debug("ANLO: %s=0, so the fused CPU kernel is off", _DISABLE_ENV)
        return None
    if sys.platform == "win32":
        logger.debug("ANLO: no fused CPU kernel on Windows; using torch._foreach_* ops")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        logger.info("ANLO: no C compiler found (set CC), so the fused CPU kernel is off; using torch._foreach_* ops")
        return None
    return build(compiler, _cache_dir())


def build(compiler: str, cache_dir: Path) -> Optional[ctypes.CDLL]:
    """Load the kernel from ``cache_dir``, compiling it with ``compiler`` first if it is not there yet;
    ``None`` (and the reason logged) if that fails."""
    key = "\0".join([_SOURCE, compiler, *_FLAGS, platform.machine(), sys.platform])
    target = cache_dir / f"anlo_cpu_kernel_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = (getattr(error, "stderr", None) or str(error)).strip()
        logger.info("ANLO: could not build the fused CPU kernel with %s (%s); using torch._foreach_* ops", compiler, detail)
        return None
    pointer, count = ctypes.c_void_p, ctypes.c_int64
    library.anlo_squared_norms_f32.argtypes = [count, pointer, pointer, pointer]
    library.anlo_squared_norms_f32.restype = None
    library.anlo_update_f32.argtypes = [count, pointer, pointer, pointer, pointer, pointer]
    library.anlo_update_f32.restype = None
    return library


@dataclass(frozen=True)
class Batch:
    """One list of parameters and their gradients as the kernel sees them: addresses and sizes.

    Valid for one step only: the addresses are read when the batch is made (:func:`batch`).
    """

    library: ctypes.CDLL
    param_addresses: array.array
    grad_addresses: array.array
    numels: Tensor  # int64, one per tensor

    def squared_norms(self) -> Tensor:
        """``||g||^2`` of each gradient, as one float64 tensor (pass 1)."""
        out = torch.empty(len(self.grad_addresses), dtype=torch.float64)
        self.library.anlo_squared_norms_f32(
            len(self.grad_addresses), _address_of(self.grad_addresses), self.numels.data_ptr(), out.data_ptr()
        )
        return out

    def update_(self, coefs: Tensor, decays: Optional[Tensor]) -> None:
        """``p <- p * d + c * g`` for every tensor (pass 2); ``coefs`` and ``decays`` (or None: no decay) are
        contiguous float32, one entry per tensor."""
        self.library.anlo_update_f32(
            len(self.param_addresses),
            _address_of(self.param_addresses),
            _address_of(self.grad_addresses),
            self.numels.data_ptr(),
            coefs.data_ptr(),
            None if decays is None else decays.data_ptr(),
        )


def batch(library: ctypes.CDLL, params: Sequence[Tensor], grads: Sequence[Tensor], numels: Tensor) -> Optional[Batch]:
    """The kernel's view of float32 CPU ``params`` and ``grads``, or None if any of them is not contiguous (the
    kernel reads and writes each tensor as one flat array)."""
    if not all(t.is_contiguous() for t in params) or not all(t.is_contiguous() for t in grads):
        return None
    return Batch(library, _addresses(params), _addresses(grads), numels)


def _addresses(tensors: Sequence[Tensor]) -> array.array:
    return array.array("q", [t.data_ptr() for t in tensors])


def _address_of(addresses: array.array) -> int:
    return addresses.buffer_info()[0]
