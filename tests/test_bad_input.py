"""Bad input through the entry points: exit status 2, no traceback, and the last line on stderr is the message:
``error: <message>`` for what the run finds wrong, argparse's ``<prog>: error: <message>`` for the command line.

The unit tests of each check (test_config.py, test_dataset.py, test_optimizers.py, ...) cover the messages in
detail; here each kind of mistake is run once end to end, on a command line that otherwise trains. No case reaches
the first training step.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdxl_train_network
import train_network
from library.tiny_models import build_tiny
from networks import lora

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A DreamBooth folder with one 64×64 image and its caption."""
    root = tmp_path_factory.mktemp("bad_input") / "data"
    images = root / "1_sks"
    images.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(images / "a.png")
    (images / "a.txt").write_text("a photo of sks", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    """LoRA files written by ``networks.lora`` for the tiny models: SD 1.x at rank 8 and SDXL at rank 4."""
    folder = tmp_path_factory.mktemp("lora_files")
    sd1, sdxl = build_tiny("tiny-sd1"), build_tiny("tiny-sdxl")
    files = {"sd1_rank8": folder / "sd1_rank8.safetensors", "sdxl": folder / "sdxl.safetensors"}
    lora.create_network(1.0, 8, 8, sd1["vae"], sd1["text_encoder"], sd1["unet"]).save_weights(str(files["sd1_rank8"]))
    sdxl_encoders = [sdxl["text_encoder"], sdxl["text_encoder_2"]]
    lora.create_network(1.0, 4, 4, sdxl["vae"], sdxl_encoders, sdxl["unet"]).save_weights(str(files["sdxl"]))
    return files


def base_argv(data_dir: Path, output_dir: Path, model: str = "tiny-sd1") -> list[str]:
    """A command line that trains (one step at rank 4 with ANLO) when nothing is added to it."""
    return [
        "--pretrained_model_name_or_path", model,
        "--train_data_dir", str(data_dir),
        "--caption_extension", ".txt",
        "--resolution", "64",
        "--output_dir", str(output_dir),
        "--network_module", "networks.lora",
        "--network_dim", "4",
        "--optimizer_type", "ANLO",
        "--max_train_steps", "1",
        "--max_data_loader_n_workers", "0",
    ]  # fmt: skip


def run_main(main, argv: list[str], capsys) -> list[str]:
    """Run an entry point's ``main(argv)``; assert it exits with status 2 and return its stderr lines."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return stderr.splitlines()


def assert_one_error_line(lines: list[str], pattern: str) -> None:
    """The program's last words are exactly one ``error:`` line matching ``pattern``."""
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, lines
    assert lines[-1] == error_lines[0]
    assert_matches(error_lines[0], "error: " + pattern)


def assert_matches(line: str, pattern: str) -> None:
    assert re.fullmatch(pattern, line), f"{line!r} does not match {pattern!r}"


def test_the_base_command_line_trains(data_dir, tmp_path):
    """The control for every case below: without the mistake, the same command line trains and saves."""
    output_file = train_network.main(base_argv(data_dir, tmp_path / "out"))
    assert Path(output_file).is_file()


# ----------------------------------------------------------------------------------- errors found while training
# (mistakes found before the models load are in test_preflight.py)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        pytest.param(
            lambda data, tmp: ["--train_data_dir", str(tmp / "nope")],
            r"--train_data_dir .*nope does not exist or is not a directory",
            id="missing-data-dir",
        ),
        pytest.param(
            lambda data, tmp: ["--train_data_dir", str(tmp)],
            r"--train_data_dir .* contains no '<repeats>_<class tokens>' folders .*",
            id="empty-data-dir",
        ),
        pytest.param(
            lambda data, tmp: ["--validation_split", "0.5"],
            r"--validation_split 0\.5: .*",
            id="validation-split-of-one-image",
        ),
        pytest.param(
            lambda data, tmp: ["--log_with", "tensorboard"],
            r"--log_with tensorboard needs --logging_dir .*",
            id="tensorboard-without-logging-dir",
        ),
        pytest.param(
            lambda data, tmp: ["--log_with", "wandb"],
            r"--log_with wandb needs the wandb package: pip install wandb",
            id="wandb-not-installed",
            marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed"),
        ),
        pytest.param(
            lambda data, tmp: ["--cache_latents", "--color_aug"],
            r".*color_aug.*",
            id="cache-latents-with-color-aug",
        ),
    ],
)
def test_bad_input_is_one_line_and_status_2(change, pattern, data_dir, tmp_path, capsys):
    argv = base_argv(data_dir, tmp_path / "out") + change(data_dir, tmp_path)
    assert_one_error_line(run_main(train_network.main, argv, capsys), pattern)


def test_caption_not_utf8_names_the_file(tmp_path, capsys):
    images = tmp_path / "data" / "1_sks"
    images.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(images / "a.png")
    (images / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    lines = run_main(train_network.main, base_argv(tmp_path / "data", tmp_path / "out"), capsys)
    assert_one_error_line(lines, r"caption file .*1_sks.a\.txt is not UTF-8 .*")


@pytest.mark.parametrize("main", [train_network.main, sdxl_train_network.main], ids=["sd1", "sdxl"])
def test_output_dir_that_cannot_be_created(main, data_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder", encoding="utf-8")
    output_dir = tmp_path / "afile" / "out"
    model = "tiny-sdxl" if main is sdxl_train_network.main else "tiny-sd1"
    lines = run_main(main, base_argv(data_dir, output_dir, model), capsys)
    assert_one_error_line(lines, rf"--output_dir {output_dir}: cannot create or write to this folder \(.+\)")
    assert not output_dir.exists()


@pytest.mark.parametrize("rank_from", [[], ["--dim_from_weights"]], ids=["network_dim", "dim_from_weights"])
def test_sdxl_lora_into_sd1_names_the_file_and_both_families(rank_from, data_dir, lora_files, tmp_path, capsys):
    argv = base_argv(data_dir, tmp_path / "out") + ["--network_weights", str(lora_files["sdxl"]), *rank_from]
    lines = run_main(train_network.main, argv, capsys)
    assert_one_error_line(
        lines,
        rf"network_weights {lora_files['sdxl']} is an SDXL LoRA \(text encoder keys lora_te1_/lora_te2_\) "
        r"but the model is SD 1\.x/2\.x",
    )


def test_lora_of_another_rank_names_the_key_shapes_and_rank(data_dir, lora_files, tmp_path, capsys):
    argv = base_argv(data_dir, tmp_path / "out") + ["--network_weights", str(lora_files["sd1_rank8"])]
    lines = run_main(train_network.main, argv, capsys)
    assert_one_error_line(
        lines,
        rf"network_weights {lora_files['sd1_rank8']}: key lora_\w+\.lora_(down|up)\.weight has shape \(\d+, \d+\) "
        r"but the network expects \(\d+, \d+\) — trained with network_dim 8\? .*--dim_from_weights\)",
    )


def test_lora_with_no_module_of_this_model_is_refused(data_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_mid_block_x.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_mid_block_x.lora_up.weight": torch.zeros(8, 4)}, str(foreign))  # fmt: skip
    argv = base_argv(data_dir, tmp_path / "out") + ["--network_weights", str(foreign)]
    assert_one_error_line(
        run_main(train_network.main, argv, capsys),
        rf"network_weights {foreign}: none of its 1 LoRA modules \(e\.g\. lora_unet_mid_block_x\) exist in this "
        r"network; is it a LoRA for another base model\?",
    )


# ----------------------------------------------------------------------------------- errors found by the parser


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--full_bf16"], "--full_bf16 requires --mixed_precision bf16"),
        (["--resolution", "big"], "--resolution: expected 'SIZE' or 'WIDTH,HEIGHT' with positive integers, got 'big'"),
        (["--max_train_steps", "0"], "--max_train_steps: expected 1 or more, got 0"),
    ],
    ids=["full-bf16-without-bf16", "bad-resolution", "zero-steps"],
)
def test_bad_arguments_end_with_status_2_and_the_message(extra, message, data_dir, tmp_path, capsys):
    lines = run_main(train_network.main, base_argv(data_dir, tmp_path / "out") + extra, capsys)
    assert lines[-2:] == [
        "usage: train_network.py [--config_file FILE] [options]   (every option: --help)",
        "train_network.py: error: " + message,
    ]


# ----------------------------------------------------------------------------------- runs that stop early


def test_loss_that_stays_non_finite_stops_with_one_line_and_status_1(data_dir, tmp_path, capsys, monkeypatch):
    from library.trainer import NetworkTrainer

    def nan_loss(self, batch, train_text_encoder, weight_dtype):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(NetworkTrainer, "compute_loss", nan_loss)
    argv = base_argv(data_dir, tmp_path / "out") + ["--max_train_steps", "5", "--nan_abort_steps", "2"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(argv)
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert_matches(stderr.splitlines()[-1], r"stopped: the loss was not finite for 2 batches in a row \(step \d\); .*")


# ----------------------------------------------------------------------------------- as a program


@pytest.mark.slow
def test_program_prints_only_the_error_line(data_dir, tmp_path):
    """As a process: stderr is the one error line; no import-time warnings (bitsandbytes' CPU kernels)."""
    (tmp_path / "afile").write_text("", encoding="utf-8")
    argv = base_argv(data_dir, tmp_path / "afile" / "out")
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "train_network.py"), *argv],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: --output_dir {tmp_path / 'afile' / 'out'}: cannot create or write to this folder (Not a directory)"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [["-q"], []], ids=["quiet", "plain"])
def test_under_accelerate_launch_the_status_stays_non_zero(quiet, data_dir, tmp_path):
    """The kohya_ss GUI starts runs with ``accelerate launch``. Its launcher exits non-zero whenever the run does;
    with ``-q`` our one error line is all it shows, without it accelerate adds its own traceback (which this
    project cannot suppress from the child: docs/FAULTS.md)."""
    (tmp_path / "afile").write_text("", encoding="utf-8")
    output_dir = tmp_path / "afile" / "out"
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *quiet, "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_network.py"),
         *base_argv(data_dir, output_dir)],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    message = f"error: --output_dir {output_dir}: cannot create or write to this folder (Not a directory)"
    assert result.returncode != 0
    assert message in result.stderr.splitlines()
    if quiet:
        assert "Traceback" not in result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [message]
