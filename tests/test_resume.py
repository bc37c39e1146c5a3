"""``--save_state`` / ``--resume`` (library/resume.py wired into the trainer) on the embedded tiny SD 1.x model.

The central check: 8 steps in one run and 4 steps + resume + 4 steps give bit-identical LoRA weights (network
dropout and random noise timesteps on, so every RNG matters); resuming the state of a finished run trains no step
and writes the same LoRA. The rest: sd-scripts' folder names, the
``train_state.json`` contents, refusal of a state of another network or optimizer, atomic saving, Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library import resume
from library.errors import OutputWriteError
from library.resume import ResumeError, TrainState
from helpers import skip_without_tensorboard  # tests/helpers.py
from library.trainer import NetworkTrainer

pytestmark = pytest.mark.slow

# Three 64×64 images, 2 repeats (6 batches per epoch, so 8 steps cross an epoch boundary).
FOLDER, COLORS = "2_sks shape", ("red", "green", "blue")


def base_args(root: Path, output_name: str, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", "tiny-sd1",
        "--train_data_dir", str(root / "data"),
        "--caption_extension", ".txt",
        "--resolution", "64",
        "--max_data_loader_n_workers", "0",
        "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "4",
        "--network_dropout", "0.1",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-2",
        "--lr_scheduler", "cosine",
        "--max_train_steps", "8",
        "--seed", "11",
        "--output_dir", str(root / "out"),
        "--output_name", output_name,
        "--shuffle_caption", "--flip_aug",
        *extra,
    ]


def train(argv: list[str]) -> NetworkTrainer:
    skip_without_tensorboard(argv)
    trainer = NetworkTrainer()
    trainer.train(train_network.parse_args(argv, sdxl=False))
    return trainer


@pytest.fixture(scope="module")
def workspace(make_shape_workspace) -> Path:
    return make_shape_workspace("resume", FOLDER, COLORS)


@pytest.fixture(scope="module")
def full_run(workspace) -> NetworkTrainer:
    """8 steps uninterrupted, saving LoRA and state every 4 steps."""
    return train(base_args(workspace, "full", "--save_every_n_steps", "4", "--save_state"))


@pytest.fixture(scope="module")
def resumed_run(workspace, full_run) -> NetworkTrainer:
    """The full run's state at step 4 (what an 8-step run stopped there leaves), resumed for the last 4 steps."""
    return train(base_args(workspace, "resumed", "--resume", str(workspace / "out" / "full-step00000004-state")))


def test_state_folders_have_sd_scripts_names_and_train_state(full_run, workspace):
    out = workspace / "out"
    for name, step in (("full-step00000004-state", 4), ("full-step00000008-state", 8), ("full-state", 8)):
        state = json.loads((out / name / "train_state.json").read_text())
        assert state["current_step"] == step
        assert (out / name / "model.safetensors").exists()
        assert (out / name / "optimizer.bin").exists()
    # 8 steps of 6 batches per epoch: step 4 is in epoch 1, step 8 in epoch 2
    assert json.loads((out / "full-step00000004-state" / "train_state.json").read_text())["current_epoch"] == 1
    assert json.loads((out / "full-state" / "train_state.json").read_text())["current_epoch"] == 2
    assert not list(out.glob("*.tmp"))


def test_resumed_run_ends_with_the_same_lora_bit_for_bit(full_run, resumed_run, workspace):
    full = load_file(workspace / "out" / "full.safetensors")
    resumed = load_file(workspace / "out" / "resumed.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    # and the losses of the resumed steps are those of the full run's steps 5..8
    assert resumed_run.loss_history == full_run.loss_history[4:]


@pytest.mark.parametrize("state", ["full-state", "full-step00000008-state"])
def test_resuming_a_finished_run_trains_no_step_and_writes_the_same_lora(full_run, workspace, state):
    """Step 8 of 8 lies in the second epoch (6 batches each), after 2 of its batches: nothing is left to train."""
    again = train(base_args(workspace, f"again-{state}", "--resume", str(workspace / "out" / state)))
    assert again.loss_history == []
    full = load_file(workspace / "out" / "full.safetensors")
    written = load_file(again.output_file)
    assert full.keys() == written.keys()
    for key in full:
        assert torch.equal(full[key], written[key]), key


def test_resuming_past_a_shorter_max_train_steps_trains_no_step(full_run, workspace):
    again = train(base_args(workspace, "shorter", "--resume", str(workspace / "out" / "full-state"))
                  + ["--max_train_steps", "7"])
    assert again.loss_history == []
    full = load_file(workspace / "out" / "full.safetensors")
    assert all(torch.equal(full[key], value) for key, value in load_file(again.output_file).items())


def test_a_state_of_another_network_is_refused_naming_the_difference(full_run, workspace):
    state = str(workspace / "out" / "full-step00000004-state")
    with pytest.raises(ResumeError, match=r"network_dim: the state has 4, this run has 8"):
        train(base_args(workspace, "other_dim", "--resume", state, "--network_dim", "8"))


def test_a_state_of_another_optimizer_is_refused_naming_the_difference(full_run, workspace):
    pytest.importorskip("lion_pytorch")  # --optimizer_type Lion
    state = str(workspace / "out" / "full-step00000004-state")
    with pytest.raises(ResumeError, match=r"optimizer: the state has 'AdamW', this run has 'Lion"):
        train(base_args(workspace, "other_opt", "--resume", state, "--optimizer_type", "Lion"))


def test_resume_of_a_missing_folder_is_refused(workspace):
    with pytest.raises(ResumeError, match=r"--resume .*nowhere: no such state folder"):
        train(base_args(workspace, "missing", "--resume", str(workspace / "nowhere")))


def test_failed_state_save_keeps_the_previous_state(full_run, workspace, monkeypatch):
    """A save that fails half-way (disk full) leaves the previous state folder as it was, and says why."""
    target = workspace / "out" / "full-state"
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    class FailingAccelerator:
        is_main_process = True
        num_processes = 1

        def save_state(self, path: str) -> None:
            os.makedirs(path)
            Path(path, "model.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")

    with pytest.raises(OutputWriteError, match=r"could not save the training state to .*full-state: .*No space left"):
        resume.save_state(FailingAccelerator(), str(target), TrainState(3, 99), {})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not (workspace / "out" / "full-state.tmp").exists()  # the partial write is removed


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        pytest.param(lambda state: (state / "model.safetensors").write_bytes(b"\x01\x02"),
                     r"cannot load the state, a file in it is damaged \(SafetensorError: .*\); resume from another "
                     r"state folder", id="truncated-model"),
        pytest.param(lambda state: (state / "optimizer.bin").write_bytes(b"not a pickle"),
                     r"cannot load the state, a file in it is damaged \(\w+: .*\); resume from another state folder",
                     id="corrupt-optimizer"),
        pytest.param(lambda state: (state / "model.safetensors").unlink(),
                     r"the state is incomplete, model\.safetensors is missing; resume from another state folder, or "
                     r"start again with --network_weights <a saved LoRA>", id="no-model-file"),
    ],
)
def test_a_damaged_state_is_refused_naming_the_folder(damage, pattern, full_run, workspace, tmp_path):
    state = tmp_path / "damaged-state"
    shutil.copytree(workspace / "out" / "full-step00000004-state", state)
    damage(state)
    with pytest.raises(ResumeError, match=rf"--resume {state}: " + pattern):
        train(base_args(workspace, "damaged", "--resume", str(state)))


def test_fingerprint_differences_lists_each_changed_entry():
    saved = {"network_dim": 4, "optimizer": "AdamW", "param_group_sizes": [10]}
    current = {"network_dim": 4, "optimizer": "ANLO", "param_group_sizes": [5, 5]}
    assert resume.fingerprint_differences(saved, current) == [
        "optimizer: the state has 'AdamW', this run has 'ANLO'",
        "param_group_sizes: the state has [10], this run has [5, 5]",
    ]


def test_resume_position_skips_the_consumed_batches():
    # 6 optimizer steps per epoch, 2 micro-batches per step
    assert resume.resume_position(0, 6, 2) == (0, 0)
    assert resume.resume_position(4, 6, 2) == (0, 8)
    assert resume.resume_position(6, 6, 2) == (1, 0)
    assert resume.resume_position(13, 6, 2) == (2, 2)


@pytest.mark.parametrize("save_state", [["--save_state"], []], ids=["save_state", "no_save_state"])
def test_ctrl_c_saves_the_lora_and_the_state_and_stops(save_state, workspace, monkeypatch):
    """SIGINT during step 3: the step finishes, the LoRA as trained so far and the state are saved (with or
    without --save_state), and the run stops with a message saying where both are."""
    from library import trainer as trainer_module

    compute_loss = NetworkTrainer.compute_loss
    calls = []

    def interrupting_compute_loss(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return compute_loss(self, *args, **kwargs)

    handler_before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(trainer_module.NetworkTrainer, "compute_loss", interrupting_compute_loss)
    out = workspace / "out"
    lora_file, state_dir = out / "ctrlc-step00000003.safetensors", out / "ctrlc-step00000003-state"
    with pytest.raises(
        resume.TrainingInterrupted,
        match=rf"interrupted at step 3; the LoRA as trained so far is {lora_file} and the state is {state_dir} "
        rf"\(continue with --resume {state_dir}\)",
    ):
        train(base_args(workspace, "ctrlc", *save_state))
    state = json.loads((state_dir / "train_state.json").read_text())
    assert state["current_step"] == 3
    with safe_open(str(lora_file), framework="pt") as handle:
        assert handle.metadata()["ss_steps"] == "3"
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_lr_free_anlo_resumes_bit_for_bit(workspace):
    """ANLO(lr_free=True)'s estimate travels in the state folder: a resumed run ends with the same LoRA."""
    anlo = ("--optimizer_type", "ANLO", "--learning_rate", "1", "--optimizer_args", "lr_free=True")
    train(base_args(workspace, "free_full", "--save_every_n_steps", "4", "--save_state", *anlo))
    state = workspace / "out" / "free_full-step00000004-state"
    train(base_args(workspace, "free_resumed", "--resume", str(state), *anlo))
    saved = torch.load(state / "optimizer.bin", weights_only=True)
    d = saved["anlo_lr_free"]["scalars"][0].item()
    assert d > 1e-6 * 2  # four steps moved the estimate off d0: the resumed run had something to carry on from
    full = load_file(workspace / "out" / "free_full.safetensors")
    resumed = load_file(workspace / "out" / "free_resumed.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
