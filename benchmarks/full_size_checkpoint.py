"""Write a full-size SD 1.5 / SD 2.x / SDXL base checkpoint with random weights as one ``.safetensors`` single file
in the original layout (LDM for SD 1.x / 2.x, SGM for SDXL), as a model site would serve it: for trying the
single-file loader and the trainer at full size without downloading a model.

The components are the published architectures (``library/architectures.py``, via ``library.single_file``)
initialised with a fixed seed directly in ``--dtype`` (fp16 by default, as released files are), named by
``library.ldm_convert``. Costs the file's size in memory (SDXL in fp16: 6.9 GB) and a few minutes of CPU::

    python -m benchmarks.full_size_checkpoint --model sdxl --out /tmp/full/sdxl.safetensors

Never commit the file it writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs as `python benchmarks/<file>.py`

from library import ldm_convert, single_file  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def write_checkpoint(model: str, out: Path, dtype: torch.dtype, seed: int = 0) -> int:
    """Build ``model`` (``sd1``, ``sd2``, ``sdxl``) with random weights in ``dtype`` and write it to ``out``;
    returns the number of tensors written."""
    arch = single_file.ARCHITECTURES[model]
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        parts = single_file.build_components(arch)
    finally:
        torch.set_default_dtype(default_dtype)
    state = ldm_convert.components_to_single_file(parts, sd2=arch.key == "sd2")
    del parts
    ldm_convert.save_single_file(state, out)
    return len(state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(single_file.ARCHITECTURES), default="sdxl")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = write_checkpoint(args.model, args.out, DTYPES[args.dtype], args.seed)
    print(f"wrote {args.out}: {count} tensors, {args.out.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
