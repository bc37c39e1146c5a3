"""Train a LoRA for Stable Diffusion XL, with sd-scripts' ``sdxl_train_network.py`` command line.

    python sdxl_train_network.py --config_file configs/sdxl_quickstart.toml
    accelerate launch sdxl_train_network.py --config_file my.toml --optimizer_type ANLO
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from library.config import parse_args
from library.sdxl import SdxlNetworkTrainer


def main(argv: Sequence[str] | None = None) -> str:
    """Parse (and check) the arguments, train, and return the path of the saved LoRA."""
    args = parse_args(argv, sdxl=True)  # merges --config_file and runs verify_args
    logging.basicConfig(
        level=args.console_log_level or logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=args.console_log_file,
    )
    return SdxlNetworkTrainer().train(args)


if __name__ == "__main__":
    main()
