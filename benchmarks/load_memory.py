"""Peak memory of loading a base model as the trainer does: ``library.models.load_models`` with the trainer's
``--mixed_precision`` / ``--no_half_vae``, then each component cast to the dtype the trainer keeps it in (a
no-op where loading produced that dtype already). Prints the process's peak RSS (``VmHWM``) and the bytes the
loaded components hold. One run per process; run it under ``/usr/bin/time -v`` for an outside view::

    python -m benchmarks.load_memory --model /tmp/full/sdxl.safetensors --sdxl --mixed_precision bf16

Optionally ``--limit_gib N`` stops the process (exit status 3) once its RSS passes N GiB, for loads that may not
fit the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs as `python benchmarks/<file>.py`

import torch  # noqa: E402

from library import models  # noqa: E402

MIB = 2**20
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def stop_above(limit_gib: float) -> None:
    """Exit the process (status 3) as soon as its RSS passes ``limit_gib``; checked every 50 ms."""
    while True:
        rss = status_kib("VmRSS") * 1024
        if rss > limit_gib * 2**30:
            print(f"stopped: RSS {rss / MIB:,.0f} MiB passed --limit_gib {limit_gib}", flush=True)
            os._exit(3)
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="--pretrained_model_name_or_path")
    parser.add_argument("--sdxl", action="store_true")
    parser.add_argument("--mixed_precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--no_half_vae", action="store_true")
    parser.add_argument("--limit_gib", type=float, default=None)
    args = parser.parse_args(argv)
    if args.limit_gib:
        threading.Thread(target=stop_above, args=(args.limit_gib,), daemon=True).start()

    started = time.perf_counter()
    bundle = models.load_models(
        Namespace(pretrained_model_name_or_path=args.model, mixed_precision=args.mixed_precision,
                  no_half_vae=args.no_half_vae),
        sdxl=args.sdxl,
    )
    weight_dtype = DTYPES[args.mixed_precision]
    bundle.unet.to(dtype=weight_dtype)
    for encoder in bundle.text_encoders:
        encoder.to(dtype=weight_dtype)
    bundle.vae.to(dtype=torch.float32 if args.no_half_vae else weight_dtype)
    seconds = time.perf_counter() - started

    held = sum(
        tensor.numel() * tensor.element_size()
        for module in (bundle.unet, bundle.vae, *bundle.text_encoders)
        for tensor in (*module.parameters(), *module.buffers())
    )
    print(
        f"peak RSS {status_kib('VmHWM') / 1024:,.0f} MiB, RSS after {status_kib('VmRSS') / 1024:,.0f} MiB, "
        f"components {held / MIB:,.0f} MiB, {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
