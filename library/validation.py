"""``--validation_split``: a held-out part of the training images and its loss at fixed noise and timesteps.

The split: in each dataset, the training images (not the regularization images) are shuffled with
``random.Random(--validation_seed or --seed)``; the first ``int(n · (1 - split))`` stay for training, the rest are
held out, each seen once per validation pass. Both parts are ``DatasetGroup``s built from the items of the group
``build_dataset`` returned, so buckets, captions and latent caching work as for training.

The loss: :func:`validation_loss` runs the trainer's own ``compute_loss`` on the held-out batches, with the network
in eval mode (dropout off), without gradients, and inside ``torch.random.fork_rng`` seeded from the validation
seed — every pass sees the same noise and timesteps, and the training RNG is exactly where it was before, so a run
trains the same with or without validation. Logged as sd-scripts does: ``loss/validation/step_current``,
``loss/validation/step_average`` (mean of the step passes so far), ``loss/validation/epoch_current`` and
``loss/validation/epoch_average``.
"""

from __future__ import annotations

import argparse
import copy
import random
from collections.abc import Callable, Iterable

import torch
from accelerate import Accelerator

from library.dataset import BucketedDataset, DatasetGroup, ImageItem
from library.errors import UserInputError


class ValidationSplitError(UserInputError):
    """``--validation_split`` leaves no image for training or none for validation."""


def validation_seed(args: argparse.Namespace) -> int:
    """``--validation_seed``, else ``--seed``, else 0."""
    if args.validation_seed is not None:
        return args.validation_seed
    return args.seed if args.seed is not None else 0


def split_dataset(group: DatasetGroup, split: float, seed: int) -> tuple[DatasetGroup, DatasetGroup]:
    """The training part and the held-out part of ``group`` (see the module docstring). Raises
    ``ValidationSplitError`` when a dataset has too few training images for both parts."""
    train_datasets, validation_datasets = [], []
    for dataset in group.datasets:
        train_items = [item for item in dataset.items if not item.subset.is_reg]
        reg_items = [item for item in dataset.items if item.subset.is_reg]
        shuffled = list(train_items)
        random.Random(seed).shuffle(shuffled)
        n_train = int(len(shuffled) * (1.0 - split))
        if n_train == 0 or n_train == len(shuffled):
            directories = sorted({item.subset.metadata_file or item.subset.image_dir for item in train_items})
            raise ValidationSplitError(
                f"--validation_split {split}: {len(shuffled)} training image(s) in {', '.join(directories)} leave "
                f"{n_train} for training and {len(shuffled) - n_train} for validation; both need at least one"
            )
        kept = set(map(id, shuffled[:n_train]))
        held_out = [copy.copy(item) for item in shuffled[n_train:]]
        for item in held_out:
            item.num_repeats = 1
        train_datasets.append(_with_items(dataset, [i for i in train_items if id(i) in kept] + reg_items))
        validation_datasets.append(_with_items(dataset, held_out))
    make = lambda datasets: DatasetGroup(datasets, group.seed, group.prior_loss_weight, group.skip_cache_check)  # noqa: E731
    return make(train_datasets), make(validation_datasets)


def _with_items(dataset: BucketedDataset, items: list[ImageItem]) -> BucketedDataset:
    """A copy of ``dataset`` holding only ``items`` (already assigned to buckets), with its counts and bucket
    lists recomputed."""
    part = copy.copy(dataset)
    part.items = items
    used = [subset for subset in dataset.subsets if any(item.subset is subset for item in items)]
    part.subsets = used
    part.subset_image_counts = [sum(item.subset is subset for item in items) for subset in used]
    part.num_train_images = sum(item.num_repeats for item in items if not item.subset.is_reg)
    part.num_reg_images = sum(item.num_repeats for item in items if item.subset.is_reg)
    part.buckets = {}
    for index, item in enumerate(items):
        part.buckets.setdefault(item.bucket.bucket, []).extend([index] * item.num_repeats)
    part.buckets = dict(sorted(part.buckets.items()))
    return part


def is_validation_step(args: argparse.Namespace, global_step: int) -> bool:
    """Whether to validate after optimizer step ``global_step`` (``--validate_every_n_steps``)."""
    return bool(args.validation_split and args.validate_every_n_steps and global_step % args.validate_every_n_steps == 0)


def is_validation_epoch(args: argparse.Namespace, epoch: int) -> bool:
    """Whether to validate at the end of ``epoch`` (1-based): every ``--validate_every_n_epochs`` epochs, or every
    epoch when only ``--validation_split`` is given (as sd-scripts)."""
    if not args.validation_split:
        return False
    if args.validate_every_n_epochs:
        return epoch % args.validate_every_n_epochs == 0
    return not args.validate_every_n_steps


def validation_loss(
    accelerator: Accelerator,
    network: torch.nn.Module,
    batches: Iterable[dict],
    compute_loss: Callable[[dict], torch.Tensor],
    seed: int,
    max_batches: int | None = None,
) -> float:
    """The mean loss of ``compute_loss`` over (at most ``max_batches`` of) ``batches``, in eval mode, without
    gradients, at noise and timesteps drawn from ``seed`` (see the module docstring). Averaged over processes."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    was_training = network.training
    network.eval()
    total, count = 0.0, 0
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                total += compute_loss(batch).item()
                count += 1
    finally:
        network.train(was_training)
    values = torch.tensor([total, float(count)], device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    return values[0].item() / max(values[1].item(), 1.0)


class ValidationRecorder:
    """The values logged after each validation pass, under sd-scripts' names."""

    def __init__(self) -> None:
        self.step_losses: list[float] = []
        self.epoch_losses: list[float] = []

    def step_logs(self, loss: float) -> dict[str, float]:
        self.step_losses.append(loss)
        return {"loss/validation/step_current": loss,
                "loss/validation/step_average": sum(self.step_losses) / len(self.step_losses)}

    def epoch_logs(self, loss: float) -> dict[str, float]:
        self.epoch_losses.append(loss)
        return {"loss/validation/epoch_current": loss,
                "loss/validation/epoch_average": sum(self.epoch_losses) / len(self.epoch_losses)}
