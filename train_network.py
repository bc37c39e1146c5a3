"""Train a LoRA for Stable Diffusion 1.x / 2.x, with sd-scripts' ``train_network.py`` command line.

    python train_network.py --config_file configs/quickstart.toml
    accelerate launch train_network.py --config_file my.toml --optimizer_type ANLO
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from library.config import parse_args
from library.trainer import NetworkTrainer


def main(argv: Sequence[str] | None = None) -> str:
    """Parse (and check) the arguments, train, and return the path of the saved LoRA."""
    args = parse_args(argv, sdxl=False)  # merges --config_file and runs verify_args
    logging.basicConfig(
        level=args.console_log_level or logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=args.console_log_file,
    )
    return NetworkTrainer().train(args)


if __name__ == "__main__":
    main()
