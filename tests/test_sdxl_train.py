"""End-to-end runs of sdxl_train_network.py on the embedded tiny SDXL model (CPU, a few steps each).

Runs are module-scoped and shared by the tests that read them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import skip_without_tensorboard  # tests/helpers.py
from library.config import parse_args
from library.sdxl import SdxlNetworkTrainer
from library.text_cache import FINGERPRINT_KEY, te_outputs_npz_path
from library.tiny_models import build_tiny
from networks.lora import create_network_from_weights

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


@pytest.fixture(scope="module")
def workspace(make_shape_workspace) -> Path:
    """A DreamBooth folder (4 images, 64×64) and a TOML config training both text encoders and the U-Net."""
    root = make_shape_workspace("sdxl_train", caption="a photo of sks shape")
    (root / "config.toml").write_text(
        f"""
[model_arguments]
pretrained_model_name_or_path = "tiny-sdxl"

[dataset_arguments]
train_data_dir = "{(root / 'data').as_posix()}"
caption_extension = ".txt"
resolution = "64"
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
max_data_loader_n_workers = 0

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 4
network_args = ["conv_dim=4", "conv_alpha=4"]

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-2
text_encoder_lr = [2e-3, 4e-3]
lr_scheduler = "constant"

[training_arguments]
max_train_steps = {STEPS}
train_batch_size = 4                            # every image in every step: a loss that falls step over step
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


def run(workspace: Path, *extra: str) -> SdxlNetworkTrainer:
    """``sdxl_train_network.py --config_file config.toml *extra`` in-process; returns the finished trainer."""
    skip_without_tensorboard(extra)
    trainer = SdxlNetworkTrainer()
    trainer.train(parse_args(["--config_file", str(workspace / "config.toml"), *extra], sdxl=True))
    return trainer


@pytest.fixture(scope="module")
def base_run(workspace) -> SdxlNetworkTrainer:
    return run(workspace, "--logging_dir", str(workspace / "logs"))


@pytest.fixture(scope="module")
def unet_only_runs(workspace) -> tuple[SdxlNetworkTrainer, SdxlNetworkTrainer]:
    """The same 3 U-Net-only steps encoding captions on the fly, then with outputs cached to disk."""
    common = ("--network_train_unet_only", "--max_train_steps", "3")
    uncached = run(workspace, *common, "--output_name", "uncached")
    cached = run(workspace, *common, "--cache_text_encoder_outputs_to_disk", "--output_name", "cached")
    return uncached, cached


def test_lora_has_sai_key_names_for_unet_and_both_text_encoders(base_run, workspace):
    assert Path(base_run.output_file) == workspace / "out" / "base.safetensors"
    weights = load_file(base_run.output_file)
    names = {key.split(".")[0] for key in weights}
    assert all(name.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for name in names)
    for prefix in ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                   "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"):
        assert any(name.startswith(prefix) for name in names), prefix
    attention = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # the cross-attention level
    assert weights[f"{attention}.lora_down.weight"].shape == (4, 64)
    assert weights[f"{attention}.alpha"].item() == 4.0
    for key in (attention, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te2_text_model_encoder_layers_0_mlp_fc1"):
        assert weights[f"{key}.lora_up.weight"].abs().sum() > 0  # trained away from the zero init


def test_metadata_says_sdxl(base_run):
    with safe_open(base_run.output_file, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_sd_model_name"] == "tiny-sdxl"
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_steps"] == str(STEPS)
    assert json.loads(metadata["ss_network_args"])["conv_dim"] == "4"


def test_loss_fell(base_run):
    losses = base_run.loss_history
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses


def test_each_text_encoder_gets_its_own_lr(base_run, workspace):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for event_file in (workspace / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [event.value for event in accumulator.Scalars(tag)]
    assert scalars["lr/textencoder1"][0] == pytest.approx(2e-3)
    assert scalars["lr/textencoder2"][0] == pytest.approx(4e-3)
    assert scalars["lr/unet"][0] == pytest.approx(1e-2)


def test_cached_text_encoder_outputs_give_the_same_losses(unet_only_runs, workspace):
    uncached, cached = unet_only_runs
    assert cached.loss_history == pytest.approx(uncached.loss_history, rel=1e-5, abs=1e-6)
    for image in (workspace / "data" / "1_sks shape").glob("*.png"):
        with np.load(te_outputs_npz_path(image)) as data:
            assert data["hidden_state1"].shape == data["hidden_state2"].shape == (77, 32)
            assert data["pool2"].shape == (32,)
            assert "a photo of sks shape" in str(data[FINGERPRINT_KEY])
    # the encoders left the accelerator once their outputs were cached
    assert all(p.device.type == "cpu" for e in cached.models.text_encoders for p in e.parameters())
    assert not any(key.startswith("lora_te") for key in load_file(cached.output_file))


def test_caching_with_a_trained_text_encoder_is_refused_before_loading(workspace):
    args = parse_args(["--config_file", str(workspace / "config.toml"), "--cache_text_encoder_outputs",
                       "--network_train_unet_only"], sdxl=True)
    args.network_train_unet_only = False  # e.g. a caller that builds its own namespace
    with pytest.raises(ValueError, match="--cache_text_encoder_outputs requires --network_train_unet_only"):
        SdxlNetworkTrainer().train(args)


def test_network_weights_are_loaded_back(workspace, base_run):
    start = load_file(base_run.output_file)
    trainer = run(
        workspace,
        "--network_weights", base_run.output_file,
        "--learning_rate", "1e-12",
        "--text_encoder_lr", "1e-12",
        "--max_train_steps", "1",
        "--output_name", "continued",
    )
    continued = load_file(trainer.output_file)
    assert continued.keys() == start.keys()
    for key in start:
        torch.testing.assert_close(continued[key], start[key], rtol=0, atol=1e-9)
    # the loaded network changes the prediction, so the first loss differs from a fresh network's
    assert trainer.loss_history[0] != pytest.approx(base_run.loss_history[0], rel=1e-3)


def test_no_half_vae_keeps_the_vae_in_float32_under_bf16(workspace):
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is process-global
    try:
        trainer = run(workspace, "--mixed_precision", "bf16", "--no_half_vae", "--network_train_unet_only",
                      "--max_train_steps", "2", "--output_name", "bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert trainer.models.vae.dtype == torch.float32
    assert trainer.models.unet.dtype == torch.bfloat16
    assert all(math.isfinite(x) for x in trainer.loss_history)


def test_diffusers_pipeline_loads_the_trained_file_with_the_same_unet_output(base_run):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs the peft package")
    parts = build_tiny("tiny-sdxl", seed=0)  # the embedded model's weights
    pipe = StableDiffusionXLPipeline(**{k: parts[k] for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                              "tokenizer_2", "unet", "scheduler")})
    pipe.load_lora_weights(base_run.output_file)

    ours = build_tiny("tiny-sdxl", seed=0)
    encoders = [ours["text_encoder"], ours["text_encoder_2"]]
    network, weights = create_network_from_weights(1.0, base_run.output_file, ours["vae"], encoders, ours["unet"])
    network.merge_to(encoders, ours["unet"], weights)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 64, generator=generator)
    added = {"text_embeds": torch.randn(2, 32, generator=generator),
             "time_ids": torch.tensor([[64.0, 96.0, 0.0, 16.0, 64.0, 64.0], [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    timesteps = torch.tensor([450, 550])
    with torch.no_grad():
        expected = ours["unet"](latents, timesteps, context, added_cond_kwargs=added).sample
        base = build_tiny("tiny-sdxl", seed=0)["unet"](latents, timesteps, context, added_cond_kwargs=added).sample
        loaded = pipe.unet(latents, timesteps, context, added_cond_kwargs=added).sample
    assert (expected - base).abs().max() > 1e-3  # the trained LoRA changes the output
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-4)

    ids = pipe.tokenizer(["a photo of sks shape, red"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        for theirs, mine in zip((pipe.text_encoder, pipe.text_encoder_2), encoders):
            torch.testing.assert_close(theirs(ids).last_hidden_state, mine(ids).last_hidden_state, rtol=0, atol=1e-4)

