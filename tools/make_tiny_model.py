"""Write an embedded tiny model as a diffusers folder and, optionally, as an LDM/SGM single file.

    python tools/make_tiny_model.py --kind sd1 --out models/tiny-sd1 [--single_file models/tiny-sd1.safetensors]
    python tools/make_tiny_model.py --kind sdxl --out models/tiny-sdxl [--single_file models/tiny-sdxl.safetensors]

The weights are those ``--pretrained_model_name_or_path tiny-sd1`` / ``tiny-sdxl`` loads (fixed seed), so either
output can stand in for the embedded name. The single file names its embedded config in its metadata, so it loads
without a config folder. Both outputs are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library import ldm_convert, models, tiny_models  # noqa: E402

KINDS = {"sd1": tiny_models.TINY_SD1, "sdxl": tiny_models.TINY_SDXL}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(KINDS), required=True, help="which embedded model to write")
    parser.add_argument("--out", type=Path, required=True, help="diffusers folder to create (new or empty)")
    parser.add_argument("--single_file", type=Path, default=None, help="also write an LDM/SGM .safetensors here")
    return parser


def make_tiny_model(kind: str, out: Path, single_file: Path | None = None) -> None:
    """Write the embedded model ``kind`` (``sd1`` / ``sdxl``) to ``out`` and optionally ``single_file``."""
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: expected one of {', '.join(sorted(KINDS))}")
    if single_file is not None and single_file.suffix != ".safetensors":
        raise ValueError(f"--single_file {single_file}: expected a path ending in .safetensors")
    name = KINDS[kind]
    print(f"building {name} (seed {models.EMBEDDED_MODEL_SEED})")
    parts = tiny_models.build_tiny(name, models.EMBEDDED_MODEL_SEED)
    models.save_diffusers_folder(parts, out)
    print(f"wrote diffusers folder {out}")
    if single_file is not None:
        state = ldm_convert.components_to_single_file(parts)
        ldm_convert.save_single_file(state, single_file, metadata={models.EMBEDDED_CONFIG_METADATA_KEY: name})
        print(f"wrote single file {single_file} ({len(state)} tensors)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        make_tiny_model(args.kind, args.out, args.single_file)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
