"""networks.lora_fa: networks.lora's modules and file format with lora_down frozen; trains with ANLO."""

from __future__ import annotations

import math
import pytest
import torch
from safetensors.torch import load_file

from library.hina_anlo import ANLO
from networks import lora, lora_fa
from test_lora_anlo import loss_of, tiny_sd1
from test_lora_network import tiny


@pytest.mark.parametrize("name, args", [("tiny-sd1", {"conv_dim": "2"}),
                                        ("tiny-sdxl", {"down_lr_weight": "linear", "mid_lr_weight": "1,0,1"})])
def test_same_modules_ranks_and_keys_as_networks_lora(name, args):
    encoders, unet = tiny(name)
    text_encoder = encoders if len(encoders) > 1 else encoders[0]
    ours = lora_fa.create_network(1.0, 4, 2.0, None, text_encoder, unet, **args)
    reference = lora.create_network(1.0, 4, 2.0, None, text_encoder, unet, **args)
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert ours.block_lr_weight == reference.block_lr_weight


def test_lora_down_is_frozen_and_drawn_as_sd_scripts_draws_it():
    text_encoder, unet = tiny_sd1()
    torch.manual_seed(0)
    network = lora_fa.create_network(1.0, 8, 8.0, None, text_encoder, unet)
    network.apply_to(text_encoder, unet)
    groups, descriptions = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    names = [n for g in groups for n in g["param_names"]]
    assert descriptions == ["textencoder", "unet"]
    assert names and all(n.endswith(".lora_up.weight") for n in names)
    assert len(names) == len(network.text_encoder_loras) + len(network.unet_loras)
    module = network.text_encoder_loras[0]  # a 32 -> 32 projection of the tiny CLIP
    down = module.lora_down.weight
    expected_std = math.sqrt(2.0 / (down.shape[1] + 8))
    assert float(down.std()) == pytest.approx(expected_std, rel=0.2)
    assert not down.requires_grad and module.lora_up.weight.requires_grad

    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    optimizer = ANLO(groups, lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss_of(text_encoder, unet).backward()
        optimizer.step()
    for n, p in network.named_parameters():
        assert torch.equal(p.detach(), before[n]) == ("lora_down" in n), n


def test_file_loads_back_and_in_networks_lora(tmp_path):
    text_encoder, unet = tiny_sd1()
    network = lora_fa.create_network(1.0, 4, 2.0, None, text_encoder, unet, conv_dim="2")
    with torch.no_grad():
        for n, p in network.named_parameters():
            if "lora_up" in n:
                p.normal_()
    file = tmp_path / "fa.safetensors"
    network.save_weights(str(file), torch.float32, {})
    saved = load_file(file)
    for module in (lora_fa, lora):
        loaded, _ = module.create_network_from_weights(1.0, str(file), None, *tiny_sd1())
        assert loaded.state_dict().keys() == saved.keys()
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, saved[key], msg=key)
        if module is lora_fa:
            loaded.prepare_grad_etc(None, None)
            assert {n.split(".")[1] for n, p in loaded.named_parameters() if p.requires_grad} == {"lora_up"}
