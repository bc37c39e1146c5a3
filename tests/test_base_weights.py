"""``--base_weights``: LoRA files merged into the tiny models, checked against the LoRA's own forward pass and
against ``W + m · alpha / rank · up @ down`` computed by hand."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from library import base_weights
from library.base_weights import BaseWeightsError, merge_base_weights, merge_file, target_layers
from library.lora_format import save_lora_file
from library.tiny_models import build_tiny
from networks.lora import create_network

TE_LINEAR = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET_CONV3 = "lora_unet_down_blocks_0_resnets_0_conv1"
UNET_LINEAR = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"


def sd1_models(seed: int = 0) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    parts = build_tiny("tiny-sd1", seed)
    return [parts["text_encoder"]], parts["unet"]


def base_args(paths: list[str], multipliers: list[float] | None = None) -> argparse.Namespace:
    return argparse.Namespace(base_weights=paths, base_weights_multiplier=multipliers)


def random_lora(layer: torch.nn.Module, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weight = layer.weight
    if weight.dim() == 2:
        down = torch.randn(rank, weight.shape[1], generator=generator)
        up = torch.randn(weight.shape[0], rank, generator=generator)
    else:
        down = torch.randn(rank, *weight.shape[1:], generator=generator)
        up = torch.randn(weight.shape[0], rank, 1, 1, generator=generator)
    return down, up


def test_lora_linear_and_conv_merge_as_the_layer_plus_the_lora_branch(tmp_path):
    """The merged layer's output equals the original layer plus ``m · scale · up(down(x))`` run as layers."""
    text_encoders, unet = sd1_models()
    layers = target_layers(text_encoders, unet)
    generator = torch.Generator().manual_seed(1)
    rank, alpha, multiplier = 2, 1.0, 0.7
    state, originals = {}, {}
    for name in (TE_LINEAR, UNET_CONV3, UNET_LINEAR):
        down, up = random_lora(layers[name], rank, generator)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
        originals[name] = (layers[name].weight.detach().clone(), down, up)
    path = tmp_path / "lora.safetensors"
    save_lora_file(state, str(path))

    assert merge_file(str(path), multiplier, layers) == 3
    scale = multiplier * alpha / rank

    weight, down, up = originals[TE_LINEAR]
    x = torch.randn(5, weight.shape[1], generator=generator)
    expected = F.linear(x, weight) + scale * F.linear(F.linear(x, down), up)
    torch.testing.assert_close(F.linear(x, layers[TE_LINEAR].weight), expected, rtol=1e-5, atol=1e-5)

    weight, down, up = originals[UNET_CONV3]
    conv = layers[UNET_CONV3]
    x = torch.randn(1, weight.shape[1], 8, 8, generator=generator)
    expected = F.conv2d(x, weight, padding=conv.padding) + scale * F.conv2d(
        F.conv2d(x, down, padding=conv.padding), up
    )
    torch.testing.assert_close(F.conv2d(x, conv.weight, padding=conv.padding), expected, rtol=1e-4, atol=1e-4)

    weight, down, up = originals[UNET_LINEAR]
    torch.testing.assert_close(layers[UNET_LINEAR].weight, weight + scale * up @ down, rtol=1e-5, atol=1e-6)


def test_loha_and_full_diff_merge_by_their_formulas(tmp_path):
    text_encoders, unet = sd1_models()
    layers = target_layers(text_encoders, unet)
    generator = torch.Generator().manual_seed(2)
    weight = layers[UNET_CONV3].weight.detach().clone()
    out_dim, columns = weight.shape[0], weight[0].numel()
    w1a, w1b = torch.randn(out_dim, 2, generator=generator), torch.randn(2, columns, generator=generator)
    w2a, w2b = torch.randn(out_dim, 2, generator=generator), torch.randn(2, columns, generator=generator)
    te_weight = layers[TE_LINEAR].weight.detach().clone()
    te_bias = layers[TE_LINEAR].bias.detach().clone()
    diff, diff_b = torch.randn(te_weight.shape, generator=generator), torch.randn(te_bias.shape, generator=generator)
    state = {
        f"{UNET_CONV3}.hada_w1_a": w1a, f"{UNET_CONV3}.hada_w1_b": w1b,
        f"{UNET_CONV3}.hada_w2_a": w2a, f"{UNET_CONV3}.hada_w2_b": w2b, f"{UNET_CONV3}.alpha": torch.tensor(4.0),
        f"{TE_LINEAR}.diff": diff, f"{TE_LINEAR}.diff_b": diff_b,
    }  # fmt: skip
    path = tmp_path / "loha.safetensors"
    save_lora_file(state, str(path))
    merge_file(str(path), 0.5, layers)

    loha = ((w1a @ w1b) * (w2a @ w2b)).reshape(weight.shape) * (4.0 / 2)
    torch.testing.assert_close(layers[UNET_CONV3].weight, weight + 0.5 * loha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers[TE_LINEAR].weight, te_weight + 0.5 * diff)
    torch.testing.assert_close(layers[TE_LINEAR].bias, te_bias + 0.5 * diff_b)


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_a_networks_lora_file_merges_to_what_the_network_computes(tmp_path, model):
    """A file saved by networks.lora (SDXL: SAI key names) merges to the model the applied network computes."""
    parts = build_tiny(model, 0)
    text_encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if "text_encoder_2" in parts else [])
    unet = parts["unet"]
    network = create_network(1.0, 4, 2.0, None, text_encoders, unet, conv_dim=2, conv_alpha=1)
    with torch.no_grad():
        for name, param in network.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1)
    path = tmp_path / "net.safetensors"
    network.save_weights(str(path), torch.float32, None)
    network.apply_to(text_encoders, unet, True, True)
    network.set_multiplier(0.6)

    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    added = None
    if "text_encoder_2" in parts:
        added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        hooked = unet(sample, 500, context, added_cond_kwargs=added).sample
        hooked_text = [encoder(ids).last_hidden_state for encoder in text_encoders]

    fresh = build_tiny(model, 0)
    fresh_encoders = [fresh["text_encoder"]] + ([fresh["text_encoder_2"]] if "text_encoder_2" in fresh else [])
    merge_base_weights(base_args([str(path)], [0.6]), fresh_encoders, fresh["unet"])
    with torch.no_grad():
        merged = fresh["unet"](sample, 500, context, added_cond_kwargs=added).sample
        merged_text = [encoder(ids).last_hidden_state for encoder in fresh_encoders]
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-4)
    for got, want in zip(merged_text, hooked_text):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_multipliers_default_to_one():
    assert base_weights.multipliers(["a", "b", "c"], [0.5]) == [0.5, 1.0, 1.0]
    assert base_weights.multipliers(["a"], None) == [1.0]


def test_a_missing_file_is_an_error_before_models_load(tmp_path):
    with pytest.raises(BaseWeightsError, match=r"--base_weights: .*nope\.safetensors not found"):
        base_weights.check_args(base_args([str(tmp_path / "nope.safetensors")]))


def test_an_unsupported_format_is_an_error_before_models_load(tmp_path):
    path = tmp_path / "lokr.safetensors"
    save_lora_file({f"{TE_LINEAR}.lokr_w1": torch.zeros(4, 4), f"{TE_LINEAR}.lokr_w2": torch.zeros(8, 8)}, str(path))
    with pytest.raises(BaseWeightsError, match=rf"--base_weights {path}: {TE_LINEAR}: unsupported weights"):
        base_weights.check_args(base_args([str(path)]))


def lora_for(name: str, down_shape: tuple[int, ...], up_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.zeros(down_shape), f"{name}.lora_up.weight": torch.zeros(up_shape)}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (lora_for("lora_unet_no_such_layer", (2, 32), (32, 2)), r"1 of its 1 modules have no layer.*no_such_layer"),
        (lora_for(TE_LINEAR, (2, 48), (32, 2)), r"lora_te_text_model_encoder_layers_0_self_attn_q_proj: gives .*"),
        ({f"{TE_LINEAR}.lokr_w1": torch.zeros(4, 4), f"{TE_LINEAR}.lokr_w2": torch.zeros(8, 8)}, r"unsupported"),
    ],
)
def test_a_file_that_does_not_fit_is_an_error_naming_it(tmp_path, state, message):
    text_encoders, unet = sd1_models()
    layers = target_layers(text_encoders, unet)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    path = tmp_path / "other.safetensors"
    save_lora_file(state, str(path))
    with pytest.raises(BaseWeightsError, match=rf"--base_weights {path}.*{message}"):
        merge_file(str(path), 1.0, layers)
    assert all(torch.equal(layers[name].weight, weight) for name, weight in before.items())


def test_an_unreadable_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(BaseWeightsError, match="broken.safetensors"):
        merge_file(str(path), 1.0, {})


# --------------------------------------------------------------------------------------------- end to end


def write_workspace(root: Path, model: str) -> Path:
    from shape_images import write_shape_images  # tests/shape_images.py

    write_shape_images(root / "data" / "1_sks shape", ("red", "blue"), caption="sks shape")
    config = root / "config.toml"
    config.write_text(
        f"""
pretrained_model_name_or_path = "{model}"
train_data_dir = "{(root / 'data').as_posix()}"
caption_extension = ".txt"
resolution = "64"
max_data_loader_n_workers = 0
network_module = "networks.lora"
network_dim = 2
network_alpha = 2
learning_rate = 1e-3
max_train_steps = 2
seed = 3
output_dir = "{(root / 'out').as_posix()}"
output_name = "run"
""",
        encoding="utf-8",
    )
    return config


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_training_on_merged_base_weights(tmp_path, model):
    """The run trains on the merged model: its U-Net layer holds W + m · scale · up @ down."""
    from library.config import parse_args
    from library.sdxl import SdxlNetworkTrainer
    from library.trainer import NetworkTrainer

    sdxl = model == "tiny-sdxl"
    config = write_workspace(tmp_path, model)
    fresh = build_tiny(model, 0)
    name = "lora_unet_input_blocks_1_0_in_layers_2" if sdxl else UNET_CONV3
    conv = fresh["unet"].down_blocks[0].resnets[0].conv1
    generator = torch.Generator().manual_seed(5)
    down, up = random_lora(conv, 2, generator)
    path = tmp_path / "base.safetensors"
    save_lora_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)},
                   str(path))

    trainer = SdxlNetworkTrainer() if sdxl else NetworkTrainer()
    args = parse_args(["--config_file", str(config), "--base_weights", str(path), "--base_weights_multiplier", "0.3"],
                      sdxl=sdxl)
    trainer.train(args)
    trained = trainer.models.unet.down_blocks[0].resnets[0].conv1.weight.detach().cpu()
    expected = conv.weight.detach() + 0.3 * (1.0 / 2) * (up.reshape(up.shape[0], 2) @ down.reshape(2, -1)).reshape(
        conv.weight.shape
    )
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
    assert Path(trainer.output_file).is_file()


def test_a_missing_base_weights_file_stops_the_run_with_one_error_line(tmp_path, capsys):
    import train_network

    config = write_workspace(tmp_path, "tiny-sd1")
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(["--config_file", str(config), "--base_weights", str(missing)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --base_weights: {missing} not found" in err
