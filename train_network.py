"""Train a LoRA for Stable Diffusion 1.x / 2.x, with sd-scripts' ``train_network.py`` command line.

    python train_network.py --config_file configs/quickstart.toml
    accelerate launch train_network.py --config_file my.toml --optimizer_type ANLO

Bad input (a flag, a config value, a data folder, a model or LoRA file) ends the program with one line on
stderr, ``error: <message>``, and exit status 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from library import cli

cli.quiet_import_warnings()  # before the imports below load bitsandbytes and transformers

from library.config import parse_args  # noqa: E402
from library.trainer import NetworkTrainer  # noqa: E402


def main(argv: Sequence[str] | None = None) -> str:
    """Parse (and check) the arguments, train, and return the path of the saved LoRA."""
    with cli.one_line_errors():
        args = parse_args(argv, sdxl=False)  # merges --config_file and runs verify_args
        cli.configure_logging(args)
        return NetworkTrainer().train(args)


if __name__ == "__main__":
    main()
