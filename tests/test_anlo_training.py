"""A small real LoRA training: ANLO against AdamW on a tiny diffusers U-Net.

A rank-4 LoRA (kohya layout: ``lora_down`` kaiming-uniform, ``lora_up`` zeros) on every attention
projection of a tiny ``UNet2DConditionModel`` learns to reproduce the output of the same U-Net carrying a
random "teacher" LoRA. Both optimizers get the same lr, steps and data; ANLO must bring the loss as far
down as AdamW.
"""

from __future__ import annotations

import math

import pytest
import torch

from library.hina_anlo import ANLO

diffusers = pytest.importorskip("diffusers")

STEPS = 50
LR = 1e-3


class LoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.lora_down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x))


def _unet_with_lora(rank: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    unet.requires_grad_(False)
    for module in list(unet.modules()):
        if isinstance(module, diffusers.models.attention_processor.Attention):
            for name in ("to_q", "to_k", "to_v"):
                setattr(module, name, LoRALinear(getattr(module, name), rank))
            module.to_out[0] = LoRALinear(module.to_out[0], rank)
    return unet


def _train(make_optimizer) -> list[float]:
    unet = _unet_with_lora()
    lora = [(n, p) for n, p in unet.named_parameters() if ".lora_" in n]
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 500])
    context = torch.randn(2, 8, 32, generator=gen)
    with torch.no_grad():  # the target: the same U-Net with a random teacher LoRA
        initial = [p.clone() for _, p in lora]
        for _, p in lora:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        target = unet(latents, timesteps, context).sample
        for (_, p), value in zip(lora, initial):
            p.copy_(value)
    for _, p in lora:
        p.requires_grad_(True)
    optimizer = make_optimizer(lora)
    losses = []
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(unet(latents, timesteps, context).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_anlo_trains_a_lora_as_far_as_adamw():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adamw = _train(lambda named: torch.optim.AdamW([p for _, p in named], lr=LR, weight_decay=0.0))
        anlo = _train(lambda named: ANLO(named, lr=LR))  # named: layers = LoRA modules
    finally:
        torch.set_num_threads(threads)
    assert adamw[0] == anlo[0]  # same start
    assert adamw[-1] < 0.5 * adamw[0]  # the task is learnable at this lr
    assert anlo[-1] <= 1.1 * adamw[-1], (anlo[-1], adamw[-1])
