"""Every output a run writes, named, saved and pruned in one place: LoRA files and state folders.

Names are sd-scripts' (``name`` is ``--output_name``; without it sd-scripts' defaults ``epoch``, ``at``, ``last``):

    every N epochs   {name}-{epoch:06d}.{ext}       {name}-{epoch:06d}-state
    every N steps    {name}-step{step:08d}.{ext}    {name}-step{step:08d}-state
    end of the run   {name}.{ext}                   {name}-state

Retention: ``--save_last_n_epochs N`` keeps the newest N epoch files (the file ``N × save_every_n_epochs`` epochs
older is removed when a new one is saved); ``--save_last_n_steps N`` keeps the files saved in the last N steps.
State folders follow ``--save_last_n_epochs_state`` / ``--save_last_n_steps_state``, falling back to the LoRA
files' settings.

A save that fails (a full disk) leaves no partial file under the final name (LoRA files and states are written
beside it and renamed) and raises :class:`~library.errors.OutputWriteError`;
:meth:`Checkpoints.naming_the_newest_on_failure` adds which complete LoRA the run leaves.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator

from library import resume
from library.errors import OutOfMemory, OutputWriteError

# sd-scripts' names when --output_name is not given.
DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_STEP_NAME = "at"
DEFAULT_LAST_NAME = "last"
SAVE_PRECISIONS = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def stem(args: argparse.Namespace, epoch: int | None = None, step: int | None = None) -> str:
    """The name shared by a checkpoint's LoRA file and state folder (see the module docstring)."""
    if epoch is not None:
        return f"{args.output_name or DEFAULT_EPOCH_NAME}-{epoch:06d}"
    if step is not None:
        return f"{args.output_name or DEFAULT_STEP_NAME}-step{step:08d}"
    return args.output_name or DEFAULT_LAST_NAME


def lora_name(args: argparse.Namespace, epoch: int | None = None, step: int | None = None) -> str:
    """``{stem}.{--save_model_as}``."""
    return f"{stem(args, epoch, step)}.{args.save_model_as}"


def state_name(args: argparse.Namespace, epoch: int | None = None, step: int | None = None) -> str:
    """``{stem}-state``."""
    return f"{stem(args, epoch, step)}-state"


def epoch_to_remove(epoch: int, every: int | None, keep: int | None) -> int | None:
    """The epoch that falls out of a window of ``keep`` saves, one every ``every`` epochs, when ``epoch`` is saved."""
    if keep is None or not every:
        return None
    old = epoch - every * keep
    return old if old > 0 else None


def step_to_remove(step: int, every: int | None, keep: int | None) -> int | None:
    """The saved step (a multiple of ``every``) that is more than ``keep`` steps old once ``step`` is saved."""
    if keep is None or not every:
        return None
    old = step - keep - 1
    old -= old % every
    return old if old > 0 else None


class Checkpoints:
    """Saves what is due after a step, after an epoch, at the end and on Ctrl-C, and prunes what falls out of
    ``--save_last_n_*``. ``metadata(steps, epoch)`` gives a LoRA file's metadata; ``averaged_weights()`` is a
    context in which the network holds the weights to save (a schedule-free optimizer's averaged ones)."""

    def __init__(
        self,
        args: argparse.Namespace,
        accelerator: Accelerator,
        network: torch.nn.Module,
        metadata: Callable[[int, int], dict[str, str]],
        run_fingerprint: dict[str, Any],
        averaged_weights: Callable[[], Any],
    ) -> None:
        self.args = args
        self.accelerator = accelerator
        self.network = network
        self.metadata = metadata
        self.run_fingerprint = run_fingerprint
        self.averaged_weights = averaged_weights
        self.save_dtype = SAVE_PRECISIONS[args.save_precision]
        self.last_lora: str | None = None  # the newest complete LoRA file this run wrote

    # ------------------------------------------------------------------ when

    def after_step(self, step: int, epoch: int) -> None:
        """``--save_every_n_steps``: the LoRA (and the state with ``--save_state``) at every N-th step."""
        args = self.args
        if not args.save_every_n_steps or step % args.save_every_n_steps:
            return
        with self.averaged_weights():
            self._save_and_prune(
                "step", step, step, epoch,
                lora_old=step_to_remove(step, args.save_every_n_steps, args.save_last_n_steps),
                state_old=step_to_remove(
                    step, args.save_every_n_steps, args.save_last_n_steps_state or args.save_last_n_steps
                ),
            )  # fmt: skip

    def after_epoch(self, epoch: int, num_epochs: int, step: int) -> None:
        """``--save_every_n_epochs``: the LoRA (and the state) at every N-th epoch but the last, which is the
        final save."""
        args = self.args
        if not args.save_every_n_epochs or epoch % args.save_every_n_epochs or epoch >= num_epochs:
            return
        with self.averaged_weights():
            self._save_and_prune(
                "epoch", epoch, step, epoch,
                lora_old=epoch_to_remove(epoch, args.save_every_n_epochs, args.save_last_n_epochs),
                state_old=epoch_to_remove(
                    epoch, args.save_every_n_epochs, args.save_last_n_epochs_state or args.save_last_n_epochs
                ),
            )  # fmt: skip

    def at_end(self, num_epochs: int, step: int) -> str | None:
        """The final LoRA ``{name}.{ext}`` (and ``{name}-state`` with ``--save_state`` or
        ``--save_state_on_train_end``); returns the LoRA's path on the main process."""
        with self.averaged_weights():
            if self.args.save_state or self.args.save_state_on_train_end:
                self.save_state(state_name(self.args), num_epochs, step)
            if self.accelerator.is_main_process:
                return self.save_lora(lora_name(self.args), step, num_epochs)
        return None

    def on_interrupt(self, epoch: int, step: int) -> str:
        """Ctrl-C between steps: the LoRA as trained so far and the state to continue from; returns what to tell
        the user."""
        with self.averaged_weights():
            state = self.save_state(state_name(self.args, step=step), epoch, step)
            if self.accelerator.is_main_process:
                self.save_lora(lora_name(self.args, step=step), step, epoch)
        return (
            f"interrupted at step {step}; the LoRA as trained so far is {self.last_lora} and the state is {state} "
            f"(continue with --resume {state})"
        )

    # ------------------------------------------------------------------ how

    def _save_and_prune(
        self, kind: str, at: int, step: int, epoch: int, lora_old: int | None, state_old: int | None
    ) -> None:
        """Save the LoRA (and the state) named for ``kind`` ("step" or "epoch") ``at``, then remove the ones of
        ``kind`` ``lora_old`` / ``state_old`` that fell out of the kept window."""
        args = self.args
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.save_lora(lora_name(args, **{kind: at}), step, epoch)
            if lora_old is not None:
                self._remove_file(lora_name(args, **{kind: lora_old}))
        if args.save_state:
            self.save_state(state_name(args, **{kind: at}), epoch, step)
            if state_old is not None:
                resume.remove_state(self.accelerator, self._path(state_name(args, **{kind: state_old})))

    def save_lora(self, file_name: str, steps: int, epoch: int) -> str:
        """Write the network's weights to ``--output_dir/file_name`` (main process only); returns the path."""
        path = self._path(file_name)
        self.accelerator.print(f"\nsaving checkpoint: {path}")
        self.accelerator.unwrap_model(self.network).save_weights(path, self.save_dtype, self.metadata(steps, epoch))
        self.last_lora = path
        return path

    def save_state(self, folder: str, epoch: int, steps: int) -> str:
        """Write the training state to ``--output_dir/folder`` (every process takes part); returns the path."""
        path = self._path(folder)
        resume.save_state(self.accelerator, path, resume.TrainState(epoch=epoch, step=steps), self.run_fingerprint)
        return path

    @contextmanager
    def naming_the_newest_on_failure(self) -> Iterator[None]:
        """Add to an ``OutputWriteError`` (a sample, a LoRA, a state) or ``OutOfMemory`` from the block which
        complete LoRA file this run leaves."""
        try:
            yield
        except (OutputWriteError, OutOfMemory) as error:
            newest = f"the newest complete LoRA of this run is {self.last_lora}" if self.last_lora else (
                "this run completed no LoRA file"
            )
            raise type(error)(f"{error}; {newest}") from error

    def _remove_file(self, file_name: str) -> None:
        path = self._path(file_name)
        if os.path.exists(path):
            self.accelerator.print(f"removing old checkpoint: {path}")
            os.remove(path)

    def _path(self, name: str) -> str:
        return os.path.join(self.args.output_dir, name)
