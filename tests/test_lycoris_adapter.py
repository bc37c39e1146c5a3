"""``--network_module lycoris.kohya`` with LyCORIS' default preset: the duplicate modules of LyCORIS 4.1 removed
where the trainer loads the module; networks train with ANLO and their files load back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import train_network
from library.hina_anlo import ANLO
from library.optimizers import with_param_names
from library.trainer import NetworkTrainer, import_network_module
from networks.lycoris_adapter import covered_names, deduplicated_preset
from shape_images import write_shape_images  # tests/shape_images.py
from test_lora_anlo import loss_of, tiny_sd1

lycoris_kohya = pytest.importorskip("lycoris.kohya")


def test_stock_lycoris_default_preset_creates_duplicates():
    """The bug the adapter works around (LyCORIS 4.1.3; stock sd-scripts calls this same function). When this
    fails, LyCORIS has fixed it: docs/COMPATIBILITY.md's note on it can go."""
    text_encoder, unet = tiny_sd1()
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_time_embedding_linear_1"):
        lycoris_kohya.create_network(1.0, 4, 1.0, None, text_encoder, unet, algo="locon")


def test_only_names_inside_targeted_classes_are_dropped():
    model = nn.Module()
    model.block = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))  # class "Sequential" targeted below
    model.head = nn.Linear(2, 2)
    model.mixed = nn.Linear(2, 2)
    assert covered_names([model], ["Sequential"], ["block.0", "head", "block.1"]) == ["block.0", "block.1"]
    assert covered_names([model], ["Sequential"], [r"block\.\d", "head"]) == [r"block\.\d"]
    assert covered_names([model], ["Sequential"], ["(block.0|mixed)"]) == []  # matches one outside: kept
    assert covered_names([model], ["Sequential"], ["block.*"], use_fnmatch=True) == ["block.*"]
    assert covered_names([model], ["Sequential"], ["block", "block.0"]) == []  # a named block: its class is not used


def test_builtin_presets_lose_only_the_time_embedding_names():
    text_encoder, unet = tiny_sd1()
    full = deduplicated_preset(lycoris_kohya.PRESET["full"], text_encoder, unet)
    assert full["unet_target_name"] == ["conv_in", "conv_out"]
    assert {k: v for k, v in full.items() if k != "unet_target_name"} == {
        k: v for k, v in lycoris_kohya.PRESET["full"].items() if k != "unet_target_name"
    }
    assert deduplicated_preset(lycoris_kohya.PRESET["attn-mlp"], text_encoder, unet) is None


def test_arguments_reach_lycoris_unchanged_but_the_preset(monkeypatch):
    calls = []
    monkeypatch.setattr(lycoris_kohya, "create_network", lambda *args, **kwargs: calls.append((args, kwargs)))
    module = import_network_module("lycoris.kohya")
    text_encoder, unet = tiny_sd1()
    module.create_network(1.0, 4, 2.0, None, text_encoder, unet, False, neuron_dropout=0.1, algo="loha")
    module.create_network(1.0, 4, 2.0, None, text_encoder, unet, preset="attn-mlp")
    (args, kwargs), (args2, kwargs2) = calls
    assert args[:3] == (1.0, 4, 2.0) and args[4:] == (text_encoder, unet, False)
    assert kwargs.keys() == {"neuron_dropout", "algo", "preset"} and kwargs["preset"].endswith("preset.toml")
    assert (kwargs["neuron_dropout"], kwargs["algo"]) == (0.1, "loha")
    assert args2[6:] == () and kwargs2 == {"preset": "attn-mlp"}  # nothing to fix: passed on as given


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_default_preset_trains_with_anlo_and_loads_back(algo, tmp_path):
    module = import_network_module("lycoris.kohya")
    text_encoder, unet = tiny_sd1()
    network = module.create_network(1.0, 4, 1.0, None, text_encoder, unet, algo=algo)
    names = [lora.lora_name for lora in network.loras]
    assert len(names) == len(set(names))
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_conv_in", "lora_unet_conv_out"} <= set(names)

    network.apply_to(text_encoder, unet, True, True)
    network.prepare_grad_etc(text_encoder, unet)
    groups = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    groups = with_param_names(groups[0] if isinstance(groups, tuple) else groups, network.named_parameters())
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    optimizer = ANLO(groups, lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss_of(text_encoder, unet).backward()
        optimizer.step()
    assert any(not torch.equal(p.detach(), before[name]) for name, p in network.named_parameters())

    file = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(file), torch.float32, {})
    saved = load_file(file)
    assert any(key.startswith("lora_unet_time_embedding_linear_1.") for key in saved)
    fresh_encoder, fresh_unet = tiny_sd1()
    loaded, _ = module.create_network_from_weights(1.0, str(file), None, fresh_encoder, fresh_unet)
    assert {lora.lora_name for lora in loaded.unet_loras + loaded.text_encoder_loras} == set(names)
    again = module.create_network(1.0, 4, 1.0, None, fresh_encoder, fresh_unet, algo=algo)
    again.load_weights(str(file))
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)


@pytest.mark.slow
def test_train_network_with_lycoris_default_preset(tmp_path: Path):
    write_shape_images(tmp_path / "data" / "1_sks shape", ("red", "blue"), caption="a photo of sks shape")
    argv = [
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
        "--resolution", "64", "--max_data_loader_n_workers", "0", "--output_dir", str(tmp_path / "out"),
        "--output_name", "loha", "--network_module", "lycoris.kohya", "--network_args", "algo=loha",
        "--network_dim", "4", "--optimizer_type", "ANLO", "--learning_rate", "1e-3", "--max_train_steps", "2",
    ]  # fmt: skip
    NetworkTrainer().train(train_network.parse_args(argv, sdxl=False))
    saved = load_file(tmp_path / "out" / "loha.safetensors")
    assert "lora_unet_time_embedding_linear_1.hada_w1_a" in saved
    module = import_network_module("lycoris.kohya")
    text_encoder, unet = tiny_sd1()
    network, _ = module.create_network_from_weights(1.0, str(tmp_path / "out" / "loha.safetensors"), None,
                                                    text_encoder, unet)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
