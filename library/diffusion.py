"""The diffusion side of the training loss: noise, timesteps, targets and per-sample loss weights.

Everything here is a pure function of tensors and a diffusers ``DDPMScheduler`` (only its ``alphas_cumprod``,
``betas`` and ``config.num_train_timesteps`` are read), so each formula can be tested on its own. The
trainer strings them together in the order sd-scripts uses:

    noise = sample_noise(latents, ...)                       # + noise offset / multires noise
    timesteps = sample_timesteps(batch, min_t, max_t, device)
    noisy = scheduler.add_noise(latents, noise (+ input perturbation), timesteps)
    target = noise, or velocity_target(scheduler, latents, noise, timesteps) for v-parameterization
    loss = per_sample_loss(pred, target, loss_type, huber_c) * loss_weights
    loss = loss * snr_loss_weight(...)                      # min-SNR γ, debiased estimation, ...

SNR(t) = ᾱ_t / (1 − ᾱ_t) with ᾱ = ``alphas_cumprod``. ``make_noise_scheduler`` builds that scheduler.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# SNR-based weights cap SNR here so the nearly noise-free t ≈ 0 does not dominate a batch.
SNR_CAP = 1000.0


def make_noise_scheduler(v_parameterization: bool = False) -> DDPMScheduler:
    """The training noise schedule of SD 1.x/2.x/SDXL (sd-scripts builds it rather than loading it)."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at each timestep (float32, on ``timesteps.device``)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    a = alphas_cumprod[timesteps]
    return a / (1.0 - a)


def fix_betas_for_zero_terminal_snr(noise_scheduler) -> None:
    """Rescale the scheduler's betas so the last timestep has SNR 0 (Lin et al. 2023, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed", algorithm 1), updating ``alphas`` and ``alphas_cumprod``.
    """
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(torch.float64)
    sqrt_ac = alphas_cumprod.sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    alphas_cumprod = sqrt_ac**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    noise_scheduler.betas = (1.0 - alphas).to(torch.float32)
    noise_scheduler.alphas = alphas.to(torch.float32)
    noise_scheduler.alphas_cumprod = alphas_cumprod.to(torch.float32)


def sample_timesteps(batch_size: int, min_timestep: int, max_timestep: int, device: torch.device) -> torch.Tensor:
    """Timesteps drawn uniformly from ``[min_timestep, max_timestep)``; all equal to ``max_timestep`` when the
    range is empty (sd-scripts' behaviour for ``--min_timestep == --max_timestep``). Drawn on the CPU so a run
    is reproducible across devices."""
    if min_timestep < max_timestep:
        timesteps = torch.randint(min_timestep, max_timestep, (batch_size,))
    else:
        timesteps = torch.full((batch_size,), max_timestep)
    return timesteps.long().to(device)


def apply_noise_offset(
    latents: torch.Tensor, noise: torch.Tensor, noise_offset: float, adaptive_noise_scale: float | None = None
) -> torch.Tensor:
    """``noise + offset · randn(B, C, 1, 1)``: a per-channel constant shift that lets the model learn overall
    brightness. With ``adaptive_noise_scale`` the offset grows with |mean latent| per channel (clamped ≥ 0)."""
    offset: float | torch.Tensor = noise_offset
    if adaptive_noise_scale:
        latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = (noise_offset + adaptive_noise_scale * latent_mean).clamp(min=0.0)
    shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device, dtype=latents.dtype)
    return noise + offset * shift


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise: add ever coarser upsampled noise, weight ``discount**i`` at level i
    with a random downscale factor in [2, 4) per level, then renormalise to unit standard deviation."""
    batch, channels, height, width = noise.shape
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    for i in range(iterations):
        factor = random.random() * 2 + 2
        h, w = max(1, int(height / factor**i)), max(1, int(width / factor**i))
        coarse = torch.randn(batch, channels, h, w, device=noise.device, dtype=noise.dtype)
        noise = noise + upsample(coarse) * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def sample_noise(
    latents: torch.Tensor,
    noise_offset: float | None = None,
    noise_offset_random_strength: bool = False,
    adaptive_noise_scale: float | None = None,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float = 0.3,
) -> torch.Tensor:
    """Gaussian noise shaped like ``latents`` with the optional noise offset and multi-resolution noise.

    ``noise_offset_random_strength`` draws the offset uniformly from [0, noise_offset) each step.
    """
    noise = torch.randn_like(latents)
    if noise_offset:
        strength = noise_offset
        if noise_offset_random_strength:
            strength = torch.rand(1, device=latents.device) * noise_offset
        noise = apply_noise_offset(latents, noise, strength, adaptive_noise_scale)
    if multires_noise_iterations:
        noise = pyramid_noise(noise, multires_noise_iterations, multires_noise_discount)
    return noise


def input_perturbation(
    noise: torch.Tensor, ip_noise_gamma: float | None, random_strength: bool = False
) -> torch.Tensor:
    """The noise that goes into ``add_noise`` under input perturbation (``--ip_noise_gamma``):
    ``noise + γ · randn``; the loss target keeps the unperturbed ``noise``."""
    if not ip_noise_gamma:
        return noise
    strength = torch.rand(1, device=noise.device) * ip_noise_gamma if random_strength else ip_noise_gamma
    return noise + strength * torch.randn_like(noise)


def velocity_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The v-parameterization target v = √ᾱ_t · ε − √(1 − ᾱ_t) · x₀ (Salimans & Ho 2022)."""
    return noise_scheduler.get_velocity(latents, noise, timesteps)


def huber_threshold(
    huber_schedule: str, huber_c: float, huber_scale: float, noise_scheduler, timesteps: torch.Tensor
) -> torch.Tensor:
    """Per-sample threshold c of the (pseudo-)Huber loss for ``--huber_schedule``.

    * ``constant``: c · scale
    * ``exponential``: c^(t / T) · scale (from ``scale`` at t = 0 down to c · scale at t = T)
    * ``snr``: (1 − c) / (1 + σ_t)² + c with σ_t = √((1 − ᾱ_t) / ᾱ_t)
    """
    if huber_schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps.float()) * huber_scale
    if huber_schedule == "snr":
        sigmas = snr(noise_scheduler, timesteps).rsqrt()
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    raise ValueError(f"--huber_schedule: unknown schedule {huber_schedule!r}; expected one of {HUBER_SCHEDULES}")


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    huber_c: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise loss averaged over every dimension but the batch: shape (B,), float32.

    ``huber``: 2c(√(d² + c²) − c); ``smooth_l1``: 2(√(d² + c²) − c) — both need the per-sample ``huber_c``.
    ``mask`` (broadcastable, e.g. (B, 1, h, w) from ``library.masks.latent_loss_mask``) multiplies the
    element-wise loss before the mean (sd-scripts' masked loss: no renormalisation by the masked area).
    """
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        loss = F.mse_loss(prediction, target, reduction="none")
    elif loss_type == "l1":
        loss = F.l1_loss(prediction, target, reduction="none")
    elif loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs huber_c (see huber_threshold)")
        c = huber_c.float().view(-1, *([1] * (prediction.ndim - 1)))
        loss = 2.0 * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
        if loss_type == "huber":
            loss = loss * c
    else:
        raise ValueError(f"--loss_type: unknown loss {loss_type!r}; expected one of {LOSS_TYPES}")
    if mask is not None:
        loss = loss * mask
    return loss.mean(dim=list(range(1, loss.ndim)))


def min_snr_weight(snr_t: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023): min(SNR, γ) / SNR for ε-prediction,
    min(SNR, γ) / (SNR + 1) for v-prediction."""
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1.0) if v_prediction else clipped / snr_t


def debiased_estimation_weight(snr_t: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """``--debiased_estimation_loss`` weight: 1 / √SNR for ε-prediction, 1 / (SNR + 1) for v-prediction,
    with SNR capped at 1000 (SNR is infinite-like near t = 0)."""
    capped = torch.clamp(snr_t, max=SNR_CAP)
    return 1.0 / (capped + 1.0) if v_prediction else torch.rsqrt(capped)


def v_like_noise_scale(snr_t: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1) with SNR capped at 1000: the ratio between an ε-loss and a v-loss at the same t.

    ``--scale_v_pred_loss_like_noise_pred`` multiplies the loss by it; ``--v_pred_like_loss w`` adds
    ``w · loss / scale`` (see ``add_v_prediction_like_loss``)."""
    capped = torch.clamp(snr_t, max=SNR_CAP)
    return capped / (capped + 1.0)


def add_v_prediction_like_loss(loss: torch.Tensor, snr_t: torch.Tensor, weight: float) -> torch.Tensor:
    """``--v_pred_like_loss``: ``loss + weight · loss / v_like_noise_scale(SNR)``."""
    return loss + loss / v_like_noise_scale(snr_t) * weight
