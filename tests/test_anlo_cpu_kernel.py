"""ANLO's fused CPU kernel (library/anlo_cpu_kernel.py): its two passes against torch computed in float64,
the optimizer's fused path against its torch path, and the fallbacks when the kernel cannot be built."""

import logging

import pytest
import torch

from library import anlo_cpu_kernel
from library.hina_anlo import ANLO

KERNEL = anlo_cpu_kernel.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C compiler: the fused CPU kernel is unavailable")

# Sizes around the kernel's 16-element vector step and 4096-element blocks, and an empty tensor.
SIZES = [0, 1, 15, 16, 17, 4095, 4096, 4097, 3 * 4096 + 5, 100_003]


def _tensors(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) * (1 + i) for i, n in enumerate(sizes)]


def _numels(tensors):
    return torch.tensor([t.numel() for t in tensors], dtype=torch.int64)


@needs_kernel
def test_squared_norms_match_float64():
    grads = _tensors(SIZES, seed=0)
    got = anlo_cpu_kernel.batch(KERNEL, grads, grads, _numels(grads)).squared_norms()
    expected = torch.stack([g.double().square().sum() for g in grads])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)


@needs_kernel
def test_squared_norms_propagate_non_finite_values():
    grads = _tensors([40, 40, 40], seed=1)
    grads[0][7], grads[1][33] = float("inf"), float("nan")
    got = anlo_cpu_kernel.batch(KERNEL, grads, grads, _numels(grads)).squared_norms()
    assert got[0] == float("inf") and got[1].isnan() and got[2].isfinite()


@needs_kernel
@pytest.mark.parametrize("with_decay", [False, True])
def test_update_matches_torch_arithmetic(with_decay):
    params, grads = _tensors(SIZES, seed=2), _tensors(SIZES, seed=3)
    coefs = torch.linspace(-0.5, 0.25, len(SIZES))
    decays = torch.linspace(0.9, 1.0, len(SIZES)) if with_decay else None
    expected = [p * (decays[i] if with_decay else 1.0) + coefs[i] * g for i, (p, g) in enumerate(zip(params, grads))]
    anlo_cpu_kernel.batch(KERNEL, params, grads, _numels(params)).update_(coefs, decays)
    for got, want in zip(params, expected):
        assert torch.equal(got, want)  # no FMA contraction: both round p * d and c * g, then the sum


@needs_kernel
@pytest.mark.parametrize("mode_steps", [1, 2])
def test_fused_optimizer_agrees_with_the_torch_path(mode_steps):
    """Two groups with LoRA+ lrs, module-level layers, decoupled decay and a missing gradient: the fused
    and foreach paths agree to float32 rounding over a few steps of both modes."""
    shapes = [(8, 32), (64, 8), (4, 16), (16, 4), (33,)]
    names = ["a.lora_down.weight", "a.lora_up.weight", "b.lora_down.weight", "b.lora_up.weight", "c.bias"]
    results = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(4)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        groups = [
            {"params": params[0::2], "param_names": names[0::2], "lr": 1e-2},
            {"params": params[1::2], "param_names": names[1::2], "lr": 1.6e-1, "weight_decay": 0.1},
        ]
        opt = ANLO(
            groups, fused=fused, foreach=None if fused else True, normalization="alternating",
            normalize_frequency=mode_steps,
        )  # fmt: skip
        for step in range(4):
            for i, p in enumerate(params):
                p.grad = None if (step, i) == (2, 4) else torch.randn(p.shape, generator=gen)
            opt.step()
        results.append([p.detach() for p in params])
    for fused_param, foreach_param in zip(*results):
        torch.testing.assert_close(fused_param, foreach_param, rtol=1e-6, atol=1e-7)


@needs_kernel
def test_no_batch_for_non_contiguous_tensors():
    matrix = torch.zeros(4, 6)
    assert anlo_cpu_kernel.batch(KERNEL, [matrix], [matrix.t().contiguous().t()], _numels([matrix])) is None
    assert anlo_cpu_kernel.batch(KERNEL, [matrix], [matrix], _numels([matrix])) is not None


@needs_kernel
def test_non_contiguous_tensors_take_the_torch_path():
    weight = torch.randn(6, 4).t().requires_grad_()  # a transposed view: not contiguous
    weight.grad = torch.randn(4, 6)
    reference = weight.detach().clone()
    scale = (weight.numel() ** 0.5) / (weight.grad.norm() + 1e-7)  # step 0: global mode, eps boosted 10x
    ANLO([weight], lr=0.1, fused=True).step()
    torch.testing.assert_close(weight.detach(), reference - 0.1 * scale * weight.grad)


def test_fused_true_rejects_other_dtypes():
    with pytest.raises(ValueError, match=r"fused=True.*float32 CPU parameters only, got torch.float64"):
        ANLO([torch.zeros(3, dtype=torch.float64, requires_grad=True)], fused=True)


def test_fused_and_foreach_cannot_both_be_true():
    with pytest.raises(ValueError, match="foreach/fused"):
        ANLO([torch.zeros(3, requires_grad=True)], fused=True, foreach=True)


def test_a_failed_build_falls_back_with_a_log_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="library.anlo_cpu_kernel"):
        assert anlo_cpu_kernel.build("/bin/false", tmp_path) is None
    assert "could not build the fused CPU kernel with /bin/false" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_without_the_kernel_fused_none_uses_torch_and_fused_true_refuses(monkeypatch):
    monkeypatch.setattr(anlo_cpu_kernel, "load", lambda: None)
    weight = torch.ones(4, requires_grad=True)
    weight.grad = torch.full((4,), 2.0)
    ANLO([weight], lr=0.5, adaptive_eps=False, eps=0.0).step()
    torch.testing.assert_close(weight.detach(), torch.full((4,), 0.5))  # unit-RMS step of lr
    with pytest.raises(RuntimeError, match="fused CPU kernel is unavailable"):
        ANLO([weight], fused=True)


def test_the_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("ANLO_CPU_KERNEL", "0")
    assert anlo_cpu_kernel.load.__wrapped__() is None


@needs_kernel
def test_the_library_is_built_once_and_reused(tmp_path):
    compiler = anlo_cpu_kernel.shutil.which("cc") or anlo_cpu_kernel.shutil.which("gcc")
    assert anlo_cpu_kernel.build(compiler, tmp_path) is not None
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    assert anlo_cpu_kernel.build(compiler, tmp_path) is not None
    assert [p.stat().st_mtime_ns for p in tmp_path.iterdir()] == [mtime]
