"""networks.lora: targets and key names, the LoRA forward, optimizer groups, save/load, merge, network args."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library import lora_format
from library.architectures import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, SD15_UNET, SDXL_UNET
from library.tiny_models import build_tiny
from networks.lora import LoRAModule, create_network, create_network_from_weights

# Transformer2DModel layers per transformer block: attn1/attn2 q, k, v, out; ff in, out.
PER_TRANSFORMER_BLOCK = ["attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0",
                         "attn2_to_q", "attn2_to_k", "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2"]
PER_CLIP_LAYER = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


def tiny(name: str, seed: int = 0) -> tuple[list[torch.nn.Module], UNet2DConditionModel]:
    """Fresh (text encoders, U-Net) of an embedded tiny model, frozen like a trainer freezes them."""
    parts = build_tiny(name, seed)
    encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if "text_encoder_2" in parts else [])
    for model in encoders + [parts["unet"]]:
        model.requires_grad_(False).eval()
    return encoders, parts["unet"]


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    cross = unet.config.cross_attention_dim
    inputs = {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(batch, 7, cross, generator=generator),
    }
    if unet.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return inputs


def run_unet(unet: UNet2DConditionModel) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


def run_text_encoder(encoder: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 17, 42, 99, 1, 1]])
    with torch.no_grad():
        return encoder(ids).last_hidden_state


def randomize_up(network: torch.nn.Module, seed: int = 3, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


# --------------------------------------------------------------------------------------------- forward


def test_fresh_network_leaves_outputs_unchanged_and_base_keys_intact():
    encoders, unet = tiny("tiny-sd1")
    unet_keys, te_keys = list(unet.state_dict()), list(encoders[0].state_dict())
    before_unet, before_te = run_unet(unet), run_text_encoder(encoders[0])
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet)
    network.apply_to(encoders[0], unet)
    assert torch.equal(run_unet(unet), before_unet)
    assert torch.equal(run_text_encoder(encoders[0]), before_te)
    assert list(unet.state_dict()) == unet_keys and list(encoders[0].state_dict()) == te_keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in network.state_dict())


def test_one_optimizer_step_changes_the_output_and_only_lora_weights():
    encoders, unet = tiny("tiny-sd1")
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    before = run_unet(unet)
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet)
    network.apply_to(encoders[0], unet)
    network.prepare_grad_etc(encoders[0], unet)
    network.on_epoch_start(encoders[0], unet)
    groups, _ = network.prepare_optimizer_params(None, None, 1e-2)
    optimizer = torch.optim.SGD([{k: v for k, v in g.items() if k != "param_names"} for g in groups])
    unet(**unet_inputs(unet)).sample.pow(2).mean().backward()
    optimizer.step()
    assert not torch.allclose(run_unet(unet), before)
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())


def manual_lora(org: torch.nn.Module, lora: LoRAModule, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """org(x) + multiplier · alpha/rank · up(down(x)) from the raw weights."""
    down, up = lora.lora_down.weight, lora.lora_up.weight
    scale = float(lora.alpha) / down.shape[0]
    if isinstance(org, torch.nn.Linear):
        base = F.linear(x, org.weight, org.bias)
        delta = F.linear(F.linear(x, down), up)
    else:
        base = F.conv2d(x, org.weight, org.bias, org.stride, org.padding)
        delta = F.conv2d(F.conv2d(x, down, None, org.stride, org.padding), up)
    return base + multiplier * scale * delta


@pytest.mark.parametrize(
    "path, shape",
    [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", (2, 7, 32)),  # Linear
        ("down_blocks.1.attentions.0.proj_in", (2, 64, 4, 4)),  # 1×1 conv (SD 1.x projection)
        ("down_blocks.0.downsamplers.0.conv", (2, 32, 8, 8)),  # 3×3 stride-2 conv (conv_dim)
        ("up_blocks.0.resnets.0.conv1", (2, 128, 4, 4)),  # 3×3 conv inside a resnet (conv_dim)
    ],
)
def test_forward_equals_base_plus_scaled_low_rank_update(path, shape):
    encoders, unet = tiny("tiny-sd1")
    network = create_network(0.7, 4, 2.0, None, encoders[0], unet, conv_dim="3", conv_alpha="6")
    network.apply_to(encoders[0], unet)
    randomize_up(network)
    lora = network.get_submodule(lora_format.unet_lora_name(path))
    org = unet.get_submodule(path)
    assert lora.org_module is org
    expected_scale = 6.0 / 3 if "conv" in path and "proj" not in path else 2.0 / 4
    assert lora.scale == pytest.approx(expected_scale)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(org(x), manual_lora(org, lora, x, 0.7), rtol=1e-5, atol=1e-6)


def test_multiplier_scales_the_update_linearly():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 4.0, None, encoders[0], unet)
    network.apply_to(encoders[0], unet)
    randomize_up(network)
    encoder = encoders[0]
    network.set_multiplier(0.0)
    base = run_text_encoder(encoder)
    network.set_multiplier(1.0)
    full = run_text_encoder(encoder)
    layer = encoder.get_submodule("encoder.layers.0.mlp.fc1")
    x = torch.randn(3, 32)
    with torch.no_grad():
        one = layer(x)
        network.set_multiplier(0.5)
        half = layer(x)
        network.set_multiplier(0.0)
        zero = layer(x)
    torch.testing.assert_close(half - zero, 0.5 * (one - zero))
    assert not torch.allclose(full, base)


def test_module_dropout_and_rank_dropout_apply_only_in_training():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 4.0, None, encoders[0], unet, module_dropout="1.0", rank_dropout="0.5")
    network.apply_to(encoders[0], unet)
    randomize_up(network)
    layer = encoders[0].get_submodule("encoder.layers.1.self_attn.q_proj")
    lora = network.get_submodule("lora_te_text_model_encoder_layers_1_self_attn_q_proj")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        network.eval()
        expected = manual_lora(layer, lora, x, 1.0)
        torch.testing.assert_close(layer(x), expected)
        network.train()
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # the whole module dropped
        lora.module_dropout = None
        torch.manual_seed(0)
        samples = layer(x[:1].expand(4000, -1, -1))  # rank dropout draws one mask per batch item
    # rank dropout rescales by 1/(1-p): the mean over many draws is the undropped output
    torch.testing.assert_close(samples.mean(0), expected[0], atol=0.02, rtol=0.0)
    assert samples.std(0).max() > 0.01


# --------------------------------------------------------------------------------------------- targets and names


def module_names(network) -> tuple[set[str], set[str]]:
    return {m.lora_name for m in network.text_encoder_loras}, {m.lora_name for m in network.unet_loras}


def test_tiny_sd1_key_names_follow_diffusers_paths():
    encoders, unet = tiny("tiny-sd1")
    te_names, unet_names = module_names(create_network(1.0, 4, 1.0, None, encoders[0], unet))
    # tiny-sd1: down_blocks.1 / up_blocks.0 are the cross-attention levels (2 and 3 Transformer2DModels),
    # plus the mid block; one transformer block each.
    blocks = ["down_blocks_1_attentions_0", "down_blocks_1_attentions_1", "mid_block_attentions_0",
              "up_blocks_0_attentions_0", "up_blocks_0_attentions_1", "up_blocks_0_attentions_2"]
    expected_unet = {f"lora_unet_{b}_{inner}" for b in blocks
                     for inner in ["proj_in", "proj_out"] + [f"transformer_blocks_0_{n}" for n in PER_TRANSFORMER_BLOCK]}
    assert unet_names == expected_unet
    assert te_names == {f"lora_te_text_model_encoder_layers_{i}_{n}" for i in range(5) for n in PER_CLIP_LAYER}


def test_tiny_sdxl_key_names_follow_sai_layout():
    encoders, unet = tiny("tiny-sdxl")
    te_names, unet_names = module_names(create_network(1.0, 4, 1.0, None, encoders, unet))
    # tiny-sdxl in LDM layout: input_blocks.0 = conv_in; level 0 (DownBlock2D) = input_blocks 1, 2 and its
    # downsampler 3; level 1 (cross-attn) = input_blocks 4, 5 with attention at .1 and 2 transformer layers
    # (transformer_layers_per_block=(1, 2)). middle_block.1 is the mid attention (2 layers, the last level's).
    # up level 0 (cross-attn, 3 resnets) = output_blocks 0, 1, 2 with attention at .1 (2 layers, reversed list).
    blocks = ["input_blocks_4_1", "input_blocks_5_1", "middle_block_1",
              "output_blocks_0_1", "output_blocks_1_1", "output_blocks_2_1"]
    expected_unet = {f"lora_unet_{b}_{inner}" for b in blocks
                     for inner in ["proj_in", "proj_out"]
                     + [f"transformer_blocks_{t}_{n}" for t in range(2) for n in PER_TRANSFORMER_BLOCK]}
    assert unet_names == expected_unet
    assert te_names == {f"lora_te{e}_text_model_encoder_layers_{i}_{n}"
                        for e in (1, 2) for i in range(5) for n in PER_CLIP_LAYER}


def test_conv_dim_adds_resnet_and_sampler_layers_at_their_ranks():
    encoders, unet = tiny("tiny-sdxl")
    network = create_network(1.0, 8, 1.0, None, encoders, unet, conv_dim="2")
    dims = {m.lora_name: (m.lora_dim, float(m.alpha)) for m in network.unet_loras}
    assert dims["lora_unet_input_blocks_1_0_in_layers_2"] == (2, 1.0)  # conv1 3×3: conv_dim, conv_alpha default 1
    assert dims["lora_unet_input_blocks_1_0_out_layers_3"] == (2, 1.0)  # conv2
    assert dims["lora_unet_input_blocks_1_0_emb_layers_1"] == (8, 1.0)  # time_emb_proj is Linear: network_dim
    assert dims["lora_unet_input_blocks_4_0_skip_connection"] == (8, 1.0)  # 1×1 shortcut: network_dim
    assert dims["lora_unet_input_blocks_3_0_op"] == (2, 1.0)  # downsampler
    assert dims["lora_unet_output_blocks_2_2_conv"] == (2, 1.0)  # upsampler after the level's attention
    lora = network.get_submodule("lora_unet_input_blocks_3_0_op")
    assert (lora.lora_down.kernel_size, lora.lora_down.stride, lora.lora_down.padding) == ((3, 3), (2, 2), (1, 1))
    assert lora.lora_up.kernel_size == (1, 1)


@pytest.fixture(scope="module")
def real_models_on_meta():
    """Real-size SD 1.5 / SDXL U-Nets and CLIP encoders on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return {
            "sd15": ([CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))], UNet2DConditionModel(**SD15_UNET)),
            "sdxl": (
                [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT))],
                UNet2DConditionModel(**SDXL_UNET),
            ),
        }


@pytest.mark.parametrize(
    "model, network_args, n_te, n_unet",
    [
        ("sd15", {}, 72, 192),  # sd-scripts' counts for SD 1.5
        ("sd15", {"conv_dim": "4"}, 72, 278),  # + 22 resnets × 3, 14 shortcuts, 3 down- and 3 upsamplers
        ("sdxl", {}, 72 + 192, 722),  # 70 transformer blocks × 10 + 11 proj_in/out pairs
    ],
)
def test_real_model_module_counts(real_models_on_meta, model, network_args, n_te, n_unet):
    encoders, unet = real_models_on_meta[model]
    with torch.device("meta"):
        network = create_network(1.0, 4, 1.0, None, encoders, unet, **network_args)
    assert (len(network.text_encoder_loras), len(network.unet_loras)) == (n_te, n_unet)


def test_real_model_key_names(real_models_on_meta):
    with torch.device("meta"):
        sd15 = create_network(1.0, 4, 1.0, None, *real_models_on_meta["sd15"])
        sdxl = create_network(1.0, 4, 1.0, None, *real_models_on_meta["sdxl"])
    sd15_te, sd15_unet = module_names(sd15)
    sdxl_te, sdxl_unet = module_names(sdxl)
    assert {"lora_unet_down_blocks_0_attentions_0_proj_in",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"} <= sd15_unet
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in sd15_te
    assert {"lora_unet_input_blocks_4_1_proj_in",
            "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
            "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k",
            "lora_unet_output_blocks_5_1_proj_out"} <= sdxl_unet
    assert not any("input_blocks_1_" in n or "output_blocks_6_" in n for n in sdxl_unet)  # no attention there
    assert {"lora_te1_text_model_encoder_layers_11_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_31_mlp_fc1"} <= sdxl_te


# --------------------------------------------------------------------------------------------- optimizer groups


def group_index(groups, descriptions) -> dict[str, dict]:
    assert len(groups) == len(descriptions) == len(set(descriptions))
    return dict(zip(descriptions, groups))


def test_groups_carry_param_names_matching_state_dict_keys():
    encoders, unet = tiny("tiny-sdxl")
    network = create_network(1.0, 4, 1.0, None, encoders, unet, conv_dim="2")
    network.apply_to(encoders, unet)
    groups, descriptions = network.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert descriptions == ["textencoder", "unet"]
    params = dict(network.named_parameters())
    seen = []
    for group in groups:
        assert len(group["param_names"]) == len(group["params"])
        for name, param in zip(group["param_names"], group["params"]):
            assert params[name] is param
            assert name.endswith((".lora_down.weight", ".lora_up.weight"))
        seen += group["param_names"]
    assert sorted(seen) == sorted(params)
    assert all(n.startswith(("lora_te1_", "lora_te2_")) for n in groups[0]["param_names"])
    assert [g["lr"] for g in groups] == [5e-5, 1e-4]


def test_loraplus_groups_and_learning_rates():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet,
                             loraplus_lr_ratio="4", loraplus_unet_lr_ratio="16")
    network.apply_to(encoders[0], unet)
    groups, descriptions = network.prepare_optimizer_params(2e-5, 1e-4, 1e-3)
    by_name = group_index(groups, descriptions)
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert by_name["textencoder"]["lr"] == 2e-5 and by_name["textencoder plus"]["lr"] == pytest.approx(8e-5)
    assert by_name["unet"]["lr"] == 1e-4 and by_name["unet plus"]["lr"] == pytest.approx(1.6e-3)
    for description, group in by_name.items():
        wanted = "lora_up" if description.endswith("plus") else "lora_down"
        assert all(wanted in name for name in group["param_names"])
    assert len(by_name["unet plus"]["params"]) == len(network.unet_loras)


def test_zero_or_missing_learning_rates_drop_groups():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet)
    network.apply_to(encoders[0], unet)
    assert network.prepare_optimizer_params(0.0, 1e-4, 1e-3)[1] == ["unet"]
    assert network.prepare_optimizer_params(None, None, None) == ([], [])
    groups, descriptions = network.prepare_optimizer_params(None, None, 3e-4)  # both fall back to default_lr
    assert descriptions == ["textencoder", "unet"] and [g["lr"] for g in groups] == [3e-4, 3e-4]


def test_per_encoder_text_encoder_lrs():
    encoders, unet = tiny("tiny-sdxl")
    network = create_network(1.0, 4, 1.0, None, encoders, unet)
    network.apply_to(encoders, unet)
    groups, descriptions = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert descriptions == ["textencoder1", "textencoder2", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    assert all(n.startswith("lora_te2_") for n in groups[1]["param_names"])
    with pytest.raises(ValueError, match="text_encoder_lr has 3 values"):
        network.prepare_optimizer_params([1e-5, 2e-5, 3e-5], 1e-4, 1e-3)


def test_block_lr_weights_group_modules_by_ldm_block():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet,
                             down_lr_weight="zeros", mid_lr_weight="0.5", up_lr_weight="linear")
    network.apply_to(encoders[0], unet)
    groups, descriptions = network.prepare_optimizer_params(None, 1e-3, 1e-3)
    by_name = group_index(groups, descriptions)
    # tiny-sd1 attentions: input_blocks 4, 5 (down weight 0: dropped), middle = block 12,
    # output_blocks 0, 1, 2 = blocks 13, 14, 15 with linear weights 0/11 (dropped), 1/11, 2/11.
    assert descriptions == ["textencoder", "unet_block12", "unet_block14", "unet_block15"]
    assert by_name["unet_block12"]["lr"] == pytest.approx(0.5e-3)
    assert by_name["unet_block14"]["lr"] == pytest.approx(1e-3 / 11)
    assert by_name["unet_block15"]["lr"] == pytest.approx(2e-3 / 11)
    assert all(n.startswith("lora_unet_up_blocks_0_attentions_2_") for n in by_name["unet_block15"]["param_names"])
    assert all(n.startswith("lora_unet_mid_block_") for n in by_name["unet_block12"]["param_names"])


def test_block_lr_presets_and_lists():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet,
                             down_lr_weight="cosine+0.25", up_lr_weight="0.5,0,2", block_lr_zero_threshold="0.1")
    cosine = [math.cos(math.pi / 2 * i / 11) + 0.25 for i in range(12)]
    assert network.block_lr_weight[:12] == pytest.approx(cosine)
    assert network.block_lr_weight[12] == 1.0  # mid: not given
    assert network.block_lr_weight[13:] == [0.5, 0.0, 2.0] + [1.0] * 9  # short lists are filled with 1
    with pytest.raises(ValueError, match="unknown down_lr_weight preset 'wave'"):
        create_network(1.0, 4, 1.0, None, encoders[0], unet, down_lr_weight="wave")


def test_block_dims_and_alphas():
    encoders, unet = tiny("tiny-sd1")
    dims = ["0"] * 25
    dims[4], dims[12], dims[14] = "2", "6", "8"
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet, block_dims=",".join(dims),
                             block_alphas=",".join(["3"] * 25))
    by_block = {(m.block_index, m.lora_dim, float(m.alpha)) for m in network.unet_loras}
    assert by_block == {(4, 2, 3.0), (12, 6, 3.0), (14, 8, 3.0)}
    with pytest.raises(ValueError, match="block_dims needs 25 values"):
        create_network(1.0, 4, 1.0, None, encoders[0], unet, block_dims="4,4")


# SDXL block-wise settings, checked against sd-scripts' rules written out here from its networks/lora.py:
# a U-Net module's block is read from its kohya name — input_blocks_{k} → 1 + k, middle_block_{k} → 10 + k,
# output_blocks_{k} → 13 + k (0 and 22, time_embed / out, have no LoRA); the lr weights are
# [1.0] + down (9) + mid (3) + up (9) + [1.0], and the presets ramp over 9 blocks.
SDXL_LINEAR = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]


def upstream_sdxl_block(lora_name: str) -> int:
    name = lora_name.removeprefix("lora_unet_")
    for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return first + int(name[len(prefix):].split("_")[0])
    raise AssertionError(f"no SDXL block for {lora_name}")


@pytest.mark.slow
def test_sdxl_block_dims_follow_the_23_block_layout(real_models_on_meta):
    unet = real_models_on_meta["sdxl"][1]  # U-Net only: block settings do not touch the text encoders
    with torch.device("meta"):
        default_names = module_names(create_network(1.0, 4, 1.0, None, None, unet, conv_dim="4"))[1]
        dims = [i % 5 + 1 for i in range(23)]
        dims[5] = dims[18] = 0  # input_blocks_4, output_blocks_5: no modules
        conv_dims = [i % 3 + 1 for i in range(23)]
        network = create_network(1.0, 4, 1.0, None, None, unet, block_dims=",".join(map(str, dims)),
                                 block_alphas=",".join(str(d / 2) for d in range(23)),
                                 conv_block_dims=",".join(map(str, conv_dims)))
    expected = {}
    for name in default_names:
        block = upstream_sdxl_block(name)
        conv3x3 = name.endswith(("_in_layers_2", "_out_layers_3", "_op", "_conv"))
        if not conv3x3 and dims[block]:
            expected[name] = (dims[block], block / 2)
        elif conv3x3:
            expected[name] = (conv_dims[block], 1.0)  # conv_block_alphas default: conv_alpha, else 1
    got = {m.lora_name: (m.lora_dim, round(m.scale * m.lora_dim, 6)) for m in network.unet_loras}  # meta alpha
    assert got == expected
    assert not any("input_blocks_4_" in n and not n.endswith(("_in_layers_2", "_out_layers_3")) for n in got)
    with pytest.raises(ValueError, match="block_dims needs 23 values"):
        create_network(1.0, 4, 1.0, None, None, unet, block_dims=",".join(["4"] * 25))


def test_sdxl_lr_weight_presets_and_lists(real_models_on_meta):
    unet = real_models_on_meta["sdxl"][1]  # U-Net only: block settings do not touch the text encoders
    with torch.device("meta"):
        network = create_network(1.0, 4, 1.0, None, None, unet, down_lr_weight="linear",
                                 mid_lr_weight="1,0.5,1", up_lr_weight="sine+0.5")
        network.apply_to(None, unet)
        groups, descriptions = network.prepare_optimizer_params(None, 1e-3, 1e-3)
    sine = [math.sin(math.pi / 2 * i / 8) + 0.5 for i in range(9)]
    weights = [1.0] + SDXL_LINEAR + [1.0, 0.5, 1.0] + sine + [1.0]
    checked = set()
    for group, description in zip(groups, descriptions):
        for name in group["param_names"]:
            block = upstream_sdxl_block(name.split(".")[0])
            assert description == f"unet_block{block}"
            assert group["lr"] == pytest.approx(1e-3 * weights[block])
            checked.add(block)
    assert checked == {5, 6, 8, 9, 11, 13, 14, 15, 16, 17, 18}  # SDXL's attention blocks
    assert network.block_lr_weight[9] == 1.0  # input_blocks_8 trains at the full lr (linear reaches 1.0)


def test_sdxl_zero_lr_weight_blocks_have_no_modules(tmp_path):
    encoders, unet = tiny("tiny-sdxl")
    network = create_network(1.0, 4, 1.0, None, encoders, unet, conv_dim="2", mid_lr_weight="1,0,1",
                             up_lr_weight="0,0,1,1,1,1,1,1,1")
    full = create_network(1.0, 4, 1.0, None, encoders, unet, conv_dim="2")
    removed = {n for n in module_names(full)[1] if upstream_sdxl_block(n) in (11, 13, 14)}
    assert removed and module_names(network)[1] == module_names(full)[1] - removed
    assert module_names(network)[0] == module_names(full)[0]  # text encoders keep every module
    network.apply_to(encoders, unet)
    network.save_weights(str(tmp_path / "blocks.safetensors"), torch.float32, {})
    keys, _ = lora_format.load_lora_file(str(tmp_path / "blocks.safetensors"))
    assert not any(k.startswith(("lora_unet_middle_block_1_", "lora_unet_output_blocks_0_")) for k in keys)
    assert any(k.startswith("lora_unet_middle_block_2_") for k in keys)


def test_sd1_zero_lr_weight_blocks_have_no_modules():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet, down_lr_weight="zeros")
    names = module_names(network)[1]
    assert names and not any(n.startswith("lora_unet_down_blocks_") for n in names)
    with pytest.raises(ValueError, match="block_dims needs 25 values"):
        create_network(1.0, 4, 1.0, None, encoders[0], unet, block_dims=",".join(["4"] * 23))


def test_lr_weight_parsing_like_sd_scripts(caplog):
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet, up_lr_weight="0.5,,2", mid_lr_weight="1,0.5,1")
    assert network.block_lr_weight[12:16] == [1.0, 0.5, 0.0, 2.0]  # SD 1.x mid takes 1 value; '' is 0
    assert "mid_lr_weight has 3 values; only the first 1 are used" in caplog.text
    with pytest.raises(ValueError, match="unknown down_lr_weight preset '0.5'"):
        create_network(1.0, 4, 1.0, None, encoders[0], unet, down_lr_weight="0.5")
    with pytest.raises(ValueError, match="expected a number after"):
        create_network(1.0, 4, 1.0, None, encoders[0], unet, down_lr_weight="linear+x")
    caplog.clear()
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet, conv_block_dims=",".join(["2"] * 25),
                             block_lr_zero_threshold="0.5")
    assert "conv_block_dims, block_lr_zero_threshold have no effect without block_dims" in caplog.text
    assert network.block_lr_weight is None and network.conv_block_dims is None  # ignored, as in sd-scripts


# --------------------------------------------------------------------------------------------- network args


def test_unknown_network_args_are_warned_by_name(caplog):
    encoders, unet = tiny("tiny-sd1")
    with caplog.at_level(logging.WARNING, logger="networks.lora"):
        create_network(1.0, 4, 1.0, None, encoders[0], unet, conv_dims="8", preset="full")
    assert "conv_dims, preset" in caplog.text


def test_bad_network_arg_values_name_the_argument():
    encoders, unet = tiny("tiny-sd1")
    with pytest.raises(ValueError, match="conv_dim must be an integer, got 'eight'"):
        create_network(1.0, 4, 1.0, None, encoders[0], unet, conv_dim="eight")
    with pytest.raises(ValueError, match="rank_dropout must be a number"):
        create_network(1.0, 4, 1.0, None, encoders[0], unet, rank_dropout="often")


def test_alpha_zero_or_none_means_rank_and_defaults():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, None, None, None, encoders[0], unet)  # sd-scripts defaults: dim 4, alpha 1
    assert {(m.lora_dim, float(m.alpha)) for m in network.unet_loras} == {(4, 1.0)}
    network = create_network(1.0, 8, 0, None, encoders[0], unet)
    assert {(m.lora_dim, float(m.alpha), m.scale) for m in network.unet_loras} == {(8, 8.0, 1.0)}


# --------------------------------------------------------------------------------------------- weights


def test_apply_to_without_text_encoder_drops_its_modules(tmp_path):
    encoders, unet = tiny("tiny-sd1")
    before = run_text_encoder(encoders[0])
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet)
    network.apply_to(encoders[0], unet, apply_text_encoder=False, apply_unet=True)
    randomize_up(network)
    assert network.text_encoder_loras == []
    assert all(k.startswith("lora_unet_") for k in network.state_dict())
    assert torch.equal(run_text_encoder(encoders[0]), before)
    assert network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)[1] == ["unet"]


@pytest.mark.slow
def test_from_weights_reads_dims_and_alphas_and_loads_weights(tmp_path):
    encoders, unet = tiny("tiny-sdxl")
    network = create_network(1.0, 8, 4.0, None, encoders, unet, conv_dim="2", conv_alpha="0.5")
    randomize_up(network)
    path = str(tmp_path / "net.safetensors")
    network.save_weights(path, torch.float32, {"ss_network_dim": "8"})

    encoders2, unet2 = tiny("tiny-sdxl")
    loaded, weights_sd = create_network_from_weights(1.0, path, None, encoders2, unet2)
    original = {m.lora_name: (m.lora_dim, float(m.alpha)) for m in network.text_encoder_loras + network.unet_loras}
    rebuilt = {m.lora_name: (m.lora_dim, float(m.alpha)) for m in loaded.text_encoder_loras + loaded.unet_loras}
    assert rebuilt == original
    assert {v for v in rebuilt.values()} == {(8, 4.0), (2, 0.5)}
    assert set(weights_sd) == set(network.state_dict())
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_from_weights_without_alpha_uses_rank_and_rejects_foreign_files(tmp_path):
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet)
    weights = {k: v for k, v in network.state_dict().items() if not k.endswith(".alpha")}
    loaded, _ = create_network_from_weights(1.0, None, None, encoders[0], unet, weights_sd=weights)
    assert {float(m.alpha) for m in loaded.unet_loras} == {4.0}
    with pytest.raises(ValueError, match="not a kohya LoRA file"):
        create_network_from_weights(1.0, None, None, encoders[0], unet, weights_sd={"x.weight": torch.zeros(1)})


def test_load_weights_restores_values_and_scale(tmp_path):
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 2.0, None, encoders[0], unet)
    randomize_up(network)
    path = str(tmp_path / "net.safetensors")
    network.save_weights(path, None, {})

    encoders2, unet2 = tiny("tiny-sd1")
    other = create_network(1.0, 4, 1.0, None, encoders2[0], unet2)  # different alpha, restored from the file
    other.apply_to(encoders2[0], unet2)
    info = other.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert {m.scale for m in other.unet_loras} == {0.5}
    network.apply_to(encoders[0], unet)
    torch.testing.assert_close(run_unet(unet2), run_unet(unet))


def test_save_weights_casts_dtype_and_writes_hashes(tmp_path):
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet)
    path = str(tmp_path / "half.safetensors")
    written = network.save_weights(path, torch.float16, {"ss_network_module": "networks.lora"})
    state_dict, metadata = lora_format.load_lora_file(path)
    assert {v.dtype for v in state_dict.values()} == {torch.float16}
    assert metadata == written and metadata["ss_network_module"] == "networks.lora"
    assert len(metadata["sshs_model_hash"]) == 64


@pytest.mark.parametrize("name, network_args", [("tiny-sd1", {"conv_dim": "3"}), ("tiny-sdxl", {})])
def test_merge_to_equals_the_applied_network(tmp_path, name, network_args):
    encoders, unet = tiny(name)
    network = create_network(0.8, 4, 2.0, None, encoders, unet, **network_args)
    network.apply_to(encoders, unet)
    randomize_up(network)
    applied_unet, applied_te = run_unet(unet), [run_text_encoder(e) for e in encoders]

    encoders2, unet2 = tiny(name)
    weights_sd = {k: v.clone() for k, v in network.state_dict().items()}
    merged, _ = create_network_from_weights(0.8, None, None, encoders2, unet2, weights_sd=weights_sd, for_inference=True)
    merged.merge_to(encoders2, unet2, weights_sd, torch.float32, "cpu")
    torch.testing.assert_close(run_unet(unet2), applied_unet, rtol=1e-4, atol=1e-5)
    for encoder, expected in zip(encoders2, applied_te):
        torch.testing.assert_close(run_text_encoder(encoder), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_max_norm_regularization_caps_module_norms():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 4.0, None, encoders[0], unet)
    randomize_up(network, std=1.0)

    def norms():
        return [float((m.lora_up.weight @ m.lora_down.weight).norm()) * m.scale for m in network.text_encoder_loras]

    before = norms()
    cap = sorted(before)[len(before) // 2]  # half the modules are above the median
    n_unet_above = sum(
        float((m.lora_up.weight.flatten(1) @ m.lora_down.weight.flatten(1)).norm()) * m.scale > cap
        for m in network.unet_loras
    )
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(cap, "cpu")
    after = norms()
    assert scaled == sum(b > cap for b in before) + n_unet_above
    assert max(after) == pytest.approx(cap, rel=1e-5) and max_norm == pytest.approx(cap, rel=1e-5)
    for b, a in zip(before, after):
        assert a == pytest.approx(min(b, cap), rel=1e-5)
    assert 0 < mean_norm <= max_norm


def test_lora_module_rejects_other_layers():
    with pytest.raises(TypeError, match="needs a Linear or Conv2d module, got LayerNorm"):
        LoRAModule("lora_x", torch.nn.LayerNorm(4))


def test_interface_hooks_exist():
    encoders, unet = tiny("tiny-sd1")
    network = create_network(1.0, 4, 1.0, None, encoders[0], unet)
    assert network.is_mergeable() is True
    network.enable_gradient_checkpointing()
    assert [id(p) for p in network.get_trainable_params()] == [id(p) for p in network.parameters()]
