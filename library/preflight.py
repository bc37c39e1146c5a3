"""Checks that need no model, run before any model file is opened.

Loading a real checkpoint and caching its latents takes minutes; a typo in ``--optimizer_args`` should not wait
for them. :func:`check_before_models` looks at everything that can be judged from the arguments alone and raises
:class:`~library.errors.UserInputError` (one ``error:`` line at the entry points) for the first problem:

* the optimizer: ``--optimizer_type`` resolves to a class, ``--optimizer_args`` parse, and the class accepts them —
  checked by building it once on a one-element dummy parameter (cost: one tiny tensor, no model);
* the network: ``--network_module`` imports, ``--network_args`` are ``key=value``;
* learning rates: the parts that train (U-Net, text encoders) do not all have learning rate 0;
* input paths: ``--network_weights``, ``--resume``, ``--sample_prompts`` and ``--in_json`` exist, and every
  ``--base_weights`` file holds LoRA formats it can merge (read from its header).

Each check reads its flags with sd-scripts' meaning; the stages that later use them keep their own (more detailed)
checks, so this module only moves the first failure earlier.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from library import base_weights
from library.errors import UserInputError, reported_as_user_input
from library.optimizers import get_optimizer, resolve_optimizer_type
from library.resume import ResumeError


def check_before_models(args: argparse.Namespace) -> None:
    """Raise :class:`UserInputError` for the first argument that would make the run fail after the models load."""
    check_paths(args)
    base_weights.check_args(args)
    check_network_arguments(args)
    check_learning_rates(args)
    check_optimizer(args)


def check_paths(args: argparse.Namespace) -> None:
    """The files and folders the run reads later (the model and data are checked where they are opened)."""
    wanted = [
        ("--network_weights", args.network_weights, os.path.isfile, "file", UserInputError),
        ("--resume", args.resume, os.path.isdir, "state folder", ResumeError),
        ("--sample_prompts", args.sample_prompts, os.path.isfile, "file", UserInputError),
        ("--in_json", args.in_json, os.path.isfile, "file", UserInputError),
    ]
    for flag, path, exists, kind, error in wanted:
        if path and not exists(path):
            raise error(f"{flag} {path}: no such {kind}")


def check_network_arguments(args: argparse.Namespace) -> None:
    """``--network_module`` imports; ``--network_args`` are key=value (the ranges of ``--network_dim`` and
    ``--network_alpha`` are the parser's, ``library/config.py``)."""
    from library.trainer import DEFAULT_NETWORK_MODULE, import_network_module, parse_network_args

    import_network_module(args.network_module or DEFAULT_NETWORK_MODULE)
    parse_network_args(args.network_args)


def check_learning_rates(args: argparse.Namespace) -> None:
    """At least one part that trains has a learning rate other than 0 (Adafactor's relative step sets its own)."""
    if resolve_optimizer_type(args) == "Adafactor":
        return
    unet_lr = args.unet_lr if args.unet_lr is not None else args.learning_rate
    text_encoder_lrs = args.text_encoder_lr
    if text_encoder_lrs is None or text_encoder_lrs == []:
        text_encoder_lrs = [args.learning_rate]
    elif isinstance(text_encoder_lrs, (int, float)):
        text_encoder_lrs = [text_encoder_lrs]
    trained = []
    if not args.network_train_text_encoder_only:
        trained.append(("--unet_lr" if args.unet_lr is not None else "--learning_rate", [unet_lr]))
    if not args.network_train_unet_only:
        trained.append(("--text_encoder_lr" if args.text_encoder_lr else "--learning_rate", text_encoder_lrs))
    if trained and all(lr == 0 for _, lrs in trained for lr in lrs):
        flags = ", ".join(dict.fromkeys(f"{flag} 0" for flag, _ in trained))
        raise UserInputError(f"every part that would train has learning rate 0 ({flags}); nothing would train")


def check_optimizer(args: argparse.Namespace) -> None:
    """Build the optimizer the flags ask for on a dummy parameter, so a wrong name or argument fails now."""
    dummy = torch.nn.Parameter(torch.zeros(1))
    lr = args.unet_lr or args.learning_rate
    with reported_as_user_input(), _quiet("library.optimizers"):
        # get_optimizer may rewrite scheduler flags (Adafactor): give it a copy
        _, _, optimizer = get_optimizer(copy.copy(args), [{"params": [dummy], "lr": lr}])
    if getattr(optimizer, "lr_free", False) is True and args.network_weights and not args.resume:
        raise UserInputError(
            "--optimizer_args lr_free=True measures the step size while a fresh LoRA's lora_up moves away from zero, "
            f"but --network_weights {args.network_weights} starts from trained weights: set a learning rate instead "
            "(--learning_rate, without lr_free=True)"
        )


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Hide a logger's messages below errors (the real construction logs them once, later)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
