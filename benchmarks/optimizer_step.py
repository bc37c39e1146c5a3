"""Time one ``optimizer.step()`` on a realistic LoRA parameter set: ANLO against other optimizers.

The parameter set is a kohya LoRA of SD 1.5 (``--model sd15``: U-Net + CLIP-L text encoder) or SDXL base
(``--model sdxl``: U-Net + CLIP-L + OpenCLIP bigG text encoders). The models are built from their real
configurations on the ``meta`` device (nothing allocated), ``networks.lora.create_network`` picks the
targets exactly as in training, and its ``prepare_optimizer_params`` makes the groups (text encoder at
5e-5, U-Net at 1e-4, with ``param_names``). Only the LoRA tensors are then materialized, with fixed
random gradients; every optimizer gets its own copy.

Every round times one step of every optimizer in turn (interleaved, so load from other processes hits
all of them alike). Per optimizer it reports the median and minimum time, the median over rounds of
its ratio to AdamW (fused) and to two references over the same tensors:

* ``floor``: ``torch._foreach_add_(params, grads)``, reads params and grads and writes params, the
  least any first-order step can touch;
* ``two_pass_floor``: ``torch._foreach_norm(grads)`` and then the same add, the least any step that
  normalizes by a norm of the whole gradient can touch (the norm must be known before any write).

It also reports optimizer-state bytes per parameter (tensors in ``optimizer.state``) and the extra
memory allocated inside ``step()``: the peak of live bytes allocated during one untimed step (after
warm-up, so persistent state already exists) minus nothing kept. On CUDA that is
``torch.cuda.max_memory_allocated`` minus the allocation before the step; on the CPU it is the peak of
the running sum of the allocation/free records of ``torch.profiler.profile(profile_memory=True)``.

    python benchmarks/optimizer_step.py --threads 1                  # SD 1.5, rank 32
    python benchmarks/optimizer_step.py --model sdxl --rank 128 --threads 1 --json sdxl128.json
    python benchmarks/optimizer_step.py --smoke                      # a few seconds, checks itself

Optional optimizers (bitsandbytes AdamW8bit, transformers Adafactor, prodigyopt Prodigy,
pytorch_optimizer Lion/CAME/SignSGD) are included when they import and run on the device, and
reported as skipped otherwise; ``--optimizers`` picks a subset (``anlo`` and ``adamw_fused`` always run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import quiet_import_warnings  # noqa: E402

quiet_import_warnings()  # before diffusers (imported for the model shapes) loads bitsandbytes

from library.architectures import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, SD15_UNET, SDXL_UNET  # noqa: E402
from library.hina_anlo import ANLO  # noqa: E402
from networks.lora import create_network  # noqa: E402

#: One optimizer parameter group before materialization: (lr, [(parameter name, shape)]).
GroupSpec = tuple[float, list[tuple[str, tuple[int, ...]]]]
#: The same group materialized: (lr, [(parameter name, tensor with .grad)]).
Group = tuple[float, list[tuple[str, torch.nn.Parameter]]]

GOAL_RATIO_TO_ADAMW_FUSED = 0.6
GOAL_RATIO_TO_FLOOR = 1.6
TEXT_ENCODER_LR = 5e-5
UNET_LR = 1e-4
MIB = float(1 << 20)

MODELS = {"sd15": "SD 1.5", "sdxl": "SDXL base"}


# --------------------------------------------------------------------------------------------------
# parameter sets


def model_lora_spec(model: str, rank: int) -> list[GroupSpec]:
    """kohya's LoRA of ``model`` ("sd15" or "sdxl") at ``rank``: groups, names and shapes, via the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if model == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET)
            text_encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))]
        elif model == "sdxl":
            unet = UNet2DConditionModel(**SDXL_UNET)
            text_encoders = [
                CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
                CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT)),
            ]
        else:
            raise ValueError(f"--model: expected one of {sorted(MODELS)}, got {model!r}")
        network = create_network(1.0, rank, rank, None, text_encoders, unet)
    groups, _ = network.prepare_optimizer_params(TEXT_ENCODER_LR, UNET_LR, UNET_LR)
    return [
        (group["lr"], [(name, tuple(p.shape)) for name, p in zip(group["param_names"], group["params"])])
        for group in groups
    ]


def smoke_spec(rank: int) -> list[GroupSpec]:
    """Twelve small LoRA modules in two groups (the text-encoder group first, like the real ones)."""
    def modules(prefix: str, count: int) -> list[tuple[str, tuple[int, ...]]]:
        tensors = []
        for i in range(count):
            fan_in, fan_out = 64 * (1 + i % 3), 64 * (1 + (i + 1) % 3)
            tensors += [(f"{prefix}_block_{i}.lora_down.weight", (rank, fan_in)),
                        (f"{prefix}_block_{i}.lora_up.weight", (fan_out, rank))]  # fmt: skip
        return tensors

    return [(TEXT_ENCODER_LR, modules("lora_te", 4)), (UNET_LR, modules("lora_unet", 8))]


def materialize(spec: list[GroupSpec], device: torch.device, seed: int = 0) -> list[Group]:
    """Tensors for ``spec`` (values RMS 1e-2) with fixed gradients (RMS 1e-3); the same seed gives the same values."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for lr, tensors in spec:
        named = []
        for name, shape in tensors:
            p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.01).to(device))
            p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
            named.append((name, p))
        groups.append((lr, named))
    return groups


def param_groups(groups: list[Group], with_names: bool) -> list[dict[str, Any]]:
    """torch parameter groups for ``groups``, with ``param_names`` if asked (ANLO finds its layers by name)."""
    result = []
    for lr, named in groups:
        group: dict[str, Any] = {"params": [p for _, p in named], "lr": lr}
        if with_names:
            group["param_names"] = [n for n, _ in named]
        result.append(group)
    return result


def tensors_of(groups: list[Group]) -> list[torch.nn.Parameter]:
    return [p for _, named in groups for _, p in named]


# --------------------------------------------------------------------------------------------------
# optimizers


def optimizer_factories() -> dict[str, Callable[[list[Group]], Any]]:
    """Name -> factory taking the materialized groups. Optional packages are imported inside the factory."""

    def anlo(**kwargs: Any) -> Callable[[list[Group]], Any]:
        options = {"orthogonalize": False, **kwargs}  # "anlo" rows: the step without it, as before it was the default
        return lambda groups: ANLO(param_groups(groups, with_names=True), **options)

    def adamw(**kwargs: Any) -> Callable[[list[Group]], Any]:
        return lambda groups: torch.optim.AdamW(param_groups(groups, False), weight_decay=0.0, **kwargs)

    def bnb_adamw8bit(groups: list[Group]) -> Any:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups(groups, False), weight_decay=0.0)

    def adafactor(groups: list[Group]) -> Any:
        from transformers.optimization import Adafactor

        return Adafactor(param_groups(groups, False), lr=1e-4, relative_step=False, scale_parameter=False)

    def prodigy(groups: list[Group]) -> Any:
        from prodigyopt import Prodigy

        torch_groups = param_groups(groups, False)
        for group in torch_groups:  # Prodigy estimates the step size itself and wants lr 1.0 in every group
            group["lr"] = 1.0
        return Prodigy(torch_groups, lr=1.0)

    def pytorch_optimizer(class_name: str) -> Callable[[list[Group]], Any]:
        def build(groups: list[Group]) -> Any:
            import pytorch_optimizer

            return getattr(pytorch_optimizer, class_name)(param_groups(groups, False), lr=1e-4)

        return build

    return {
        "anlo": anlo(),  # the normalized step on torch's multi-tensor (foreach) ops, without orthogonalize
        "anlo_for_loop": anlo(foreach=False),
        "anlo_alternating": anlo(normalization="alternating"),  # the seed algorithm: global steps cost the same
        "anlo_sinkgd1": anlo(sinkgd_iterations=1),  # row/column normalization: an option that won a little
        "anlo_orthogonalize": anlo(orthogonalize=True),  # ANLO's default: won the LoRA-quality benchmark
        "anlo_lr_free": anlo(lr_free=True),  # the estimated step size (the group lrs become its multipliers)
        "adamw_fused": adamw(fused=True),
        "adamw_foreach": adamw(foreach=True),
        "adamw8bit": bnb_adamw8bit,
        "adafactor": adafactor,
        "prodigy": prodigy,
        "lion": pytorch_optimizer("Lion"),
        "came": pytorch_optimizer("CAME"),
        "signsgd": pytorch_optimizer("SignSGD"),
    }


#: Where an optimizer comes from, for the table (torch and this repository otherwise).
PACKAGES = {
    "adamw8bit": "bitsandbytes", "adafactor": "transformers", "prodigy": "prodigyopt",
    "lion": "pytorch_optimizer", "came": "pytorch_optimizer", "signsgd": "pytorch_optimizer",
}  # fmt: skip
REFERENCES = ("floor", "two_pass_floor")
#: Always run: the ratios are taken to these.
ALWAYS = ("anlo", "adamw_fused")
#: What --smoke runs and checks (besides the references).
SMOKE = ALWAYS + ("anlo_for_loop", "adamw_foreach")


def reference_steps(groups: list[Group]) -> dict[str, Callable[[], None]]:
    """The two references over ``groups``' tensors (see the module docstring)."""
    params = tensors_of(groups)
    grads = [p.grad for p in params]

    @torch.no_grad()
    def floor() -> None:
        torch._foreach_add_(params, grads, alpha=-1e-12)

    @torch.no_grad()
    def two_pass_floor() -> None:
        torch._foreach_norm(grads, 2)
        torch._foreach_add_(params, grads, alpha=-1e-12)

    return {"floor": floor, "two_pass_floor": two_pass_floor}


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


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Discard what C++ code writes to stderr meanwhile (the profiler's own start/stop and allocator lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def extra_step_memory(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``step`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation (+) and free (-) records of
    ``torch.profiler.profile(profile_memory=True)`` in time order; the peak of their running sum.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _stderr_silenced(), torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    # The raw event stream: the FunctionEvent view folds allocations into the op that made them.
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------------------------------
# timing


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = smoke_spec(args.rank) if args.smoke else model_lora_spec(args.model, args.rank)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    wanted = set(args.optimizers or ())
    steps: dict[str, Callable[[], Any]] = {}
    notes: dict[str, str] = {}
    state_bytes: dict[str, float] = {}
    extra_bytes: dict[str, int] = {}
    numel = sum(math.prod(shape) for _, tensors in spec for _, shape in tensors)
    for name, factory in optimizer_factories().items():
        if name not in ALWAYS and name not in (wanted or (SMOKE if args.smoke else (name,))):
            continue
        groups = materialize(spec, device)  # every optimizer gets its own copy of the same tensors
        try:
            optimizer = factory(groups)
            for _ in range(args.warmup):
                optimizer.step()
            synchronize()
        except Exception as error:  # an optional package missing or not supporting this device
            notes[name] = f"skipped: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        steps[name] = optimizer.step
        state_bytes[name] = state_bytes_per_parameter(optimizer, numel)
        extra_bytes[name] = extra_step_memory(optimizer.step, device)
    references = reference_steps(materialize(spec, device))
    for name, step in references.items():
        step()
        state_bytes[name] = 0.0
        extra_bytes[name] = extra_step_memory(step, device)
    steps = {**references, **steps}

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
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
            "ratio_to_two_pass_floor": ratio(name, "two_pass_floor"),
            "state_bytes_per_param": state_bytes[name],
            "extra_step_bytes": extra_bytes[name],
        }
    largest = max(math.prod(shape) for _, tensors in spec for _, shape in tensors)
    return {
        "config": {
            "parameter_set": "smoke" if args.smoke else f"{MODELS[args.model]} LoRA (networks.lora targets)",
            "rank": args.rank,
            "groups": len(spec),
            "tensors": sum(len(tensors) for _, tensors in spec),
            "parameters": numel,
            "largest_tensor_bytes": 4 * largest,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": cpu_model(),
            "command": "python benchmarks/optimizer_step.py " + " ".join(args.argv),
        },
        "results": results,
        "skipped": notes,
    }


def cpu_model() -> str:
    """``lscpu``'s model name (from /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio_text(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}×"


def report(data: dict[str, Any]) -> str:
    """A markdown summary: one line of configuration, the table, the goals, skips."""
    config = data["config"]
    lines = [
        f"{config['parameter_set']}, rank {config['rank']}: {config['tensors']} tensors in {config['groups']} groups, "
        f"{config['parameters'] / 1e6:.2f} M parameters, largest tensor {config['largest_tensor_bytes'] / MIB:.2f} MiB; "
        f"{config['device']} ({config['cpu']}), {config['threads']} thread(s), {config['repeats']} interleaved rounds, "
        f"torch {config['torch']}",
        "",
        "| optimizer | median ms | min ms | ÷ AdamW fused | ÷ floor | ÷ two-pass floor | state B/param "
        "| extra KiB in step() |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data["results"].items():
        lines.append(
            f"| {name}{f' ({PACKAGES[name]})' if name in PACKAGES else ''} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {_ratio_text(r['ratio_to_adamw_fused'])} "
            f"| {_ratio_text(r['ratio_to_floor'])} | {_ratio_text(r['ratio_to_two_pass_floor'])} "
            f"| {r['state_bytes_per_param']:.2f} | {r['extra_step_bytes'] / 1024:,.1f} |"
        )
    anlo = data["results"]["anlo"]
    lines.append("")
    to_adamw, to_floor = anlo["ratio_to_adamw_fused"], anlo["ratio_to_floor"]
    lines.append(
        f"Goals: ANLO ≤ {GOAL_RATIO_TO_ADAMW_FUSED}× AdamW-fused: {to_adamw:.2f}× "
        f"({'met' if to_adamw <= GOAL_RATIO_TO_ADAMW_FUSED else 'NOT met'}); "
        f"≤ {GOAL_RATIO_TO_FLOOR}× floor: {to_floor:.2f}× ({'met' if to_floor <= GOAL_RATIO_TO_FLOOR else 'NOT met'})."
    )
    for name, note in data["skipped"].items():
        lines.append(f"{name}: {note}")
    return "\n".join(lines)


def check(data: dict[str, Any]) -> list[str]:
    """Sanity checks for --smoke: every required row present, positive finite times, expected state, and
    no temporary inside ANLO's step larger than its largest tensor (plus small per-tensor vectors)."""
    problems = []
    results = data["results"]
    for name in REFERENCES + SMOKE:
        if name not in results:
            problems.append(f"{name}: missing ({data['skipped'].get(name, 'no result')})")
    for name, r in results.items():
        values = [r["median_ms"], r["min_ms"], r["ratio_to_floor"]]
        if not all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values):
            problems.append(f"{name}: nonsense timing {values}")
    if "anlo" in results:
        if results["anlo"]["state_bytes_per_param"] != 0:
            problems.append(f"anlo keeps {results['anlo']['state_bytes_per_param']} bytes of state per parameter")
        allowed = data["config"]["largest_tensor_bytes"] + 64 * data["config"]["tensors"]
        if results["anlo"]["extra_step_bytes"] > allowed:
            problems.append(f"anlo allocates {results['anlo']['extra_step_bytes']} bytes inside step(), over {allowed}")
    if "adamw_fused" in results and not 8 <= results["adamw_fused"]["state_bytes_per_param"] < 8.1:
        problems.append(f"adamw_fused keeps {results['adamw_fused']['state_bytes_per_param']} bytes per parameter")
    return problems


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15", help="LoRA of which model (default sd15)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30; smoke 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--optimizers", type=lambda text: [t.strip() for t in text.split(",") if t.strip()], default=None,
        metavar="NAMES", help="comma-separated optimizers to run besides anlo and adamw_fused (default: all; smoke: "
        + ",".join(SMOKE[len(ALWAYS):]) + ")",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny shapes, few rounds, required optimizers only, 1 thread; exit 1 on nonsense",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    if args.rank < 1:
        parser.error(f"--rank: expected a positive integer, got {args.rank}")
    unknown = sorted(set(args.optimizers or ()) - set(optimizer_factories()))
    if unknown:
        parser.error(f"--optimizers: unknown {', '.join(unknown)}; known: {', '.join(optimizer_factories())}")
    if args.smoke:  # one thread: on a busy shared machine, OpenMP threads can stall tiny steps for 100s of ms
        args.rank = min(args.rank, 4)
        args.threads = args.threads or 1
    if args.repeats is None:
        args.repeats = 5 if args.smoke else 30

    data = run(args)
    print(report(data))
    if args.json is not None:
        write_atomically(args.json, json.dumps(data, indent=2))
    if args.smoke:
        problems = check(data)
        for problem in problems:
            print(f"SMOKE CHECK FAILED: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
