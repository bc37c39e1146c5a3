"""A small SD-architecture diffusion model pretrained on scikit-learn's digits, for the LoRA-quality benchmark.

The data ships with scikit-learn (``load_digits``: 1797 scans of 8×8 pixels, values 0..16), so nothing is
downloaded. Each scan is resized to ``image_size``² (bilinear, ``align_corners=False``; the identity at the native
8 px) and scaled to [-1, 1]; the pixels are used directly as a
one-channel "latent" (no VAE). The model is a diffusers ``UNet2DConditionModel`` with cross-attention at every
level, conditioned on a fixed random "caption" embedding per digit (``tokens`` × ``cross_attention_dim``), and
trained with Stable Diffusion's DDPM ε-objective (scaled-linear betas 0.00085..0.012, 1000 steps).

``pretrained_unet(config, cache_dir)`` trains it on every digit except ``config.concept`` (9 by default) once and
caches the weights on disk, keyed by a hash of the config; the benchmark then teaches the held-out digit to a LoRA
under a caption the model has never seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsConfig:
    """Everything that determines the pretrained model; its hash names the cache file."""

    concept: int = 9  # the digit held out of pretraining and taught to the LoRA
    image_size: int = 8
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 32
    tokens: int = 4
    pretrain_steps: int = 1500
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    seed: int = 0

    def cache_key(self) -> str:
        """A short stable hash of every field."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training noise schedule."""
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )


def load_digit_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, image_size, image_size) floats in [-1, 1], and their labels (N,)."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.from_numpy(digits.target).long()
    return images, labels


def caption_embeddings(config: DigitsConfig) -> torch.Tensor:
    """A fixed random "caption" per digit: (NUM_CLASSES, tokens, cross_attention_dim), unit-variance entries."""
    generator = torch.Generator().manual_seed(10_000 + config.seed)
    return torch.randn(NUM_CLASSES, config.tokens, config.cross_attention_dim, generator=generator)


def build_unet(config: DigitsConfig) -> UNet2DConditionModel:
    """The SD-architecture U-Net at toy size: cross-attention at every level and in the mid block."""
    levels = len(config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=config.cross_attention_dim,
        norm_num_groups=min(32, config.block_out_channels[0]),
    )


def diffusion_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    context: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Per-sample ε-prediction MSE, shape (B,)."""
    noisy = scheduler.add_noise(images, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
    return F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))


def pretrain(config: DigitsConfig) -> UNet2DConditionModel:
    """Train the U-Net from scratch on every digit except ``config.concept``."""
    torch.manual_seed(config.seed)
    unet = build_unet(config)
    scheduler = noise_scheduler()
    images, labels = load_digit_images(config.image_size)
    keep = labels != config.concept
    images, labels = images[keep], labels[keep]
    captions = caption_embeddings(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    unet.train()
    for _ in range(config.pretrain_steps):
        index = torch.randint(0, len(images), (config.pretrain_batch_size,), generator=generator)
        batch = images[index]
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        loss = diffusion_loss(unet, scheduler, batch, captions[labels[index]], noise, timesteps).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    unet.eval()
    return unet


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temp file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pretrained_unet(config: DigitsConfig, cache_dir: Path) -> UNet2DConditionModel:
    """The pretrained U-Net for ``config``: loaded from ``cache_dir`` if cached, else trained and cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"digits_unet_{config.cache_key()}.safetensors"
    if path.exists():
        unet = build_unet(config)
        unet.load_state_dict(load_file(path))
        unet.eval()
        return unet
    unet = pretrain(config)
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    _save_atomic(state, path, metadata={"config": json.dumps(dataclasses.asdict(config), sort_keys=True)})
    return unet
