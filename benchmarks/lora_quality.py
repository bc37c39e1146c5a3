"""LoRA fine-tuning quality: how fast each optimizer teaches a pretrained diffusion U-Net a new concept.

Setup (see ``benchmarks/digits_unet.py``): an SD-architecture U-Net pretrained on scikit-learn's digits 0–8
learns digit 9 through a LoRA (``networks.lora``, kohya's U-Net targets) under a caption embedding it has never
seen (``--concept`` holds out another digit instead; ``--image_size`` resizes the 8×8 scans, bilinear). The score
is the diffusion (ε-MSE) loss on held-out images of the new digit at FIXED noise and timesteps (stratified over
0..999), measured along training. Every optimizer is run on the same learning-rate grid and seeds (``--seeds``
for AdamW and ANLO; ``--variant_seeds``, by default the same, for the other variants) and is reported at its
best lr (lowest mean final loss):

* final validation loss (mean ± std over seeds),
* steps to reach AdamW's best validation loss, and that count relative to AdamW's own.

Run from the repository root::

    nice -n 19 python -m benchmarks.lora_quality --out benchmarks/results          # the full benchmark
    python -m benchmarks.lora_quality --smoke                                      # < 30 s self-check

It writes ``lora_quality.md`` (table), ``lora_quality.png`` (curves) and ``lora_quality.json`` (every curve) to
``--out``. Besides ANLO's own options (``normalization``, ``normalize_frequency``, weight decay, the cautious gate,
SinkGD-style row/column normalization, orthogonalization), the variants include the Riemannian LoRA preconditioner
and SWAN's row normalization applied to each LoRA pair's gradients before ANLO (``benchmarks/stateless_variants.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs as `python benchmarks/<file>.py`

from library.cli import quiet_import_warnings  # noqa: E402

quiet_import_warnings()  # before diffusers loads bitsandbytes

import torch
from diffusers import UNet2DConditionModel

from benchmarks.digits_unet import (
    NUM_CLASSES,
    DigitsConfig,
    caption_embeddings,
    diffusion_loss,
    load_digit_images,
    noise_scheduler,
    pretrained_unet,
)
from benchmarks.stateless_variants import (
    DistanceBoundEstimator,
    LoRAMuonSGD,
    PairTransform,
    PairTransformANLO,
    chain,
    lora_muon_,
    normalize_tensors_,
    riemannian_precondition_,
    row_normalize_tensors_,
)
from library import hina_anlo
from library.hina_anlo import ANLO
from networks.lora import LoRANetwork, create_network

# Half-decades around the optimum at this horizon (3e-4 lost for every optimizer in a pilot).
LR_GRID = (2e-3, 3e-3, 5e-3, 7e-3)
SMOKE_LRS = (1e-4, 1e-3)
# LoRA-Muon's own grid: its step is sized in the spectral norm of the product's change, not in RMS per entry
# (seed 0 at rank 8 from 3e-3 to 3e-1 was best at 1e-2).
LORA_MUON_LRS = (5e-3, 1e-2, 2e-2)
NETWORK_DIM = 8
NETWORK_ALPHA = 4.0
BATCH_SIZE = 16
TRAIN_IMAGES = 100  # of the new digit's ~180 scans (180 nines); the rest are the held-out validation images
EVAL_BATCH = 512
WEIGHT_DECAY = 1e-2  # for the ANLO weight-decay variants (AdamW's own default is also 1e-2)
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class OptimizerSpec:
    """One benchmarked optimizer: a label, how to build it from param groups and an lr, and whether the
    groups keep their ``param_names`` (without them ANLO's layer mode falls back to one layer per tensor)."""

    label: str
    build: Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]
    named_groups: bool = True
    lrs: tuple[float, ...] | None = None  # its own lr grid (learning-rate-free optimizers: lr 1), else --lrs
    warmup_steps: int = 0  # linear lr warm-up from 0 over this many steps (LambdaLR), then constant ...
    cosine: bool = False  # ... or a cosine decay to 0 over the rest of the run (sd-scripts' --lr_scheduler cosine)


def _anlo(**kwargs: Any) -> Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]:
    # The rows labelled "ANLO" were measured before orthogonalize=True became ANLO's default: a row orthogonalizes
    # only where its options say so, so every documented row reproduces.
    options = {"orthogonalize": False, **kwargs}

    def build(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        return ANLO(groups, lr=lr, **options)

    return build


def _anlo_bound(
    d0: float = hina_anlo._LR_FREE_D0, **kwargs: Any
) -> Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]:
    """ANLO(lr_free=True) with the step-size estimator it had before, the distance bound, starting at ``d0`` (its
    rows in docs/benchmarks.md were measured with it)."""
    anlo = _anlo(lr_free=True, **kwargs)

    def build(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        optimizer = anlo(groups, lr)
        optimizer._lr_free = DistanceBoundEstimator(d0)
        return optimizer

    return build


def _alternating(**kwargs: Any) -> Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]:
    return _anlo(normalization="alternating", **kwargs)


def _pair_transform_anlo(
    transform: PairTransform, per_tensor: bool = False, normalization: str = "alternating", **kwargs: Any
) -> Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]:
    kwargs = {"orthogonalize": False, **kwargs}  # as _anlo: only where the row says so

    def build(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        return PairTransformANLO(
            groups, transform, per_tensor=per_tensor, lr=lr, normalization=normalization, **kwargs
        )

    return build


# Riemannian LoRA preconditioner (arXiv 2402.02347) at the reference implementation's damping; a pilot with δ 1e-2
# (PEFT's default) gave the same loss within 0.01 %.
RIEMANNIAN = partial(riemannian_precondition_, delta=1e-6)


def _prodigy(**kwargs: Any) -> Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]:
    def build(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, **kwargs)

    return build


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr)


def _dadapt_adam(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    from dadaptation import DAdaptAdam

    return DAdaptAdam(groups, lr=lr)


def _schedule_free_adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(groups, lr=lr)


#: Multipliers of ANLO(lr_free=True)'s estimated step size in the benchmark, each its own row.
LR_FREE_MULTIPLIERS = (0.5, 1.0, 2.0)
WARMUP_STEPS = 15  # 10 % of the default 150 steps


def optimizer_specs() -> dict[str, OptimizerSpec]:
    """Every optimizer this benchmark knows, by label."""
    specs = [
        OptimizerSpec("AdamW", _adamw),
        # ANLO as constructed by default: one norm per LoRA module on every step.
        OptimizerSpec("ANLO", _anlo()),
        # The same with lora_down and lora_up each its own layer (what stock sd-scripts gets: no param_names).
        OptimizerSpec("ANLO per-tensor", _anlo(), named_groups=False),
        OptimizerSpec("ANLO global", _anlo(normalization="global")),
        # SinkGD row/column normalization (arXiv 2502.06742) before the module norm; 1 iteration did as well as 5.
        OptimizerSpec("ANLO+SinkGD1", _anlo(sinkgd_iterations=1)),
        # Every gradient matrix to its orthogonal polar factor before the module norm (SWAN's whitening, Muon's
        # orthogonalization without momentum).
        OptimizerSpec("ANLO+orthogonalize", _anlo(orthogonalize=True)),
        # The seed algorithm, global and module norms in turn (ANLO's default before this benchmark), and the
        # choices first measured on it; pinned to it, so their rows in docs/benchmarks.md reproduce.
        OptimizerSpec("ANLO alternating", _alternating()),
        OptimizerSpec("ANLO alternating per-tensor", _alternating(), named_groups=False),
        OptimizerSpec("ANLO alternating nf=2", _alternating(normalize_frequency=2)),
        OptimizerSpec("ANLO alternating nf=4", _alternating(normalize_frequency=4)),
        OptimizerSpec("ANLO wd coupled", _alternating(weight_decay=WEIGHT_DECAY, decoupled_weight_decay=False)),
        OptimizerSpec("ANLO wd decoupled", _alternating(weight_decay=WEIGHT_DECAY, decoupled_weight_decay=True)),
        # ANLO's cautious gate can only fire when coupled weight decay turns the update away from the gradient.
        OptimizerSpec(
            "ANLO wd coupled+cautious",
            _alternating(weight_decay=WEIGHT_DECAY, decoupled_weight_decay=False, use_cautious_update=True),
        ),
        OptimizerSpec("ANLO alternating+SinkGD1", _alternating(sinkgd_iterations=1)),
        OptimizerSpec("ANLO alternating+SinkGD5", _alternating(sinkgd_iterations=5)),
        # Riemannian preconditioning before ANLO's module layers: loses (a tiny lora_up inflates grad_down).
        OptimizerSpec("ANLO alternating+Riem d1e-6", _pair_transform_anlo(RIEMANNIAN)),
        # ... before per-tensor layers: still loses to plain ANLO (the alternation with global norms remains).
        OptimizerSpec("ANLO alternating+Riem per-tensor d1e-6", _pair_transform_anlo(RIEMANNIAN, per_tensor=True)),
        # ... then every tensor to unit RMS: a tie with per-tensor layer norms alone; the preconditioner adds nothing.
        OptimizerSpec(
            "ANLO alternating+Riem+tensor-norm", _pair_transform_anlo(chain(RIEMANNIAN, normalize_tensors_))
        ),
        # SWAN's whitening (arXiv 2412.13148) after its row normalization: no better than the whitening alone.
        OptimizerSpec(
            "ANLO+rows+orthogonalize",
            _pair_transform_anlo(row_normalize_tensors_, normalization="layer", orthogonalize=True),
        ),
        # LoRA-Muon (arXiv 2606.12921) without momentum: Muon's step of the product on the rank-r manifold ...
        OptimizerSpec("LoRA-Muon", LoRAMuonSGD, lrs=LORA_MUON_LRS),
        # ... and its directions rescaled by ANLO's module norms, or by per-tensor ones.
        OptimizerSpec("ANLO+LoRA-Muon", _pair_transform_anlo(lora_muon_, normalization="layer")),
        OptimizerSpec(
            "ANLO+LoRA-Muon per-tensor", _pair_transform_anlo(lora_muon_, per_tensor=True, normalization="layer")
        ),
        # Learning-rate-free: ANLO's estimated step size at a fixed multiplier each (lr = the multiplier), and the
        # learning-rate-free optimizers LoRA trainers ship, at lr 1 as their authors recommend.
        *[OptimizerSpec(f"ANLO lr_free x{m:g}", _anlo(lr_free=True), lrs=(m,)) for m in LR_FREE_MULTIPLIERS],
        *[
            OptimizerSpec(f"ANLO+orthogonalize lr_free x{m:g}", _anlo(lr_free=True, orthogonalize=True), lrs=(m,))
            for m in LR_FREE_MULTIPLIERS
        ],
        OptimizerSpec("ANLO lr_free x1 per-tensor", _anlo(lr_free=True), named_groups=False, lrs=(1.0,)),
        # ... under a cosine decay, with and without a warm-up; AdamW under the same schedules on --lrs.
        OptimizerSpec("ANLO lr_free x1 cosine", _anlo(lr_free=True), lrs=(1.0,), cosine=True),
        OptimizerSpec(
            "ANLO lr_free x1 warmup+cosine", _anlo(lr_free=True), lrs=(1.0,), warmup_steps=WARMUP_STEPS, cosine=True
        ),
        OptimizerSpec("AdamW cosine", _adamw, cosine=True),
        OptimizerSpec("AdamW warmup+cosine", _adamw, warmup_steps=WARMUP_STEPS, cosine=True),
        # ... with the estimator lr_free had before (the distance bound), as its rows were measured: as above, ...
        *[OptimizerSpec(f"ANLO lr_free bound x{m:g}", _anlo_bound(), lrs=(m,)) for m in LR_FREE_MULTIPLIERS],
        *[
            OptimizerSpec(f"ANLO lr_free bound x{m:g} per-tensor", _anlo_bound(), named_groups=False, lrs=(m,))
            for m in LR_FREE_MULTIPLIERS
        ],
        # ... started at d0 = 1e-3 instead of 1e-6, near the step size the estimate ends at (a diagnostic), ...
        *[OptimizerSpec(f"ANLO lr_free bound x{m:g} d0=1e-3", _anlo_bound(1e-3), lrs=(m,)) for m in (0.5, 1.0)],
        # ... and with orthogonalized gradients.
        *[
            OptimizerSpec(f"ANLO+orthogonalize lr_free bound x{m:g}", _anlo_bound(orthogonalize=True), lrs=(m,))
            for m in LR_FREE_MULTIPLIERS
        ],
        OptimizerSpec("Prodigy", _prodigy(), lrs=(1.0,)),
        OptimizerSpec(
            "Prodigy safeguard+warmup", _prodigy(safeguard_warmup=True), lrs=(1.0,),
            warmup_steps=WARMUP_STEPS,
        ),  # fmt: skip
        OptimizerSpec("DAdaptAdam", _dadapt_adam, lrs=(1.0,)),
        # Schedule-free AdamW (its train()/eval() modes are switched around every evaluation); on --lrs.
        OptimizerSpec("AdamW schedule-free", _schedule_free_adamw),
    ]
    return {spec.label: spec for spec in specs}


#: The main table of docs/benchmarks.md: what a run without --optimizers measures.
MAIN_OPTIMIZERS = ("AdamW", "ANLO", "ANLO per-tensor", "ANLO alternating", "ANLO+SinkGD1", "ANLO+orthogonalize")
SMOKE_OPTIMIZERS = ("AdamW", "ANLO", "ANLO+SinkGD1", "ANLO+orthogonalize", "ANLO alternating")
REFERENCE_PAIR = ("AdamW", "ANLO")  # always run with --seeds; the other variants with --variant_seeds


# --------------------------------------------------------------------------------------------------- LoRA


def attach_lora(
    unet: UNet2DConditionModel, seed: int, rank: int = NETWORK_DIM, alpha: float = NETWORK_ALPHA
) -> LoRANetwork:
    """Freeze ``unet`` and attach a LoRA of ``rank`` and ``alpha``, seeded by ``seed``."""
    unet.requires_grad_(False)
    torch.manual_seed(seed)
    network = create_network(1.0, rank, alpha, None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return network


# --------------------------------------------------------------------------------------------------- data


@dataclass
class Setup:
    """The pretrained model and the data every run shares."""

    config: DigitsConfig
    base: UNet2DConditionModel
    train_images: torch.Tensor  # (TRAIN_IMAGES, 1, S, S)
    val_images: torch.Tensor  # (V·draws, 1, S, S): each held-out image repeated per draw
    val_noise: torch.Tensor
    val_timesteps: torch.Tensor
    context: torch.Tensor  # (1, tokens, dim): the new concept's caption embedding
    scheduler: Any = field(default_factory=noise_scheduler)


def validation_draws(images: torch.Tensor, draws_per_image: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Fixed (images, noise, timesteps): each image ``draws_per_image`` times. The timesteps are an even grid
    over 0..999 (one per draw, dealt out to the draws in a random order), so only the noise and the deal depend
    on ``seed``: the estimate does not hinge on how many draws happened to land at extreme timesteps."""
    generator = torch.Generator().manual_seed(seed)
    repeated = images.repeat(draws_per_image, 1, 1, 1)
    n = len(repeated)
    grid = ((torch.arange(n, dtype=torch.float64) + 0.5) * (1000 / n)).floor().long()
    timesteps = grid[torch.randperm(n, generator=generator)]
    noise = torch.randn(repeated.shape, generator=generator)
    return repeated, noise, timesteps


def make_setup(config: DigitsConfig, cache_dir: Path, draws_per_image: int, draw_seed: int = 1000) -> Setup:
    """Load (or pretrain) the base model and split the new concept's images into training and held-out
    validation images."""
    base = pretrained_unet(config, cache_dir)
    images, labels = load_digit_images(config.image_size)
    concept = images[labels == config.concept]
    order = torch.randperm(len(concept), generator=torch.Generator().manual_seed(0))
    train, held_out = concept[order[:TRAIN_IMAGES]], concept[order[TRAIN_IMAGES:]]
    val_images, val_noise, val_timesteps = validation_draws(held_out, draws_per_image, draw_seed)
    context = caption_embeddings(config)[config.concept].unsqueeze(0)
    return Setup(config, base, train, val_images, val_noise, val_timesteps, context)


@torch.no_grad()
def validation_loss(unet: UNet2DConditionModel, setup: Setup, draws: tuple[torch.Tensor, ...] | None = None) -> float:
    """Mean ε-MSE over the fixed validation draws (``setup``'s own unless ``draws`` is given)."""
    images, noise, timesteps = draws if draws is not None else (setup.val_images, setup.val_noise, setup.val_timesteps)
    total = 0.0
    for start in range(0, len(images), EVAL_BATCH):
        chunk = slice(start, start + EVAL_BATCH)
        context = setup.context.expand(len(images[chunk]), -1, -1)
        losses = diffusion_loss(unet, setup.scheduler, images[chunk], context, noise[chunk], timesteps[chunk])
        total += losses.sum().item()
    return total / len(images)


# --------------------------------------------------------------------------------------------------- training


@dataclass
class RunResult:
    """One training run: validation loss at ``steps`` (step 0 = the pretrained model)."""

    label: str
    lr: float
    seed: int
    steps: list[int]
    losses: list[float]
    seconds: float


def lr_factor(step: int, warmup_steps: int, cosine_steps: int | None = None) -> float:
    """The lr factor of step ``step`` (0-based): a linear warm-up, (step + 1) / warmup_steps, then 1; or, with
    ``cosine_steps`` (the whole run), a cosine decay from 1 to 0 over the steps after the warm-up."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cosine_steps is None:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / (cosine_steps - warmup_steps)))


def train_run(
    setup: Setup, spec: OptimizerSpec, lr: float, seed: int, steps: int, eval_every: int, initial_loss: float,
    rank: int = NETWORK_DIM, alpha: float = NETWORK_ALPHA,
) -> tuple[RunResult, UNet2DConditionModel]:
    """Train a fresh LoRA (``rank``, ``alpha``) on the new concept with ``spec`` at ``lr``; the batches, noise and
    timesteps depend only on ``seed``, so every optimizer sees the same data. Returns the curve and the trained
    (LoRA-applied) U-Net."""
    start = time.perf_counter()
    unet = copy.deepcopy(setup.base)
    network = attach_lora(unet, seed, rank, alpha)
    groups, _ = network.prepare_optimizer_params(None, lr, lr)
    if not spec.named_groups:
        groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    optimizer = spec.build(groups, lr)
    scheduler = None
    if spec.warmup_steps or spec.cosine:
        factor = partial(lr_factor, warmup_steps=spec.warmup_steps, cosine_steps=steps if spec.cosine else None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    modes = hasattr(optimizer, "train") and hasattr(optimizer, "eval")  # schedule-free: train / eval weights
    if modes:
        optimizer.train()
    generator = torch.Generator().manual_seed(seed)
    timesteps_total = setup.scheduler.config.num_train_timesteps
    context = setup.context.expand(BATCH_SIZE, -1, -1)
    curve_steps, curve_losses = [0], [initial_loss]
    for step in range(1, steps + 1):
        index = torch.randint(0, len(setup.train_images), (BATCH_SIZE,), generator=generator)
        batch = setup.train_images[index]
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, timesteps_total, (BATCH_SIZE,), generator=generator)
        loss = diffusion_loss(unet, setup.scheduler, batch, context, noise, timesteps).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if step % eval_every == 0 or step == steps:
            curve_steps.append(step)
            if modes:
                optimizer.eval()
            curve_losses.append(validation_loss(unet, setup))
            if modes:
                optimizer.train()
    result = RunResult(spec.label, lr, seed, curve_steps, curve_losses, time.perf_counter() - start)
    return result, unet


# --------------------------------------------------------------------------------------------------- summary


def lr_text(lr: float) -> str:
    """``3e-03``, or ``1.5e-03`` where one digit would round the learning rate to another grid point."""
    return f"{lr:.1e}".replace(".0e", "e")


def steps_to_reach(steps: list[int], losses: list[float], target: float) -> int | None:
    """The first evaluated step whose loss is ≤ ``target``, or None if the curve never gets there."""
    for step, loss in zip(steps, losses):
        if loss <= target:
            return step
    return None


@dataclass
class Row:
    """One optimizer at its best lr."""

    label: str
    best_lr: float
    final_mean: float
    final_std: float
    best_loss: float
    steps_to_target: int | None
    ratio_to_adamw: float | None
    lr_at_grid_edge: bool


def mean_curves(results: list[RunResult]) -> dict[tuple[str, float], tuple[list[int], list[float], list[float]]]:
    """(label, lr) → (steps, mean over seeds, std over seeds)."""
    grouped: dict[tuple[str, float], list[RunResult]] = {}
    for r in results:
        grouped.setdefault((r.label, r.lr), []).append(r)
    out = {}
    for key, runs in grouped.items():
        losses = torch.tensor([r.losses for r in runs], dtype=torch.float64)
        std = losses.std(dim=0, unbiased=True) if len(runs) > 1 else torch.zeros(losses.shape[1])
        out[key] = (runs[0].steps, losses.mean(dim=0).tolist(), std.tolist())
    return out


def summarize(results: list[RunResult], lrs: tuple[float, ...], reference: str = "AdamW") -> list[Row]:
    """Best lr per optimizer (lowest mean final loss) and steps to reach the reference's best mean loss."""
    curves = mean_curves(results)
    labels = list(dict.fromkeys(r.label for r in results))
    best: dict[str, float] = {}
    for label in labels:
        candidates = [lr for lr in sorted({r.lr for r in results if r.label == label}) if (label, lr) in curves]
        best[label] = min(candidates, key=lambda lr: curves[(label, lr)][1][-1])
    ref_steps, ref_mean, _ = curves[(reference, best[reference])]
    target = min(ref_mean)
    ref_reach = steps_to_reach(ref_steps, ref_mean, target)
    rows = []
    for label in labels:
        lr = best[label]
        steps, mean, std = curves[(label, lr)]
        reach = steps_to_reach(steps, mean, target)
        ratio = reach / ref_reach if reach is not None and ref_reach else None
        own = sorted({r.lr for r in results if r.label == label})
        edge = len(own) > 2 and lr in (min(own), max(own))
        rows.append(Row(label, lr, mean[-1], std[-1], min(mean), reach, ratio, edge))
    return rows


def markdown_table(rows: list[Row], reference: str = "AdamW") -> str:
    """The summary as a markdown table."""
    ref = next(r for r in rows if r.label == reference)
    lines = [
        f"| optimizer | best lr | final val loss (mean ± std) | vs {reference} | best val loss "
        f"| steps to {reference}'s best | × {reference}'s steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lr = lr_text(r.best_lr) + (" (grid edge)" if r.lr_at_grid_edge else "")
        change = 100.0 * (r.final_mean / ref.final_mean - 1.0)
        reach = "not reached" if r.steps_to_target is None else str(r.steps_to_target)
        ratio = "–" if r.ratio_to_adamw is None else f"{r.ratio_to_adamw:.2f}"
        lines.append(
            f"| {r.label} | {lr} | {r.final_mean:.5f} ± {r.final_std:.5f} | {change:+.2f} % | {r.best_loss:.5f} "
            f"| {reach} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], rows: list[Row], lrs: tuple[float, ...], path: Path, concept: int) -> None:
    """Validation curves at each optimizer's best lr, and final loss against lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = mean_curves(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for row in rows:
        steps, mean, std = curves[(row.label, row.best_lr)]
        low = [m - s for m, s in zip(mean, std)]
        high = [m + s for m, s in zip(mean, std)]
        (line,) = left.plot(steps, mean, label=f"{row.label} (lr {lr_text(row.best_lr)})")
        left.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
        finals = [(lr, curves[(row.label, lr)][1][-1]) for lr in lrs if (row.label, lr) in curves]
        right.plot(*zip(*finals), marker="o", color=line.get_color(), label=row.label)
    target = min(curves[("AdamW", next(r.best_lr for r in rows if r.label == "AdamW"))][1])
    left.axhline(target, color="gray", linestyle="--", linewidth=1, label="AdamW best")
    left.set(
        xlabel="step", ylabel=f"validation ε-MSE (held-out {concept}s)", title="validation loss at best lr (±1 std)"
    )
    right.set(xscale="log", xlabel="learning rate", ylabel="final validation ε-MSE", title="lr sensitivity")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    _atomic_write(path, write)


# --------------------------------------------------------------------------------------------------- noise check


def validation_noise(
    setup: Setup, models: dict[str, UNet2DConditionModel], draws_per_image: int, sets: int = 5
) -> dict[str, Any]:
    """How much the validation numbers depend on which fixed draws were picked. Every model (and the pretrained
    base) is evaluated on ``sets`` independent draw sets; reported as relative std over the sets of

    * each model's loss (the absolute level; common to all optimizers, which share one draw set), and
    * the difference between the first two models' losses, relative to the first one's loss (what decides a
      comparison between optimizers).
    """
    held_out = setup.val_images[: len(setup.val_images) // draws_per_image]
    losses: dict[str, list[float]] = {"pretrained": [], **{label: [] for label in models}}
    for k in range(sets):
        draws = validation_draws(held_out, draws_per_image, seed=2000 + k)
        losses["pretrained"].append(validation_loss(setup.base, setup, draws))
        for label, unet in models.items():
            losses[label].append(validation_loss(unet, setup, draws))
    table = {label: torch.tensor(values, dtype=torch.float64) for label, values in losses.items()}
    report: dict[str, Any] = {
        "draw_sets": sets,
        "draws": len(setup.val_images),
        "level_rel_std": {label: (t.std() / t.mean()).item() for label, t in table.items()},
    }
    if len(models) >= 2:
        first, second = list(models)[:2]
        difference = table[first] - table[second]
        report["compared"] = [first, second]
        report["difference_rel_std"] = (difference.std() / table[first].mean()).item()
    return report


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny self-checking run (< 30 s) in a temp dir")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (0..N-1) per lr for AdamW and ANLO")
    parser.add_argument("--variant_seeds", type=int, default=None,
                        help="seeds (0..N-1) per lr for the other optimizers (default: --seeds)")
    parser.add_argument("--steps", type=int, default=150, help="LoRA training steps per run")
    parser.add_argument("--eval_every", type=int, default=25, help="steps between validation evaluations")
    parser.add_argument("--draws", type=int, default=4, help="validation draws (noise, timestep) per held-out image")
    parser.add_argument("--rank", type=int, default=NETWORK_DIM, help=f"LoRA rank (default {NETWORK_DIM})")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: half the rank)")
    parser.add_argument("--concept", type=int, default=DigitsConfig.concept,
                        help=f"the digit held out of pretraining and taught to the LoRA "
                        f"(default {DigitsConfig.concept})")
    parser.add_argument("--image_size", type=int, default=DigitsConfig.image_size,
                        help=f"image side in px; the {DigitsConfig.image_size}-px scans are resized bilinearly "
                        f"(default {DigitsConfig.image_size}: native)")
    parser.add_argument("--pretrain_steps", type=int, default=DigitsConfig.pretrain_steps,
                        help=f"AdamW steps that pretrain the base U-Net (default {DigitsConfig.pretrain_steps})")
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LR_GRID),
                        help=f"the learning-rate grid (default: {' '.join(f'{lr:g}' for lr in LR_GRID)})")
    others = [label for label in optimizer_specs() if label not in MAIN_OPTIMIZERS]
    parser.add_argument("--optimizers", nargs="+", default=None,
                        help=f"labels to run (default: {', '.join(MAIN_OPTIMIZERS)}; also: {', '.join(others)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the table, plot and JSON")
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE, help="where the pretrained U-Net is cached")
    args = parser.parse_args(argv)
    specs = optimizer_specs()
    unknown = [label for label in args.optimizers or [] if label not in specs]
    if unknown:
        parser.error(f"--optimizers: unknown label(s) {unknown}; expected some of {list(specs)}")
    if "AdamW" not in (args.optimizers or ["AdamW"]):
        parser.error("--optimizers: must include AdamW (the reference)")
    if any(lr <= 0 for lr in args.lrs):
        parser.error(f"--lrs: expected positive learning rates, got {args.lrs}")
    if args.variant_seeds is None:
        args.variant_seeds = args.seeds
    for name in ("seeds", "variant_seeds", "steps", "eval_every", "draws", "rank", "pretrain_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if not 0 <= args.concept < NUM_CLASSES:
        parser.error(f"--concept: expected a digit 0..{NUM_CLASSES - 1}, got {args.concept}")
    if args.image_size < DigitsConfig.image_size or args.image_size % 2:
        parser.error(
            f"--image_size: expected an even number of px >= {DigitsConfig.image_size}, got {args.image_size}"
        )
    if args.alpha is None:
        args.alpha = args.rank / 2
    if not args.alpha > 0:
        parser.error(f"--alpha: expected a positive number, got {args.alpha:g}")
    return args


def run_benchmark(
    setup: Setup, labels: list[str], lrs: tuple[float, ...], seeds: dict[str, int], steps: int, eval_every: int,
    rank: int = NETWORK_DIM, alpha: float = NETWORK_ALPHA,
) -> tuple[list[RunResult], dict[str, UNet2DConditionModel]]:
    """Every (optimizer, lr, seed) run, ``seeds[label]`` seeds per optimizer. Also returns, for the noise check,
    the seed-0 models of the first two optimizers at the lowest lr of the grid."""
    specs = optimizer_specs()
    initial = validation_loss(setup.base, setup)
    noise_lr = min(lrs)
    results: list[RunResult] = []
    kept: dict[str, UNet2DConditionModel] = {}
    for label in labels:
        for lr in specs[label].lrs or lrs:
            for seed in range(seeds[label]):
                result, unet = train_run(setup, specs[label], lr, seed, steps, eval_every, initial, rank, alpha)
                results.append(result)
                final = result.losses[-1]
                print(f"{label:24s} lr {lr_text(lr)} seed {seed}: final {final:.5f} ({result.seconds:.1f} s)", flush=True)
                if label in labels[:2] and lr == noise_lr and seed == 0:
                    kept[label] = unet
    return results, kept


def environment() -> dict[str, str]:
    """Machine and library versions for the report."""
    import diffusers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def noise_line(noise: dict[str, Any]) -> str:
    """The validation-noise check in one sentence."""
    levels = ", ".join(f"{label} {100 * v:.2f} %" for label, v in noise["level_rel_std"].items())
    line = (f"Validation noise, over {noise['draw_sets']} independent draw sets: loss level varies by {levels} "
            f"(relative std; the same for every optimizer, which all share one draw set)")
    if "difference_rel_std" in noise:
        first, second = noise["compared"]
        line += f"; the {first} − {second} difference by {100 * noise['difference_rel_std']:.2f} % of the loss"
    return line + "."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        config = DigitsConfig(
            concept=args.concept, image_size=args.image_size, pretrain_steps=5, pretrain_batch_size=16
        )
        temp = tempfile.TemporaryDirectory()
        cache_dir = Path(temp.name) / "cache"
        args.out = args.out if args.out != DEFAULT_OUT else Path(temp.name) / "results"
        seeds, variant_seeds, steps, eval_every, draws, lrs = 1, 1, 10, 5, 1, SMOKE_LRS
        labels = list(args.optimizers or SMOKE_OPTIMIZERS)
    else:
        config = DigitsConfig(concept=args.concept, image_size=args.image_size, pretrain_steps=args.pretrain_steps)
        cache_dir = args.cache_dir
        seeds, variant_seeds, lrs = args.seeds, args.variant_seeds, tuple(args.lrs)
        steps, eval_every, draws = args.steps, args.eval_every, args.draws
        labels = list(args.optimizers or MAIN_OPTIMIZERS)
    labels = ["AdamW"] + [label for label in labels if label != "AdamW"]

    started = time.perf_counter()
    setup = make_setup(config, cache_dir, draws)
    seeds_per_label = {label: seeds if label in REFERENCE_PAIR else variant_seeds for label in labels}
    results, kept = run_benchmark(setup, labels, lrs, seeds_per_label, steps, eval_every, args.rank, args.alpha)
    noise = validation_noise(setup, kept, draws, sets=2 if args.smoke else 5)
    rows = summarize(results, lrs)
    table = markdown_table(rows)
    wall = time.perf_counter() - started
    env = environment()

    given = argv if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "-m", "benchmarks.lora_quality", *given])
    header = (
        f"Command: `{command.strip()}`  \n"
        f"Machine: {env['cpu']}, {env['torch_threads']} torch thread(s); torch {env['torch']}, "
        f"diffusers {env['diffusers']}; {env['date']}; wall time {wall / 60:.1f} min  \n"
        f"Setup: {len(setup.train_images)} training / {len(setup.val_images) // draws} held-out "
        f"{setup.config.concept}s, {setup.config.image_size}² px (base: {setup.config.pretrain_steps} steps), "
        f"LoRA rank {args.rank} alpha {args.alpha:g}, batch {BATCH_SIZE}, "
        f"{steps} steps, {seeds} seed(s) for {' and '.join(REFERENCE_PAIR)}, {variant_seeds} for the others, "
        f"lr grid {', '.join(lr_text(lr) for lr in lrs)}; "
        f"validation: {len(setup.val_images)} fixed draws, evaluated every {eval_every} steps.  \n"
        f"{noise_line(noise)}\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    _write_text(args.out / "lora_quality.md", header + table)
    payload = {"environment": env, "noise": noise, "config": vars(setup.config),
               "rows": [vars(r) for r in rows], "runs": [vars(r) for r in results]}
    _write_text(args.out / "lora_quality.json", json.dumps(payload, indent=1, default=str))
    plot(results, rows, lrs, args.out / "lora_quality.png", setup.config.concept)
    print(header + table)

    problems = [f"{r.label} lr {r.lr:g} seed {r.seed}" for r in results if not all(map(math.isfinite, r.losses))]
    if problems:
        print(f"FAILED: non-finite validation loss in {problems}", file=sys.stderr)
        return 1
    produced = [args.out / name for name in ("lora_quality.md", "lora_quality.png", "lora_quality.json")]
    missing = [str(p) for p in produced if not p.exists() or p.stat().st_size == 0]
    if missing or len(rows) != len(labels):
        print(f"FAILED: outputs missing {missing} or table rows {len(rows)} != optimizers {len(labels)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
