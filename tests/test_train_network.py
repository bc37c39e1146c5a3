"""End-to-end runs of train_network.py on the embedded tiny SD 1.x model (CPU, a few steps each).

Each run is module-scoped and shared by the tests that read it; the whole file keeps to a handful of short runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library import hina_anlo
from library import trainer as trainer_module
from library.text_encoding import merge_chunks, split_into_chunks, tokenize
from library.checkpoints import epoch_to_remove, lora_name, state_name, step_to_remove
from helpers import skip_without_tensorboard  # tests/helpers.py
from library.trainer import NetworkTrainer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 16


@pytest.fixture(scope="module")
def workspace(make_shape_workspace) -> Path:
    """A DreamBooth folder (4 images, 64×64, 2 repeats → 8 batches per epoch) and a TOML config using it."""
    root = make_shape_workspace("train_network", "2_sks shape", caption="a photo of sks shape")
    (root / "config.toml").write_text(
        f"""
[model_arguments]
pretrained_model_name_or_path = "tiny-sd1"

[dataset_arguments]
train_data_dir = "{(root / 'data').as_posix()}"
caption_extension = ".txt"
resolution = "64"
max_data_loader_n_workers = 0

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 4
network_args = ["conv_dim=4", "conv_alpha=4"]  # the tiny U-Net learns fast enough to see only with conv layers

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-2
lr_scheduler = "constant"

[training_arguments]
max_train_steps = {STEPS}
seed = 7
min_timestep = 400
max_timestep = 600

[saving_arguments]
output_dir = "{(root / 'out').as_posix()}"
output_name = "base"
""",
        encoding="utf-8",
    )
    return root


def run(workspace: Path, *extra: str) -> NetworkTrainer:
    """``train_network.py --config_file config.toml *extra`` in-process; returns the finished trainer."""
    skip_without_tensorboard(extra)
    trainer = NetworkTrainer()
    args = train_network.parse_args(["--config_file", str(workspace / "config.toml"), *extra], sdxl=False)
    trainer.train(args)
    return trainer


@pytest.fixture(scope="module")
def base_run(workspace):
    """16 steps from the TOML file, with TensorBoard logging and saves every 5 steps keeping the last 6 steps."""
    return run(
        workspace,
        "--logging_dir", str(workspace / "logs"),
        "--save_every_n_steps", "5",
        "--save_last_n_steps", "6",
        "--training_comment", "unit test",
    )


@pytest.fixture(scope="module")
def cached_run(workspace, base_run):
    return run(workspace, "--cache_latents", "--max_train_steps", "4", "--output_name", "cached")


def test_base_run_writes_sd_scripts_lora(base_run, workspace):
    path = Path(base_run.output_file)
    assert path == workspace / "out" / "base.safetensors"
    weights = load_file(path)
    te_key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    unet_key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    conv_key = "lora_unet_up_blocks_1_resnets_0_conv1"
    assert weights[f"{conv_key}.lora_down.weight"].shape == (4, 64 + 32, 3, 3)
    for name in (te_key, unet_key, conv_key):
        assert weights[f"{name}.lora_down.weight"].shape[0] == 4
        assert weights[f"{name}.lora_up.weight"].shape[1] == 4
        assert weights[f"{name}.alpha"].item() == 4.0
    assert all(key.startswith(("lora_te_", "lora_unet_")) for key in weights)
    assert weights[f"{unet_key}.lora_up.weight"].abs().sum() > 0  # trained away from the zero init


def test_base_run_metadata_as_sd_scripts_writes_it(base_run, workspace):
    with safe_open(base_run.output_file, framework="pt") as handle:
        metadata = handle.metadata()
    assert all(isinstance(value, str) for value in metadata.values())
    expected = {
        "ss_output_name": "base",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "4.0",
        "ss_learning_rate": "0.01",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "4", "dropout": None}),
        "ss_lr_scheduler": "constant",
        "ss_max_train_steps": str(STEPS),
        "ss_steps": str(STEPS),
        "ss_epoch": "2",
        "ss_num_epochs": "2",
        "ss_num_train_images": "8",
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": "8",
        "ss_seed": "7",
        "ss_mixed_precision": "no",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": "tiny-sd1",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_training_comment": "unit test",
        "ss_resolution": "(64, 64)",
        "ss_enable_bucket": "False",
        "ss_loss_type": "l2",
        "ss_min_snr_gamma": "None",
        "ss_dataset_dirs": json.dumps({"2_sks shape": {"n_repeats": 2, "img_count": 4}}),
        "ss_reg_dataset_dirs": "{}",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.prediction_type": "epsilon",
        "modelspec.title": "base",
    }
    assert {key: metadata.get(key) for key in expected} == expected
    tags = json.loads(metadata["ss_tag_frequency"])["2_sks shape"]
    assert tags["a photo of sks shape"] == 4 and tags["red"] == 1
    started, finished = float(metadata["ss_training_started_at"]), float(metadata["ss_training_finished_at"])
    assert started <= finished
    for key in ("ss_session_id", "ss_sd_scripts_commit_hash", "ss_bucket_info", "sshs_model_hash", "sshs_legacy_hash"):
        assert key in metadata


def test_base_run_loss_fell(base_run):
    losses = base_run.loss_history
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses


def test_save_every_n_steps_keeps_last_n_steps(base_run, workspace):
    # saved at steps 5, 10, 15; at step 15 the step-5 file fell out of the last 6 steps
    names = sorted(p.name for p in (workspace / "out").glob("base*"))
    assert names == ["base-step00000010.safetensors", "base-step00000015.safetensors", "base.safetensors"]
    with safe_open(str(workspace / "out" / "base-step00000010.safetensors"), framework="pt") as handle:
        assert handle.metadata()["ss_steps"] == "10"


def test_tensorboard_events_have_step_losses(base_run, workspace):
    scalars = read_scalars(workspace / "logs")
    assert scalars["loss/current"] == pytest.approx(base_run.loss_history, rel=1e-5)
    assert len(scalars["loss/average"]) == STEPS
    assert scalars["lr/textencoder"][0] == pytest.approx(1e-2)
    assert scalars["lr/unet"][0] == pytest.approx(1e-2)


def test_cached_latents_give_the_same_losses(cached_run, base_run):
    assert cached_run.loss_history == pytest.approx(base_run.loss_history[:4], rel=1e-5, abs=1e-6)
    with safe_open(cached_run.output_file, framework="pt") as handle:
        assert handle.metadata()["ss_cache_latents"] == "True"


def test_command_line_overrides_config_file(workspace):
    trainer = run(workspace, "--network_dim", "8", "--max_train_steps", "1", "--output_name", "override")
    weights = load_file(trainer.output_file)
    assert weights["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape[0] == 8
    with safe_open(trainer.output_file, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "8"  # command line
    assert metadata["ss_network_alpha"] == "4.0"  # file
    assert metadata["ss_max_train_steps"] == "1"


def test_network_weights_continue_from_a_file(workspace, base_run):
    start = load_file(base_run.output_file)
    trainer = run(
        workspace,
        "--network_weights", base_run.output_file,
        "--learning_rate", "1e-12",
        "--max_train_steps", "1",
        "--output_name", "continued",
    )
    continued = load_file(trainer.output_file)
    assert continued.keys() == start.keys()
    for key in start:
        torch.testing.assert_close(continued[key], start[key], rtol=0, atol=1e-9)
    # a fresh network starts at the base model's prediction, so its first loss is the base run's first loss
    assert trainer.loss_history[0] != pytest.approx(base_run.loss_history[0], rel=1e-3)


def read_scalars(log_dir: Path) -> dict[str, list[float]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for event_file in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(event.value for event in accumulator.Scalars(tag))
    return scalars


def test_adamw8bit_runs(workspace):
    pytest.importorskip("bitsandbytes")
    trainer = run(workspace, "--optimizer_type", "AdamW8bit", "--max_train_steps", "3", "--output_name", "adamw8bit")
    assert len(trainer.loss_history) == 3 and all(math.isfinite(x) for x in trainer.loss_history)
    with safe_open(trainer.output_file, framework="pt") as handle:
        assert handle.metadata()["ss_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"


def test_anlo_runs_and_logs_its_normalization(workspace, monkeypatch):
    rescaled = []  # SinkGD's iterations, per gradient rescaled
    rescale = hina_anlo._row_column_normalize_
    monkeypatch.setattr(hina_anlo, "_row_column_normalize_", lambda grad, n: (rescaled.append(n), rescale(grad, n)))
    orthogonalized = []  # per step, how many gradients went to orthogonalization
    orthogonalize = hina_anlo._orthogonalize_
    monkeypatch.setattr(
        hina_anlo, "_orthogonalize_", lambda grads: (orthogonalized.append(len(grads)), orthogonalize(grads))
    )
    modes = []  # per step, the normalization mode ANLO applied
    anlo_step = hina_anlo._anlo_step_
    monkeypatch.setattr(
        hina_anlo, "_anlo_step_", lambda params, grads, layout, options, mode, *a, **k: (
            modes.append(mode), anlo_step(params, grads, layout, options, mode, *a, **k))[1]
    )
    steps = trainer_module.OPTIMIZER_STATS_EVERY_N_STEPS
    log_dir = workspace / "anlo_logs"
    trainer = run(
        workspace, "--optimizer_type", "ANLO", "--max_train_steps", str(steps), "--output_name", "anlo",
        "--logging_dir", str(log_dir),
        "--optimizer_args", "normalization='global'", "sinkgd_iterations=1", "orthogonalize=True",
    )
    assert len(trainer.loss_history) == steps and all(math.isfinite(x) for x in trainer.loss_history)
    with safe_open(trainer.output_file, framework="pt") as handle:
        assert handle.metadata()["ss_optimizer"] == (
            "library.hina_anlo.ANLO(normalization=global,sinkgd_iterations=1,orthogonalize=True)"
        )
    scalars = read_scalars(log_dir)
    # read once, at the step the stats are due: after `steps` optimizer steps ANLO has counted them all
    assert scalars["optimizer/step_count"] == [float(steps)]
    assert scalars["optimizer/global_norm"][0] > 0
    assert not any(key.startswith("optimizer/groups") for key in scalars)  # only the top-level numbers
    # The options outlived accelerate's prepare() (which reloads the optimizer's state dict): every step normalized
    # globally, SinkGD rescaled the gradients with 1 iteration, and every step orthogonalized them.
    assert modes == ["global"] * steps
    assert set(rescaled) == {1}
    assert len(orthogonalized) == steps and min(orthogonalized) > 0


def test_no_metadata_keeps_only_what_loaders_need(workspace):
    trainer = run(workspace, "--no_metadata", "--max_train_steps", "1", "--output_name", "bare")
    with safe_open(trainer.output_file, framework="pt") as handle:
        metadata = handle.metadata()
    ss_keys = {key for key in metadata if key.startswith("ss_")}
    assert ss_keys == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                       "ss_network_args"}
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_non_finite_losses_abort_the_run(workspace, monkeypatch):
    def nan_loss(self, batch, train_text_encoder, weight_dtype):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(NetworkTrainer, "compute_loss", nan_loss)
    with pytest.raises(FloatingPointError, match=r"not finite for 2 batches in a row .*--nan_abort_steps"):
        run(workspace, "--nan_abort_steps", "2", "--output_name", "nan")


@pytest.mark.parametrize("max_grad_norm", ["1.0", "0"], ids=["clipped", "unclipped"])
def test_a_non_finite_step_is_skipped_and_training_goes_on(workspace, monkeypatch, max_grad_norm):
    """AdamW would turn every weight to NaN; the trainer skips that optimizer step, counts it, and goes on."""
    calls = []
    real_loss = NetworkTrainer.compute_loss

    def sometimes_nan(self, batch, train_text_encoder, weight_dtype):
        calls.append(1)
        loss = real_loss(self, batch, train_text_encoder, weight_dtype)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(NetworkTrainer, "compute_loss", sometimes_nan)
    logs = workspace / f"nan_logs_{max_grad_norm}"
    trainer = run(workspace, "--max_train_steps", "4", "--output_name", "one_nan", "--logging_dir", str(logs),
                  "--max_grad_norm", max_grad_norm)
    assert trainer.skipped_steps == 1
    assert [math.isfinite(x) for x in trainer.loss_history] == [True, False, True, True]
    weights = load_file(trainer.output_file)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert any(tensor.abs().sum() > 0 for key, tensor in weights.items() if "lora_up" in key)  # it did train
    assert read_scalars(logs)["loss/skipped_steps"] == [1.0, 1.0, 1.0]


def test_max_train_epochs_with_gradient_accumulation(workspace):
    trainer = run(
        workspace,
        "--max_train_epochs", "2",
        "--gradient_accumulation_steps", "2",
        "--save_every_n_epochs", "1",
        "--output_name", "epochs",
    )
    # 8 batches per epoch, 2 per optimizer step: 4 steps per epoch, 8 in all, 16 micro-batch losses
    assert len(trainer.loss_history) == 16
    out = Path(trainer.output_file).parent
    assert sorted(p.name for p in out.glob("epochs*")) == ["epochs-000001.safetensors", "epochs.safetensors"]
    with safe_open(trainer.output_file, framework="pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_max_train_steps"], metadata["ss_steps"], metadata["ss_epoch"]) == ("8", "8", "2")
    assert metadata["ss_gradient_accumulation_steps"] == "2"


def test_loss_options_run(workspace):
    trainer = run(
        workspace,
        "--min_snr_gamma", "5",
        "--noise_offset", "0.1",
        "--v_parameterization",
        "--max_train_steps", "3",
        "--output_name", "loss_options",
    )
    assert all(math.isfinite(x) for x in trainer.loss_history)
    with safe_open(trainer.output_file, framework="pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_min_snr_gamma"], metadata["ss_noise_offset"]) == ("5.0", "0.1")
    assert metadata["modelspec.prediction_type"] == "v"


def test_checkpoint_names_and_removal():
    class Args:
        output_name, save_model_as = None, "safetensors"

    assert lora_name(Args, epoch=3) == "epoch-000003.safetensors"
    assert lora_name(Args, step=40) == "at-step00000040.safetensors"
    assert lora_name(Args) == "last.safetensors"
    assert state_name(Args, epoch=3) == "epoch-000003-state"
    assert state_name(Args, step=40) == "at-step00000040-state"
    assert state_name(Args) == "last-state"
    Args.output_name = "mine"
    assert (lora_name(Args, step=40), state_name(Args)) == ("mine-step00000040.safetensors", "mine-state")
    # saves every 10 steps, the last 30 steps kept: at step 50, steps 20, 30, 40 and 50 are kept
    assert step_to_remove(50, every=10, keep=30) == 10
    assert step_to_remove(30, every=10, keep=30) is None
    assert step_to_remove(30, every=10, keep=None) is None
    # saves every 2 epochs, the last 3 kept: at epoch 8, epochs 4, 6, 8 are kept
    assert epoch_to_remove(8, every=2, keep=3) == 2
    assert epoch_to_remove(6, every=2, keep=3) is None


def test_long_captions_are_encoded_in_75_token_windows():
    from library.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    ids = tokenize(tokenizer, ["red " * 100, "a dog"], max_token_length=150)
    assert ids.shape == (2, 152)
    chunks = split_into_chunks(ids, tokenizer)
    assert chunks.shape == (4, 77)
    assert (chunks[:, 0] == tokenizer.bos_token_id).all() and (chunks[:, -1] == tokenizer.eos_token_id).all()
    torch.testing.assert_close(chunks[0, 1:76], ids[0, 1:76])
    torch.testing.assert_close(chunks[1, 1:76], ids[0, 76:151])
    # merging hidden states gives back one state per original token position
    hidden = torch.arange(4 * 77, dtype=torch.float32).reshape(4, 77, 1)
    merged = merge_chunks(hidden, batch_size=2)
    assert merged.shape == (2, 152, 1)
    assert merged[0, 0, 0] == 0 and merged[0, 1, 0] == 1 and merged[0, 76, 0] == 77 + 1 and merged[0, -1, 0] == 2 * 77 - 1


def test_save_n_epoch_ratio_spreads_the_epoch_saves(workspace):
    # 4 epochs of one optimizer step each (8 batches accumulated); ratio 2 -> a save every 2 epochs, as sd-scripts
    trainer = run(
        workspace,
        "--max_train_epochs", "4",
        "--gradient_accumulation_steps", "8",
        "--save_n_epoch_ratio", "2",
        "--output_name", "ratio",
    )  # fmt: skip
    out = Path(trainer.output_file).parent
    assert sorted(p.name for p in out.glob("ratio*")) == ["ratio-000002.safetensors", "ratio.safetensors"]


def test_log_config_stores_the_arguments_without_secrets(workspace, base_run):
    logs = workspace / "config_logs"
    run(
        workspace,
        "--max_train_steps", "1",
        "--logging_dir", str(logs),
        "--log_config",
        "--wandb_api_key", "do-not-log-me",
        "--output_name", "log_config",
    )  # fmt: skip
    (hparams_file,) = logs.rglob("hparams.yml")
    hparams = hparams_file.read_text(encoding="utf-8")
    assert "network_dim: 4" in hparams and "optimizer_type: AdamW" in hparams
    assert "wandb_api_key" not in hparams and "do-not-log-me" not in hparams
    assert not list((workspace / "logs").rglob("hparams.yml"))  # the base run had no --log_config


def test_ddp_timeout_reaches_the_process_group(workspace):
    args = train_network.parse_args(["--config_file", str(workspace / "config.toml"), "--ddp_timeout", "7"])
    accelerator = trainer_module.make_accelerator(args)
    assert accelerator.init_handler.timeout.total_seconds() == 7 * 60
