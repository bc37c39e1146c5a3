"""``--fp8_base`` / ``--fp8_base_unet`` (library/fp8.py): what is stored in float8, what is computed, and short
training runs on the tiny models against the same runs without fp8 (CPU, bf16 autocast)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from library import fp8
from library.errors import UserInputError
from library.config import parse_args
from library.sdxl import SdxlNetworkTrainer
from library.tiny_models import build_tiny
from library.trainer import NetworkTrainer
from networks import lora
from shape_images import write_shape_images  # tests/shape_images.py

FP8 = torch.float8_e4m3fn


def fp8_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer for layer in module.modules() if isinstance(layer, fp8.FP8_LAYERS)]


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("flag", ["--fp8_base", "--fp8_base_unet"])
@pytest.mark.parametrize("precision", [[], ["--mixed_precision", "no"]])
def test_fp8_without_mixed_precision_is_refused(flag, precision, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, *precision])
    assert exit_info.value.code == 2
    assert f"{flag} requires --mixed_precision fp16 or bf16" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fp8_is_accepted_with_mixed_precision(precision):
    args = parse_args(["--fp8_base", "--mixed_precision", precision])
    assert fp8.unet_in_fp8(args) and fp8.text_encoders_in_fp8(args)
    args = parse_args(["--fp8_base", "--fp8_base_unet", "--mixed_precision", precision])
    assert fp8.unet_in_fp8(args) and not fp8.text_encoders_in_fp8(args)


def test_fp8_is_refused_by_a_torch_without_float8(monkeypatch, capsys):
    monkeypatch.setattr(fp8, "FP8_DTYPE", None)
    with pytest.raises(SystemExit):
        parse_args(["--fp8_base_unet", "--mixed_precision", "bf16"])
    assert "needs a torch with torch.float8_e4m3fn" in capsys.readouterr().err


def test_fp8_with_fp16_on_the_cpu_is_refused_before_models_load(tmp_path):
    """accelerate runs fp16 on the CPU without autocast, so nothing would cast the fp8 weights."""
    argv = ["--pretrained_model_name_or_path", "no-such-model", "--fp8_base", "--mixed_precision", "fp16",
            "--output_dir", str(tmp_path)]
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with pytest.raises(UserInputError, match="--fp8_base needs autocast, .* use --mixed_precision bf16"):
            NetworkTrainer().train(parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------ storage and computation


@pytest.fixture(scope="module")
def tiny_sd1() -> dict:
    return build_tiny("tiny-sd1", seed=3)


def test_linear_and_conv_weights_are_stored_in_fp8_the_rest_in_the_compute_dtype(tiny_sd1):
    unet = copy.deepcopy(tiny_sd1["unet"])
    stored = fp8.store_in_fp8(unet, torch.bfloat16, "cpu")
    layers = fp8_layers(unet)
    assert stored == len(layers) > 20
    assert all(layer.weight.dtype == FP8 for layer in layers)
    fp8_weights = {id(layer.weight) for layer in layers}
    others = [p for p in unet.parameters() if id(p) not in fp8_weights]
    assert others and all(p.dtype == torch.bfloat16 for p in others)  # biases, norms


def test_fp8_halves_the_unet_weight_bytes(tiny_sd1):
    half = copy.deepcopy(tiny_sd1["unet"]).to(torch.bfloat16)
    quarter = copy.deepcopy(tiny_sd1["unet"])
    fp8.store_in_fp8(quarter, torch.bfloat16, "cpu")
    weight_bytes = sum(layer.weight.numel() for layer in fp8_layers(half)) * 2
    # exactly the Linear/Conv weights lose one of their two bytes
    assert fp8.parameter_bytes(half) - fp8.parameter_bytes(quarter) == weight_bytes // 2
    assert fp8.parameter_bytes(quarter) / fp8.parameter_bytes(half) < 0.52


def test_fp8_unet_computes_in_bf16_with_the_rounded_weights(tiny_sd1):
    """Under CPU autocast the fp8 U-Net gives exactly the output of a bf16 U-Net whose Linear/Conv weights were
    rounded through e4m3 (the reference rounds the weights itself and never stores fp8)."""
    unet = copy.deepcopy(tiny_sd1["unet"])
    fp8.store_in_fp8(unet, torch.bfloat16, "cpu")
    reference = copy.deepcopy(tiny_sd1["unet"]).to(torch.bfloat16)
    for layer in fp8_layers(reference):
        layer.weight.data = layer.weight.data.to(FP8).to(torch.bfloat16)
    unrounded = copy.deepcopy(tiny_sd1["unet"]).to(torch.bfloat16)

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, tiny_sd1["unet"].config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([100, 700])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(sample, timesteps, context).sample
        expected = reference(sample, timesteps, context).sample
        plain = unrounded(sample, timesteps, context).sample
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # e4m3 rounds each weight by at most 5.9 % relative (2.7 % RMS): the output moves by a few percent
    relative = (out.float() - plain.float()).norm() / plain.float().norm()
    assert 0 < relative < 0.1


# ------------------------------------------------------------------ training runs

STEPS = 6


def write_config(root: Path, model: str) -> Path:
    write_shape_images(root / "data" / "1_sks shape", ("red", "green", "blue", "yellow"), caption="a photo of sks")
    config = root / "config.toml"
    config.write_text(
        f"""
[model_arguments]
pretrained_model_name_or_path = "{model}"

[dataset_arguments]
train_data_dir = "{(root / 'data').as_posix()}"
caption_extension = ".txt"
resolution = "64"
max_data_loader_n_workers = 0

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 4
network_args = ["conv_dim=4", "conv_alpha=4"]

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-3
lr_scheduler = "constant"

[training_arguments]
max_train_steps = {STEPS}
seed = 11
mixed_precision = "bf16"
min_timestep = 400
max_timestep = 600

[saving_arguments]
output_dir = "{(root / 'out').as_posix()}"
""",
        encoding="utf-8",
    )
    return config


def train(trainer: NetworkTrainer, config: Path, *extra: str, sdxl: bool = False) -> NetworkTrainer:
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is process-global
    try:
        trainer.train(parse_args(["--config_file", str(config), *extra], sdxl=sdxl))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return trainer


@pytest.fixture(scope="module")
def sd1_runs(tmp_path_factory) -> dict[str, NetworkTrainer]:
    """The same tiny SD 1.x run in bf16: plain, --fp8_base, and --fp8_base_unet with gradient checkpointing and
    cached latents."""
    config = write_config(tmp_path_factory.mktemp("fp8_sd1"), "tiny-sd1")
    return {
        "plain": train(NetworkTrainer(), config, "--output_name", "plain"),
        "fp8": train(NetworkTrainer(), config, "--fp8_base", "--output_name", "fp8"),
        "unet_only": train(NetworkTrainer(), config, "--fp8_base_unet", "--gradient_checkpointing",
                           "--cache_latents", "--output_name", "unet_only"),
    }


def assert_losses_close(losses: list[float], reference: list[float]) -> None:
    """The per-step losses of an fp8 run against the same run in bf16. The frozen weights differ by e4m3's
    rounding (at most 5.9 %, 2.7 % RMS per weight), which moves the U-Net's prediction by a few percent of
    its size (test_fp8_unet_computes_in_bf16_with_the_rounded_weights) and the MSE loss by less: 5 % per step
    allows that and still fails on a broken computation (a zeroed or unscaled weight changes the loss by far
    more). The noise and timesteps are the same in both runs (same seed)."""
    assert len(losses) == len(reference) == STEPS
    assert all(math.isfinite(loss) for loss in losses)
    for loss, expected in zip(losses, reference):
        assert loss == pytest.approx(expected, rel=0.05)
    assert losses != reference  # the weights really were rounded


@pytest.mark.slow
def test_fp8_run_stores_the_base_in_fp8_and_the_lora_in_float32(sd1_runs):
    trainer = sd1_runs["fp8"]
    assert all(layer.weight.dtype == FP8 for layer in fp8_layers(trainer.models.unet))
    assert all(layer.weight.dtype == FP8 for layer in fp8_layers(trainer.models.text_encoders[0]))
    embeddings = [m for m in trainer.models.text_encoders[0].modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(m.weight.dtype == torch.bfloat16 for m in embeddings)  # the compute dtype
    # the LoRA is saved in its own dtype (no --save_precision): float32, never the fp8 of the layers it wraps
    assert {value.dtype for value in load_file(trainer.output_file).values()} == {torch.float32}


def test_fp8_without_gradient_checkpointing_is_warned_about(caplog):
    args = parse_args(["--fp8_base_unet", "--mixed_precision", "bf16"])
    fp8.check_fp8_run(args, SimpleNamespace(native_amp=True, device=torch.device("cpu")))
    assert "--fp8_base_unet without --gradient_checkpointing" in caplog.text
    caplog.clear()
    args = parse_args(["--fp8_base_unet", "--mixed_precision", "bf16", "--gradient_checkpointing"])
    fp8.check_fp8_run(args, SimpleNamespace(native_amp=True, device=torch.device("cpu")))
    assert "gradient_checkpointing" not in caplog.text


@pytest.mark.slow
def test_fp8_base_unet_leaves_the_text_encoder_in_the_compute_dtype(sd1_runs):
    trainer = sd1_runs["unet_only"]
    assert all(layer.weight.dtype == FP8 for layer in fp8_layers(trainer.models.unet))
    assert {p.dtype for p in trainer.models.text_encoders[0].parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_fp8_losses_stay_close_to_the_bf16_run(sd1_runs):
    assert_losses_close(sd1_runs["fp8"].loss_history, sd1_runs["plain"].loss_history)
    assert_losses_close(sd1_runs["unet_only"].loss_history, sd1_runs["plain"].loss_history)


@pytest.mark.slow
def test_the_lora_saved_from_an_fp8_run_loads_back(sd1_runs):
    trainer = sd1_runs["fp8"]
    saved = load_file(trainer.output_file)
    assert any(key.startswith("lora_unet_") for key in saved) and any(key.startswith("lora_te_") for key in saved)
    fresh = build_tiny("tiny-sd1")
    network, _ = lora.create_network_from_weights(1.0, trainer.output_file, fresh["vae"], fresh["text_encoder"],
                                                  fresh["unet"])
    network.load_weights(trainer.output_file)
    loaded = network.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    # trained: the LoRA-up weights start at zero and moved
    assert any(value.abs().max() > 0 for key, value in saved.items() if "lora_up" in key)


@pytest.mark.slow
def test_sdxl_fp8_with_cached_text_outputs_and_checkpointing(tmp_path):
    config = write_config(tmp_path, "tiny-sdxl")
    common = ("--network_train_unet_only", "--cache_text_encoder_outputs", "--cache_latents",
              "--gradient_checkpointing")
    plain = train(SdxlNetworkTrainer(), config, *common, "--output_name", "plain", sdxl=True)
    quantized = train(SdxlNetworkTrainer(), config, *common, "--fp8_base", "--output_name", "fp8", sdxl=True)
    assert all(layer.weight.dtype == FP8 for layer in fp8_layers(quantized.models.unet))
    for encoder in quantized.models.text_encoders:
        assert all(layer.weight.dtype == FP8 for layer in fp8_layers(encoder))
    assert_losses_close(quantized.loss_history, plain.loss_history)
    assert any(key.startswith("lora_unet_") for key in load_file(quantized.output_file))
