"""``--save_state`` / ``--resume``: the training state of a run, saved so that it can go on where it stopped.

A state folder holds what ``accelerator.save_state`` writes (the network's weights, the optimizer's and the LR
scheduler's state dicts, the RNG states of every process) plus two small files of ours:

* ``train_state.json``: ``{"current_epoch": e, "current_step": s}`` as sd-scripts writes it, the epoch counted from
  1 when the state was saved at an epoch's end and the optimizer steps done so far;
* ``fingerprint.json``: what the state fits (network module, dim, alpha, a hash of the network's key names and
  shapes, optimizer class and parameter-group sizes); ``--resume`` compares it with the current run before loading
  anything, so a state of another network or optimizer is refused with a message saying what differs.

Folder names and retention are decided in ``library/checkpoints.py``. A state is written into ``<folder>.tmp`` and
renamed into place, so a crash or a full disk while saving never leaves a half-written folder where a good one was.

Ctrl-C: :class:`InterruptRequest` turns the first SIGINT into a request that the loop checks between steps (it
then saves the state and stops); a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from library.atomic import atomic_output
from library.errors import INTERRUPTED_STATUS, OutputWriteError, RunStopped, UserInputError, first_line

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
FINGERPRINT_FILE = "fingerprint.json"
# What accelerate's save_state writes for one prepared network, optimizer and scheduler (one process).
STATE_FILES = ("model.safetensors", "optimizer.bin")
# What reading a truncated or overwritten state file raises (safetensors' header check, torch.load's unpickler).
STATE_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, IndexError, EOFError, pickle.UnpicklingError,
                     SafetensorError)  # fmt: skip


class ResumeError(UserInputError):
    """A state folder cannot be used: the message names the folder and what is wrong."""


class TrainingInterrupted(RunStopped):
    """The run was stopped by Ctrl-C; the message says where its state was saved (if it was)."""

    exit_status = INTERRUPTED_STATUS


@dataclass(frozen=True)
class TrainState:
    """Where a saved run stood: ``epoch`` (1-based epochs finished or in progress, as sd-scripts) and ``step``
    (optimizer steps done)."""

    epoch: int
    step: int


def fingerprint(args: argparse.Namespace, network: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """What a state must match to be loaded into this run (see the module docstring)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    shapes = sorted((key, list(value.shape)) for key, value in network.state_dict().items())
    return {
        "network_module": args.network_module,
        "network_dim": args.network_dim,
        "network_alpha": args.network_alpha,
        "network_keys": len(shapes),
        "network_keys_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
        "optimizer": type(inner).__name__,
        "param_group_sizes": [len(group["params"]) for group in inner.param_groups],
    }


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: state has A, this run has B"`` for every fingerprint entry that differs."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            differences.append(f"{key}: the state has {saved.get(key)!r}, this run has {current.get(key)!r}")
    return differences


def save_state(accelerator: Accelerator, path: str, state: TrainState, run_fingerprint: dict[str, Any]) -> None:
    """Save the training state into the folder ``path``. Every process must call this: each one writes its part
    (accelerate writes the weights, optimizer and scheduler from the main process and one RNG file per process)
    into ``<path>.tmp``, which the main process then completes with the json files and renames to ``path``. An
    existing ``path`` is replaced only when the new state is complete, and stays as it was if saving fails.

    Between the phases the processes agree on whether every one of them succeeded, so a failure on any process
    raises ``OutputWriteError`` on all of them, instead of leaving the others waiting for it forever."""
    if accelerator.num_processes > 1 and not torch.distributed.is_initialized():
        raise RuntimeError(  # a bug in the caller, not an input the user can fix
            f"cannot save the training state to {path}: the {accelerator.num_processes} processes no longer form a "
            "process group (accelerator.end_training() was called before this save; it must come after it)"
        )
    temporary = path + ".tmp"
    main = accelerator.is_main_process
    _agree(accelerator, path, _attempt(lambda: _remove_dir(temporary)) if main else None)
    try:
        _agree(accelerator, path, _attempt(lambda: accelerator.save_state(temporary)))
        complete = lambda: _complete_and_rename(temporary, path, state, run_fingerprint)  # noqa: E731
        _agree(accelerator, path, _attempt(complete) if main else None)
    except OutputWriteError:
        if main:
            shutil.rmtree(temporary, ignore_errors=True)  # what was written before the disk filled up
        raise
    logger.info("saved the training state to %s (epoch %d, step %d)", path, state.epoch, state.step)


def _attempt(action: Callable[[], object]) -> Exception | None:
    """Run ``action``; return the ``OSError`` / ``OutputWriteError`` it raised (a full disk, a missing permission),
    or None."""
    try:
        action()
    except (OSError, OutputWriteError) as error:
        return error
    return None


def _agree(accelerator: Accelerator, path: str, failure: Exception | None) -> None:
    """Wait for every process (a collective, so also a barrier) and raise ``OutputWriteError`` on all of them if
    saving failed on any."""
    failed = failure is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
        failed = accelerator.reduce(flag, reduction="sum").item() > 0
    if failed:
        reason = failure if failure is not None else "it failed on another process"
        message = f"could not save the training state to {path}: {reason}; earlier states are unchanged"
        raise OutputWriteError(message) from failure


def _remove_dir(path: str) -> None:
    if os.path.exists(path):
        shutil.rmtree(path)


def _complete_and_rename(temporary: str, path: str, state: TrainState, run_fingerprint: dict[str, Any]) -> None:
    """Add ``train_state.json`` and ``fingerprint.json`` to the saved folder ``temporary`` and move it to ``path``."""
    _write_json(os.path.join(temporary, TRAIN_STATE_FILE), {"current_epoch": state.epoch, "current_step": state.step})
    _write_json(os.path.join(temporary, FINGERPRINT_FILE), run_fingerprint)
    _replace_dir(temporary, path)


def remove_state(accelerator: Accelerator, path: str) -> None:
    """Remove an old state folder (main process only)."""
    if accelerator.is_main_process and os.path.isdir(path):
        logger.info("removing old state: %s", path)
        shutil.rmtree(path)


def load_state(accelerator: Accelerator, path: str, run_fingerprint: dict[str, Any]) -> TrainState:
    """Check that the state folder ``path`` fits this run, load it into the prepared objects and RNGs, and return
    where the saved run stood. A folder without ``train_state.json`` (an sd-scripts state of an old version)
    resumes at step 0 with a warning."""
    if not os.path.isdir(path):
        raise ResumeError(f"--resume {path}: no such state folder")
    fingerprint_path = os.path.join(path, FINGERPRINT_FILE)
    if os.path.exists(fingerprint_path):
        differences = fingerprint_differences(_read_json(fingerprint_path, path), run_fingerprint)
        if differences:
            raise ResumeError(f"--resume {path}: the state does not fit this run ({'; '.join(differences)})")
    else:
        logger.warning("--resume %s: no %s, cannot check that the state fits this run", path, FINGERPRINT_FILE)
    missing = [name for name in STATE_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise ResumeError(
            f"--resume {path}: the state is incomplete, {' and '.join(missing)} is missing; resume from another "
            "state folder, or start again with --network_weights <a saved LoRA>"
        )
    try:
        accelerator.load_state(path)
    except STATE_READ_ERRORS as error:
        reason = first_line(error)
        if len(reason) > 120:
            reason = reason[:120] + "..."
        raise ResumeError(
            f"--resume {path}: cannot load the state, a file in it is damaged ({type(error).__name__}: {reason}); "
            "resume from another state folder"
        ) from error

    train_state_path = os.path.join(path, TRAIN_STATE_FILE)
    if not os.path.exists(train_state_path):
        logger.warning("--resume %s: no %s; training restarts its step count at 0", path, TRAIN_STATE_FILE)
        return TrainState(epoch=0, step=0)
    values = _read_json(train_state_path, path)
    try:
        return TrainState(epoch=int(values["current_epoch"]), step=int(values["current_step"]))
    except (KeyError, TypeError, ValueError):
        raise ResumeError(f"--resume {path}: {TRAIN_STATE_FILE} must hold integer current_epoch and current_step, "
                          f"got {values!r}") from None


def resume_position(step: int, steps_per_epoch: int, gradient_accumulation_steps: int) -> tuple[int, int]:
    """Where a run resumed after ``step`` optimizer steps goes on: the 0-based epoch and the number of batches of
    that epoch already consumed (to skip)."""
    epoch = step // steps_per_epoch
    return epoch, (step - epoch * steps_per_epoch) * gradient_accumulation_steps


class InterruptRequest:
    """Once installed, the first Ctrl-C (SIGINT) only sets :attr:`requested`, so the loop can finish the step, save
    the state and stop; a second Ctrl-C raises ``KeyboardInterrupt`` at once. ``restore`` puts back the previous
    handler. Outside the main thread (where signal handlers cannot be installed) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt: the state is saved after this step (press Ctrl-C again to stop at once)")

    def install(self) -> "InterruptRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def requested_anywhere(self, accelerator: Accelerator) -> bool:
        """Whether any process was interrupted (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _write_json(path: str, values: dict[str, Any]) -> None:
    """Write a json file atomically."""
    with atomic_output(path, "w", encoding="utf-8") as file:
        json.dump(values, file, indent=2)


def _read_json(path: str, state_dir: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ResumeError(f"--resume {state_dir}: cannot read {os.path.basename(path)}: {error}") from None


def _replace_dir(source: str, destination: str) -> None:
    """Move the folder ``source`` to ``destination``, replacing an existing one only once the move is certain: the
    old folder is first renamed aside, then removed."""
    aside = destination + ".old"
    if os.path.exists(aside):
        shutil.rmtree(aside)
    if os.path.exists(destination):
        os.replace(destination, aside)
    os.replace(source, destination)
    if os.path.exists(aside):
        shutil.rmtree(aside)
