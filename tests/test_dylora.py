"""networks.dylora: sd-scripts' DyLoRA — kohya LoRA files, one rank unit trained per forward, ANLO steps."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from library.hina_anlo import ANLO
from networks import dylora, lora
from test_lora_anlo import loss_of, tiny_sd1
from test_lora_network import run_unet, tiny


def test_file_layout_matches_networks_lora():
    encoders, unet = tiny("tiny-sdxl")
    ours = dylora.create_network(1.0, 4, 2.0, None, encoders, unet, conv_dim="4", unit="2")
    reference = lora.create_network(1.0, 4, 2.0, None, encoders, unet, conv_dim="4", conv_alpha="2")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    assert any(".lora_A." in n for n, _ in ours.named_parameters())  # trained as rows, saved as matrices


def test_saved_file_acts_like_the_same_lora_in_networks_lora(tmp_path):
    text_encoder, unet = tiny_sd1()
    network = dylora.create_network(1.0, 4, 2.0, None, text_encoder, unet, conv_dim="4")
    network.apply_to(text_encoder, unet)
    with torch.no_grad():
        for n, p in network.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.3)
    network.eval()  # out of training: scale alpha / rank, as any loader reads the file
    ours = run_unet(unet)
    file = tmp_path / "dylora.safetensors"
    network.save_weights(str(file), torch.float32, {})

    base_encoder, base_unet = tiny_sd1()
    reference, _ = lora.create_network_from_weights(1.0, str(file), None, base_encoder, base_unet)
    reference.apply_to(base_encoder, base_unet)
    torch.testing.assert_close(run_unet(base_unet), ours, rtol=0, atol=1e-5)
    assert not torch.allclose(run_unet(tiny_sd1()[1]), ours, atol=1e-3)

    loaded, _ = dylora.create_network_from_weights(1.0, str(file), None, *tiny_sd1())
    saved = load_file(file)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)


@pytest.mark.parametrize("unit", [1, 2])
def test_training_forward_trains_one_unit_and_scales_by_the_drawn_rank(unit):
    layer = torch.nn.Linear(8, 6).requires_grad_(False)
    module = dylora.DyLoRAModule("lora_x", layer, 1.0, 4, 2.0, unit=unit)
    module.apply_to()
    down = torch.randn(4, 8)
    up = torch.randn(6, 4)
    module.load_state_dict({"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0)})
    x = torch.randn(3, 8)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        module.zero_grad(set_to_none=True)
        out = layer(x)
        out.sum().backward()
        trained = [i for i in range(4) if module.lora_A[i].grad is not None]
        assert trained == [i for i in range(4) if module.lora_B[i].grad is not None]
        b = trained[0]
        assert trained == list(range(b, b + unit)) and b % unit == 0
        expected = x @ layer.weight.T + layer.bias + (x @ down.T @ up.T) * (2.0 / 4) * math.sqrt(4 / (b + unit))
        torch.testing.assert_close(out, expected)
        seen.add(b)
    assert seen == set(range(0, 4, unit))  # every unit gets drawn


def test_anlo_moves_only_the_drawn_rows():
    text_encoder, unet = tiny_sd1()
    network = dylora.create_network(1.0, 4, 4.0, None, text_encoder, unet)
    network.apply_to(text_encoder, unet)
    network.prepare_grad_etc(text_encoder, unet)
    groups, _ = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    optimizer = ANLO(groups, lr=1e-3)
    named = dict(network.named_parameters())
    torch.manual_seed(0)
    for _ in range(2):
        before = {n: p.detach().clone() for n, p in named.items()}
        optimizer.zero_grad(set_to_none=True)
        loss_of(text_encoder, unet).backward()
        with_grad = {n for n, p in named.items() if p.grad is not None}
        optimizer.step()
        moved = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
        assert moved <= with_grad
        assert any(".lora_B." in n for n in moved)
    for module in network.unet_loras:  # one row of each module took the gradient
        rows = [i for i in range(4) if f"{module.lora_name}.lora_A.{i}" in with_grad]
        assert len(rows) == 1


def test_bad_unit_and_conv_dim_are_refused():
    text_encoder, unet = tiny_sd1()
    with pytest.raises(ValueError, match="unit must divide network_dim 4, got unit=3"):
        dylora.create_network(1.0, 4, 1.0, None, text_encoder, unet, unit="3")
    with pytest.raises(ValueError, match="needs conv_dim equal to network_dim"):
        dylora.create_network(1.0, 4, 1.0, None, text_encoder, unet, conv_dim="8")
