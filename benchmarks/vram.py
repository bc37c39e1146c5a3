"""Memory and time of one LoRA training step: ANLO (also with ``orthogonalize=True``) vs AdamW vs AdamW8bit on
SD 1.5- and SDXL-sized U-Nets.

On a GPU it measures ``torch.cuda.max_memory_allocated`` and the median time of the training steps after the first
(forward, backward, optimizer step, zero_grad) of a randomly initialised U-Net with the real SD 1.5 / SDXL base
architecture (configs below), frozen in fp16 or bf16, with gradient checkpointing, a ``networks.lora`` LoRA (fp32
weights, autocast compute) at rank 32 and 128, batch 1 at 512² (64×64 latents) / 1024² (128×128 latents)::

    python -m benchmarks.vram --out benchmarks/results           # GPU: the full table

Without a GPU (or with ``--smoke``) it runs a reduced, self-checking CPU mode on tiny configs: the step must
succeed and change the LoRA, and the optimizer state read from ``optimizer.state_dict()`` must be 0 bytes per
parameter for ANLO and 8 for AdamW (fp32 m and v)::

    python -m benchmarks.vram --smoke

Both write ``vram.md`` and ``vram.json`` to ``--out`` and exit non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs as `python benchmarks/<file>.py`

from library.cli import quiet_import_warnings  # noqa: E402

quiet_import_warnings()  # before diffusers loads bitsandbytes

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from library.architectures import SD15_UNET, SDXL_UNET
from library.hina_anlo import ANLO
from library.tiny_models import TINY_SD1_UNET, TINY_SDXL_UNET
from networks.lora import create_network

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

MODELS: dict[str, dict[str, Any]] = {"SD1.5": SD15_UNET, "SDXL": SDXL_UNET}
# The tiny test-size configurations of SPEC §4 (CPU mode).
TINY_MODELS: dict[str, dict[str, Any]] = {"tiny-sd": TINY_SD1_UNET, "tiny-sdxl": TINY_SDXL_UNET}
GPU_RANKS = (32, 128)
TINY_RANK = 8
OPTIMIZERS = ("ANLO", "ANLO+orthogonalize", "AdamW", "AdamW8bit")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CPU_DTYPES = {"fp32": torch.float32}  # CPU mode: half-precision CPU kernels are slow and prove nothing more
TOKENS = 77
MIB = 2**20


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float = 1e-4) -> torch.optim.Optimizer:
    """ANLO (without and with ``orthogonalize``, its default), torch AdamW or bitsandbytes AdamW8bit over ``groups``."""
    if name == "ANLO":
        return ANLO(groups, lr=lr, orthogonalize=False)
    if name == "ANLO+orthogonalize":
        return ANLO(groups, lr=lr, orthogonalize=True)
    plain = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    if name == "AdamW":
        return torch.optim.AdamW(plain, lr=lr)
    if name == "AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(plain, lr=lr)
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")


def _tensor_bytes(value: Any) -> int:
    """Bytes of every tensor with at least one dimension in ``value``, looking inside nested dicts (bitsandbytes
    keeps its quantized state in one)."""
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if torch.is_tensor(value) and value.ndim > 0:
        return value.numel() * value.element_size()
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of per-parameter state in ``optimizer.state_dict()``: every tensor with at least one dimension
    (0-dim step counters and Python scalars are not per-element state)."""
    return sum(_tensor_bytes(per_param) for per_param in optimizer.state_dict()["state"].values())


def step_inputs(config: dict[str, Any], latent_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Random batch-1 U-Net inputs of the right shapes (SDXL also gets pooled text embeds and six time ids)."""
    channels = config.get("in_channels", 4)
    inputs: dict[str, Any] = {
        "sample": torch.randn(1, channels, latent_size, latent_size, device=device, dtype=dtype),
        "timestep": torch.randint(0, 1000, (1,), device=device),
        "encoder_hidden_states": torch.randn(1, TOKENS, config["cross_attention_dim"], device=device, dtype=dtype),
    }
    if config.get("addition_embed_type") == "text_time":
        time_ids_width = 6 * config["addition_time_embed_dim"]
        pooled = config["projection_class_embeddings_input_dim"] - time_ids_width
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[latent_size * 8, latent_size * 8, 0, 0, latent_size * 8, latent_size * 8]],
                                     device=device, dtype=dtype),
        }
    return inputs


@dataclass
class Measurement:
    """One (model, rank, optimizer, dtype) training-step measurement."""

    model: str
    latent: int
    rank: int
    optimizer: str
    dtype: str
    lora_params: int
    state_bytes: int
    weights_mib: float  # allocated after building model + LoRA + optimizer, before the first step
    peak_mib: float | None  # max_memory_allocated over the steps (GPU only)
    loss: float
    lora_changed: bool
    seconds: float
    step_ms: float | None = None  # median wall time of the steps after the first (synchronized on CUDA)

    @property
    def state_bytes_per_param(self) -> float:
        return self.state_bytes / self.lora_params


def measure(
    model: str, config: dict[str, Any], rank: int, optimizer_name: str, dtype_name: str,
    device: torch.device, steps: int = 3,
) -> Measurement:
    """Build the U-Net (random init, frozen, ``dtype``, gradient checkpointing) with a LoRA at ``rank`` and run
    ``steps`` training steps under autocast; the peak covers the steps after the optimizer state exists."""
    started = time.perf_counter()
    dtype = {**DTYPES, **CPU_DTYPES}[dtype_name]
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(**config)
    unet.to(dtype=dtype).requires_grad_(False)
    unet.enable_gradient_checkpointing()
    unet.train()
    network = create_network(1.0, rank, rank, None, [], unet)
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    network.to(device=device, dtype=torch.float32)
    groups, _ = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    params = [p for g in groups for p in g["params"]]
    before = [p.detach().to("cpu", copy=True) for p in params]  # host copies: not part of the device peak
    optimizer = build_optimizer(optimizer_name, groups)
    latent = config["sample_size"]
    inputs = step_inputs(config, latent, device, dtype)
    noise = torch.randn_like(inputs["sample"], dtype=torch.float32)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    weights_mib = torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else 0.0
    loss_value = float("nan")
    step_seconds = []
    for _ in range(steps):
        step_started = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(**inputs).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # waits for the step to finish
        step_seconds.append(time.perf_counter() - step_started)
    peak_mib = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
    changed = any(not torch.equal(p.detach().cpu(), b) for p, b in zip(params, before))
    result = Measurement(
        model, latent, rank, optimizer_name, dtype_name, sum(p.numel() for p in params),
        optimizer_state_bytes(optimizer), weights_mib, peak_mib, loss_value, changed, time.perf_counter() - started,
        1e3 * statistics.median(step_seconds[1:]) if steps > 1 else None,
    )
    del unet, network, optimizer, params, before, inputs, noise
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@dataclass
class LoRASize:
    """LoRA size of a full-size model, counted on the meta device (nothing allocated, nothing measured)."""

    model: str
    rank: int
    modules: int
    params: int


def full_size_lora(model: str, config: dict[str, Any], ranks: list[int]) -> list[LoRASize]:
    """Count the ``networks.lora`` modules and parameters for ``config`` at each rank without allocating."""
    sizes = []
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        for rank in ranks:
            network = create_network(1.0, rank, rank, None, None, unet)
            sizes.append(LoRASize(model, rank, len(network.unet_loras), sum(p.numel() for p in network.parameters())))
    return sizes


def sizes_table(sizes: list[LoRASize]) -> str:
    """LoRA sizes and the optimizer state they imply: AdamW 8 bytes/param (fp32 m and v), ANLO 0."""
    lines = [
        "| model | rank | LoRA modules | LoRA params | AdamW state (8 B/param) | ANLO state |",
        "|---|---|---|---|---|---|",
    ]
    for s in sizes:
        lines.append(f"| {s.model} | {s.rank} | {s.modules} | {s.params / 1e6:.2f} M | {8 * s.params / MIB:,.0f} MiB | 0 |")
    return "\n".join(lines) + "\n"


def check(results: list[Measurement]) -> list[str]:
    """The self-checks: finite loss, LoRA changed, ANLO 0 and AdamW 8 bytes of state per parameter, AdamW8bit
    no more than AdamW."""
    problems = []
    for r in results:
        where = f"{r.model} rank {r.rank} {r.optimizer} {r.dtype}"
        if not torch.isfinite(torch.tensor(r.loss)):
            problems.append(f"{where}: loss {r.loss} is not finite")
        if not r.lora_changed:
            problems.append(f"{where}: the optimizer step left every LoRA weight unchanged")
        expected = {"ANLO": 0.0, "ANLO+orthogonalize": 0.0, "AdamW": 8.0}.get(r.optimizer)
        if expected is not None and r.state_bytes_per_param != expected:
            problems.append(f"{where}: {r.state_bytes_per_param:.3f} bytes of state per parameter, expected {expected:g}")
        if r.optimizer == "AdamW8bit" and r.state_bytes_per_param > 8.0:
            problems.append(f"{where}: AdamW8bit keeps {r.state_bytes_per_param:.3f} bytes/param, more than AdamW")
    return problems


def markdown_table(results: list[Measurement]) -> str:
    """The measurements as a markdown table."""
    lines = [
        "| model | latent | rank | LoRA params | optimizer | dtype | optimizer state | state bytes/param "
        "| allocated before step | peak during steps | step time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = "–" if r.peak_mib is None else f"{r.peak_mib:,.0f} MiB"
        before = "–" if r.peak_mib is None else f"{r.weights_mib:,.0f} MiB"
        step = "–" if r.step_ms is None else f"{r.step_ms:,.1f} ms"
        lines.append(
            f"| {r.model} | {r.latent}×{r.latent} | {r.rank} | {r.lora_params / 1e6:.2f} M | {r.optimizer} | {r.dtype} "
            f"| {r.state_bytes / MIB:,.1f} MiB | {r.state_bytes_per_param:.2f} | {before} | {peak} | {step} |"
        )
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict[str, str]:
    """Device, library versions and date for the report."""
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the reduced CPU mode on tiny configs (self-checking)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for vram.md and vram.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="GPU mode models")
    parser.add_argument("--ranks", nargs="+", type=int, default=list(GPU_RANKS), help="GPU mode LoRA ranks")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="GPU mode dtypes")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    args = parser.parse_args(argv)
    if any(rank < 1 for rank in args.ranks):
        parser.error(f"--ranks: expected positive integers, got {args.ranks}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # the fp16 cast warning repeats for every model built
    gpu = torch.cuda.is_available() and not args.smoke
    if gpu:
        device = torch.device("cuda")
        plan = [(m, MODELS[m], r, d) for m in args.models for r in args.ranks for d in args.dtypes]
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        plan = [(m, c, TINY_RANK, "fp32") for m, c in TINY_MODELS.items()]
        print("no GPU (or --smoke): reduced CPU mode on tiny configs; no peak memory is measured", flush=True)

    results: list[Measurement] = []
    for model, config, rank, dtype in plan:
        for name in args.optimizers:
            results.append(measure(model, config, rank, name, dtype, device, steps=5 if gpu else 2))
            r = results[-1]
            peak = "" if r.peak_mib is None else f", peak {r.peak_mib:,.0f} MiB"
            print(f"{model} rank {rank} {name} {dtype}: state {r.state_bytes_per_param:.2f} B/param{peak} "
                  f"({r.seconds:.1f} s)", flush=True)

    env = environment(device)
    command = "python -m benchmarks.vram " + " ".join(argv if argv is not None else sys.argv[1:])
    mode = "GPU" if gpu else "reduced CPU mode (tiny configs, no peak memory)"
    header = (f"Command: `{command.strip()}`  \nDevice: {env['device']} ({mode}); torch {env['torch']} "
              f"(CUDA {env['cuda']}), diffusers {env['diffusers']}; {env['date']}\n\n")
    sizes = [size for m in args.models for size in full_size_lora(m, MODELS[m], args.ranks)]
    table = markdown_table(results) + "\nFull-size LoRA sizes (counted on the meta device):\n\n" + sizes_table(sizes)
    _write_text(args.out / "vram.md", header + table)
    payload = {"environment": env, "mode": mode, "results": [asdict(r) for r in results],
               "full_size_lora": [asdict(s) for s in sizes]}
    _write_text(args.out / "vram.json", json.dumps(payload, indent=1))
    print(header + table)
    problems = check(results)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
