"""Golden cases of ANLO: fixed parameters, fixed gradients, several steps per option.

``python tests/anlo_golden.py`` (with ``OMP_NUM_THREADS=1``) runs every case with the current
``library/hina_anlo.py`` and writes ``tests/data/anlo_golden.pt``: the parameters after the last step,
the skip and cautious counters, and, for the resume case, the parameters and ``state_dict()`` half way.
``tests/test_anlo_golden.py`` reruns the cases and asserts the parameters are equal bit for bit, so a
change to the optimizer's code that moves any number fails there. The fixture was written by the
implementation of commit 5385cdf (before the step was restructured), every case with ``fused=False``: torch's
own ops, the only path since the fused CPU kernel was removed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.hina_anlo import ANLO  # noqa: E402

FIXTURE = Path(__file__).with_name("data") / "anlo_golden.pt"
STEPS = 5
RESUME_AT = 3

# A small LoRA: two linear modules, one conv module (3x3 down, 1x1 up), one PEFT-style module, and a plain
# tensor without a LoRA factor name (its own layer). Shapes (out, in) as in kohya's networks/lora.py.
SHAPES = {
    "lora_unet_down_0_attn_to_q.lora_down.weight": (4, 40),
    "lora_unet_down_0_attn_to_q.lora_up.weight": (24, 4),
    "lora_unet_mid_proj_in.lora_down.weight": (4, 16),
    "lora_unet_mid_proj_in.lora_up.weight": (16, 4),
    "lora_unet_up_0_conv.lora_down.weight": (4, 8, 3, 3),
    "lora_unet_up_0_conv.lora_up.weight": (12, 4, 1, 1),
    "te.layers.0.mlp.fc1.lora_A.default.weight": (2, 20),
    "te.layers.0.mlp.fc1.lora_B.default.weight": (20, 2),
    "extra.bias": (12,),
}
# Per-tensor gradient magnitudes, so layer norms and the global norm differ.
GRAD_SCALES = (1.0, 3e-2, 0.5, 2.0, 1e-3, 7.0, 0.2, 1.5, 4e-4)


def _case(options: Optional[dict] = None, **setup: Any) -> dict[str, Any]:
    # The fixture predates orthogonalize=True as the default: a case orthogonalizes only where it says so.
    return {"options": {"orthogonalize": False, **(options or {})}, **setup}


#: name -> constructor options and how parameters and gradients are set up:
#: names (bool: named groups), dtype, groups ("one" or "loraplus": lora_up in a second group at 16x lr),
#: skip_step (a step whose first gradient has an inf), missing (step at which tensor 2 has no gradient).
CASES: dict[str, dict[str, Any]] = {
    "default": _case(names=True),
    "default_unnamed": _case(names=False),
    "foreach_false": _case({"foreach": False}, names=True),
    "alternating": _case({"normalize_frequency": 2}, names=True),
    "alternating_freq1_weights": _case(
        {"normalization": "alternating", "global_norm_weight": 0.7, "layer_norm_weight": 1.3},
        names=True,
    ),
    "global": _case({"normalization": "global"}, names=True),
    "global_weights_unnamed": _case({"normalization": "global", "global_norm_weight": 2.0}, names=False),
    "layer_weight": _case({"layer_norm_weight": 0.5}, names=True),
    "orthogonalize": _case({"orthogonalize": True}, names=True),
    "orthogonalize_unnamed_global": _case({"orthogonalize": True, "normalization": "global"}, names=False),
    "sinkgd1": _case({"sinkgd_iterations": 1}, names=True),
    "sinkgd2_orthogonalize": _case({"sinkgd_iterations": 2, "orthogonalize": True}, names=True),
    "loraplus": _case({"lr": 2e-3}, names=True, groups="loraplus"),
    "loraplus_unnamed_alternating": _case({"lr": 2e-3, "normalize_frequency": 2}, names=False, groups="loraplus"),
    "coupled_decay": _case({"weight_decay": 0.05, "decoupled_weight_decay": False}, names=True),
    "coupled_decay_global": _case(
        {"weight_decay": 0.05, "decoupled_weight_decay": False, "normalization": "global"}, names=True
    ),
    "decoupled_decay": _case({"weight_decay": 0.1}, names=True),
    "decoupled_decay_loraplus": _case({"weight_decay": 0.1, "lr": 1e-2}, names=True, groups="loraplus_decay"),
    "cautious_no_decay": _case({"use_cautious_update": True}, names=True),
    "cautious_coupled": _case(
        {
            "use_cautious_update": True, "cautious_threshold": 0.999, "cautious_scale": 0.25,
            "weight_decay": 0.5, "decoupled_weight_decay": False, "lr": 1e-2,
        },
        names=True,
    ),  # fmt: skip
    "cautious_coupled_loraplus": _case(
        {"use_cautious_update": True, "cautious_threshold": 0.999, "weight_decay": 0.5,
         "decoupled_weight_decay": False},
        names=True, groups="loraplus",
    ),  # fmt: skip
    "adaptive_eps_large": _case({"eps": 1e-2}, names=True),
    "fixed_eps_large": _case({"eps": 1e-2, "adaptive_eps": False}, names=True),
    "eps_zero_zero_grad": _case({"eps": 0.0, "adaptive_eps": False}, names=True, zero_tensor=3),
    "bf16_stochastic_rounding": _case(names=True, dtype=torch.bfloat16),
    "bf16_round_to_nearest": _case({"stochastic_rounding": False}, names=True, dtype=torch.bfloat16),
    "bf16_decoupled_decay": _case({"weight_decay": 0.1}, names=True, dtype=torch.bfloat16),
    "fp16": _case({"weight_decay": 0.1, "decoupled_weight_decay": False}, names=True, dtype=torch.float16),
    "float64": _case({"normalize_frequency": 2}, names=True, dtype=torch.float64),
    "mixed_dtypes": _case({"weight_decay": 0.1}, names=True, dtype="mixed"),
    "nonfinite_skip": _case(names=True, skip_step=2),
    "nonfinite_skip_unnamed_per_tensor": _case({"foreach": False}, names=False, skip_step=2),
    "missing_grad": _case({"normalize_frequency": 2}, names=True, missing=3),
    "resume_alternating": _case({"normalize_frequency": 2, "eps": 1e-3}, names=True, resume=True),
    "resume_loraplus_cautious": _case(
        {"use_cautious_update": True, "cautious_threshold": 0.999, "weight_decay": 0.5,
         "decoupled_weight_decay": False, "normalization": "alternating"},
        names=True, groups="loraplus", resume=True,
    ),  # fmt: skip
}


def _dtypes(case: dict[str, Any]) -> list[torch.dtype]:
    dtype = case.get("dtype", torch.float32)
    if dtype == "mixed":
        return [torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.float16] + [torch.float32] * 4
    return [dtype] * len(SHAPES)


def initial_params(case: dict[str, Any]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [
        (torch.randn(shape, generator=generator) * 0.1).to(dtype)
        for shape, dtype in zip(SHAPES.values(), _dtypes(case))
    ]


def set_grads(params: list[torch.Tensor], case: dict[str, Any], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for i, (p, scale) in enumerate(zip(params, GRAD_SCALES)):
        grad = torch.randn(p.shape, generator=generator) * scale
        if case.get("zero_tensor") == i:
            grad.zero_()
        if case.get("skip_step") == step and i == 0:
            grad.view(-1)[1] = float("inf")
        p.grad = grad.to(p.dtype)
        if case.get("missing") == step and i == 2:
            p.grad = None


def build(case: dict[str, Any], params: list[torch.Tensor]) -> ANLO:
    names = list(SHAPES)
    grouping = case.get("groups", "one")
    if grouping == "one":
        members = [list(range(len(params)))]
        extra: list[dict[str, Any]] = [{}]
    else:
        up = [i for i, n in enumerate(names) if "lora_up" in n or "lora_B" in n]
        members = [[i for i in range(len(params)) if i not in up], up]
        lr = case["options"].get("lr", 1e-4)
        extra = [{}, {"lr": lr * 16}]
        if grouping == "loraplus_decay":
            extra = [{}, {"lr": lr * 16, "weight_decay": 0.0}]
    groups = []
    for indices, options in zip(members, extra):
        group: dict[str, Any] = {"params": [params[i] for i in indices], **options}
        if case["names"]:
            group["param_names"] = [names[i] for i in indices]
        groups.append(group)
    return ANLO(groups, **case["options"])


def run(case: dict[str, Any], steps: range, params: list[torch.Tensor], optimizer: ANLO) -> None:
    for step in steps:
        set_grads(params, case, step)
        optimizer.step()


def flat(params: list[torch.Tensor]) -> torch.Tensor:
    """All parameters as one float64 vector (exact for every float dtype ANLO steps)."""
    return torch.cat([p.detach().double().reshape(-1) for p in params])


def record(case: dict[str, Any]) -> dict[str, Any]:
    """Run ``case`` from the start and return what the fixture stores for it."""
    params = initial_params(case)
    optimizer = build(case, params)
    result: dict[str, Any] = {}
    if case.get("resume"):
        run(case, range(RESUME_AT), params, optimizer)
        result["resume_params"] = flat(params)
        result["resume_state"] = optimizer.state_dict()
        run(case, range(RESUME_AT, STEPS), params, optimizer)
    else:
        run(case, range(STEPS), params, optimizer)
    stats = optimizer.get_normalization_stats()
    result["params"] = flat(params)
    result["skipped_steps"] = stats["skipped_steps"]
    result["fired_per_group"] = optimizer.get_cautious_update_stats()["fired_per_group"]
    return result


def main() -> None:
    torch.set_num_threads(1)
    fixture = {name: record(case) for name, case in CASES.items()}
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save(fixture, FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes, {len(fixture)} cases)")


if __name__ == "__main__":
    main()
