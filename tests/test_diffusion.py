"""library/diffusion.py: each formula checked against the scheduler's tables or an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from library import diffusion


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )


def _snr_from_betas(t: int) -> float:
    """SNR at t computed from scratch in float64: ᾱ_t = Π (1 − β_i), β from the scaled-linear schedule."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.prod(1.0 - betas[: t + 1]).item()
    return alpha_bar / (1.0 - alpha_bar)


def test_snr_matches_alphas_cumprod(scheduler):
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    got = diffusion.snr(scheduler, timesteps)
    expected = torch.tensor([_snr_from_betas(int(t)) for t in timesteps], dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_weight_closed_form(scheduler, v_prediction):
    gamma = 5.0
    timesteps = torch.tensor([1, 50, 200, 600, 999])
    weights = diffusion.min_snr_weight(diffusion.snr(scheduler, timesteps), gamma, v_prediction)
    for t, w in zip(timesteps.tolist(), weights.tolist()):
        s = _snr_from_betas(t)
        expected = min(s, gamma) / (s + 1.0 if v_prediction else s)
        assert w == pytest.approx(expected, rel=1e-4)
    if not v_prediction:
        # low t has SNR ≫ γ (down-weighted), high t has SNR < γ (weight exactly 1)
        assert weights[0] < 0.01 and weights[-1] == pytest.approx(1.0)


def test_velocity_target_formula(scheduler):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 400, 999])
    velocity = diffusion.velocity_target(scheduler, latents, noise, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        s = _snr_from_betas(t)
        alpha_bar = s / (1.0 + s)
        expected = math.sqrt(alpha_bar) * noise[i] - math.sqrt(1.0 - alpha_bar) * latents[i]
        torch.testing.assert_close(velocity[i], expected, rtol=1e-4, atol=1e-5)


def test_noise_offset_is_a_per_channel_constant_shift():
    latents = torch.zeros(2, 4, 16, 16)
    torch.manual_seed(0)
    plain = diffusion.sample_noise(latents)
    torch.manual_seed(0)
    offset = diffusion.sample_noise(latents, noise_offset=0.5)
    assert offset.shape == latents.shape
    shift = offset - plain
    # the difference is constant over each (sample, channel) plane and differs between planes
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert shift[:, :, 0, 0].std() > 0.05
    # shift = 0.5 · randn(B, C, 1, 1) drawn right after the noise
    torch.manual_seed(0)
    torch.randn_like(latents)
    expected = 0.5 * torch.randn(2, 4, 1, 1)
    torch.testing.assert_close(shift[:, :, :1, :1], expected)


def test_adaptive_noise_scale_grows_offset_with_latent_mean():
    latents = torch.full((1, 4, 8, 8), 2.0)
    noise = torch.zeros_like(latents)
    torch.manual_seed(0)
    shifted = diffusion.apply_noise_offset(latents, noise, 0.1, adaptive_noise_scale=0.5)
    torch.manual_seed(0)
    draw = torch.randn(1, 4, 1, 1)
    torch.testing.assert_close(shifted[:, :, :1, :1], (0.1 + 0.5 * 2.0) * draw)


def test_pyramid_noise_is_unit_std_and_spatially_correlated():
    torch.manual_seed(0)
    base = torch.randn(4, 4, 32, 32)
    pyramid = diffusion.pyramid_noise(base.clone(), iterations=6, discount=0.8)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-4)
    # neighbouring pixels become correlated (white noise has ~0 correlation)
    a, b = pyramid[..., :, :-1].flatten(), pyramid[..., :, 1:].flatten()
    correlation = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert correlation > 0.2


def test_timesteps_uniform_in_half_open_range():
    torch.manual_seed(0)
    timesteps = diffusion.sample_timesteps(20000, 100, 200, torch.device("cpu"))
    assert timesteps.dtype == torch.long
    assert timesteps.min() == 100 and timesteps.max() == 199
    assert timesteps.float().mean().item() == pytest.approx(149.5, abs=1.0)
    fixed = diffusion.sample_timesteps(3, 500, 500, torch.device("cpu"))
    assert fixed.tolist() == [500, 500, 500]


def test_per_sample_losses_against_direct_computation():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    diff = pred - target
    torch.testing.assert_close(diffusion.per_sample_loss(pred, target, "l2"), (diff**2).flatten(1).mean(1))
    torch.testing.assert_close(diffusion.per_sample_loss(pred, target, "l1"), diff.abs().flatten(1).mean(1))
    c = torch.tensor([0.1, 0.5, 1.0])
    huber = diffusion.per_sample_loss(pred, target, "huber", c)
    for i in range(3):
        ci = c[i].item()
        expected = (2 * ci * (torch.sqrt(diff[i] ** 2 + ci**2) - ci)).mean()
        assert huber[i].item() == pytest.approx(expected.item(), rel=1e-5)
    # pseudo-Huber grows like 2c·|d| for |d| ≫ c (L1-like), unlike the squared error
    large = diffusion.per_sample_loss(torch.full((1, 1), 100.0), torch.zeros(1, 1), "huber", torch.tensor([0.5]))
    assert large.item() == pytest.approx(2 * 0.5 * 100.0, rel=1e-2)


def test_unknown_loss_type_is_named():
    with pytest.raises(ValueError, match="--loss_type: unknown loss 'l3'"):
        diffusion.per_sample_loss(torch.zeros(1, 1), torch.zeros(1, 1), "l3")
    with pytest.raises(ValueError, match="needs huber_c"):
        diffusion.per_sample_loss(torch.zeros(1, 1), torch.zeros(1, 1), "huber")


def test_huber_schedules(scheduler):
    timesteps = torch.tensor([0, 500, 1000 - 1])
    constant = diffusion.huber_threshold("constant", 0.1, 2.0, scheduler, timesteps)
    torch.testing.assert_close(constant, torch.full((3,), 0.2))
    exponential = diffusion.huber_threshold("exponential", 0.1, 1.0, scheduler, timesteps)
    torch.testing.assert_close(exponential, 0.1 ** (timesteps.float() / 1000))
    by_snr = diffusion.huber_threshold("snr", 0.1, 1.0, scheduler, timesteps)
    sigma = torch.tensor([1.0 / math.sqrt(_snr_from_betas(int(t))) for t in timesteps])
    torch.testing.assert_close(by_snr, 0.9 / (1 + sigma) ** 2 + 0.1, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="--huber_schedule"):
        diffusion.huber_threshold("cosine", 0.1, 1.0, scheduler, timesteps)


def test_debiased_and_v_like_weights(scheduler):
    timesteps = torch.tensor([0, 300, 999])
    snr_t = diffusion.snr(scheduler, timesteps)
    capped = snr_t.clamp(max=1000.0)
    torch.testing.assert_close(diffusion.debiased_estimation_weight(snr_t, False), 1 / capped.sqrt())
    torch.testing.assert_close(diffusion.debiased_estimation_weight(snr_t, True), 1 / (capped + 1))
    loss = torch.ones(3)
    torch.testing.assert_close(
        diffusion.add_v_prediction_like_loss(loss, snr_t, 0.5), loss + 0.5 * (capped + 1) / capped
    )


def test_zero_terminal_snr_rescale():
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    first = scheduler.alphas_cumprod[0].item()
    diffusion.fix_betas_for_zero_terminal_snr(scheduler)
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(first, rel=1e-6)
    torch.testing.assert_close(torch.cumprod(scheduler.alphas, 0), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
