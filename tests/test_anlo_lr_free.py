"""ANLO(lr_free=True): the estimated step size, against a reference computed from stored snapshots; resume; groups."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from library.hina_anlo import _LR_FREE_D0, ANLO, LR_FREE_KEY, lora_module_key


pytestmark = pytest.mark.usefixtures("one_torch_thread")


FACTORS = {
    "lora": ("lora_down.weight", "lora_up.weight"),  # kohya: lora_up starts at zero
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),  # LyCORIS LoHa: hada_w2_a starts at zero
}


def make_params(
    family: str = "lora", modules: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[tuple[str, torch.Tensor]]:
    """Named factors of ``modules`` modules; the factor a LoRA / LoHa initialises to zero is zero."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for m in range(modules):
        for factor in FACTORS[family]:
            shape = (4, 6 + m) if factor.startswith(("lora_down", "hada_w1_a", "hada_w2_b")) else (5 + m, 4)
            zero = factor.startswith(("lora_up", "hada_w2_a"))
            random = torch.randn(shape, generator=generator, dtype=dtype) * 0.3
            value = torch.zeros(shape, dtype=dtype) if zero else random
            params.append((f"lora_unet_block_{m}.{factor}", torch.nn.Parameter(value)))
    return params


def gradients(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """A quadratic pull of every tensor towards a fixed target, plus noise that depends on the step."""
    generator = torch.Generator().manual_seed(1000 + step)
    grads = []
    for i, p in enumerate(params):
        target = torch.full_like(p, 0.5 if i % 2 else -0.25)
        grads.append((p.detach() - target) + 0.1 * torch.randn(p.shape, generator=generator))
    return grads


def run(optimizer: ANLO, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        for p, g in zip(params, gradients(params, step)):
            p.grad = g
        optimizer.step()


def groups_of(named: list[tuple[str, torch.Tensor]], names: bool = True, plus: bool = False) -> list[dict]:
    """One group, or LoRA+-style groups (the zero-start factors in a second group at 4x the lr)."""
    if not plus:
        group = {"params": [p for _, p in named]}
        if names:
            group["param_names"] = [n for n, _ in named]
        return [group]
    ups = [(n, p) for n, p in named if "lora_up" in n or "hada_w2_a" in n]
    downs = [(n, p) for n, p in named if (n, p) not in ups]
    result = []
    for chosen, lr in ((downs, None), (ups, 4.0)):
        group = {"params": [p for _, p in chosen]}
        if names:
            group["param_names"] = [n for n, _ in chosen]
        if lr is not None:
            group["lr"] = lr
        result.append(group)
    return result


def reference_estimates(snapshots: list[list[torch.Tensor]]) -> list[float]:
    """d at each step, from the parameters stored after every step: the way so far ``x_t`` (the start kept
    explicitly) and each step ``δ_t`` as differences of snapshots, their cosine as an inner product, over every
    tensor that started at zero; d_t+1 = d_t exp(c_t), the first step from zero counting as c = 1."""
    members = [i for i, t in enumerate(snapshots[0]) if bool((t == 0).all())]

    def flat(t: int, k: int = 0) -> torch.Tensor:  # snapshot t minus snapshot k, the members concatenated
        return torch.cat([(snapshots[t][i].double() - snapshots[k][i].double()).flatten() for i in members])

    out = [_LR_FREE_D0]
    for t in range(len(snapshots) - 2):
        way, step = flat(t), flat(t + 1, t)
        cosine = 1.0 if not way.any() else float(way @ step / (way.norm() * step.norm()))
        out.append(out[-1] * math.exp(cosine))
    return out


@pytest.mark.parametrize("family,names", [("lora", True), ("lora", False), ("loha", True)])
def test_estimate_and_step_size_match_a_reference_from_stored_snapshots(family, names):
    named = make_params(family, dtype=torch.float64)  # differences of snapshots exact enough to measure a 1e-6 step
    params = [p for _, p in named]
    optimizer = ANLO(groups_of(named, names), lr=1.0, lr_free=True, adaptive_eps=False, eps=0.0)
    layers = [lora_module_key(n) if names else i for i, (n, _) in enumerate(named)]
    snapshots = [[p.detach().clone() for p in params]]
    reported = []
    for step in range(12):
        run(optimizer, params, range(step, step + 1))
        snapshots.append([p.detach().clone() for p in params])
        reported.append(optimizer._last.step_size.double())
    expected = reference_estimates(snapshots)
    assert expected[-1] > 10 * _LR_FREE_D0  # the estimate grew: the test is not vacuous
    assert len(expected) == len(reported)
    for t, (want, sizes) in enumerate(zip(expected, reported)):
        torch.testing.assert_close(sizes, torch.full_like(sizes, want), rtol=1e-6, atol=0)  # one d for every tensor
        # the update of each layer (module, or tensor without names) has RMS lr * d: the step size is what was applied
        for layer in set(layers):
            members = [i for i, key in enumerate(layers) if key == layer]
            diff_sq = sum(float((snapshots[t + 1][i] - snapshots[t][i]).double().square().sum()) for i in members)
            numel = sum(params[i].numel() for i in members)
            assert math.sqrt(diff_sq / numel) == pytest.approx(want, rel=1e-6), (t, layer)


@pytest.mark.parametrize(
    "family,names,plus", [("lora", True, False), ("lora", False, False), ("lora", True, True), ("loha", True, False)]
)
def test_resume_continues_bit_identically(family, names, plus):
    def fresh():
        named = make_params(family)
        params = [p for _, p in named]
        return params, ANLO(groups_of(named, names, plus), lr=1.0, lr_free=True, weight_decay=0.01)

    straight_params, straight = fresh()
    run(straight, straight_params, range(10))

    first_params, first = fresh()
    run(first, first_params, range(5))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # a flag per tensor and three scalars, nothing per element
    assert saved[LR_FREE_KEY]["started_at_zero"].shape == (len(first_params),)
    assert saved[LR_FREE_KEY]["scalars"].shape == (3,)

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    named = make_params(family)
    for (_, p), value in zip(named, resumed_params):
        p.data.copy_(value)
    resumed = ANLO(groups_of(named, names, plus), lr=1.0, lr_free=True, weight_decay=0.01)
    resumed.load_state_dict(saved)
    resumed_params = [p for _, p in named]
    run(resumed, resumed_params, range(5, 10))
    for a, b in zip(straight_params, resumed_params):
        assert torch.equal(a, b)


def test_lora_plus_ratio_holds_and_the_multiplier_scales_the_step():
    named = make_params("lora", dtype=torch.float64)
    params = [p for _, p in named]
    optimizer = ANLO(groups_of(named, plus=True), lr=0.5, lr_free=True, adaptive_eps=False, eps=0.0)
    run(optimizer, params, range(6))
    before = [p.detach().clone() for p in params]
    run(optimizer, params, range(6, 7))
    sizes = optimizer._last.step_size
    stats = optimizer.get_normalization_stats()
    downs, ups = optimizer.param_groups
    # module 0: its down (group 0, lr 0.5) and up (group 1, lr 4) share one d and one unit-RMS normalization
    down, up = params[0], params[1]
    scale_sq = (sum(float(p.grad.double().square().sum()) for p in (down, up))) / (down.numel() + up.numel())
    for p, lr, b in ((down, 0.5, before[0]), (up, 4.0, before[1])):
        step = (p.detach() - b).double()
        expected = lr * sizes[0].item() * p.grad.double() / math.sqrt(scale_sq)
        torch.testing.assert_close(-step, expected, rtol=1e-9, atol=0)
    assert stats["lr_free_step_group1"] == pytest.approx(4.0 * stats["groups"][1]["lr_free_d"])
    assert stats["lr_free_step_group0"] == pytest.approx(0.5 * stats["groups"][0]["lr_free_d"])
    assert stats["lr_free_d"] == sizes[0].item()
    for key in ("lr_free_d", "lr_free_step_group0", "lr_free_step_group1"):
        assert isinstance(stats[key], float)
    assert downs["lr"] == 0.5 and ups["lr"] == 4.0


def test_the_steering_corrects_the_multiplier():
    """The cosine sees the steps taken, lr * d: a 16x larger lr ends at about the same step, with a 16x smaller d."""
    taken = {}
    for lr in (0.5, 8.0):
        named = make_params("lora")
        optimizer = ANLO(groups_of(named), lr=lr, lr_free=True)
        run(optimizer, [p for _, p in named], range(80))
        taken[lr] = lr * optimizer._last.step_size[0].item()
    assert taken[8.0] > 1e3 * _LR_FREE_D0 * 8.0  # d moved far from where it started: the test is not vacuous
    assert taken[8.0] == pytest.approx(taken[0.5], rel=0.2)


def test_decoupled_decay_scales_with_the_step_taken():
    p = torch.nn.Parameter(torch.full((3, 3), 2.0))
    optimizer = ANLO([("lora_unet_x.lora_down.weight", p)], lr=1.0, lr_free=True, weight_decay=0.1)
    p.grad = torch.zeros_like(p)  # no gradient step: only the decay, p *= 1 - lr * d * wd with d = d0
    with pytest.warns(UserWarning, match="no parameter with a gradient is zero"):
        optimizer.step()
    expected = torch.full((3, 3), 2.0) * (1 - 1.0 * _LR_FREE_D0 * 0.1)
    torch.testing.assert_close(p.detach(), expected.float(), rtol=0, atol=0)


def test_a_skipped_step_leaves_the_step_size_alone():
    named = make_params("lora")
    params = [p for _, p in named]
    optimizer = ANLO(groups_of(named), lr=1.0, lr_free=True)
    run(optimizer, params, range(4))
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    skipped_d = optimizer._last.step_size[0].item()
    run(optimizer, params, range(4, 5))  # no step was taken, so there is no cosine to steer by
    assert optimizer._last.step_size[0].item() == skipped_d
    run(optimizer, params, range(5, 6))
    assert optimizer._last.step_size[0].item() != skipped_d


def test_without_a_tensor_at_zero_it_warns_that_it_cannot_measure():
    named = [(n, torch.nn.Parameter(p.detach() + 0.1)) for n, p in make_params("lora")]  # trained weights
    params = [p for _, p in named]
    optimizer = ANLO(groups_of(named), lr=1.0, lr_free=True)
    with pytest.warns(UserWarning, match=r"no parameter with a gradient is zero.*--network_weights"):
        run(optimizer, params, range(1))
    run(optimizer, params, range(1, 3))
    assert optimizer._last.step_size[0].item() == pytest.approx(_LR_FREE_D0, rel=1e-6)


def test_a_state_of_the_earlier_distance_bound_continues_from_its_estimate():
    named = make_params("lora")
    params = [p for _, p in named]
    optimizer = ANLO(groups_of(named), lr=1.0, lr_free=True)
    run(optimizer, params, range(3))
    saved = optimizer.state_dict()
    flags = saved[LR_FREE_KEY]["started_at_zero"]
    earlier = torch.stack([flags, torch.zeros_like(flags), torch.full_like(flags, 3e-3)], dim=1)  # (tensors, 3)
    resumed = ANLO(groups_of(named), lr=1.0, lr_free=True)
    resumed.load_state_dict({**saved, LR_FREE_KEY: earlier})
    run(resumed, params, range(3, 4))  # no step of its own measured yet: the saved d as it was
    assert resumed._last.step_size[0].item() == pytest.approx(3e-3)
    assert torch.equal(resumed.state_dict()[LR_FREE_KEY]["started_at_zero"], flags)


def test_off_by_default_and_lr_defaults():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    assert ANLO([p]).defaults["lr"] == 1e-4
    optimizer = ANLO([p], lr_free=True)
    assert optimizer.defaults["lr"] == 1.0
    p.grad = torch.ones_like(p)
    ANLO([p]).step()
    off = ANLO([p])
    off.step()
    assert LR_FREE_KEY not in off.state_dict()
    assert "lr_free_d" not in off.get_normalization_stats()
    with pytest.warns(UserWarning, match="lr multiplies the estimated step size"):
        ANLO([p], lr=1e-4, lr_free=True)
    with pytest.raises(ValueError, match="lr_free"):
        ANLO([p], lr_free="yes")


def test_optimizer_args_turn_it_on_and_the_trainer_logs_each_groups_step():
    from library.optimizers import get_optimizer
    from library.trainer import optimizer_stats_logs
    from tests.test_optimizers import make_args

    named = make_params("lora")
    params = [p for _, p in named]
    groups = groups_of(named, plus=True)
    groups[1]["lr"] = 2.0
    args = make_args(optimizer_type="ANLO", optimizer_args=["lr_free=True"], learning_rate=1.0)
    _, _, optimizer = get_optimizer(args, groups)
    assert optimizer.lr_free and [g["lr"] for g in optimizer.param_groups] == [1.0, 2.0]
    run(optimizer, params, range(3))
    logs = optimizer_stats_logs(optimizer)
    stats = optimizer.get_normalization_stats()
    assert logs["optimizer/lr_free_step_group1"] == pytest.approx(2.0 * stats["groups"][1]["lr_free_d"])
    assert logs["optimizer/lr_free_d"] == pytest.approx(stats["lr_free_d"])


def test_pickling_keeps_the_option_and_the_estimate():
    import pickle

    named = make_params("lora")
    params = [p for _, p in named]
    optimizer = ANLO(groups_of(named), lr=1.0, lr_free=True)
    run(optimizer, params, range(4))
    copy = pickle.loads(pickle.dumps(optimizer))
    assert copy.lr_free
    for key, value in optimizer._lr_free.state_dict().items():
        assert torch.equal(copy._lr_free.state_dict()[key], value)
