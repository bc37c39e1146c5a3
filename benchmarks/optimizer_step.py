"""Time one ``optimizer.step()`` on a realistic LoRA parameter set: ANLO against torch AdamW.

The parameter set is an SD 1.5 LoRA (kohya's targets: every Linear / 1x1 conv inside the U-Net's
Transformer2DModel blocks and inside the text encoder's attention and MLP blocks), built from the real
module shapes: the U-Net (diffusers ``UNet2DConditionModel``) and text encoder (transformers
``CLIPTextModel``) are instantiated on the ``meta`` device and only the LoRA tensors (down ``r x in``,
up ``out x r``) are materialized, with fixed random gradients.

Every round times one step of every optimizer in turn (interleaved, so load from other processes hits
all of them alike) and reports, per optimizer, the median and minimum time and the median over rounds
of its ratio to AdamW (fused) and to a bandwidth floor, ``torch._foreach_add_(params, grads)`` over the
same tensors (reads params and grads, writes params: the least any first-order step can touch).

    python benchmarks/optimizer_step.py                      # SD 1.5 U-Net + TE LoRA, rank 32
    python benchmarks/optimizer_step.py --rank 128 --threads 1 --json results.json
    python benchmarks/optimizer_step.py --smoke              # a few seconds, checks itself

Optional optimizers (bitsandbytes AdamW8bit, transformers Adafactor, prodigyopt Prodigy,
pytorch_optimizer Lion/CAME/SignSGD) are included when they import and run on the device, and
reported as skipped otherwise (``--smoke`` leaves them out).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.hina_anlo import ANLO  # noqa: E402

Shapes = list[tuple[str, int, int]]  # (module name, in features, out features)

GOAL_RATIO_TO_ADAMW_FUSED = 0.6
GOAL_RATIO_TO_FLOOR = 1.6


# --------------------------------------------------------------------------------------------------
# parameter sets


def sd15_lora_shapes() -> Shapes:
    """Module names and (in, out) features of kohya's SD 1.5 LoRA targets: 192 U-Net + 72 TE modules."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # the rest: SD 1.x defaults
        text_encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
        )
    shapes: Shapes = []
    for prefix, model, containers in (
        ("lora_unet", unet, ("Transformer2DModel",)),
        ("lora_te", text_encoder, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")),
    ):
        for container_name, container in model.named_modules():
            if type(container).__name__ not in containers:
                continue
            for name, module in container.named_modules():
                full_name = f"{prefix}_{container_name}.{name}".replace(".", "_")
                if isinstance(module, torch.nn.Linear):
                    shapes.append((full_name, module.in_features, module.out_features))
                elif isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1):
                    shapes.append((full_name, module.in_channels, module.out_channels))
    return shapes


def smoke_shapes() -> Shapes:
    return [(f"lora_unet_block_{i}", 64 * (1 + i % 3), 64 * (1 + (i + 1) % 3)) for i in range(12)]


def make_lora(shapes: Shapes, rank: int, device: torch.device, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Named LoRA tensors (down ``rank x in``, up ``out x rank``) with fixed gradients of RMS 1e-3."""
    gen = torch.Generator().manual_seed(seed)
    named = []
    for module, fan_in, fan_out in shapes:
        for factor, shape in (("lora_down", (rank, fan_in)), ("lora_up", (fan_out, rank))):
            p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.01).to(device))
            p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
            named.append((f"{module}.{factor}.weight", p))
    return named


def param_groups(named: list[tuple[str, torch.Tensor]], with_names: bool) -> list[dict[str, Any]]:
    """kohya-like groups: text encoder at 5e-5, U-Net at 1e-4."""
    groups = []
    for prefix, lr in (("lora_te", 5e-5), ("lora_unet", 1e-4)):
        members = [(n, p) for n, p in named if n.startswith(prefix)]
        if members:
            group: dict[str, Any] = {"params": [p for _, p in members], "lr": lr}
            if with_names:
                group["param_names"] = [n for n, _ in members]
            groups.append(group)
    return groups


# --------------------------------------------------------------------------------------------------
# optimizers


def optimizer_factories() -> dict[str, Callable[[list[tuple[str, torch.Tensor]]], Any]]:
    """Name -> factory taking the named tensors. Optional packages are imported inside the factory."""

    def anlo(**kwargs):
        return lambda named: ANLO(param_groups(named, with_names=True), **kwargs)

    def adamw(**kwargs):
        return lambda named: torch.optim.AdamW(param_groups(named, False), weight_decay=0.0, **kwargs)

    def bnb_adamw8bit(named):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups(named, False), weight_decay=0.0)

    def adafactor(named):
        from transformers.optimization import Adafactor

        return Adafactor(param_groups(named, False), lr=1e-4, relative_step=False, scale_parameter=False)

    def prodigy(named):
        from prodigyopt import Prodigy

        groups = param_groups(named, False)
        for group in groups:  # Prodigy estimates the step size itself and wants lr 1.0 in every group
            group["lr"] = 1.0
        return Prodigy(groups, lr=1.0)

    def pytorch_optimizer(class_name):
        def build(named):
            import pytorch_optimizer

            return getattr(pytorch_optimizer, class_name)(param_groups(named, False), lr=1e-4)

        return build

    return {
        "anlo": anlo(),
        "anlo_for_loop": anlo(foreach=False),
        "adamw_fused": adamw(fused=True),
        "adamw_foreach": adamw(foreach=True),
        "adamw8bit (bitsandbytes)": bnb_adamw8bit,
        "adafactor (transformers)": adafactor,
        "prodigy (prodigyopt)": prodigy,
        "lion (pytorch_optimizer)": pytorch_optimizer("Lion"),
        "came (pytorch_optimizer)": pytorch_optimizer("CAME"),
        "signsgd (pytorch_optimizer)": pytorch_optimizer("SignSGD"),
    }


REQUIRED = ("floor", "anlo", "anlo_for_loop", "adamw_fused", "adamw_foreach")


def state_bytes_per_parameter(optimizer: Any, numel: int) -> float:
    def tensor_bytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(tensor_bytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(tensor_bytes(v) for v in value)
        return 0

    return sum(tensor_bytes(s) for s in optimizer.state.values()) / numel


# --------------------------------------------------------------------------------------------------
# timing


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = smoke_shapes() if args.smoke else sd15_lora_shapes()
    rank = args.rank

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps: dict[str, Callable[[], Any]] = {}
    notes: dict[str, str] = {}
    state_bytes: dict[str, float] = {}
    numel = 0
    for name, factory in optimizer_factories().items():
        if args.smoke and name not in REQUIRED:
            continue
        named = make_lora(shapes, rank, device)  # every optimizer gets its own copy of the same tensors
        numel = sum(p.numel() for _, p in named)
        try:
            optimizer = factory(named)
            for _ in range(args.warmup):
                optimizer.step()
            synchronize()
        except Exception as error:  # an optional package missing or not supporting this device
            notes[name] = f"skipped: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        steps[name] = optimizer.step
        state_bytes[name] = state_bytes_per_parameter(optimizer, numel)
        if name == "anlo":
            anlo_optimizer = optimizer
    floor_named = make_lora(shapes, rank, device)
    floor_params = [p for _, p in floor_named]
    floor_grads = [p.grad for p in floor_params]

    @torch.no_grad()
    def floor() -> None:
        torch._foreach_add_(floor_params, floor_grads, alpha=-1e-12)

    steps = {"floor": floor, **steps}
    state_bytes["floor"] = 0.0

    times: dict[str, list[float]] = {name: [] for name in steps}
    anlo_modes: list[str] = []
    for _ in range(args.repeats):
        for name, step in steps.items():
            if name == "anlo":
                anlo_modes.append(anlo_optimizer.get_normalization_stats()["next_normalization_mode"])
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times[name].append(time.perf_counter() - start)

    def ratio(name: str, reference: str) -> Optional[float]:
        if reference not in times:
            return None
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    results = {}
    for name, samples in times.items():
        results[name] = {
            "median_ms": 1e3 * statistics.median(samples),
            "min_ms": 1e3 * min(samples),
            "ratio_to_adamw_fused": ratio(name, "adamw_fused"),
            "ratio_to_floor": ratio(name, "floor"),
            "state_bytes_per_param": state_bytes[name],
        }
    for mode in ("global", "layer"):
        samples = [t for t, m in zip(times["anlo"], anlo_modes) if m == mode]
        if samples:
            results["anlo"][f"median_ms_{mode}"] = 1e3 * statistics.median(samples)
    return {
        "config": {
            "parameter_set": "smoke" if args.smoke else "SD 1.5 U-Net + text encoder LoRA (kohya targets)",
            "rank": rank,
            "modules": len(shapes),
            "tensors": 2 * len(shapes),
            "parameters": numel,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
        },
        "results": results,
        "skipped": notes,
    }


def report(data: dict[str, Any]) -> str:
    config = data["config"]
    lines = [
        f"{config['parameter_set']}: rank {config['rank']}, {config['modules']} modules, {config['tensors']} tensors, "
        f"{config['parameters'] / 1e6:.2f} M params; {config['device']}, {config['threads']} threads, "
        f"{config['repeats']} interleaved rounds, torch {config['torch']}",
        f"{'optimizer':<28}{'median ms':>10}{'min ms':>9}{'/AdamW-fused':>13}{'/floor':>8}{'state B/param':>15}",
    ]
    for name, r in data["results"].items():
        to_adamw = "-" if r["ratio_to_adamw_fused"] is None else f"{r['ratio_to_adamw_fused']:.2f}"
        lines.append(
            f"{name:<28}{r['median_ms']:>10.2f}{r['min_ms']:>9.2f}{to_adamw:>13}{r['ratio_to_floor']:>8.2f}"
            f"{r['state_bytes_per_param']:>15.2f}"
        )
    anlo = data["results"]["anlo"]
    if "median_ms_global" in anlo and "median_ms_layer" in anlo:
        lines.append(f"anlo by mode: global {anlo['median_ms_global']:.2f} ms, layer {anlo['median_ms_layer']:.2f} ms")
    lines.append(
        f"goals: ANLO <= {GOAL_RATIO_TO_ADAMW_FUSED}x AdamW-fused: {anlo['ratio_to_adamw_fused']:.2f}x "
        f"({'met' if anlo['ratio_to_adamw_fused'] <= GOAL_RATIO_TO_ADAMW_FUSED else 'NOT met'}); "
        f"<= {GOAL_RATIO_TO_FLOOR}x floor: {anlo['ratio_to_floor']:.2f}x "
        f"({'met' if anlo['ratio_to_floor'] <= GOAL_RATIO_TO_FLOOR else 'NOT met'})"
    )
    for name, note in data["skipped"].items():
        lines.append(f"{name}: {note}")
    return "\n".join(lines)


def check(data: dict[str, Any]) -> list[str]:
    """Sanity checks for --smoke: every required row present, positive finite times, expected state."""
    problems = []
    results = data["results"]
    for name in REQUIRED:
        if name not in results:
            problems.append(f"{name}: missing ({data['skipped'].get(name, 'no result')})")
    for name, r in results.items():
        values = [r["median_ms"], r["min_ms"], r["ratio_to_floor"]]
        if not all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values):
            problems.append(f"{name}: nonsense timing {values}")
    if "anlo" in results and results["anlo"]["state_bytes_per_param"] != 0:
        problems.append(f"anlo keeps {results['anlo']['state_bytes_per_param']} bytes of state per parameter")
    if "adamw_fused" in results and not 8 <= results["adamw_fused"]["state_bytes_per_param"] < 8.1:
        problems.append(f"adamw_fused keeps {results['adamw_fused']['state_bytes_per_param']} bytes per parameter")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30; smoke 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny shapes, few rounds, required optimizers only, 1 thread; exit 1 on nonsense",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.smoke:  # one thread: on a busy shared machine, OpenMP threads can stall tiny steps for 100s of ms
        args.rank = min(args.rank, 4)
        args.threads = args.threads or 1
    if args.repeats is None:
        args.repeats = 5 if args.smoke else 30

    data = run(args)
    print(report(data))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2))
    if args.smoke:
        problems = check(data)
        for problem in problems:
            print(f"SMOKE CHECK FAILED: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
