"""Mistakes that need no model are reported before any model loads (``library/preflight.py``).

Each case runs the real entry point with a command line that otherwise trains; the trainer's ``load_models`` is
replaced by one that fails the test, so a case passes only if its error comes first, as one ``error:`` line.
"""

from __future__ import annotations

import pytest

import train_network
from library.trainer import NetworkTrainer
from tests.test_bad_input import assert_one_error_line, base_argv, data_dir, run_main  # noqa: F401 (fixture)


@pytest.fixture
def no_model_loading(monkeypatch):
    def load_models(self, args):
        raise AssertionError("a model was loaded before the argument error was reported")

    monkeypatch.setattr(NetworkTrainer, "load_models", load_models)


CASES = [
    pytest.param(["--optimizer_type", "NoSuchOptimizer"],
                 r"--optimizer_type 'NoSuchOptimizer' is not a built-in optimizer .*", id="unknown-optimizer"),
    pytest.param(["--optimizer_args", "foo=1"], r".*--optimizer_args.*\bfoo\b.*", id="unknown-anlo-keyword"),
    pytest.param(["--optimizer_args", "betas"], r"--optimizer_args: 'betas' is not key=value; .*", id="not-key-value"),
    pytest.param(["--optimizer_args", "mode=global"],
                 r"--optimizer_args: the value of 'mode' in 'mode=global' is not a Python literal; .*",
                 id="not-a-literal"),
    pytest.param(["--optimizer_type", "AdamW", "--optimizer_args", "betas=(0.9,)"],
                 r"--optimizer_type AdamW: torch\.optim\.adamw\.AdamW rejected its arguments .*", id="bad-value"),
    pytest.param(["--network_module", "networks.nope"],
                 r"--network_module networks\.nope: no such module \(e\.g\. networks\.lora\)", id="network-module"),
    pytest.param(["--network_args", "conv_dim"], r"--network_args: 'conv_dim' is not key=value", id="network-args"),
    pytest.param(["--learning_rate", "0"],
                 r"every part that would train has learning rate 0 \(--learning_rate 0\); nothing would train",
                 id="lr-0"),
    pytest.param(["--unet_lr", "0", "--text_encoder_lr", "0"],
                 r"every part that would train has learning rate 0 \(--unet_lr 0, --text_encoder_lr 0\); .*",
                 id="both-lrs-0"),
    pytest.param(["--unet_lr", "0", "--network_train_unet_only"],
                 r"every part that would train has learning rate 0 \(--unet_lr 0\); nothing would train",
                 id="unet-only-lr-0"),
]


@pytest.mark.parametrize(("change", "pattern"), CASES)
def test_argument_errors_come_before_the_models(change, pattern, data_dir, tmp_path, capsys, no_model_loading):
    argv = base_argv(data_dir, tmp_path / "out") + change
    assert_one_error_line(run_main(train_network.main, argv, capsys), pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "kind"),
    [("--network_weights", "file"), ("--resume", "state folder"), ("--sample_prompts", "file")],
)
def test_missing_input_paths_come_before_the_models(flag, kind, data_dir, tmp_path, capsys, no_model_loading):
    missing = tmp_path / "missing"
    argv = base_argv(data_dir, tmp_path / "out") + [flag, str(missing)]
    assert_one_error_line(run_main(train_network.main, argv, capsys), rf"{flag} {missing}: no such {kind}")


def test_a_zero_lr_part_is_fine_while_another_trains(data_dir, tmp_path):
    """Only a run where nothing trains is refused: a frozen text encoder beside a training U-Net is normal."""
    argv = base_argv(data_dir, tmp_path / "out") + ["--text_encoder_lr", "0", "--unet_lr", "1e-4"]
    output_file = train_network.main(argv)
    assert output_file.endswith(".safetensors")


def test_lr_free_on_trained_weights_comes_before_the_models(data_dir, tmp_path, capsys, no_model_loading):
    """lr_free measures its step while a fresh lora_up leaves zero; --network_weights starts elsewhere."""
    weights = tmp_path / "trained.safetensors"
    weights.write_bytes(b"")  # only its existence is checked before the models
    argv = base_argv(data_dir, tmp_path / "out") + [
        "--optimizer_type", "ANLO", "--learning_rate", "1", "--optimizer_args", "lr_free=True",
        "--network_weights", str(weights),
    ]  # fmt: skip
    pattern = rf"--optimizer_args lr_free=True measures .*--network_weights {weights} starts from trained weights.*"
    assert_one_error_line(run_main(train_network.main, argv, capsys), pattern)
