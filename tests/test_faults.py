"""Faults of the environment during a run: a full disk at each kind of save, Ctrl-C in each phase.

Each case runs the real entry point and checks three things: the exit status, the one ``stopped:`` line (what
failed, and which complete LoRA the run leaves), and the files on disk (nothing partial under a final name, no
temporary file left behind). A full disk is simulated by failing the ``fsync`` of the temporary file that
``library/atomic.py`` writes for a chosen output name; every output goes through it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_network
from library import atomic
from library.dataset import DatasetGroup
from library.trainer import NetworkTrainer

pytestmark = pytest.mark.slow

NO_SPACE = "No space left on device"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    images = tmp_path_factory.mktemp("faults") / "data" / "1_sks"
    images.mkdir(parents=True)
    for name, color in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (64, 64), color).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text("a photo of sks", encoding="utf-8")
    return images.parent


def argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data_dir),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(out), "--output_name", "run",
        "--network_module", "networks.lora", "--network_dim", "4", "--optimizer_type", "ANLO",
        "--max_train_steps", "4", "--save_every_n_steps", "2", "--max_data_loader_n_workers", "0", "--seed", "1",
        *extra,
    ]  # fmt: skip


def fail_writes(monkeypatch, failing: Callable[[str], bool], error: BaseException | None = None) -> None:
    """Make the atomic write of every output whose final file name satisfies ``failing`` fail at its fsync."""
    fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        temporary = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))  # ".<name>.<random>.tmp"
        if temporary.startswith(".") and failing(temporary[1:].rsplit(".", 2)[0]):
            raise error or OSError(errno.ENOSPC, NO_SPACE)
        fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)


def run_stopped(args: list[str], capsys, status: int) -> str:
    """Run the entry point; assert it exits with ``status`` and no traceback; return its last stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(args)
    assert exit_info.value.code == status
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return stderr.splitlines()[-1]


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders left in ``out``."""
    return sorted(path.name for path in out.rglob("*") if path.name.endswith(".tmp"))


# ----------------------------------------------------------------------------------------------- a full disk


def test_full_disk_at_the_final_lora_keeps_the_step_files(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    fail_writes(monkeypatch, lambda name: name == "run.safetensors")
    line = run_stopped(argv(data_dir, out), capsys, status=1)
    assert line == (
        f"stopped: could not write {out / 'run.safetensors'}: {NO_SPACE}; "
        f"the newest complete LoRA of this run is {out / 'run-step00000004.safetensors'}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["run-step00000002.safetensors", "run-step00000004.safetensors"]


def test_full_disk_at_a_step_lora_stops_and_names_the_one_before(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    fail_writes(monkeypatch, lambda name: name == "run-step00000004.safetensors")
    line = run_stopped(argv(data_dir, out), capsys, status=1)
    assert line == (
        f"stopped: could not write {out / 'run-step00000004.safetensors'}: {NO_SPACE}; "
        f"the newest complete LoRA of this run is {out / 'run-step00000002.safetensors'}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["run-step00000002.safetensors"]


def test_full_disk_at_a_state_removes_the_partial_folder(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    fail_writes(monkeypatch, lambda name: name == "train_state.json")
    line = run_stopped(argv(data_dir, out, "--save_state"), capsys, status=1)
    state = out / "run-step00000002-state"
    assert line == (
        f"stopped: could not save the training state to {state}: could not write {state}.tmp/train_state.json: "
        f"{NO_SPACE}; earlier states are unchanged; "
        f"the newest complete LoRA of this run is {out / 'run-step00000002.safetensors'}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["run-step00000002.safetensors"]


def test_full_disk_at_a_sample_image(data_dir, tmp_path, capsys, monkeypatch):
    out, prompts = tmp_path / "out", tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks --s 2 --w 64 --h 64\n", encoding="utf-8")
    fail_writes(monkeypatch, lambda name: name.endswith(".png"))
    line = run_stopped(
        argv(data_dir, out, "--sample_prompts", str(prompts), "--sample_every_n_steps", "4"), capsys, status=1
    )
    assert line.startswith(f"stopped: could not write {out / 'sample'}")
    assert line.endswith(
        f".png: {NO_SPACE}; the newest complete LoRA of this run is {out / 'run-step00000002.safetensors'}"
    )
    assert not list(out.rglob("*.png")) and leftovers(out) == []


def test_full_disk_at_the_latent_cache(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    fail_writes(monkeypatch, lambda name: name.endswith(".npz"))
    line = run_stopped(argv(data_dir, out, "--cache_latents_to_disk"), capsys, status=1)
    assert line == (
        f"stopped: could not write {data_dir / '1_sks' / 'a.npz'}: {NO_SPACE}; nothing was trained"
    )
    assert not list(data_dir.rglob("*.npz")) and leftovers(data_dir) == []


# ----------------------------------------------------------------------------------------------- Ctrl-C


def raise_keyboard_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "phase",
    [(NetworkTrainer, "load_models"), (DatasetGroup, "cache_latents")],
    ids=["loading", "caching"],
)
def test_ctrl_c_before_training(phase, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(*phase, raise_keyboard_interrupt)
    out = tmp_path / "out"
    line = run_stopped(argv(data_dir, out, "--cache_latents"), capsys, status=130)
    assert line == (
        "stopped: interrupted before training started (while loading the models or caching latents); nothing was "
        "trained, and latents already cached to disk are complete"
    )
    assert not out.exists() or list(out.iterdir()) == []


def test_second_ctrl_c_during_training_stops_at_once(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(NetworkTrainer, "compute_loss", raise_keyboard_interrupt)
    line = run_stopped(argv(data_dir, out), capsys, status=130)
    assert line == (
        "stopped: interrupted (Ctrl-C); every file already in --output_dir is complete (outputs are written "
        "atomically)"
    )


def test_ctrl_c_during_the_final_save_leaves_no_partial_file(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    fail_writes(monkeypatch, lambda name: name == "run.safetensors", KeyboardInterrupt())
    line = run_stopped(argv(data_dir, out), capsys, status=130)
    assert line.startswith("stopped: interrupted (Ctrl-C)")
    assert sorted(p.name for p in out.iterdir()) == ["run-step00000002.safetensors", "run-step00000004.safetensors"]


def test_out_of_memory_during_training_names_the_step_and_what_helps(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    compute_loss, calls = NetworkTrainer.compute_loss, []

    def compute_loss_running_out_of_memory(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
        return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(NetworkTrainer, "compute_loss", compute_loss_running_out_of_memory)
    line = run_stopped(argv(data_dir, out), capsys, status=1)
    assert line == (
        "stopped: out of memory at step 3 (CUDA out of memory. Tried to allocate 2.00 GiB); try "
        "--gradient_checkpointing, --cache_latents, --fp8_base, --mixed_precision bf16, a smaller --train_batch_size "
        "or --resolution, or --network_train_unet_only with --cache_text_encoder_outputs (SDXL); "
        f"the newest complete LoRA of this run is {out / 'run-step00000002.safetensors'}"
    )
