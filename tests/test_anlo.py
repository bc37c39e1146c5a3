"""Unit tests of the ANLO optimizer (library/hina_anlo.py).

The arithmetic is checked against ``reference_anlo`` below: an independent float64 implementation of
the definition in docs/ANLO.md, written with per-element Python loops over plain lists.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import pickle
import warnings

import pytest
import torch

from helpers import SeedANLO  # tests/helpers.py
from library import hina_anlo
from library.hina_anlo import ANLO, lora_module_key

# --------------------------------------------------------------------------------------------------
# independent reference


def _flat(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().reshape(-1).tolist()]


def reference_anlo(
    params, grad_steps, config, layer_of, normalize_frequency=1, start_step=0, normalization="alternating"
):
    """Run ANLO's definition in float64 with Python loops.

    params: list of tensors (initial values). grad_steps: list of steps, each a list of gradients
    (``None`` = no gradient). config: one dict per parameter with lr, eps, weight_decay, decoupled,
    global_weight, layer_weight, adaptive_eps, cautious, threshold, scale. layer_of: layer id of each
    parameter. normalization: "alternating", or "global" / "layer" on every step. Returns the final values
    as lists of floats.
    """
    values = [_flat(p) for p in params]
    for step_offset, grads in enumerate(grad_steps):
        step = start_step + step_offset
        active = [i for i, g in enumerate(grads) if g is not None]
        raw = {i: _flat(grads[i]) for i in active}
        upd = {}
        for i in active:
            c = config[i]
            coupled = c["weight_decay"] != 0 and not c["decoupled"]
            upd[i] = [g + c["weight_decay"] * p if coupled else g for g, p in zip(raw[i], values[i])]

        def eps_t(c):
            boost = 1 + 9 * max(0.0, 1 - step / 1000) if c["adaptive_eps"] else 1.0
            return c["eps"] * boost

        scale = {}
        if normalization == "alternating":
            mode = "global" if (step // normalize_frequency) % 2 == 0 else "layer"
        else:
            mode = normalization
        if mode == "global":
            n_total = sum(len(upd[i]) for i in active)
            norm = math.sqrt(sum(x * x for i in active for x in upd[i]))
            for i in active:
                scale[i] = config[i]["global_weight"] * math.sqrt(n_total) / (norm + eps_t(config[i]))
        else:
            for i in active:
                members = [j for j in active if layer_of[j] == layer_of[i]]
                n_layer = sum(len(upd[j]) for j in members)
                norm = math.sqrt(sum(x * x for j in members for x in upd[j]))
                scale[i] = config[i]["layer_weight"] * math.sqrt(n_layer) / (norm + eps_t(config[i]))
        for i in active:
            c = config[i]
            if c["cautious"]:
                dot = sum(u * g for u, g in zip(upd[i], raw[i]))
                nu = math.sqrt(sum(u * u for u in upd[i]))
                ng = math.sqrt(sum(g * g for g in raw[i]))
                if nu > 0 and ng > 0 and dot / (nu * ng) < c["threshold"]:
                    scale[i] *= c["scale"]
            decay = 1 - c["lr"] * c["weight_decay"] if c["decoupled"] else 1.0
            values[i] = [p * decay - c["lr"] * scale[i] * u for p, u in zip(values[i], upd[i])]
    return values


def _config(**overrides):
    base = dict(
        lr=1e-2, eps=1e-8, weight_decay=0.0, decoupled=False, global_weight=1.0, layer_weight=1.0,
        adaptive_eps=True, cautious=False, threshold=0.1, scale=0.5,
    )  # fmt: skip
    base.update(overrides)
    return base


def _group_options(c):
    return dict(
        lr=c["lr"], eps=c["eps"], weight_decay=c["weight_decay"], decoupled_weight_decay=c["decoupled"],
        global_norm_weight=c["global_weight"], layer_norm_weight=c["layer_weight"], adaptive_eps=c["adaptive_eps"],
        use_cautious_update=c["cautious"], cautious_threshold=c["threshold"], cautious_scale=c["scale"],
    )  # fmt: skip


# A small LoRA-like parameter set: two modules (one split over two groups, as LoRA+ does), a LoHa
# module, and two unnamed-looking tensors that are their own layers.
NAMES = [
    "lora_unet_a.lora_down.weight",   # layer 0, group 0
    "lora_unet_b.lora_down.weight",   # layer 1, group 0
    "lycoris_c.hada_w1_a",            # layer 2, group 0
    "lycoris_c.hada_w1_b",            # layer 2, group 0
    "plain.weight",                   # layer 3, group 0
    "lora_unet_a.lora_up.weight",     # layer 0, group 1 (LoRA+ group)
    "lora_unet_b.lora_up.weight",     # layer 1, group 1
    "plain.bias",                     # layer 4, group 1
]  # fmt: skip
SHAPES = [(3, 6), (2, 5), (4, 2), (2, 3), (3, 3), (7, 3), (4, 2), (3,)]
LAYER_OF = [0, 1, 2, 2, 3, 0, 1, 4]
GROUP_OF = [0, 0, 0, 0, 0, 1, 1, 1]


def _make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def _make_grads(n_steps, dtype=torch.float64, seed=1, missing=()):
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for step in range(n_steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) * (1 + i) for i, s in enumerate(SHAPES)]
        steps.append([None if (step, i) in missing else g for i, g in enumerate(grads)])
    return steps


def _build(params, group_configs, names=NAMES, normalization="alternating", **kwargs):
    """ANLO over the test parameters. Alternating by default, like ``reference_anlo``: it exercises both
    modes (ANLO's own default, "layer", is checked by ``test_default_normalization_is_layer``)."""
    groups = []
    for gi, c in enumerate(group_configs):
        idx = [i for i, g in enumerate(GROUP_OF) if g == gi]
        groups.append(
            {"params": [params[i] for i in idx], "param_names": [names[i] for i in idx], **_group_options(c)}
        )
    return SeedANLO(groups, normalization=normalization, **kwargs)


def _run(opt, params, grad_steps):
    for grads in grad_steps:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()


def _assert_close_to_reference(params, expected, rtol, atol=0.0):
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double().reshape(-1), torch.tensor(e, dtype=torch.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# arithmetic against the reference


@pytest.mark.parametrize("frequency", [1, 2, 3])
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference_float64(frequency, foreach):
    configs = [_config(lr=1e-2), _config(lr=1.6e-1)]  # LoRA+: ratio 16 on the second group
    params = _make_params()
    grads = _make_grads(7, missing={(2, 1), (4, 7)})
    expected = reference_anlo(params, grads, [configs[g] for g in GROUP_OF], LAYER_OF, frequency)
    opt = _build(params, configs, normalize_frequency=frequency, foreach=foreach)
    _run(opt, params, grads)
    _assert_close_to_reference(params, expected, rtol=1e-12, atol=1e-14)
    assert opt.get_normalization_stats()["step_count"] == 7


def test_default_normalization_is_layer():
    """Constructed with nothing but group lrs, ANLO takes a layer step every step."""
    configs = [_config(lr=1e-2), _config(lr=1.6e-1)]  # the other _config defaults are ANLO's (no decay)
    params = _make_params()
    grads = _make_grads(3)
    expected = reference_anlo(params, grads, [configs[g] for g in GROUP_OF], LAYER_OF, normalization="layer")
    groups = [
        {
            "params": [p for p, g in zip(params, GROUP_OF) if g == group],
            "param_names": [n for n, g in zip(NAMES, GROUP_OF) if g == group],
            "lr": configs[group]["lr"],
        }
        for group in range(2)
    ]
    opt = SeedANLO(groups)
    _run(opt, params, grads)
    _assert_close_to_reference(params, expected, rtol=1e-12, atol=1e-14)
    assert opt.get_normalization_stats()["normalization"] == "layer"
    # A normalize_frequency other than 1 only means something when alternating, so it selects that.
    assert SeedANLO(groups, normalize_frequency=2).normalization == "alternating"


def test_a_layer_of_three_tensors_across_groups_shares_one_norm():
    """LoCon's lora_mid makes a module of three tensors; with LoRA+ its lora_up sits in another group."""
    names = ["m.lora_down.weight", "m.lora_mid.weight", "n.lora_down.weight", "m.lora_up.weight"]
    gen = torch.Generator().manual_seed(3)
    shapes = [(2, 5), (2, 2), (3, 4), (6, 2)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) * (i + 1) for i, p in enumerate(params)]] * 2
    configs = [_config(lr=1e-2, decoupled=True), _config(lr=1.6e-1, decoupled=True)]
    expected = reference_anlo(params, grads, [configs[0]] * 3 + [configs[1]], [0, 0, 1, 0], normalization="layer")
    opt = SeedANLO([
        {"params": params[:3], "param_names": names[:3], "lr": 1e-2},
        {"params": params[3:], "param_names": names[3:], "lr": 1.6e-1},
    ])  # fmt: skip
    _run(opt, params, grads)
    _assert_close_to_reference(params, expected, rtol=1e-12, atol=1e-14)
    assert opt.get_normalization_stats()["num_layers"] == 2


@pytest.mark.parametrize("normalization", ["global", "layer"])
def test_one_normalization_on_every_step_matches_reference(normalization):
    configs = [_config(lr=1e-2, weight_decay=0.1), _config(lr=1.6e-1, weight_decay=0.1, decoupled=True)]
    params = _make_params()
    grads = _make_grads(5, missing={(2, 1)})
    expected = reference_anlo(params, grads, [configs[g] for g in GROUP_OF], LAYER_OF, normalization=normalization)
    opt = _build(params, configs, normalization=normalization)
    _run(opt, params, grads)
    _assert_close_to_reference(params, expected, rtol=1e-12, atol=1e-14)
    stats = opt.get_normalization_stats()
    assert stats["normalization_mode"] == stats["next_normalization_mode"] == stats["normalization"] == normalization


@pytest.mark.parametrize(
    "group_configs",
    [
        [_config(weight_decay=0.3), _config(lr=5e-2, weight_decay=0.1)],
        [_config(weight_decay=0.3, decoupled=True), _config(weight_decay=0.05, decoupled=True)],
        [_config(weight_decay=2.0, cautious=True, threshold=0.6, scale=0.25), _config(cautious=True)],
        [_config(eps=1e-3, adaptive_eps=False, global_weight=0.5, layer_weight=2.0), _config(eps=0.05, global_weight=3.0)],
    ],
    ids=["coupled-decay", "decoupled-decay", "cautious", "eps-and-weights"],
)
def test_matches_reference_options(group_configs):
    params = _make_params()
    grads = _make_grads(6)
    expected = reference_anlo(params, grads, [group_configs[g] for g in GROUP_OF], LAYER_OF, 2)
    opt = _build(params, group_configs, normalize_frequency=2)
    _run(opt, params, grads)
    _assert_close_to_reference(params, expected, rtol=1e-10, atol=1e-13)


def test_matches_reference_float32():
    configs = [_config(lr=1e-3, weight_decay=0.1), _config(lr=4e-3)]
    params = _make_params(torch.float32)
    grads = _make_grads(6, torch.float32)
    expected = reference_anlo(params, grads, [configs[g] for g in GROUP_OF], LAYER_OF)
    _run(_build(params, configs), params, grads)
    _assert_close_to_reference(params, expected, rtol=2e-6, atol=1e-6)


def test_adaptive_eps_schedule_against_reference():
    """Steps 0..1000: eps is 10x at step 0 and decays linearly to 1x (eps large so it matters)."""
    configs = [_config(eps=0.5), _config(eps=0.5)]
    for start in (0, 400, 999, 1500):
        params = _make_params()
        grads = _make_grads(2)
        expected = reference_anlo(params, grads, [configs[g] for g in GROUP_OF], LAYER_OF, start_step=start)
        opt = _build(params, configs)
        state = opt.state_dict()
        state["anlo_step"] = start
        opt.load_state_dict(state)
        assert opt.get_normalization_stats()["groups"][0]["effective_eps"] == pytest.approx(
            0.5 * (1 + 9 * max(0.0, 1 - start / 1000))
        )
        _run(opt, params, grads)
        _assert_close_to_reference(params, expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# modes, layers and groups


def test_lora_module_key():
    assert lora_module_key("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight") == (
        "lora_unet_down_blocks_0_attentions_0_proj_in"
    )
    assert lora_module_key("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_mid.weight") == (
        "lora_te_text_model_encoder_layers_0_mlp_fc1"
    )
    assert lora_module_key("unet.up_blocks.1.attn2.to_k.lora_A.default.weight") == "unet.up_blocks.1.attn2.to_k"
    assert lora_module_key("unet.up_blocks.1.attn2.to_k.lora_B.default.weight") == "unet.up_blocks.1.attn2.to_k"
    for factor in ("hada_w1_a", "hada_w2_b", "hada_t1", "lokr_w1", "lokr_w2_a", "lokr_t2", "dora_scale", "magnitude"):
        assert lora_module_key(f"lycoris_unet_x.{factor}") == "lycoris_unet_x"
    assert lora_module_key("module.lora_unet_x.lora_down.weight") == "module.lora_unet_x"
    assert lora_module_key("down_blocks.0.resnets.0.conv1.weight") is None
    assert lora_module_key("lora_unet_x_lora_down_weight") is None  # no component is a factor name


def _unit_rms(values):
    return math.sqrt(sum(float((v**2).sum()) for v in values) / sum(v.numel() for v in values))


@pytest.mark.parametrize("frequency", [1, 2, 3])
def test_alternation_global_then_layer(frequency):
    """The step's mode follows (step // frequency) % 2, checked by the shape of the update itself."""
    params = _make_params()
    lr = 1e-3
    opt = _build(params, [_config(lr=lr, eps=1e-12), _config(lr=lr, eps=1e-12)], normalize_frequency=frequency)
    for step, grads in enumerate(_make_grads(3 * frequency + 2)):
        before = [p.detach().clone() for p in params]
        _run(opt, params, [grads])
        deltas = [(b - p.detach()) / lr for b, p in zip(before, params)]
        expected_mode = "global" if (step // frequency) % 2 == 0 else "layer"
        stats = opt.get_normalization_stats()
        assert stats["normalization_mode"] == expected_mode
        assert stats["next_normalization_mode"] == ("global" if ((step + 1) // frequency) % 2 == 0 else "layer")
        # delta = s * g with one s for everything (global: the whole update has unit RMS) or one s per
        # layer (layer: every layer has unit RMS).
        if expected_mode == "global":
            members = [list(range(8))]
        else:
            members = [[i for i in range(8) if LAYER_OF[i] == L] for L in range(5)]
        for layer in members:
            ratios = torch.cat([(deltas[i] / grads[i]).reshape(-1) for i in layer])
            torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios), rtol=1e-9, atol=0)
            assert _unit_rms([deltas[i] for i in layer]) == pytest.approx(1.0, rel=1e-9)
        if expected_mode == "global":  # the per-layer RMS then differ
            layer_rms = [_unit_rms([d for d, lay in zip(deltas, LAYER_OF) if lay == L]) for L in range(5)]
            assert max(layer_rms) / min(layer_rms) > 1.1


def test_lora_plus_ratio_preserved_in_global_mode():
    params = _make_params()
    ratio = 16.0
    opt = _build(params, [_config(lr=1e-4), _config(lr=1e-4 * ratio)])
    grads = _make_grads(1)[0]
    before = [p.detach().clone() for p in params]
    _run(opt, params, [grads])
    per_unit = [((b - p.detach()) / g).reshape(-1) for b, p, g in zip(before, params, grads)]
    down = per_unit[NAMES.index("lora_unet_a.lora_down.weight")]
    up = per_unit[NAMES.index("lora_unet_a.lora_up.weight")]
    # Every element moves by lr * s * g with one global s.
    torch.testing.assert_close(down, down[0].expand_as(down), rtol=1e-9, atol=0)
    torch.testing.assert_close(up, up[0].expand_as(up), rtol=1e-9, atol=0)
    assert float(up[0] / down[0]) == pytest.approx(ratio, rel=1e-9)


def test_global_norm_spans_groups():
    """Splitting the same tensors into several groups with the same options changes nothing."""
    grads = _make_grads(4)
    params_one = _make_params()
    opt_one = SeedANLO([{"params": params_one, "param_names": NAMES}], lr=1e-2, normalization="global")
    params_split = _make_params()
    groups = [{"params": [params_split[i]], "param_names": [NAMES[i]]} for i in range(len(NAMES))]
    opt_split = SeedANLO(groups, lr=1e-2, normalization="global")
    _run(opt_one, params_one, grads)
    _run(opt_split, params_split, grads)
    for a, b in zip(params_one, params_split):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_named_parameters_and_pairs_define_layers():
    """``model.named_parameters()`` and (name, tensor) pairs give torch's param_names; layers follow."""

    class Lora(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_down = torch.nn.Linear(6, 2, bias=False)
            self.lora_up = torch.nn.Linear(2, 5, bias=False)

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"q": Lora(), "k": Lora()})
    lr = 1e-3
    for params_arg in (model.named_parameters(), [(n, p) for n, p in model.named_parameters()]):
        opt = SeedANLO(params_arg, lr=lr, normalization="alternating")
        assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
        for p in model.parameters():
            p.grad = torch.randn_like(p) * (10 if p.shape[0] == 5 else 1)
        opt.step()  # global
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()  # layer: each module (down + up) has unit RMS
        assert opt.get_normalization_stats()["num_layers"] == 2
        for module in ("q", "k"):
            deltas = [(before[n] - p.detach()) / lr for n, p in model.named_parameters() if n.startswith(module)]
            assert _unit_rms(deltas) == pytest.approx(1.0, rel=1e-5)
            assert _unit_rms(deltas[:1]) != pytest.approx(1.0, rel=1e-2)  # the tensors share one norm


def test_unnamed_parameters_are_their_own_layers():
    params = _make_params()
    opt = SeedANLO(params, lr=1e-3)
    _run(opt, params, _make_grads(1))
    before = [p.detach().clone() for p in params]
    _run(opt, params, _make_grads(1, seed=5))
    assert opt.get_normalization_stats()["num_layers"] == len(params)
    for b, p in zip(before, params):
        assert _unit_rms([(b - p.detach()) / 1e-3]) == pytest.approx(1.0, rel=1e-6)


def test_layout_follows_changing_gradients_and_groups():
    params = _make_params()
    opt = _build(params, [_config(), _config()])
    _run(opt, params, _make_grads(2))
    grads = _make_grads(2, seed=3, missing={(0, 0), (0, 5), (1, 2)})
    expected = reference_anlo(params, grads, [_config()] * 8, LAYER_OF, start_step=2)
    _run(opt, params, grads)
    _assert_close_to_reference(params, expected, rtol=1e-12, atol=1e-14)
    extra = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt.add_param_group({"params": [extra], "param_names": ["extra.lora_down.weight"], "lr": 0.5})
    extra.grad = torch.full((4,), 3.0, dtype=torch.float64)
    for p in params:
        p.grad = None
    opt.step()  # step 4: global over the single tensor -> update lr * 1 per element
    torch.testing.assert_close(extra.detach(), torch.full((4,), 0.5, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# no-ops, skipped steps, state dict


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [True, False])
def test_zero_gradients_change_nothing(dtype, foreach):
    params = _make_params(dtype)
    opt = _build(params, [_config(), _config(eps=0.0)], foreach=foreach)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for b, p in zip(before, params):
        assert torch.equal(b, p.detach())


def test_parameters_without_grad_are_skipped_and_not_counted():
    params = _make_params()
    grads = _make_grads(1)[0]
    frozen_before = params[3].detach().clone()
    grads[3] = None
    opt = _build(params, [_config(), _config()])
    _run(opt, params, [grads])
    assert torch.equal(params[3].detach(), frozen_before)
    # N and the global norm exclude the frozen tensor: same result as an optimizer without it.
    others = [i for i in range(len(params)) if i != 3]
    params_without = [p for i, p in enumerate(_make_params()) if i != 3]
    opt_without = SeedANLO(
        [{"params": params_without, "param_names": [NAMES[i] for i in others]}], lr=1e-2, normalization="alternating"
    )
    for p, i in zip(params_without, others):
        p.grad = grads[i].clone()
    opt_without.step()
    for p, i in zip(params_without, others):
        assert torch.equal(p, params[i])


def test_step_without_any_gradient_changes_nothing_and_counts():
    params = _make_params()
    before = [p.detach().clone() for p in params]
    opt = _build(params, [_config(weight_decay=0.1, decoupled=True), _config(weight_decay=0.1)])
    opt.step()
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert opt.get_normalization_stats()["step_count"] == 1


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("step_index", [0, 1], ids=["global", "layer"])
@pytest.mark.parametrize("on_host", [True, False], ids=["host-check", "device-masking"])
def test_non_finite_gradient_skips_step(bad, step_index, on_host):
    params = _make_params(torch.float32)
    params.append(torch.ones(3, dtype=torch.bfloat16, requires_grad=True))
    names = NAMES + ["bf16.lora_down.weight"]
    opt = SeedANLO([{"params": params, "param_names": names, "weight_decay": 0.1}], lr=1e-2, normalization="alternating")
    _run(opt, params, [[torch.randn_like(p) for p in params]] * step_index)
    before = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    grads[2].view(-1)[1] = bad
    for p, g in zip(params, grads):
        p.grad = g
    if not on_host:  # exercise the accelerator path (no host read of the finite flag) on the CPU
        active_params, _, counts = opt._collect()
        opt._get_layout(active_params, counts).on_host = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        stats = opt.get_normalization_stats()  # the device path warns when statistics are read
    assert [w.category for w in caught] == [RuntimeWarning]
    assert "skipped 1 step" in str(caught[0].message)
    for b, p in zip(before, params):
        assert torch.equal(b, p.detach())
    assert stats["skipped_steps"] == 1
    assert stats["step_count"] == step_index + 1
    assert not math.isfinite(stats["global_norm"])
    # A second skip is counted, not warned again; a finite step then updates again.
    grads[0].view(-1)[0] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(opt, params, [[g.clone() for g in grads]])
        assert opt.get_normalization_stats()["skipped_steps"] == 2
    assert caught == []
    _run(opt, params, [[torch.randn_like(p) for p in params]])
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before[:-1], params))


def _sample_optimizer(params, **kwargs):
    """Mixed dtypes and options, so every code path takes part."""
    return _build(params, [_config(lr=3e-2, weight_decay=0.2, cautious=True, threshold=0.5), _config(lr=1e-1)], **kwargs)


def _mixed_params(seed=0):
    params = _make_params(torch.float32, seed)
    params[1] = params[1].detach().to(torch.bfloat16).requires_grad_()
    params[6] = params[6].detach().double().requires_grad_()
    return params


def test_state_dict_round_trip_continues_identically():
    params_a = _mixed_params()
    grads = [[g.to(p.dtype) for g, p in zip(step, params_a)] for step in _make_grads(7, torch.float32)]
    opt_a = _sample_optimizer(params_a, normalize_frequency=2)
    _run(opt_a, params_a, grads[:3])
    saved = opt_a.state_dict()
    assert saved["anlo_step"] == 3 and saved["state"] == {}
    assert saved["param_groups"][1]["param_names"] == [NAMES[i] for i in range(8) if GROUP_OF[i] == 1]
    buffer = io.BytesIO()
    torch.save({"optimizer": saved, "params": [p.detach() for p in params_a]}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    params_b = [p.clone().requires_grad_() for p in loaded["params"]]
    opt_b = _sample_optimizer(params_b, normalize_frequency=2)
    opt_b.load_state_dict(loaded["optimizer"])
    assert opt_b.get_normalization_stats()["step_count"] == 3
    _run(opt_a, params_a, grads[3:])
    _run(opt_b, params_b, grads[3:])
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)


def test_accelerate_save_state_and_load_state_resume(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    params = _make_params(torch.float32)
    model = torch.nn.ParameterList(params)
    opt = _build(params, [_config(), _config()], normalization="layer", sinkgd_iterations=1, foreach=False)
    grads = _make_grads(5, torch.float32)
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        model, prepared = accelerator.prepare(model, opt)
        # prepare() round-trips the optimizer through load_state_dict(): the options must survive it
        assert (opt.normalization, opt.sinkgd_iterations, opt.foreach) == ("layer", 1, False)
        _run(prepared, params, grads[:3])
        accelerator.save_state(str(tmp_path / "state"))
        _run(prepared, params, grads[3:])
        expected = [p.detach().clone() for p in params]
        accelerator.load_state(str(tmp_path / "state"))  # restores weights and the optimizer's step counter
        assert opt.get_normalization_stats()["step_count"] == 3
        _run(prepared, params, grads[3:])
    finally:  # accelerate's state is process-global: leave none behind for other tests
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)


def test_load_state_dict_keeps_the_options_and_counters():
    """torch's load_state_dict() hands __setstate__ only "state" and "param_groups"."""
    params = _make_params()
    opt = _build(
        params, [_config(), _config()], normalization="global", sinkgd_iterations=2, orthogonalize=True, foreach=False
    )
    _run(opt, params, _make_grads(3))
    opt.load_state_dict(opt.state_dict())
    assert (opt.normalization, opt.sinkgd_iterations, opt.orthogonalize, opt.foreach) == ("global", 2, True, False)
    assert opt.get_normalization_stats()["step_count"] == 3


def test_load_state_dict_names_the_options_that_differ_from_the_saved_ones():
    params = _make_params()
    saved_without = SeedANLO(params, lr=1e-3).state_dict()  # orthogonalize=False
    assert saved_without["anlo_options"]["orthogonalize"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SeedANLO(params, lr=1e-3).load_state_dict(saved_without)  # the same options: silent
    with pytest.warns(UserWarning, match=r"orthogonalize=True \(saved: False\).*--optimizer_args"):
        ANLO(params, lr=1e-3).load_state_dict(saved_without)
    # saved before the options were recorded: by an ANLO whose default did not orthogonalize
    old = SeedANLO(params, lr=1e-3).state_dict()
    del old["anlo_options"]
    with pytest.warns(UserWarning, match=r"orthogonalize=True \(saved: False\)"):
        ANLO(params, lr=1e-3).load_state_dict(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SeedANLO(params, lr=1e-3).load_state_dict(old)
    # a state dict of another optimizer (no step counter) says nothing about ANLO's options
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ANLO(params, lr=1e-3).load_state_dict({k: v for k, v in old.items() if k != "anlo_step"})


def test_load_state_dict_without_step_key_restarts_at_zero():
    params = _make_params()
    opt = _build(params, [_config(), _config()], normalize_frequency=2)
    _run(opt, params, _make_grads(3))
    saved = opt.state_dict()
    del saved["anlo_step"]
    for group in saved["param_groups"]:  # e.g. written by an older version
        del group["cautious_scale"]
    fresh = _build(_make_params(), [_config(), _config()], normalize_frequency=2)
    fresh.load_state_dict(saved)
    stats = fresh.get_normalization_stats()
    assert stats["step_count"] == 0 and stats["next_normalization_mode"] == "global"
    assert fresh.param_groups[0]["cautious_scale"] == 0.5


def test_load_state_dict_drops_foreign_per_parameter_state():
    params = _make_params()
    adamw = torch.optim.AdamW(
        [{"params": [params[i] for i in range(8) if GROUP_OF[i] == g]} for g in range(2)], lr=1e-3
    )
    _run(adamw, params, _make_grads(1))
    opt = SeedANLO([{"params": [params[i] for i in range(8) if GROUP_OF[i] == g]} for g in range(2)], lr=1e-3)
    with pytest.warns(UserWarning, match="per-parameter state"):
        opt.load_state_dict(adamw.state_dict())
    assert len(opt.state) == 0 and opt.param_groups[0]["layer_norm_weight"] == 1.0


def test_no_per_parameter_state_after_100_steps():
    params = _make_params(torch.float32)
    opt = _sample_optimizer(params)
    for _ in range(100):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(opt.state) == 0
    assert not any(isinstance(v, torch.Tensor) for s in opt.state.values() for v in s.values())
    assert opt.get_memory_usage()["optimizer_state_memory_bytes"] == 0
    assert opt.state_dict()["state"] == {}


def test_pickle_keeps_step_and_options():
    params = _make_params()
    opt = _build(params, [_config(), _config()], normalize_frequency=3)
    _run(opt, params, _make_grads(4))
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.get_normalization_stats()["step_count"] == 4 and clone.normalize_frequency == 3
    assert clone.normalization == "alternating"
    single_mode = SeedANLO([torch.zeros(1, requires_grad=True)], normalization="global")
    assert pickle.loads(pickle.dumps(single_mode)).normalization == "global"
    copied = copy.deepcopy(opt)
    assert copied.state_dict()["anlo_step"] == 4


def test_the_seeds_normalization_seams_return_the_scales_and_write_nothing():
    params = _make_params()
    lrs = (1e-3, 1e-2)
    opt = _build(params, [_config(lr=lrs[0]), _config(lr=lrs[1])], normalization="layer", sinkgd_iterations=1)
    grads = _make_grads(1)[0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    global_scales = opt._apply_global_normalization()
    layer_scales = opt._apply_layer_normalization()
    for p, b, g in zip(params, before, grads):  # neither the weights nor the gradients (SinkGD ran on a copy)
        assert torch.equal(p.detach(), b) and torch.equal(p.grad, g)
    assert opt.get_normalization_stats()["step_count"] == 0
    transformed = [g.clone() for g in grads]
    for g in transformed:
        hina_anlo._row_column_normalize_(g, 1)
    eps_t = 1e-8 * 10  # adaptive eps at step 0
    total = math.sqrt(sum(float(g.double().square().sum()) for g in transformed))
    n = sum(g.numel() for g in transformed)
    for scale in global_scales.tolist():
        assert scale == pytest.approx(math.sqrt(n) / (total + eps_t), rel=1e-6)
    for i, scale in enumerate(layer_scales.tolist()):
        members = [j for j in range(len(params)) if LAYER_OF[j] == LAYER_OF[i]]
        norm = math.sqrt(sum(float(transformed[j].double().square().sum()) for j in members))
        numel = sum(transformed[j].numel() for j in members)
        assert scale == pytest.approx(math.sqrt(numel) / (norm + eps_t), rel=1e-6)
    # the step itself then applies exactly those layer scales: p - lr * s * u
    opt.step()
    for i, (p, b) in enumerate(zip(params, before)):
        expected = b - lrs[GROUP_OF[i]] * layer_scales[i] * transformed[i]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)


def test_an_optimizer_pickled_with_the_removed_fused_option_unpickles():
    params = _make_params()
    opt = _build(params, [_config(), _config()])
    state = opt.__getstate__()
    state["fused"] = None  # what ANLO pickled while it had its fused CPU kernel
    clone = ANLO.__new__(ANLO)
    clone.__setstate__(state)
    assert not hasattr(clone, "fused")
    _run(clone, params, _make_grads(1))
    assert clone.get_normalization_stats()["step_count"] == 1


# --------------------------------------------------------------------------------------------------
# precision, cautious gate, paths


def test_bfloat16_stochastic_rounding_makes_progress():
    """Updates of 1e-4 on bf16 weights of 1.0 (spacing 2^-8 below 1) vanish with round-to-nearest."""
    lr, steps = 1e-4, 40
    results = {}
    for stochastic in (True, False):
        weight = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
        opt = SeedANLO([weight], lr=lr, stochastic_rounding=stochastic)
        for _ in range(steps):
            weight.grad = torch.ones_like(weight)  # unit RMS already: every element moves by lr
            opt.step()
        results[stochastic] = weight.detach().double().mean().item()
    assert results[False] == 1.0
    expected = 1.0 - lr * steps  # 0.996; the SR standard error of the mean is ~6e-5
    assert results[True] == pytest.approx(expected, abs=4e-4)


def test_stochastic_rounding_is_unbiased_and_exact_on_representable_values():
    from library.hina_anlo import _copy_stochastically_rounded_

    gen = torch.Generator().manual_seed(0)
    low, high = 1.0, 1.0 + 2.0**-7  # neighbours in bf16
    src_values = torch.full((20000,), low + 0.3 * (high - low))
    dst = torch.empty(20000, dtype=torch.bfloat16)
    _copy_stochastically_rounded_(dst, src_values.clone(), gen)
    assert set(dst.double().unique().tolist()) == {low, high}
    assert (dst.double() == high).double().mean().item() == pytest.approx(0.3, abs=0.015)
    negative = torch.full((20000,), -(low + 0.3 * (high - low)))
    _copy_stochastically_rounded_(dst, negative.clone(), gen)
    assert dst.double().mean().item() == pytest.approx(negative[0].item(), abs=2e-4)
    exact = torch.tensor([0.0, -0.0, 1.5, -3.0, 2.0**-100])
    _copy_stochastically_rounded_(dst[:5], exact.clone(), gen)
    assert torch.equal(dst[:5].float(), exact) and torch.signbit(dst[1])


def test_sparse_gradients_are_rejected():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    opt = SeedANLO(embedding.parameters())
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(before, embedding.weight.detach())


@pytest.mark.parametrize(
    "p0, fires",
    [(-100.0, True), (-99.0, False)],
    ids=["cosine-0.0995-fires", "cosine-0.1005-holds"],
)
def test_cautious_gate_fires_exactly_when_coupled_decay_turns_the_update(p0, fires):
    """g = (0, 1), p = (p0, 0), wd = 0.1: u = g + wd p = (p0 / 10, 1), cos(u, g) = 1 / sqrt(1 + p0^2 / 100).

    p0 = -100 gives cos = 1/sqrt(101) = 0.0995 < 0.1 (scaled by 0.5); p0 = -99 gives 0.1005 (not).
    """
    lr, wd = 1e-3, 0.1
    p = torch.tensor([p0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = SeedANLO([p], lr=lr, weight_decay=wd, decoupled_weight_decay=False, use_cautious_update=True,
               adaptive_eps=False, eps=0.0, normalization="global")  # the gate can fire only with coupled decay
    p.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opt.step()
    u = torch.tensor([p0 * wd, 1.0], dtype=torch.float64)
    s = math.sqrt(2) / u.norm().item()  # global step, N = 2
    factor = 0.5 if fires else 1.0
    expected = torch.tensor([p0, 0.0], dtype=torch.float64) - lr * s * factor * u
    torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=0)
    stats = opt.get_cautious_update_stats()
    assert stats["fired_total"] == int(fires) and stats["evaluated_total"] == 1
    assert stats["enabled_groups"] == 1 and stats["cautious_update_config"]["group_0"]["threshold"] == 0.1
    assert opt.get_normalization_stats()["cautious_update_enabled"] is True


def test_cautious_gate_never_fires_without_coupled_decay():
    params = _make_params()
    opt = SeedANLO(params, lr=1e-2, use_cautious_update=True, cautious_threshold=1.0, weight_decay=0.5, decoupled_weight_decay=True)
    _run(opt, params, _make_grads(5))
    stats = opt.get_cautious_update_stats()
    assert stats["fired_total"] == 0 and stats["evaluated_total"] == 5 * len(params)


def test_cautious_seam_on_a_tensor_pair():
    gate = ANLO._apply_cautious_update_optimized
    grad = torch.tensor([0.0, 1.0])
    turned = torch.tensor([-10.0, 1.0])  # cosine 1/sqrt(101) = 0.0995
    torch.testing.assert_close(gate(turned, grad, 0.1, 0.5), turned * 0.5)
    torch.testing.assert_close(gate(turned, grad, 0.099, 0.5), turned)
    torch.testing.assert_close(gate(-grad, grad, 0.0, 0.25), -grad * 0.25)
    assert torch.equal(gate(torch.zeros(2), grad, 0.5, 0.5), torch.zeros(2))
    assert torch.equal(gate(turned, torch.zeros(2), 0.5, 0.5), turned)
    assert gate(turned.bfloat16(), grad.bfloat16(), 0.1, 0.5).dtype == torch.bfloat16


def test_foreach_and_for_loop_paths_agree():
    grads = _make_grads(6, torch.float32)
    results = []
    for foreach in (True, False):
        params = _mixed_params()
        opt = _sample_optimizer(params, foreach=foreach, normalize_frequency=2)
        _run(opt, params, [[g.to(p.dtype) for g, p in zip(step, params)] for step in grads])
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_closure_runs_with_grad_and_returns_loss():
    weight = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = SeedANLO([weight], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (weight**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.item() == 5.0
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0, 2.0]) - 0.1 * torch.tensor([1.0, 2.0]) * math.sqrt(2) / math.sqrt(5), rtol=1e-6, atol=0)


def test_weight_decay_is_decoupled_by_default():
    """The default the LoRA benchmark supports: p <- p * (1 - lr * wd) - lr * s * g, g alone normalized."""
    p = torch.tensor([3.0, -4.0], dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    SeedANLO([p], lr=0.1, weight_decay=0.5, adaptive_eps=False, eps=0.0).step()
    expected = torch.tensor([3.0, -4.0], dtype=torch.float64) * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, 1.0])
    torch.testing.assert_close(p.detach(), expected, rtol=1e-7, atol=0)  # coefficients are float32


def _sinkgd_reference(grad: list[list[float]], iterations: int) -> list[list[float]]:
    """Row then column rescaling to RMS 1, element by element in float64 (independent of torch)."""
    m = [row[:] for row in grad]
    rows, cols = len(m), len(m[0])
    for _ in range(iterations):
        for i in range(rows):
            norm = math.sqrt(sum(v * v for v in m[i]))
            m[i] = [v * math.sqrt(cols) / (norm + 1e-12) for v in m[i]]
        for j in range(cols):
            norm = math.sqrt(sum(m[i][j] ** 2 for i in range(rows)))
            for i in range(rows):
                m[i][j] = m[i][j] * math.sqrt(rows) / (norm + 1e-12)
    return m


def test_sinkgd_iterations_rescale_rows_and_columns_before_the_step():
    generator = torch.Generator().manual_seed(3)
    down = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    down.grad = torch.randn(2, 5, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [7.0]])
    bias.grad = torch.randn(3, generator=generator, dtype=torch.float64)
    expected_down = torch.tensor(_sinkgd_reference(down.grad.tolist(), 3), dtype=torch.float64)
    expected_bias = bias.grad.clone()  # 1-D: left alone
    SeedANLO([down, bias], lr=0.1, sinkgd_iterations=3, adaptive_eps=False, eps=0.0, normalization="global").step()

    torch.testing.assert_close(down.grad, expected_down, rtol=1e-12, atol=0)  # rewritten in place
    torch.testing.assert_close(bias.grad, expected_bias, rtol=0, atol=0)
    # then a plain global step on the rescaled gradients
    total = math.sqrt(float(expected_down.pow(2).sum() + expected_bias.pow(2).sum()))
    scale = 0.1 * math.sqrt(13) / total
    torch.testing.assert_close(down.detach(), -scale * expected_down, rtol=1e-12, atol=0)
    torch.testing.assert_close(bias.detach(), -scale * expected_bias, rtol=1e-12, atol=0)


def _polar_reference(matrix: torch.Tensor, relative_floor: float = 1e-3) -> torch.Tensor:
    """``U f(S) Vᵀ`` by an SVD in float64: f(s) = s / sqrt(s² + δ), δ = floor² sqrt(Σ s⁴) (floor² ‖G Gᵀ‖_F)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    damping = relative_floor**2 * s.pow(4).sum().sqrt()
    return (u * (s / (s.square() + damping).sqrt())) @ vh


def test_orthogonalize_replaces_every_matrix_gradient_by_its_polar_factor_before_the_step():
    generator = torch.Generator().manual_seed(5)
    shapes = {"wide": (3, 7), "tall": (7, 3), "conv": (3, 2, 2, 2), "bias": (4,)}
    params = {k: torch.zeros(shape, dtype=torch.float64, requires_grad=True) for k, shape in shapes.items()}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
    expected = {k: _polar_reference(p.grad.reshape(p.shape[0], -1)).view(p.shape) for k, p in params.items()}
    expected["bias"] = params["bias"].grad.clone()  # 1-D: left alone
    ANLO(list(params.values()), lr=0.1, orthogonalize=True, adaptive_eps=False, eps=0.0, normalization="global").step()

    for key, p in params.items():
        torch.testing.assert_close(p.grad, expected[key], rtol=0, atol=1e-12, msg=key)  # rewritten in place
    # then a plain global step on the orthogonalized gradients
    total = math.sqrt(sum(float(e.pow(2).sum()) for e in expected.values()))
    scale = 0.1 * math.sqrt(sum(p.numel() for p in params.values())) / total
    for key, p in params.items():
        torch.testing.assert_close(p.detach(), -scale * expected[key], rtol=1e-12, atol=0, msg=key)


def test_orthogonalize_is_the_default():
    """Constructed without the option, ANLO orthogonalizes: each matrix gradient becomes its polar factor."""
    generator = torch.Generator().manual_seed(7)
    p = torch.zeros(3, 7, dtype=torch.float64, requires_grad=True)
    p.grad = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    expected = _polar_reference(p.grad)
    optimizer = ANLO([p], lr=0.1, adaptive_eps=False, eps=0.0)
    assert optimizer.orthogonalize is True
    optimizer.step()
    torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-12)
    scale = 0.1 * math.sqrt(p.numel()) / float(expected.norm())  # then a layer step to unit RMS times lr
    torch.testing.assert_close(p.detach(), -scale * expected, rtol=1e-12, atol=0)


def test_orthogonalize_damps_singular_values_below_the_floor_and_keeps_zero_ones_zero():
    generator = torch.Generator().manual_seed(6)
    u, _ = torch.linalg.qr(torch.randn(6, 3, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(9, 3, generator=generator, dtype=torch.float64))
    singular = torch.tensor([2.0, 1e-5, 0.0], dtype=torch.float64)  # rank 2; the second far below 1e-3 * 2
    p = torch.zeros(6, 9, dtype=torch.float64, requires_grad=True)
    p.grad = (u * singular) @ v.T
    zero = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
    zero.grad = torch.zeros(4, 5, dtype=torch.float64)
    ANLO([p, zero], lr=0.1, orthogonalize=True).step()
    damping = 1e-6 * 4.0  # floor² ‖G Gᵀ‖_F, and ‖G Gᵀ‖_F = sqrt(2⁴ + 1e-20) = 4
    mapped = singular / (singular.square() + damping).sqrt()  # [1 - 5e-7, about 1e-5 / 2e-3, 0]
    assert mapped[0] > 0.999999 and 0.0049 < mapped[1] < 0.0051
    expected = (u * mapped) @ v.T
    torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-12)  # the null direction stays (near) zero
    assert torch.equal(zero.grad, torch.zeros(4, 5, dtype=torch.float64)) and torch.equal(zero.detach(), zero.grad)


def test_orthogonalize_in_small_batches_gives_the_same_bits(monkeypatch):
    generator = torch.Generator().manual_seed(8)
    shapes = [(3, 7), (7, 3), (3, 5), (4, 9), (3, 2, 2, 2), (9, 4)]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    in_one_call = [g.clone() for g in grads]
    hina_anlo._orthogonalize_(in_one_call)
    monkeypatch.setattr(hina_anlo, "_ORTHOGONAL_BATCH_BYTES", 8 * 3 * 3)  # one 3 x 3 Gram matrix per call
    hina_anlo._orthogonalize_(grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, in_one_call))


def _spd_batch(size: int, count: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` random symmetric positive definite matrices with eigenvalues spread log-evenly over [spread, 1]."""
    q, _ = torch.linalg.qr(torch.randn(count, size, size, generator=generator, dtype=torch.float64))
    values = torch.logspace(0, math.log10(spread), size, dtype=torch.float64)
    return (q * values) @ q.mT


@pytest.mark.parametrize("size", [1, 3, 32, 40])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-5), (torch.float32, 1e-2)])
def test_newton_schulz_inverse_square_root_matches_eigh(size, dtype, tolerance):
    generator = torch.Generator().manual_seed(size)
    matrices = torch.cat([_spd_batch(size, 3, spread, generator) for spread in (1.0, 1e-3, 1.001e-6)]) * 7.5
    values, vectors = torch.linalg.eigh(matrices)
    expected = (vectors * values.rsqrt()[:, None, :]) @ vectors.mT
    got = hina_anlo._inverse_sqrt_newton_schulz(matrices.to(dtype)).double()
    # relative to each matrix's largest entry of A^(-1/2), whose eigenvalues span a factor of 1000
    error = (got - expected).abs().amax(dim=(-2, -1)) / expected.abs().amax(dim=(-2, -1))
    assert error.max() < tolerance, error
    assert error[:6].max() < 2e-5, error  # spectra within a factor 1e-3: within 2e-5 in float32 too


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 5e-6), (torch.float32, 1e-3)])
def test_orthogonalize_by_newton_schulz_matches_eigh_and_handles_zero_and_non_finite(monkeypatch, dtype, tolerance):
    """What CUDA runs (Newton-Schulz steps, in the gradients' dtype), run here on the CPU, against the eigh path."""
    generator = torch.Generator().manual_seed(9)
    shapes = [(3, 7), (7, 3), (40, 90), (3, 2, 2, 2)]
    grads = [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]
    u, _ = torch.linalg.qr(torch.randn(8, 4, generator=generator, dtype=dtype))
    grads.append(torch.diag(torch.tensor([3.0, 1.0, 1e-2, 1e-7], dtype=dtype)) @ u.T)  # 4 x 8, spread
    grads += [torch.zeros(4, 6, dtype=dtype), torch.ones(3, 5, dtype=dtype)]
    grads[-1][1, 1] = math.inf
    by_eigh = [g.clone() for g in grads]
    hina_anlo._orthogonalize_(by_eigh)
    monkeypatch.setattr(hina_anlo, "_uses_newton_schulz", lambda device: True)
    iterated, newton_schulz = [], hina_anlo._inverse_sqrt_newton_schulz
    monkeypatch.setattr(
        hina_anlo, "_inverse_sqrt_newton_schulz", lambda m: (iterated.append((*m.shape, m.dtype)), newton_schulz(m))[1]
    )
    hina_anlo._orthogonalize_(grads)
    assert sorted(iterated, key=str) == [(1, 40, 40, dtype), (2, 4, 4, dtype), (4, 3, 3, dtype)]  # one per side
    for got, expected in zip(grads[:-2], by_eigh[:-2]):
        torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)  # float64 steps end within 2e-6 of 1
    assert torch.equal(grads[-2], torch.zeros(4, 6, dtype=dtype))
    assert grads[-1].isnan().all() and by_eigh[-1].isnan().all()


def test_orthogonalize_runs_float32_matmuls_in_full_precision_and_restores_the_setting(monkeypatch):
    seen, orthogonalize_batch = [], hina_anlo._orthogonalize_batch_

    def recording(entries, relative_floor):
        seen.append(torch.get_float32_matmul_precision())
        orthogonalize_batch(entries, relative_floor)

    monkeypatch.setattr(hina_anlo, "_orthogonalize_batch_", recording)
    p = torch.zeros(3, 5, requires_grad=True)
    p.grad = torch.randn(3, 5, generator=torch.Generator().manual_seed(10))
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # what a script allowing TF32 sets
        ANLO([p], lr=0.1, orthogonalize=True).step()
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "high"
        monkeypatch.setattr(hina_anlo, "_orthogonalize_batch_", lambda entries, floor: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            hina_anlo._orthogonalize_([p.grad])
        assert torch.get_float32_matmul_precision() == "high"  # restored on the way out of an error too
    finally:
        torch.set_float32_matmul_precision(saved)


def test_orthogonalize_low_precision_gradients_in_float32():
    generator = torch.Generator().manual_seed(7)
    p = torch.zeros(4, 16, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.randn(4, 16, generator=generator).to(torch.bfloat16)
    expected = _polar_reference(p.grad.float())
    ANLO([p], lr=0.1, orthogonalize=True).step()
    assert p.grad.dtype == torch.bfloat16
    torch.testing.assert_close(p.grad.double(), expected, rtol=0, atol=2e-3)  # within bfloat16's rounding


def test_orthogonalize_with_a_non_finite_gradient_skips_the_step():
    params = [torch.ones(3, 4, requires_grad=True), torch.ones(4, 3, requires_grad=True)]
    params[0].grad = torch.ones(3, 4)
    params[0].grad[1, 2] = math.inf
    params[1].grad = torch.eye(4, 3)
    opt = ANLO(params, lr=0.1, orthogonalize=True)
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        opt.step()
        stats = opt.get_normalization_stats()
    assert stats["skipped_steps"] == 1
    assert all(torch.equal(p.detach(), torch.ones_like(p)) for p in params)


# --------------------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1e-4}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.01}, "weight_decay"),
        ({"normalize_frequency": 0}, "normalize_frequency"),
        ({"normalize_frequency": 1.5}, "normalize_frequency"),
        ({"global_norm_weight": -1.0}, "global_norm_weight"),
        ({"layer_norm_weight": math.inf}, "layer_norm_weight"),
        ({"cautious_threshold": 1.5}, "cautious_threshold"),
        ({"cautious_threshold": -0.1}, "cautious_threshold"),
        ({"cautious_scale": 2.0}, "cautious_scale"),
        ({"adaptive_eps": "yes"}, "adaptive_eps"),
        ({"use_cautious_update": 1}, "use_cautious_update"),
        ({"stochastic_rounding": None}, "stochastic_rounding"),
        ({"foreach": "fast"}, "foreach"),
        ({"sinkgd_iterations": -1}, "sinkgd_iterations"),
        ({"sinkgd_iterations": 2.0}, "sinkgd_iterations"),
        ({"orthogonalize": 1}, "orthogonalize"),
        ({"normalization": "module"}, "normalization"),
        ({"normalization": "layer", "normalize_frequency": 2}, "normalize_frequency"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}: "):
        SeedANLO([torch.zeros(1, requires_grad=True)], **kwargs)


def test_invalid_group_options_and_names():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid lr: -0.5"):
        SeedANLO([{"params": [p], "lr": -0.5}])
    with pytest.raises(ValueError, match="Invalid param_names"):
        SeedANLO([{"params": [p], "param_names": ["a", "b"]}])
    opt = SeedANLO([p])
    with pytest.raises(ValueError, match="Invalid cautious_scale"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "cautious_scale": -1.0})
    assert len(opt.param_groups) == 1


def test_unknown_keyword_arguments_are_a_type_error():
    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(TypeError, match=r"'betas'.*Valid arguments: params, lr, eps"):
        SeedANLO(p, betas=(0.9, 0.999))
    with pytest.raises(TypeError, match=r"'normalise_frequency' \(did you mean 'normalize_frequency'\?\)"):
        SeedANLO(p, normalise_frequency=2)


# --------------------------------------------------------------------------------------------------
# statistics and helpers


def test_statistics():
    params = _make_params(torch.float32)
    params[4] = params[4].detach().to(torch.bfloat16).requires_grad_()
    opt = _build(params, [_config(lr=1e-3), _config(lr=2e-3)])
    stats = opt.get_normalization_stats()
    assert stats["step_count"] == 0 and stats["normalization_mode"] is None and stats["global_norm"] is None
    grads = [g.to(p.dtype) for g, p in zip(_make_grads(1, torch.float32)[0], params)]
    grads[0] = None
    _run(opt, params, [grads])
    stats = opt.get_normalization_stats()
    assert stats["normalization_mode"] == "global" and stats["next_normalization_mode"] == "layer"
    assert stats["skipped_steps"] == 0 and stats["cautious_update_enabled"] is False
    assert stats["global_norm"] == pytest.approx(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None)))
    g0 = [grads[i].double().norm().item() for i in range(1, 5)]
    group0 = stats["groups"][0]
    assert group0["num_params"] == 5 and group0["num_params_with_grad"] == 4 and group0["lr"] == 1e-3
    assert group0["grad_norm_min"] == pytest.approx(min(g0), rel=1e-6)
    assert group0["grad_norm_max"] == pytest.approx(max(g0), rel=1e-6)
    assert group0["grad_norm_mean"] == pytest.approx(sum(g0) / 4, rel=1e-6)

    memory = opt.get_memory_usage()
    numel = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * (2 if p.dtype == torch.bfloat16 else 4) for p in params)
    assert memory["total_parameters"] == numel
    assert memory["parameter_memory_bytes"] == param_bytes
    assert memory["gradient_memory_bytes"] == param_bytes - params[0].numel() * 4
    assert memory["parameter_memory_mb"] == param_bytes / 2**20
    assert memory["optimizer_state_memory_mb"] == 0.0 and memory["state_bytes_per_parameter"] == 0.0
    assert 0 < memory["workspace_memory_bytes"] < 64 * len(params)


def test_verbose_logs_a_summary(caplog):
    params = _make_params()
    opt = _build(params, [_config(), _config()], verbose=True)
    opt.log_interval = 2
    with caplog.at_level(logging.INFO, logger="library.hina_anlo"):
        _run(opt, params, _make_grads(4))
    lines = [r.getMessage() for r in caplog.records if r.name == "library.hina_anlo"]
    assert len(lines) == 2 and lines[0].startswith("ANLO step 2: mode=layer global_norm=")


def test_seed_import_path():
    from library.hina_ano import ANLO as SeedANLO

    assert SeedANLO is ANLO
