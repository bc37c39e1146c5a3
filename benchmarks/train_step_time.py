"""Time of whole LoRA training steps through the trainer, per optimizer setting: what ANLO's ``orthogonalize=True``
and ``lr_free=True`` add to a real step of a full-size SD 1.5 or SDXL LoRA, against ANLO's default and AdamW.

Each run is one subprocess that trains as ``benchmarks/train_memory.py`` does (its trainer, model swap and command
line: ``NetworkTrainer`` / ``SdxlNetworkTrainer`` with random weights of the published shapes,
``--cache_latents --network_train_unet_only``, SDXL also ``--cache_text_encoder_outputs``), here always with
``--gradient_checkpointing``, batch 1, ``--mixed_precision`` as given, and the configuration's ``--optimizer_type``,
``--optimizer_args`` and ``--learning_rate``. The VAE stays the tiny one: it only fills the latent cache before the
first step, and its latents have the full-size VAE's shape. Nothing in the trainer changes: the child's trainer
subclass wraps ``training_step`` (forward, backward, clipping, ``optimizer.step()``, the schedule, ``zero_grad``)
and the prepared optimizer's ``step`` in ``time.perf_counter()`` calls (after ``torch.cuda.synchronize()`` on a
GPU).

Per configuration it reports the median over every timed step (each run's first step, which allocates the
optimizer's state and warms caches, is left out), the ratio of that median to the baseline configuration's (the
first of ``--configs`` run on the same model and rank in the same invocation), the median of ``optimizer.step()``
alone, and what the optimizer step adds: its median minus the baseline's, as a share of the baseline's step (the
rest of the step is the same computation in every configuration, so this is the ratio's part that is not load
noise). The configurations run interleaved, ``--rounds`` times each in turn, so that load from
other processes hits all alike. Run from the repository root; full-size runs need several GiB each::

    python -m benchmarks.train_step_time --model SD1.5 --rank 32 --resolution 512 --steps 4 --rounds 2 \\
        --configs ANLO ANLO+orthogonalize ANLO+lr_free AdamW --lock /tmp/bigmem.lock
    python -m benchmarks.train_step_time --model SDXL --mixed_precision no   # a CPU without bf16 arithmetic

Results are appended to ``<out>/train_step_time.jsonl`` as each run finishes (with the invocation's start time) and
the invocation's table is written to ``<out>/train_step_time.md``. ``--tiny`` runs the tiny test models instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs as `python benchmarks/<file>.py`

from benchmarks import train_memory  # noqa: E402
from library.atomic import atomic_output  # noqa: E402

MODELS = ("SD1.5", "SDXL")
#: name -> (--optimizer_type, --optimizer_args, --learning_rate)
# ANLO's rows name orthogonalize either way: it became the default after these rows were first measured.
CONFIGS: dict[str, tuple[str, list[str], float]] = {
    "ANLO": ("ANLO", ["orthogonalize=False"], 1e-4),
    "ANLO+orthogonalize": ("ANLO", ["orthogonalize=True"], 1e-4),
    "ANLO+lr_free": ("ANLO", ["orthogonalize=False", "lr_free=True"], 1.0),
    "AdamW": ("AdamW", [], 1e-4),
}
# one torch thread, glibc's default allocator (train_memory's mmap threshold would add page faults to every step)
CHILD_ENV = {"OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------ the child: one timed training run


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(function: Callable[..., Any], seconds: list[float]) -> Callable[..., Any]:
    """``function``, appending the wall time of each call to ``seconds``."""
    def timed(*args: Any, **kwargs: Any) -> Any:
        _synchronize()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        _synchronize()
        seconds.append(time.perf_counter() - start)
        return result

    return timed


def timed_trainer_class(sdxl: bool, full_size: bool) -> type:
    """train_memory's trainer (full-size random weights), timing each ``training_step`` and ``optimizer.step()``."""
    base = train_memory.trainer_class(sdxl, full_size, full_size_vae=False)  # the VAE only fills the latent cache

    class TimedTrainer(base):
        def __init__(self) -> None:
            super().__init__()
            self.step_seconds: list[float] = []
            self.optimizer_seconds: list[float] = []

        def training_step(self, run: Any, batch: dict) -> Any:
            if not self.step_seconds:  # the prepared optimizer exists from here on
                run.optimizer.step = _timed(run.optimizer.step, self.optimizer_seconds)
            return _timed(super().training_step, self.step_seconds)(run, batch)

    return TimedTrainer


def training_argv(spec: dict[str, Any], data: Path, output: Path) -> list[str]:
    """train_memory's command line with the configuration's optimizer, its arguments and learning rate."""
    optimizer, optimizer_args, learning_rate = CONFIGS[spec["config"]]
    argv = train_memory.training_argv(
        dict(spec, optimizer=optimizer, fp8=False, checkpointing=True), data, output
    )
    argv[argv.index("--learning_rate") + 1] = str(learning_rate)
    argv[argv.index("--mixed_precision") + 1] = spec["mixed_precision"]
    if optimizer_args:
        argv += ["--optimizer_args", *optimizer_args]
    return argv


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run in this process; returns its step times."""
    import tempfile

    import torch

    from library.cli import quiet_import_warnings
    from library.config import parse_args

    quiet_import_warnings()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sdxl = spec["model"] in ("SDXL", "tiny-sdxl")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_memory.write_images(root / "data" / "1_sks", 2, spec["resolution"])
        args = parse_args(training_argv(spec, root / "data", root / "out"), sdxl=sdxl)
        trainer = timed_trainer_class(sdxl, full_size=not spec["model"].startswith("tiny"))()
        trainer.train(args)
    result = dict(spec)
    result.update(
        device="cuda" if torch.cuda.is_available() else "cpu",
        threads=torch.get_num_threads(),
        step_seconds=trainer.step_seconds,
        optimizer_seconds=trainer.optimizer_seconds,
        skipped_steps=trainer.skipped_steps,
        losses=trainer.loss_history,
        load_average=[load_before, os.getloadavg()[0]],
        seconds=time.perf_counter() - started,
    )
    return result


# ------------------------------------------------------------------ the parent: interleaved rounds, the table


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run, in the order run: each round runs every configuration once."""
    return [
        dict(model=args.model, rank=args.rank, config=config, resolution=args.resolution, steps=args.steps,
             mixed_precision=args.mixed_precision, round=index)
        for index in range(args.rounds)
        for config in args.configs
    ]


def summarize(results: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """One row per (model, rank, configuration), in first-run order: the medians over each run's steps after the
    first, and the ratio of the step median to ``baseline``'s on the same model and rank."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["model"], result["rank"], result["config"]), []).append(result)
    rows = []
    for (model, rank, config), runs in groups.items():
        steps = [seconds for run in runs for seconds in run["step_seconds"][1:]]
        optimizer_steps = [seconds for run in runs for seconds in run["optimizer_seconds"][1:]]
        loads = [load for run in runs for load in run["load_average"]]
        optimizer_type, optimizer_args, learning_rate = CONFIGS[config]
        rows.append(dict(
            model=model, rank=rank, config=config, optimizer_type=optimizer_type,
            optimizer_args=" ".join(optimizer_args), learning_rate=learning_rate, runs=len(runs),
            timed_steps=len(steps), step_s=statistics.median(steps), min_step_s=min(steps),
            optimizer_s=statistics.median(optimizer_steps), skipped_steps=sum(run["skipped_steps"] for run in runs),
            load=(min(loads), max(loads)), resolution=runs[0]["resolution"], device=runs[0]["device"],
            mixed_precision=runs[0]["mixed_precision"],
        ))
    for row in rows:
        reference = next((r for r in rows if (r["model"], r["rank"], r["config"]) ==
                          (row["model"], row["rank"], baseline)), None)
        row["ratio"] = row["step_s"] / reference["step_s"] if reference else None
        row["added_optimizer_s"] = row["optimizer_s"] - reference["optimizer_s"] if reference else None
    return rows


def markdown_table(rows: list[dict[str, Any]], baseline: str) -> str:
    lines = [
        f"| model | px | --mixed_precision | rank | configuration | --optimizer_type | --optimizer_args "
        f"| --learning_rate | runs × timed steps | median step s | min step s | ÷ {baseline} | optimizer.step() ms "
        f"| optimizer share | optimizer.step() adds | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f}×"
        reference_step_s = r["step_s"] / r["ratio"] if r["ratio"] else None
        adds = "–" if reference_step_s is None else f"{r['added_optimizer_s'] / reference_step_s:+.2%}"
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['mixed_precision']} | {r['rank']} | {r['config']} "
            f"| {r['optimizer_type']} "
            f"| {r['optimizer_args'] or '–'} | {r['learning_rate']:g} | {r['runs']} × {r['timed_steps'] // r['runs']} "
            f"| {r['step_s']:.2f} | {r['min_step_s']:.2f} | {ratio} | {r['optimizer_s'] * 1000:,.0f} "
            f"| {r['optimizer_s'] / r['step_s']:.2%} | {adds} | {r['load'][0]:.1f}–{r['load'][1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SD1.5", choices=list(MODELS))
    parser.add_argument("--rank", type=int, default=32, help="--network_dim and --network_alpha (default 32)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="optimizer settings to time; the first is the baseline of the ratio (default: all)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"],
                        help="the trainer's --mixed_precision (default bf16; on a CPU without AVX-512 BF16 or AMX, "
                        "bf16 convolutions are emulated and hundreds of times slower than fp32: use no)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run, the first untimed (default 4)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each configuration, interleaved (default 1)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    parser.add_argument("--lock", type=str, default=None,
                        help="run each configuration under `flock LOCK` (machines shared by several jobs)")
    parser.add_argument("--out", type=Path, default=train_memory.DEFAULT_OUT,
                        help="folder for train_step_time.jsonl / .md")
    parser.add_argument("--tiny", action="store_true", help="the tiny test models instead (a quick self-check)")
    parser.add_argument("--table_only", action="store_true",
                        help="run nothing: write the table of the last invocation recorded in <out>")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank < 1 or args.steps < 2 or args.rounds < 1:
        parser.error(f"expected --rank >= 1, --steps >= 2 (one untimed) and --rounds >= 1, got --rank {args.rank} "
                     f"--steps {args.steps} --rounds {args.rounds}")
    if args.tiny:
        args.model = "tiny-sdxl" if args.model == "SDXL" else "tiny-sd1"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    if args.table_only:
        recorded = train_memory.read_results(args.out / "train_step_time.jsonl")
        results = [result for result in recorded if result["invocation"] == recorded[-1]["invocation"]]
        return write_table(results, args.out, results[0]["config"])
    invocation = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in plan(args):
        result = train_memory.run_in_subprocess(spec, args.timeout, args.lock, module="benchmarks.train_step_time",
                                                child_env=CHILD_ENV)
        result["invocation"] = invocation
        results.append(result)
        with open(args.out / "train_step_time.jsonl", "a", encoding="utf-8") as handle:  # a partial run is kept
            handle.write(json.dumps(result) + "\n")
        steps = ", ".join(f"{seconds:.2f}" for seconds in result["step_seconds"])
        print(f"round {spec['round'] + 1} {spec['model']} rank {spec['rank']} {spec['config']}: steps {steps} s "
              f"({result['seconds']:.0f} s in all)", flush=True)
    return write_table(results, args.out, args.configs[0])


def write_table(results: list[dict[str, Any]], out: Path, baseline: str) -> int:
    table = markdown_table(summarize(results, baseline), baseline)
    with atomic_output(out / "train_step_time.md", "w") as handle:
        handle.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
