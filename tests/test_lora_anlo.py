"""ANLO trains our LoRA network through ``prepare_optimizer_params`` groups, and a LyCORIS network alike.

The groups carry ``param_names``, so ANLO's layer mode normalizes per LoRA module (``lora_down`` + ``lora_up``,
even when LoRA+ puts them in different groups). Checked against a direct computation of
update_p = lr_group · √N · g_p / (‖g‖ + eps), over all parameters (global step) or over each module (layer step).
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import SeedANLO  # tests/helpers.py
from library.tiny_models import build_tiny
from networks.lora import create_network

EPS = 1e-8
TOKENS = torch.tensor([[0, 5, 17, 42, 99, 1, 1], [0, 7, 8, 9, 1, 1, 1]])


def tiny_sd1():
    parts = build_tiny("tiny-sd1", seed=0)
    for model in (parts["text_encoder"], parts["unet"]):
        model.requires_grad_(False)
    return parts["text_encoder"], parts["unet"]


def loss_of(text_encoder, unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    context = text_encoder(TOKENS).last_hidden_state
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    return (unet(sample, torch.tensor([100, 600]), context).sample - target).pow(2).mean()


def expected_step(groups, grads, mode: str) -> dict[str, torch.Tensor]:
    """Parameter changes p_before − p_after predicted from the definition."""
    lr_of = {name: group["lr"] for group in groups for name in group["param_names"]}
    if mode == "global":
        total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        n = sum(g.numel() for g in grads.values())
        return {name: lr_of[name] * math.sqrt(n) / (total + EPS) * g for name, g in grads.items()}
    modules: dict[str, list[str]] = {}
    for name in grads:
        modules.setdefault(name.rsplit(".lora_", 1)[0], []).append(name)
    expected = {}
    for names in modules.values():
        assert len(names) == 2  # lora_down and lora_up of one module
        norm = math.sqrt(sum(float(grads[n].double().pow(2).sum()) for n in names))
        numel = sum(grads[n].numel() for n in names)
        for name in names:
            expected[name] = lr_of[name] * math.sqrt(numel) / (norm + EPS) * grads[name]
    return expected


def test_anlo_steps_on_lora_groups_match_the_definition():
    text_encoder, unet = tiny_sd1()
    network = create_network(1.0, 4, 2.0, None, text_encoder, unet, loraplus_lr_ratio="4")
    network.apply_to(text_encoder, unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero lora_up so that lora_down gets gradients too
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    groups, descriptions = network.prepare_optimizer_params(2e-4, 1e-3, 1e-3)
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    optimizer = SeedANLO(groups, lr=1e-3, eps=EPS, adaptive_eps=False, normalization="alternating", normalize_frequency=1)
    params = dict(network.named_parameters())

    for mode in ("global", "layer"):  # step 0 is global, step 1 layer (normalize_frequency=1)
        optimizer.zero_grad(set_to_none=True)
        loss_of(text_encoder, unet).backward()
        grads = {name: p.grad.detach().clone() for name, p in params.items()}
        before = {name: p.detach().clone() for name, p in params.items()}
        expected = expected_step(groups, grads, mode)
        optimizer.step()
        for name, p in params.items():  # atol: the fp32 ulp of the weights
            torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-4, atol=5e-8)


def test_layer_mode_without_param_names_normalizes_each_tensor():
    text_encoder, unet = tiny_sd1()
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet)
    network.apply_to(text_encoder, unet, apply_text_encoder=False)
    groups, _ = network.prepare_optimizer_params(None, 1e-3, 1e-3)
    unnamed = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    optimizer = SeedANLO(unnamed, lr=1e-3, eps=EPS, adaptive_eps=False, normalization="layer")
    loss_of(text_encoder, unet).backward()
    params = [p for g in unnamed for p in g["params"]]
    grads = [p.grad.detach().clone() for p in params]
    before = [p.detach().clone() for p in params]
    optimizer.step()
    for p, g, b in zip(params, grads, before):
        if g.abs().sum() == 0:  # lora_down: no gradient while lora_up is zero
            assert torch.equal(p.detach(), b)
            continue
        expected = 1e-3 * math.sqrt(g.numel()) / (float(g.norm()) + EPS) * g
        torch.testing.assert_close(b - p.detach(), expected, rtol=1e-4, atol=5e-8)


def test_lycoris_network_trains_with_anlo():
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    text_encoder, unet = tiny_sd1()
    # "attn-mlp": stock LyCORIS 4.1's default "full" preset collides (tests/test_lycoris_adapter.py)
    network = lycoris_kohya.create_network(1.0, 4, 1.0, None, text_encoder, unet, algo="locon", preset="attn-mlp")
    network.apply_to(text_encoder, unet, True, True)
    network.prepare_grad_etc(text_encoder, unet)
    groups = network.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    groups = groups[0] if isinstance(groups, tuple) else groups
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    optimizer = SeedANLO(groups, lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(text_encoder, unet)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    changed = [name for name, p in network.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(changed) == len(before)  # every LoCon factor moved (up first, then down through it)


def test_lycoris_groups_get_names_so_anlo_normalizes_each_module():
    """LyCORIS hands over groups without names; ``with_param_names`` (the trainer applies it) adds them, and ANLO's
    layer step then gives each module (down + up together) unit RMS, not each tensor."""
    from library.optimizers import with_param_names

    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    text_encoder, unet = tiny_sd1()
    network = lycoris_kohya.create_network(1.0, 4, 1.0, None, text_encoder, unet, algo="locon", preset="attn-mlp")
    network.apply_to(text_encoder, unet, False, True)
    groups = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    groups = groups[0] if isinstance(groups, tuple) else groups
    groups = with_param_names(groups, network.named_parameters())
    assert all(len(g["param_names"]) == len(g["params"]) for g in groups)
    named = dict(network.named_parameters())
    assert all(named[n] is p for g in groups for n, p in zip(g["param_names"], g["params"]))

    lr = 1e-3
    optimizer = SeedANLO(groups, lr=lr, adaptive_eps=False)  # every step a layer step (the default)
    for step in range(2):
        for name, p in named.items():
            scale = 10.0 if "lora_up" in name else 1.0  # the halves of a module get gradients of different sizes
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step + p.numel())) * scale
        before = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
        optimizer.step()
    modules: dict[str, list[torch.Tensor]] = {}
    for name, old in before.items():
        modules.setdefault(name.rsplit(".lora_", 1)[0], []).append((old - named[name].detach()) / lr)
    for updates in modules.values():
        squares = sum(float(u.double().pow(2).sum()) for u in updates)
        assert squares / sum(u.numel() for u in updates) == pytest.approx(1.0, rel=1e-4)
    per_tensor_rms = [float(u.pow(2).mean().sqrt()) for updates in modules.values() for u in updates]
    assert max(per_tensor_rms) > 1.3  # per tensor the RMS is not 1: the norm really spans the module
