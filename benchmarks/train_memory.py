"""Peak memory of full-size LoRA training runs through the trainer: SD 1.5 and SDXL, per optimizer, rank,
``--fp8_base`` and ``--gradient_checkpointing``.

Each configuration runs in its own subprocess: ``NetworkTrainer`` / ``SdxlNetworkTrainer`` with every training
flag as a user passes it (``--mixed_precision bf16 --cache_latents --network_train_unet_only``, SDXL also
``--cache_text_encoder_outputs``), two images at a small resolution and a few steps. The only change is the
model: random weights of the published shapes (``library/architectures.py``) built in bf16, in place of a
checkpoint file. Two numbers per run:

* **peak in training**: from the first training step to the end (optimizer state, gradients, activations, the
  frozen model as the loop holds it). On the CPU, the process's peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs`` at the first step); on a GPU, ``torch.cuda.max_memory_allocated`` reset there.
* **peak of the run**: the same since the process started (model building and the latent cache included).

On the CPU the frozen model, the VAE and the text encoders all count (they live in RAM, on the device); on a
GPU the VAE and cached text encoders are moved off the device. The children run with a fixed glibc mmap
threshold so that freed tensors return to the system (the RSS then follows what is allocated). Run from the
repository root; full-size runs need several GiB each::

    python -m benchmarks.train_memory --models SD1.5 --out benchmarks/results        # the SD 1.5 grid, 24 runs
    python -m benchmarks.train_memory --models SDXL --ranks 32 --optimizers ANLO AdamW --checkpointing on

Results are appended to ``<out>/train_memory.jsonl`` as each run finishes and the table of every recorded run is
written to ``<out>/train_memory.md``. ``--tiny`` runs the same on the tiny test models (a self-check in seconds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs as `python benchmarks/<file>.py`

from library.atomic import atomic_output  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MODELS = ("SD1.5", "SDXL")
OPTIMIZERS = ("ANLO", "AdamW", "AdamW8bit")
RANKS = (32, 128)
MIB = 2**20
# glibc: serve every allocation of 64 KiB or more with its own mmap, returned to the system when freed
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------ the child: one training run


def build_full_size(bundle: Any, sdxl: bool, vae: bool = True) -> Any:
    """Replace the tiny bundle's U-Net, VAE (unless ``vae`` is false) and text encoders by full-size ones (random
    weights, bf16); the tokenizers and noise schedule stay (the tiny tokenizer's ids are valid CLIP ids)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.architectures import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, SD15_UNET, SDXL_UNET

    tokenizer = bundle.tokenizers[0]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        bundle.unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET))
        if vae:
            bundle.vae = AutoencoderKL(  # the SD / SDXL VAE: 83.7 M parameters
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
            )
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **special))]
        if sdxl:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT, **special,
                                                                       hidden_act="gelu")))
        bundle.text_encoders = encoders
    finally:
        torch.set_default_dtype(default_dtype)
    return bundle


def _clear_peak_rss() -> None:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS (Linux 4.0 and later)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MIB  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def trainer_class(sdxl: bool, full_size: bool, full_size_vae: bool = True) -> type:
    """The trainer, with the model swapped for full-size random weights (the VAE too when ``full_size_vae``; the
    tiny one encodes latents of the same shape) and the peak reset at the first step."""
    from library.sdxl import SdxlNetworkTrainer
    from library.trainer import NetworkTrainer

    base = SdxlNetworkTrainer if sdxl else NetworkTrainer

    class MeasuredTrainer(base):
        in_training: dict[str, float] | None = None

        def load_models(self, args: argparse.Namespace) -> Any:
            bundle = super().load_models(args)
            return build_full_size(bundle, sdxl, vae=full_size_vae) if full_size else bundle

        def compute_loss(self, batch: dict, train_text_encoder: bool, weight_dtype: Any) -> Any:
            if self.in_training is None:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    self.in_training = {"start_mib": torch.cuda.memory_allocated() / MIB}
                    torch.cuda.reset_peak_memory_stats()
                else:
                    self.in_training = {"start_mib": _status_mib("VmRSS"), "before_mib": _status_mib("VmHWM")}
                    _clear_peak_rss()
            return super().compute_loss(batch, train_text_encoder, weight_dtype)

    return MeasuredTrainer


def write_images(folder: Path, count: int, size: int) -> None:
    """``count`` flat-coloured PNG images with a caption each (content does not change memory)."""
    from PIL import Image

    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (size, size), (40 * index, 120, 200)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("a photo of sks")


def training_argv(spec: dict[str, Any], data: Path, output: Path) -> list[str]:
    """The command line of one run (what a user types, with the measured options)."""
    sdxl = spec["model"] in ("SDXL", "tiny-sdxl")
    argv = [
        "--pretrained_model_name_or_path", "tiny-sdxl" if sdxl else "tiny-sd1",
        "--train_data_dir", str(data), "--caption_extension", ".txt", "--resolution", str(spec["resolution"]),
        "--network_module", "networks.lora", "--network_dim", str(spec["rank"]), "--network_alpha", str(spec["rank"]),
        "--network_train_unet_only", "--optimizer_type", spec["optimizer"], "--learning_rate", "1e-4",
        "--max_train_steps", str(spec["steps"]), "--mixed_precision", "bf16", "--cache_latents",
        "--max_data_loader_n_workers", "0", "--seed", "0", "--output_dir", str(output), "--save_model_as",
        "safetensors",
    ]
    if sdxl:
        argv.append("--cache_text_encoder_outputs")
    if spec["fp8"]:
        argv.append("--fp8_base")
    if spec["checkpointing"]:
        argv.append("--gradient_checkpointing")
    return argv


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run in this process; returns its measurements."""
    import torch

    from library.cli import quiet_import_warnings
    from library.config import parse_args

    quiet_import_warnings()
    torch.set_num_threads(1)
    sdxl = spec["model"] in ("SDXL", "tiny-sdxl")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "data" / "1_sks", 2, spec["resolution"])
        args = parse_args(training_argv(spec, root / "data", root / "out"), sdxl=sdxl)
        trainer = trainer_class(sdxl, full_size=not spec["model"].startswith("tiny"))()
        trainer.train(args)
        lora_bytes = Path(trainer.output_file).stat().st_size
    gpu = torch.cuda.is_available()
    result = dict(spec)
    result.update(
        device="cuda" if gpu else "cpu",
        measure="peak CUDA memory allocated" if gpu else "peak RSS",
        training_start_mib=trainer.in_training["start_mib"],
        training_peak_mib=torch.cuda.max_memory_allocated() / MIB if gpu else _status_mib("VmHWM"),
        run_peak_mib=None if gpu else max(trainer.in_training["before_mib"], _status_mib("VmHWM")),
        losses=trainer.loss_history,
        lora_file_bytes=lora_bytes,
        unet_parameter_mib=_parameter_mib(trainer.models.unet),
        seconds=time.perf_counter() - started,
    )
    return result


def _parameter_mib(module: Any) -> float:
    from library.fp8 import parameter_bytes

    return parameter_bytes(module) / MIB


# ------------------------------------------------------------------ the parent: the grid


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration to run, in the order run."""
    on_off = {"on": [True], "off": [False], "both": [False, True]}
    specs = []
    for model, rank, fp8, checkpointing, optimizer in itertools.product(
        args.models, args.ranks, on_off[args.fp8], on_off[args.checkpointing], args.optimizers
    ):
        specs.append(dict(model=model, rank=rank, optimizer=optimizer, fp8=fp8, checkpointing=checkpointing,
                          resolution=args.resolution, steps=args.steps))
    return specs


def run_in_subprocess(
    spec: dict[str, Any], timeout: float, lock: str | None = None, module: str = "benchmarks.train_memory",
    child_env: dict[str, str] = CHILD_ENV,
) -> dict[str, Any]:
    """Run one configuration in a fresh Python process, ``python -m module --child SPEC`` with ``child_env`` added
    to the environment (under ``flock lock`` when given, so that big runs sharing a machine never overlap); its
    last stdout line is the result as JSON."""
    command = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    if lock:
        command = ["flock", lock, *command]
    completed = subprocess.run(
        command, cwd=Path(__file__).resolve().parents[1], env={**os.environ, **child_env},
        capture_output=True, text=True, timeout=timeout,
    )
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.splitlines()[-15:])
        raise RuntimeError(f"{spec}: exit status {completed.returncode}\n{tail}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per run; the fp8 saving is the drop in training peak against the same row without fp8."""
    def key(r: dict[str, Any], fp8: bool) -> tuple:
        return (r["model"], r["rank"], r["optimizer"], r["checkpointing"], fp8, r["device"])

    by_key = {key(r, r["fp8"]): r for r in results}
    lines = [
        "| model | rank | optimizer | --fp8_base | --gradient_checkpointing | U-Net params | peak in training "
        "| fp8 saves | peak of the run | measure |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        plain = by_key.get(key(r, False))
        saving = f"{plain['training_peak_mib'] - r['training_peak_mib']:,.0f} MiB" if r["fp8"] and plain else ""
        run_peak = "–" if r["run_peak_mib"] is None else f"{r['run_peak_mib']:,.0f} MiB"
        lines.append(
            f"| {r['model']} | {r['rank']} | {r['optimizer']} | {'yes' if r['fp8'] else 'no'} "
            f"| {'yes' if r['checkpointing'] else 'no'} | {r['unet_parameter_mib']:,.0f} MiB "
            f"| {r['training_peak_mib']:,.0f} MiB | {saving} | {run_peak} | {r['measure']} |"
        )
    return "\n".join(lines) + "\n"


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, "tiny-sd1", "tiny-sdxl"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    parser.add_argument("--fp8", choices=["on", "off", "both"], default="both", help="runs with --fp8_base")
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="both",
                        help="runs with --gradient_checkpointing")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run (default 2: the second "
                        "runs with the optimizer state allocated)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    parser.add_argument("--lock", type=str, default=None,
                        help="run each configuration under `flock LOCK` (machines shared by several jobs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for train_memory.jsonl / .md")
    parser.add_argument("--tiny", action="store_true", help="the tiny test models instead (a quick self-check)")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(rank < 1 for rank in args.ranks):
        parser.error(f"--ranks: expected positive integers, got {args.ranks}")
    if args.tiny:
        args.models = ["tiny-sdxl" if model == "SDXL" else "tiny-sd1" for model in args.models]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    log = args.out / "train_memory.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in plan(args):
        result = run_in_subprocess(spec, args.timeout, args.lock)
        with open(log, "a", encoding="utf-8") as handle:  # one line per finished run: a partial grid is kept
            handle.write(json.dumps(result) + "\n")
        print(f"{spec['model']} rank {spec['rank']} {spec['optimizer']} fp8={spec['fp8']} "
              f"checkpointing={spec['checkpointing']}: peak in training {result['training_peak_mib']:,.0f} MiB "
              f"({result['seconds']:.0f} s)", flush=True)
    table = markdown_table(read_results(log))
    with atomic_output(args.out / "train_memory.md", "w") as handle:
        handle.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
