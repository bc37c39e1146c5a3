"""ANLO: Alternating Norm LoRA Optimizer.

A stateless optimizer for LoRA training. Every step normalizes the current gradient to unit RMS and
then applies each parameter's own learning rate; no moment buffers are kept. A step divides either by
a *layer* norm (one norm per LoRA module, e.g. ``lora_down`` + ``lora_up``) or by a *global* norm (one
norm over every gradient of every parameter group)::

    u_p   = g_p + wd * p                      (coupled weight decay; u_p = g_p by default)
    s_L   = w_layer  * sqrt(N_L) / (||u_L||_2   + eps_t)       layer steps
    s     = w_global * sqrt(N)   / (||u_all||_2 + eps_t)       global steps
    p    <- p - lr_p * s * u_p                (per parameter group lr, so LoRA+ ratios survive)

By default every step is a layer step (``normalization="layer"``); the seed algorithm,
``normalization="alternating"``, alternates global and layer steps every ``normalize_frequency`` steps.
:func:`_anlo_step_` is the step; docs/benchmarks.md has what was measured.

See ``docs/ANLO.md`` for the full definition, the options and the statistics. The module depends on
torch only.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["ANLO", "lora_module_key"]

logger = logging.getLogger(__name__)

#: Key under which ``state_dict()`` stores the step counter (a plain ``int``).
STEP_KEY = "anlo_step"
#: Key under which ``state_dict()`` stores the options that apply to all groups, so a resume can name a change.
OPTIONS_KEY = "anlo_options"
_RECORDED_OPTIONS = ("normalization", "sinkgd_iterations", "orthogonalize", "lr_free")

#: Name components that mark a LoRA / LyCORIS / DoRA factor. A parameter's module key is its name
#: with the last such component and everything after it removed (``a.b.lora_down.weight`` -> ``a.b``).
LORA_FACTOR_NAMES = frozenset(
    {
        # kohya LoRA / LoCon, LyCORIS LoCon
        "lora_down", "lora_up", "lora_mid",
        # PEFT (and kohya DyLoRA)
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
        # LyCORIS LoHa
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        # LyCORIS LoKr
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
        # DoRA magnitudes (LyCORIS and kohya-style implementations)
        "dora_scale", "magnitude",
    }
)  # fmt: skip

# Adaptive eps: eps_t = eps * (1 + (_EPS_BOOST - 1) * max(0, 1 - step / _EPS_WARMUP_STEPS)).
_EPS_BOOST = 10.0
_EPS_WARMUP_STEPS = 1000
# orthogonalize=True: each Gram matrix A is damped to A + _ORTHOGONAL_FLOOR² ‖A‖_F I before its inverse square root,
# so singular values far below this fraction of ‖A‖_F^(1/2) (from the largest singular value to k^(1/4) times it) are
# scaled down, not raised to 1.
_ORTHOGONAL_FLOOR = 1e-3
_ORTHOGONAL_BATCH_BYTES = 4 << 20
# On CUDA the inverse square roots come from Newton-Schulz steps: Muon's quintic (Jordan et al., 2024) takes every
# singular value in [1e-3, 1] into [0.68, 1.21] in 6 steps, 4 cubic steps then bring it to 1 within 2e-6.
_NEWTON_SCHULZ_QUINTIC = (3.4445, -4.7750, 2.0315)
_NEWTON_SCHULZ_STEPS = (6, 4)
# Stochastic rounding draws come from a private generator re-seeded with this value + step each step, so
# they are reproducible, identical on every data-parallel rank, and need no state in the state dict.
_SR_SEED = 0x414E4C4F
# lr_free=True: the step size (RMS of a layer's update at lr 1) before any step has been measured, as Prodigy's and
# D-Adaptation's d0; it grows by up to e per step from there.
_LR_FREE_D0 = 1e-6
#: Key under which ``state_dict()`` stores the lr_free estimator's state (with ``lr_free=True``): a flag per tensor and
#: three scalars.
LR_FREE_KEY = "anlo_lr_free"

# Per-group options: constructor defaults, overridable per parameter group (like torch.optim).
_GROUP_OPTIONS = (
    "lr", "eps", "weight_decay", "decoupled_weight_decay", "global_norm_weight", "layer_norm_weight",
    "adaptive_eps", "use_cautious_update", "cautious_threshold", "cautious_scale",
)  # fmt: skip
# Optimizer-wide options: constructor only.
_OPTIMIZER_OPTIONS = (
    "normalization", "normalize_frequency", "sinkgd_iterations", "orthogonalize", "lr_free", "stochastic_rounding",
    "foreach", "verbose",
)  # fmt: skip
#: Values of the ``normalization`` option: which norm each step divides by.
NORMALIZATIONS = ("layer", "alternating", "global")


def lora_module_key(name: str) -> Optional[str]:
    """Return the LoRA module a parameter belongs to, or ``None`` if its name has no factor component.

    >>> lora_module_key("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight")
    'lora_unet_mid_block_attentions_0_proj_in'
    >>> lora_module_key("unet.down_blocks.0.attn1.to_q.lora_B.default.weight")
    'unet.down_blocks.0.attn1.to_q'
    >>> lora_module_key("lycoris_te_0_mlp_fc1.hada_w1_a")
    'lycoris_te_0_mlp_fc1'
    >>> lora_module_key("encoder.layers.0.mlp.fc1.weight") is None
    True
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in LORA_FACTOR_NAMES:
            return ".".join(parts[:i])
    return None


# --------------------------------------------------------------------------------------------------
# the step


@dataclass
class _TensorOptions:
    """The per-group options, expanded to one entry per tensor with a gradient (in the step's tensor order).

    Numbers are float64 CPU tensors holding the groups' Python floats exactly; the step does its arithmetic on
    them in float64, as Python would, and converts a result once, where it meets the gradients' statistics.
    """

    lr: Tensor
    eps: Tensor
    adaptive_eps: Tensor  # bool
    weight_decay: Tensor
    coupled: Tensor  # bool: weight decay joins the gradient before normalization (decoupled_weight_decay=False)
    global_norm_weight: Tensor
    layer_norm_weight: Tensor
    gated: Tensor  # bool: the cautious gate applies (use_cautious_update with coupled decay; else cosine is 1)
    cautious_threshold: Tensor
    cautious_scale: Tensor
    group: Tensor  # long: each tensor's index into the optimizer's param_groups
    decayed: list[bool]  # weight_decay != 0
    coupled_positions: list[int]  # the tensors with coupled decay


def _expand_options(groups: list[dict[str, Any]], group_slices: list[tuple[int, int, int]]) -> _TensorOptions:
    """Each group's options repeated for its tensors (``group_slices``: group index, start, end)."""
    counts = torch.tensor([end - start for _, start, end in group_slices])

    def per_tensor(name: str, dtype: torch.dtype = torch.float64) -> Tensor:
        values = [groups[index][name] for index, _, _ in group_slices]
        return torch.tensor(values, dtype=dtype).repeat_interleave(counts)

    weight_decay = per_tensor("weight_decay")
    coupled = (weight_decay != 0) & ~per_tensor("decoupled_weight_decay", torch.bool)
    return _TensorOptions(
        lr=per_tensor("lr"),
        eps=per_tensor("eps"),
        adaptive_eps=per_tensor("adaptive_eps", torch.bool),
        weight_decay=weight_decay,
        coupled=coupled,
        global_norm_weight=per_tensor("global_norm_weight"),
        layer_norm_weight=per_tensor("layer_norm_weight"),
        gated=per_tensor("use_cautious_update", torch.bool) & coupled,
        cautious_threshold=per_tensor("cautious_threshold"),
        cautious_scale=per_tensor("cautious_scale"),
        group=torch.tensor([index for index, _, _ in group_slices]).repeat_interleave(counts),
        decayed=(weight_decay != 0).tolist(),
        coupled_positions=coupled.nonzero().view(-1).tolist(),
    )


#: A write pass: ``p <- p * d + c * g`` for each tensor (``d`` skipped where None), ``c`` and ``d`` 0-dim tensors.
WritePass = Callable[[list[Tensor], list[Tensor], Sequence[Tensor], Sequence[Optional[Tensor]]], None]


@dataclass
class _StepRecord:
    """What a step leaves for the statistics: device tensors, read lazily, never inside ``step()``."""

    mode: str
    grad_sq: Tensor  # (n,) squared norms of the raw gradients
    total_sq: Tensor  # squared global norm of what was normalized (gradients + coupled decay)
    finite: Tensor  # 0-dim bool: the step was taken (False: skipped, nothing written)
    scale: Tensor  # (n,) the unit-RMS scale s of each tensor
    fired: Optional[Tensor]  # (groups,) long: tensors whose update the cautious gate scaled; None without the gate
    group_slices: list[tuple[int, int, int]]
    num_layers: int
    step_size: Optional[Tensor] = None  # (n,) lr_free: each tensor's estimated step size d (at lr 1)


def _anlo_step_(
    params: list[Tensor],
    grads: list[Tensor],
    layout: _Layout,
    options: _TensorOptions,
    mode: str,
    step: int,
    *,
    n_groups: int,
    foreach: bool,
    sinkgd_iterations: int,
    orthogonalize: bool,
    write_pass: Optional[Callable[[torch.dtype, torch.device], WritePass]],
    lr_free: Optional[_LRFreeEstimator] = None,
) -> _StepRecord:
    """One ANLO step over ``params`` (every tensor with a gradient, group by group), in the order of docs/ANLO.md.

    ``mode`` is ``"global"`` or ``"layer"``. ``write_pass(dtype, device)`` gives the function that writes a
    (device, dtype) bucket of parameters; ``None`` computes the step without writing anything. Two passes over
    memory: one reads every gradient (its squared norm), one reads gradient and parameter and writes the
    parameter; everything in between works on vectors with one entry per tensor and never synchronizes with
    the device.
    """
    dtype, device = layout.stat_dtype, layout.device

    def on_device(values: Tensor) -> Tensor:  # float64 option values -> the statistics' dtype and device
        return values.to(dtype if values.is_floating_point() else values.dtype).to(device)

    # Optional gradient transforms, in place in p.grad.
    if sinkgd_iterations:
        for grad in grads:
            _row_column_normalize_(grad, sinkgd_iterations)
    if orthogonalize:
        _orthogonalize_(grads)

    # ||g||^2 of every tensor: the pass that reads every gradient.
    grad_sq = _gather([_squared_norms(b.select(grads), dtype, foreach) for b in layout.buckets], layout)
    # u = g + wd * p where decay is coupled: ||u||^2 and <u, g> without forming u. Elsewhere u = g.
    update_sq, update_dot_grad = grad_sq, grad_sq
    if options.coupled_positions:
        update_sq, update_dot_grad = _coupled_decay_norms(params, grads, grad_sq, options, layout)
    total_sq = update_sq.sum()
    finite = torch.isfinite(total_sq)

    # eps_t = eps * (1 + 9 * max(0, 1 - step / 1000)) with adaptive eps, else eps.
    eps = on_device(torch.where(options.adaptive_eps, options.eps * _adaptive_eps_factor(step), options.eps))
    if mode == "global":  # s = w_global * sqrt(N) / (||u_all|| + eps_t): one norm over every tensor of every group
        denominator = total_sq.sqrt() + eps
        numerator = on_device(options.global_norm_weight * math.sqrt(layout.numel))
        # 1 / x * y rather than y / x: the rounding tests/data/anlo_golden.pt recorded for global steps
        scale = torch.where(denominator > 0, denominator.reciprocal() * numerator, 0.0)
    else:  # s_L = w_layer * sqrt(N_L) / (||u_L|| + eps_t): one norm per layer, shared by the layer's tensors
        denominator = _sum_per_layer(update_sq, layout.layer_members).sqrt_()[layout.layer_index] + eps
        numerator = on_device(options.layer_norm_weight) * layout.layer_sqrt_numel
        scale = torch.where(denominator > 0, numerator / denominator, 0.0)  # 0 for a zero norm with eps = 0

    # c = -lr * s, each tensor with its own group's lr (LoRA+ ratios survive).
    coef = scale * on_device(-options.lr)
    step_size = None
    if lr_free is not None:  # lr_free: lr is a multiplier of the estimated step size d, c = -lr * d * s
        step_size = lr_free.step_sizes(params, layout, foreach)
        coef = coef * step_size
    fired = None
    if options.gated.any():  # cautious gate: c *= cautious_scale where cosine(u, g) < cautious_threshold
        factor, fired = _cautious_gate(
            update_dot_grad, update_sq, grad_sq, on_device(options.cautious_threshold),
            on_device(options.cautious_scale), on_device(options.gated),
        )  # fmt: skip
        coef = coef * factor
        fired = torch.zeros(n_groups, dtype=torch.long, device=device).index_add_(
            0, on_device(options.group), (fired & finite).long()
        )
    # Non-finite norm: skip the step. p * 1 + (-0.0) * g is p bit for bit (once g's non-finite entries are 0).
    coef = torch.where(finite, coef, -0.0)
    # d: coupled decay's part of c * u, 1 + c * wd; decoupled decay, 1 - lr * wd (1 when skipped).
    decay = None
    if any(options.decayed):
        coupled_decay = 1.0 + coef * on_device(options.weight_decay)
        if step_size is None:
            decoupled_decay = torch.where(finite, on_device(1.0 - options.lr * options.weight_decay), 1.0)
        else:  # the decay scales with the step actually taken, lr * d, as AdamW's with its lr
            decoupled_decay = torch.where(finite, 1.0 - on_device(options.lr * options.weight_decay) * step_size, 1.0)
        decay = torch.where(on_device(options.coupled), coupled_decay, decoupled_decay)

    record = _StepRecord(
        mode, grad_sq, total_sq, finite, scale, fired, layout.group_slices, layout.num_layers, step_size
    )
    if lr_free is not None and write_pass is not None:
        lr_free.commit(coef, update_sq, finite)
    if write_pass is None or (layout.on_host and not finite):  # on the CPU, reading the flag costs no sync
        return record
    # p <- p * d + c * g: the pass that reads every gradient and parameter and writes the parameter.
    for bucket in layout.buckets:
        b_params, b_grads = bucket.select(params), bucket.select(grads)
        if not layout.on_host:  # the skip stays on the device: keep NaN * 0 out of p (a no-op on finite g)
            for g in b_grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        bucket.load(bucket.coefs, coef)
        b_decays: list[Optional[Tensor]] = [None] * len(b_params)
        if decay is not None:
            bucket.load(bucket.decays, decay)
            b_decays = [d if options.decayed[i] else None for d, i in zip(bucket.decay_views, bucket.positions)]
        write_pass(bucket.dtype, bucket.device)(b_params, b_grads, bucket.coef_views, b_decays)
    return record


def _adaptive_eps_factor(step: int) -> float:
    """eps_t / eps with adaptive eps: 10 at step 0, falling linearly to 1 at step 1000 and after."""
    return 1.0 + (_EPS_BOOST - 1.0) * max(0.0, 1.0 - step / _EPS_WARMUP_STEPS)


def _squared_norms(tensors: list[Tensor], dtype: torch.dtype, foreach: bool) -> Tensor:
    """Squared L2 norm of each tensor, accumulated in ``dtype``, as one 1-D tensor."""
    if foreach:
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]
    return torch.stack(norms).square_()


def _gather(vectors: list[Tensor], layout: _Layout) -> Tensor:
    """Per-bucket vectors -> one vector in the step's tensor order (group by group), on the layout's device."""
    if layout.inverse_order is None:
        return vectors[0]
    return torch.cat([v.to(layout.device) for v in vectors])[layout.inverse_order]


def _sum_per_layer(values: Tensor, layer_members: Tensor) -> Tensor:
    """Per layer, the sum of its tensors' entries of ``values`` (one per tensor), by ``_Layout.layer_members``.

    A gather and a sum over a fixed axis, not an ``index_add_``: on CUDA that adds atomically, in an order
    that changes from run to run, so layers of three or more tensors (LyCORIS, DoRA) would get sums that
    differ in the last bit between runs and between data-parallel ranks.
    """
    padded = torch.cat([values, values.new_zeros(1)])  # index n, the padding, reads 0
    return padded[layer_members].sum(dim=1)


def _coupled_decay_norms(
    params: list[Tensor], grads: list[Tensor], grad_sq: Tensor, options: _TensorOptions, layout: _Layout
) -> tuple[Tensor, Tensor]:
    """``||u||^2`` and ``<u, g>`` of every tensor, ``u = g + wd * p`` where decay is coupled and ``u = g`` elsewhere.

    ``||g + wd p||^2 = ||g||^2 + 2 wd <g, p> + wd^2 ||p||^2``: one more pass that reads gradient and parameter
    of those tensors; ``u`` is never formed and the gradients are not modified.
    """
    positions = options.coupled_positions
    dots, params_sq = _decay_terms(
        [grads[i] for i in positions], [params[i] for i in positions], layout.stat_dtype, layout.device
    )
    wd = options.weight_decay[positions]
    on_device = functools.partial(Tensor.to, device=layout.device, dtype=layout.stat_dtype)
    index = torch.tensor(positions, device=layout.device)
    g_sq = grad_sq[index]
    update_sq = (g_sq + on_device(2 * wd) * dots + on_device(wd * wd) * params_sq).clamp_min_(0)
    update_dot_grad = g_sq + on_device(wd) * dots
    return grad_sq.index_put((index,), update_sq), grad_sq.index_put((index,), update_dot_grad)


def _decay_terms(
    grads: list[Tensor], params: list[Tensor], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``<g, p>`` and ``||p||^2`` of each pair, accumulated in ``dtype``, as two 1-D tensors on ``device``.

    Low-precision tensors are upcast one at a time, so no temporary exceeds one parameter.
    """
    dots, params_sq = [], []
    for g, p in zip(grads, params):
        g_flat, p_flat = g.reshape(-1).to(dtype), p.reshape(-1).to(dtype)
        dots.append(torch.dot(g_flat, p_flat).to(device))
        params_sq.append(torch.dot(p_flat, p_flat).to(device))
    return torch.stack(dots), torch.stack(params_sq)


def _cautious_gate(
    dot: Tensor, update_sq: Tensor, grad_sq: Tensor, threshold: Any, scale: Any, gated: Any = True
) -> tuple[Tensor, Tensor]:
    """Cautious-update factors from ``<u, g>``, ``||u||^2`` and ``||g||^2`` (element-wise, no host sync).

    Returns ``(factor, fired)``: ``factor`` is ``scale`` where ``gated``, cosine(u, g) < ``threshold`` and both
    norms are positive, else 1; ``fired`` is the boolean mask of those entries.
    """
    cosine = dot / (update_sq.sqrt() * grad_sq.sqrt())
    fired = (cosine < threshold) & (update_sq > 0) & (grad_sq > 0) & gated
    return torch.where(fired, scale if isinstance(scale, Tensor) else torch.full_like(dot, scale), 1.0), fired


# --------------------------------------------------------------------------------------------------
# write passes: p <- p * d + c * g, interchangeable; ANLO._write_pass chooses one per (device, dtype) bucket


def _write_foreach_(
    params: list[Tensor], grads: list[Tensor], coefs: Sequence[Tensor], decays: Sequence[Optional[Tensor]]
) -> None:
    """Multi-tensor ops: one ``torch._foreach_*`` call per pass over the tensors."""
    decayed = [(p, d) for p, d in zip(params, decays) if d is not None]
    if decayed:
        torch._foreach_mul_([p for p, _ in decayed], [d for _, d in decayed])
    # The 0-dim coefficients go first: pytorch/pytorch#172731 gives a 0-dim list in that position a
    # one-launch CUDA path (which torch versions have it is not checked here, no GPU). c * g == g * c.
    torch._foreach_addcmul_(params, coefs, grads)


def _write_per_tensor_(
    params: list[Tensor], grads: list[Tensor], coefs: Sequence[Tensor], decays: Sequence[Optional[Tensor]]
) -> None:
    """The same arithmetic as :func:`_write_foreach_`, one tensor at a time (``foreach=False``)."""
    for p, d in zip(params, decays):
        if d is not None:
            p.mul_(d)
    for p, g, c in zip(params, grads, coefs):
        p.addcmul_(c, g)


def _write_low_precision_(
    params: list[Tensor],
    grads: list[Tensor],
    coefs: Sequence[Tensor],
    decays: Sequence[Optional[Tensor]],
    generator: Optional[torch.Generator] = None,
) -> None:
    """float16/bfloat16 parameters: the update in float32, rounded back stochastically into bfloat16 when a
    ``generator`` is given, else to nearest.

    The coefficients are float32 and may exceed float16's range when gradients are tiny, so they are
    never cast to the parameter dtype. One tensor at a time: no temporary exceeds one parameter in float32.
    """
    for p, g, c, d in zip(params, grads, coefs, decays):
        x = p.float()
        if d is not None:
            x.mul_(d)
        x.addcmul_(g, c)
        if generator is not None:
            _copy_stochastically_rounded_(p, x, generator)
        else:
            p.copy_(x)


def _copy_stochastically_rounded_(dst: Tensor, src: Tensor, generator: torch.Generator) -> None:
    """Copy float32 ``src`` into bfloat16 ``dst`` with stochastic rounding (``src`` is clobbered).

    bfloat16 is float32 with the low 16 bits dropped. Adding uniform noise in [0, 2^16) to those bits
    and truncating rounds the magnitude up with probability equal to the dropped fraction, so the
    rounding is unbiased. Values already representable in bfloat16 are returned unchanged.
    """
    bits = src.view(torch.int32)
    bits.add_(torch.empty_like(bits).random_(0, 1 << 16, generator=generator))
    bits.bitwise_and_(-65536)  # 0xFFFF0000
    dst.copy_(src)


# --------------------------------------------------------------------------------------------------
# gradient transforms (options), in place in p.grad: SinkGD and orthogonalization


def _row_column_normalize_(grad: Tensor, iterations: int, eps: float = 1e-12) -> None:
    """SinkGD (Scetbon et al., arXiv 2502.06742), in place: ``iterations`` times, scale every row of ``grad`` to
    RMS 1, then every column. Gradients of fewer than two dimensions are left alone; a conv kernel is the
    matrix (out_channels, in_channels * kh * kw). Norms are taken in at least float32."""
    if grad.dim() < 2:
        return
    matrix = grad.view(grad.shape[0], -1) if grad.is_contiguous() else grad.reshape(grad.shape[0], -1)
    rows, cols = matrix.shape
    norm_dtype = torch.promote_types(grad.dtype, torch.float32)
    for _ in range(iterations):
        matrix.mul_((math.sqrt(cols) / (matrix.norm(dim=1, keepdim=True, dtype=norm_dtype) + eps)).to(grad.dtype))
        # Column norms as sqrt(sum of squares): on the CPU, norm(dim=0) over a row-major matrix runs a strided
        # loop about 8x slower than squaring and summing over dim 0 (one temporary the size of the gradient).
        column_norms = matrix.to(norm_dtype).square().sum(dim=0, keepdim=True).sqrt_()
        matrix.mul_((math.sqrt(rows) / (column_norms + eps)).to(grad.dtype))
    if matrix.data_ptr() != grad.data_ptr():
        grad.copy_(matrix.view_as(grad))


def _orthogonalize_(grads: list[Tensor], relative_floor: float = _ORTHOGONAL_FLOOR) -> None:
    """In place, every gradient of two or more dimensions (as the matrix ``(shape[0], rest)``, like SinkGD) to its
    orthogonal polar factor ``U Vᵀ`` (``grad = U S Vᵀ``): every singular value set to 1, the whitening of SWAN
    (arXiv 2412.13148) and the core of Muon, without momentum.

    From the small ``k × k`` Gram matrix ``A = G Gᵀ`` of the short side (``k`` is the rank for a LoRA factor):
    ``(A + δ I)^(-1/2) G`` with ``δ = relative_floor² ‖A‖_F``, which maps each singular value ``s`` to
    ``s / sqrt(s² + δ)``: 1 for all but those below about ``relative_floor`` times ``‖A‖_F^(1/2)`` (which lies
    between the largest singular value and ``k^(1/4)`` times it), which are scaled down instead of raised to 1.
    The Gram matrices of the gradients with the same ``k`` are handled together, at most
    ``_ORTHOGONAL_BATCH_BYTES`` of them (counted in float64) at a time (:func:`_damped_inverse_sqrt_`). A gradient
    whose float32 Gram matrix is zero (a zero gradient, or one with every entry below about 1e-19) becomes zero;
    one with a non-finite entry becomes all NaN, so the step that follows skips. Temporaries: one gradient in
    float32, and a few times the Gram matrices of one batch. float32 products run in full precision even where
    TF32 is on.
    """
    by_side: dict[tuple[int, torch.device], list[tuple[Tensor, Tensor, bool]]] = {}
    for grad in grads:
        if grad.dim() < 2 or grad.numel() == 0:
            continue
        matrix = grad.reshape(grad.shape[0], -1)
        wide = matrix.shape[0] <= matrix.shape[1]  # short side first: Gram (rows x rows), else (cols x cols)
        by_side.setdefault((min(matrix.shape), grad.device), []).append((grad, matrix, wide))
    with _full_precision_float32_matmuls():
        for (side, _), all_entries in by_side.items():
            # At most _ORTHOGONAL_BATCH_BYTES of Gram matrices (counted in float64) at a time: the temporaries of one
            # batch are a few times that, whatever the rank and the number of tensors.
            per_batch = max(1, _ORTHOGONAL_BATCH_BYTES // (8 * side * side))
            for start in range(0, len(all_entries), per_batch):
                _orthogonalize_batch_(all_entries[start : start + per_batch], relative_floor)


@contextlib.contextmanager
def _full_precision_float32_matmuls():
    """float32 matrix products in full precision meanwhile, also where a script allows TF32 (or bfloat16) ones
    (``torch.set_float32_matmul_precision``): with their 10-bit mantissa the Gram matrices' eigenvalues below
    about 1e-3 of the largest, which the orthogonalization divides by, would be rounding noise."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _orthogonalize_batch_(entries: list[tuple[Tensor, Tensor, bool]], relative_floor: float) -> None:
    """:func:`_orthogonalize_` of ``(grad, grad as a matrix, rows <= columns)`` entries whose short sides are equal."""

    def in_work_dtype(matrix: Tensor) -> Tensor:  # float32 at least; a low-precision gradient is converted anew
        return matrix.to(torch.promote_types(matrix.dtype, torch.float32))  # each time, so one copy lives at once

    grams = []
    for _, matrix, wide in entries:
        short = in_work_dtype(matrix if wide else matrix.T)
        grams.append(short @ short.T)
    gram = torch.stack(grams)  # float32, or float64 for float64 gradients
    if not _uses_newton_schulz(gram.device):  # eigh in float64, on the CPU (not every accelerator has float64)
        gram = gram.cpu().double()
    not_finite = ~torch.isfinite(gram).all(dim=-1).all(dim=-1)[:, None, None]
    inverse_sqrt = _damped_inverse_sqrt_(gram.masked_fill_(not_finite, 0.0), relative_floor)
    inverse_sqrt.masked_fill_(not_finite, math.nan)
    for (grad, matrix, wide), factor in zip(entries, inverse_sqrt.unbind(0)):
        work = in_work_dtype(matrix)
        factor = factor.to(device=work.device, dtype=work.dtype)
        polar = factor @ work if wide else work @ factor
        grad.copy_(polar.view(grad.shape))


def _uses_newton_schulz(device: torch.device) -> bool:
    """Whether :func:`_damped_inverse_sqrt_` iterates (CUDA) rather than calling ``eigh`` (on the CPU)."""
    return device.type == "cuda"


def _damped_inverse_sqrt_(gram: Tensor, relative_floor: float) -> Tensor:
    """``(A + δ I)^(-1/2)``, ``δ = relative_floor² ‖A‖_F``, of each Gram matrix ``A`` of a batch; zero where ``A`` is
    zero. ``gram`` is overwritten (with ``A + δ I``), so the temporaries stay a few times its size.

    On CUDA by Newton-Schulz steps (:func:`_inverse_sqrt_newton_schulz`) in the Gram matrices' dtype, float32 for
    float32 gradients (consumer GPUs run float64 at 1/64 of the rate): batched matrix products, no host
    synchronization. torch's CUDA ``eigh`` synchronizes, and has decomposed matrices larger than 32 × 32 one at a
    time (pytorch/pytorch#175585). Elsewhere exactly, by ``eigh`` (the caller moves those Gram matrices to the CPU).
    """
    damping = relative_floor**2 * torch.linalg.matrix_norm(gram)
    gram.diagonal(dim1=-2, dim2=-1).add_(damping[:, None])
    if _uses_newton_schulz(gram.device):
        inverse_sqrt = _inverse_sqrt_newton_schulz(gram)
    else:
        values, vectors = torch.linalg.eigh(gram)
        inverse_sqrt = (vectors * values.clamp_min(damping[:, None]).rsqrt()[:, None, :]) @ vectors.mT
    return inverse_sqrt.masked_fill_((damping == 0)[:, None, None], 0.0)


def _inverse_sqrt_newton_schulz(matrices: Tensor) -> Tensor:
    """``A^(-1/2)`` of each symmetric positive definite ``A`` of a batch whose eigenvalues are at least 1e-6 times
    its Frobenius norm (as :func:`_damped_inverse_sqrt_` makes them).

    With ``X0`` any matrix such that ``X0 X0ᵀ = A / ‖A‖_F``, the steps act on ``X = M X0`` as odd polynomials of
    its singular values, which start within [1e-3, 1] and end at 1, so ``M`` ends at ``(A / ‖A‖_F)^(-1/2)``. Each
    step needs only ``X Xᵀ = M (A / ‖A‖_F) Mᵀ``, so everything is a ``k × k`` product.
    """
    scale = torch.linalg.matrix_norm(matrices).clamp_min(torch.finfo(matrices.dtype).tiny)[:, None, None]
    normalized = matrices / scale
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
    a, b, c = _NEWTON_SCHULZ_QUINTIC
    quintic_steps, cubic_steps = _NEWTON_SCHULZ_STEPS
    m = eye.expand_as(normalized)
    for step in range(quintic_steps + cubic_steps):
        x_gram = m @ normalized @ m.mT  # X Xᵀ; with m rather than m.mT, rounding would grow unchecked
        if step < quintic_steps:  # x <- a x + b x³ + c x⁵
            m = (a * eye + b * x_gram + c * (x_gram @ x_gram)) @ m
        else:  # x <- (3 x - x³) / 2
            m = (1.5 * eye - 0.5 * x_gram) @ m
    return m / scale.sqrt()


# --------------------------------------------------------------------------------------------------
# lr_free=True: one step size estimated for the whole network


class _LRFreeEstimator:
    """The step size ``d`` (the RMS of every layer's update at lr 1), steered by the direction of the steps taken by
    the tensors that started at zero (a LoRA's ``lora_up``); docs/ANLO.md has the formulas.

    Those tensors together, ``x`` (``x_0 = 0``), have moved by ``x_t`` so far. The cosine between a step and that
    way so far, ``c_t = <δ_t, x_t> / (‖δ_t‖ ‖x_t‖)``, says whether the steps are too short (they keep going the
    same way: c > 0) or too long (they turn back: c < 0), and every step multiplies the step size by ``exp(c)``:
    ``d_t+1 = d_t · exp(c_t)``, from ``d0``, so a run settles where its steps are as often with the way so far as
    against it. ``c_t`` costs no pass of its own: ``‖x_t+1‖² = ‖x_t‖² + 2 <δ_t, x_t> + ‖δ_t‖²``, so it follows one
    step late from the norms the estimator reads anyway (the first step from zero counts as ``c = 1``).
    Decoupled weight decay also shrinks ``x``; that adds about ``-lr·d·wd·‖x‖/‖δ‖`` to ``c`` (1e-3 at wd 0.01).

    State: per tensor of the optimizer (all groups, in order), whether it started at zero (-1 not seen yet, 0, 1);
    for the network, ``d``, ``‖x‖²`` before the last step and that step's ``‖δ‖²``. Cost per step: one pass that
    reads every parameter (its norm), and vector operations with one entry per tensor; no host synchronization
    after the first step (which checks that some tensor starts at zero).
    """

    def __init__(self, d0: float = _LR_FREE_D0) -> None:
        self.d0 = d0  # the step size before any step has been measured
        self.started: Optional[Tensor] = None  # (tensors,): started at zero; -1 not seen yet
        self.scalars: Optional[Tensor] = None  # (3,): d, ‖x‖² before the last step, the last step's ‖δ‖²
        self._pending: Optional[tuple[Tensor, Tensor, Tensor]] = None

    def state_dict(self) -> Optional[dict[str, Tensor]]:
        if self.started is None or self.scalars is None:
            return None
        return {"started_at_zero": self.started.cpu().clone(), "scalars": self.scalars.cpu().clone()}

    def load_state_dict(self, state: Optional[Union[dict[str, Tensor], Tensor]]) -> None:
        """Load :meth:`state_dict`'s output; the ``(tensors, 3)`` tensor of the distance bound used before
        (2026-12) keeps its zero flags and its last ``d``, and the steering starts from there."""
        if state is None:
            self.started = self.scalars = None
        elif isinstance(state, Tensor):
            self.started = state[:, 0].clone()
            self.scalars = torch.stack([state[:, 2].max(), state.new_zeros(()), state.new_zeros(())])
        else:
            self.started = state["started_at_zero"].clone()
            self.scalars = state["scalars"].clone()

    def _prepare(self, layout: _Layout) -> tuple[Tensor, Tensor]:
        """The zero flags (grown to every tensor, new ones not seen yet) and scalars on the layout's device."""
        device, dtype = layout.device, layout.stat_dtype
        started = torch.empty(0) if self.started is None else self.started
        started = started.to(device=device, dtype=dtype)
        if len(started) < layout.total_tensors:
            started = torch.cat([started, started.new_full((layout.total_tensors - len(started),), -1.0)])
        scalars = torch.tensor([self.d0, 0.0, 0.0]) if self.scalars is None else self.scalars
        self.started, self.scalars = started, scalars.to(device=device, dtype=dtype)
        return self.started, self.scalars

    def _norms_and_flags(self, params: list[Tensor], layout: _Layout, foreach: bool) -> tuple[Tensor, Tensor]:
        """Each active tensor's squared norm and its flag, started at zero (a tensor seen for the first time: whether
        it is zero now); after :meth:`_prepare`."""
        assert self.started is not None and layout.positions is not None
        norms = [_squared_norms(b.select(params), layout.stat_dtype, foreach) for b in layout.buckets]
        param_sq = _gather(norms, layout)
        started = self.started[layout.positions]
        return param_sq, torch.where(started < 0, (param_sq == 0).to(started.dtype), started)

    def step_sizes(self, params: list[Tensor], layout: _Layout, foreach: bool) -> Tensor:
        """``d`` for this step, once per tensor with a gradient (in the step's order); kept for :meth:`commit`."""
        assert layout.positions is not None
        first = self.started is None
        _, scalars = self._prepare(layout)
        positions = layout.positions
        param_sq, started = self._norms_and_flags(params, layout, foreach)
        if first and not bool((started > 0).any()):  # one host synchronization, at the first step only
            warnings.warn(
                f"ANLO(lr_free=True): no parameter with a gradient is zero at the first step, so the step size "
                f"cannot be measured and stays at {self.d0:g}; lr_free estimates it while a fresh LoRA's lora_up "
                "moves away from zero: to continue training saved weights (--network_weights), set a learning rate",
                stacklevel=7,  # the caller of step()
            )
        x_sq = (param_sq * started).sum()  # in a fixed order: the same sum on every run
        d, before_sq, step_sq = scalars.unbind()
        # c of the last step from ‖x_t+1‖² = ‖x_t‖² + 2 <δ_t, x_t> + ‖δ_t‖²; 1 for the first step from zero, 0 with
        # no step (none taken yet, or skipped)
        cosine = (x_sq - before_sq - step_sq) / (2 * (before_sq * step_sq).sqrt())
        cosine = torch.where(before_sq > 0, cosine.clamp(-1.0, 1.0), 1.0)
        cosine = torch.where(step_sq > 0, cosine, 0.0)
        d = d * cosine.exp()
        self._pending = (positions, started, torch.stack([d, x_sq]))
        return d.expand(len(positions))

    def commit(self, coef: Tensor, update_sq: Tensor, finite: Tensor) -> None:
        """After a step with coefficients ``coef`` (``δ_p = coef_p * u_p``): record the zero flags, ``d``, ``‖x‖²``
        before the step and the step's ``‖δ‖²`` over the tensors that started at zero."""
        assert self.started is not None and self.scalars is not None and self._pending is not None
        positions, started, d_and_x_sq = self._pending
        step_sq = (torch.where(finite, coef.square() * update_sq, 0.0) * started).sum()
        self.started.index_put_((positions,), started)
        self.scalars = torch.cat([d_and_x_sq, step_sq[None]])
        self._pending = None


# --------------------------------------------------------------------------------------------------
# cached structure of one parameter layout


class _Bucket:
    """Tensors of one device and dtype, with buffers that carry their per-tensor coefficients.

    The foreach update takes one 0-dim tensor per parameter. Views of a persistent buffer are made
    once here; each step only copies the new coefficients into the buffer.
    """

    def __init__(
        self, device: torch.device, dtype: torch.dtype, positions: list[int], index: Optional[Tensor],
        stat_dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.device = device
        self.dtype = dtype
        self.positions = positions
        self.index = index  # selects the bucket from the per-tensor vectors; None if it is all of them
        self.coefs = torch.empty(len(positions), dtype=stat_dtype, device=device)
        self.decays = torch.empty_like(self.coefs)
        self.coef_views = self.coefs.unbind(0)
        self.decay_views = self.decays.unbind(0)

    def select(self, tensors: list[Tensor]) -> list[Tensor]:
        """This bucket's entries of a per-tensor list (the list itself when the bucket is all of it)."""
        return tensors if self.index is None else [tensors[i] for i in self.positions]

    def load(self, buffer: Tensor, vector: Tensor) -> None:
        """Copy this bucket's entries of a per-tensor ``vector`` into ``buffer``."""
        buffer.copy_(vector if self.index is None else vector[self.index])

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.index, self.coefs, self.decays) if t is not None]


@dataclass
class _Layout:
    """Everything ``step()`` needs that depends only on which tensors have gradients."""

    key: tuple
    device: torch.device  # where the per-tensor statistics live
    stat_dtype: torch.dtype
    on_host: bool  # every tensor is on the CPU: reading a flag needs no device synchronization
    group_slices: list[tuple[int, int, int]]  # (group index, start, end) into the active tensors
    numel: int
    num_layers: int
    layer_index: Tensor  # (n,) long: the layer of each tensor
    layer_members: Tensor  # (layers, most tensors in one layer) long: each layer's tensors, padded with n
    layer_sqrt_numel: Tensor  # (n,): sqrt(N_L) of each tensor's layer
    buckets: list[_Bucket]
    inverse_order: Optional[Tensor]  # maps bucket-major order back to group-major; None if identity
    options: Optional[tuple[tuple, "_TensorOptions"]] = None  # the groups' option values and their expansion
    # lr_free: each tensor's position among all the optimizer's tensors, and their number
    positions: Optional[Tensor] = None
    total_tensors: int = 0

    def nbytes(self) -> int:
        tensors = [self.layer_index, self.layer_members, self.layer_sqrt_numel, self.inverse_order, self.positions]
        tensors += [t for b in self.buckets for t in b.tensors()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _build_layout(
    key: tuple, params: list[Tensor], names: list[Optional[str]], counts: list[int]
) -> _Layout:
    """The layers, buckets and per-tensor constants of one set of tensors with gradients (``names`` parallel)."""
    device = params[0].device
    stat_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    group_slices, start = [], 0
    for group_index, count in enumerate(counts):
        if count:
            group_slices.append((group_index, start, start + count))
            start += count

    layer_ids: dict[tuple[str, Union[str, int]], int] = {}
    layer_of: list[int] = []
    seen_names: set[str] = set()
    for i, name in enumerate(names):
        module = lora_module_key(name) if name is not None else None
        if name is not None and name in seen_names:
            warnings.warn(f"ANLO: parameter name {name!r} repeats; the repeat is its own layer", stacklevel=5)
            module = None
        if name is not None:
            seen_names.add(name)
        layer_key = ("module", module) if module is not None else ("tensor", i)
        layer_of.append(layer_ids.setdefault(layer_key, len(layer_ids)))

    numels = torch.tensor([p.numel() for p in params], dtype=stat_dtype)
    layer_index = torch.tensor(layer_of, dtype=torch.long)
    members: list[list[int]] = [[] for _ in layer_ids]
    for i, layer in enumerate(layer_of):
        members[layer].append(i)
    width = max(map(len, members), default=0)
    layer_members = torch.tensor([m + [len(params)] * (width - len(m)) for m in members], dtype=torch.long)
    layer_numel = _sum_per_layer(numels, layer_members)

    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        by_kind.setdefault((p.device, p.dtype), []).append(i)
    order = [i for positions in by_kind.values() for i in positions]
    identity = len(by_kind) == 1
    buckets = [
        _Bucket(
            dev, dtype, positions, None if identity else torch.tensor(positions, device=device), stat_dtype
        )
        for (dev, dtype), positions in by_kind.items()
    ]  # fmt: skip
    inverse_order = None if identity else torch.argsort(torch.tensor(order)).to(device)
    return _Layout(
        key=key,
        device=device,
        stat_dtype=stat_dtype,
        on_host=all(b.device.type == "cpu" for b in buckets),
        group_slices=group_slices,
        numel=sum(p.numel() for p in params),
        num_layers=len(layer_ids),
        layer_index=layer_index.to(device),
        layer_members=layer_members.to(device),
        layer_sqrt_numel=layer_numel.sqrt()[layer_index].to(device),
        buckets=buckets,
        inverse_order=inverse_order,
    )


# --------------------------------------------------------------------------------------------------
# argument validation


def _check_real(name: str, value: Any, low: float = 0.0, high: float = math.inf) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number {bounds})")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")


def _validate_group_options(options: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid per-group option."""
    _check_real("lr", options["lr"])
    _check_real("eps", options["eps"])
    _check_real("weight_decay", options["weight_decay"])
    _check_real("global_norm_weight", options["global_norm_weight"])
    _check_real("layer_norm_weight", options["layer_norm_weight"])
    _check_real("cautious_threshold", options["cautious_threshold"], 0.0, 1.0)
    _check_real("cautious_scale", options["cautious_scale"], 0.0, 1.0)
    for name in ("decoupled_weight_decay", "adaptive_eps", "use_cautious_update"):
        _check_bool(name, options[name])


class ANLO(torch.optim.Optimizer):
    r"""Alternating Norm LoRA Optimizer: stateless, unit-RMS normalized gradient steps.

    Each step replaces every matrix gradient by its orthogonal polar factor (``orthogonalize``, on by default),
    then normalizes the gradients (plus coupled weight decay, if any) to unit RMS, by default with
    one norm per LoRA module (``normalization="layer"``); ``"alternating"`` switches every
    ``normalize_frequency`` steps between one global norm over all parameters of all groups and the
    module norms. Then each parameter's own group ``lr`` applies. No per-parameter state is kept; the
    only state is the step counter, saved in ``state_dict()["anlo_step"]``.

    LoRA modules are found from parameter names: pass ``model.named_parameters()``, ``(name, tensor)``
    pairs, or groups with a ``"param_names"`` list parallel to ``"params"``. Parameters of one module
    may sit in different groups (LoRA+); they still share one layer norm. Parameters without a
    recognizable name are each their own layer.

    Args:
        params: iterable of tensors, of ``(name, tensor)`` pairs, or of parameter-group dicts.
        lr: learning rate; with unit-RMS updates it sits in AdamW's range. (default: 1e-4, or 1.0 with lr_free)
        eps: added to every norm. (default: 1e-8)
        weight_decay: decay coefficient. (default: 0)
        normalize_frequency: with ``normalization="alternating"``, how many consecutive steps one mode
            is held: block = step // normalize_frequency, even block -> global, odd -> layer. A value
            other than 1 requires (and by default selects) that normalization. (default: 1)
        global_norm_weight: RMS of the update in global steps. (default: 1)
        layer_norm_weight: RMS of each layer's update in layer steps. (default: 1)
        adaptive_eps: use ``eps * (1 + 9 * max(0, 1 - step / 1000))``, 10x at step 0 down to 1x at
            step 1000. (default: True)
        use_cautious_update: scale a tensor's update by ``cautious_scale`` where cosine(update, raw
            gradient) < ``cautious_threshold``. The update is a positive multiple of the gradient
            unless coupled weight decay turns it, so only then can the gate fire. (default: False)
        cautious_threshold: cosine threshold in [0, 1]. (default: 0.1)
        cautious_scale: factor in [0, 1]. (default: 0.5)
        verbose: log a one-line summary every ``log_interval`` (100) steps via ``logging``; reading
            the numbers synchronizes with the device at those steps only. (default: False)
        decoupled_weight_decay: True decays AdamW-style, ``p *= 1 - lr * wd``; False decays like the
            seed algorithm (``wd * p`` added to the gradient before normalization, where it competes with
            the gradient for the fixed step size; one more pass over gradients and parameters). (default: True)
        normalization: ``"layer"`` (every step a layer step), ``"alternating"`` (global and layer steps
            in turn, see ``normalize_frequency``: the seed algorithm) or ``"global"`` (every step a global
            step). (default: None = ``"layer"``, or ``"alternating"`` if ``normalize_frequency`` > 1)
        sinkgd_iterations: before normalizing, rescale the rows and columns of every >= 2-D gradient
            to unit RMS this many times, in place in ``p.grad`` (SinkGD, arXiv 2502.06742). 0 = off.
            Costs a few torch operations per tensor and iteration, and a float32 temporary of one
            gradient. (default: 0)
        orthogonalize: before normalizing (after SinkGD), replace every >= 2-D gradient, in place in
            ``p.grad``, by its orthogonal polar factor: every singular value set to 1 (SWAN's whitening,
            arXiv 2412.13148; Muon without momentum), singular values far below the largest damped instead.
            From each gradient's small Gram matrix (rank x rank for a LoRA factor): by ``eigh`` on the CPU,
            by Newton-Schulz steps without host synchronization on CUDA. Costs about ``4 r`` flops per
            parameter (rank ``r``) plus one small decomposition per tensor; ``False`` gives the seeds'
            normalized gradient step. (default: True)
        lr_free: estimate the step size: steered every step by the cosine between the step of the
            zero-initialised tensors (``lora_up``) and the way they have moved so far (:class:`_LRFreeEstimator`);
            ``lr`` and every group's lr become multipliers of it. A flag per tensor and three scalars, saved in the
            state dict; one more pass that reads every parameter. (default: False; with it, ``lr`` defaults to 1.0)
        stochastic_rounding: update bfloat16 parameters in float32 and round stochastically, so tiny
            updates are not lost to round-to-nearest. Other dtypes are unaffected. (default: True)
        foreach: use the multi-tensor (``torch._foreach_*``) implementation; False runs a plain loop
            over tensors with the same arithmetic. (default: None = True)

    All options except ``normalization``, ``normalize_frequency``, ``sinkgd_iterations``, ``orthogonalize``,
    ``lr_free``, ``stochastic_rounding``, ``foreach`` and ``verbose`` can be set per parameter group.
    Unknown keyword arguments raise ``TypeError``.
    """

    #: Steps between two ``verbose`` log lines.
    log_interval: int = 100

    def __init__(
        self,
        params: Iterable[Union[Tensor, tuple[str, Tensor], dict[str, Any]]],
        lr: Optional[float] = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        normalize_frequency: int = 1,
        global_norm_weight: float = 1.0,
        layer_norm_weight: float = 1.0,
        adaptive_eps: bool = True,
        use_cautious_update: bool = False,
        cautious_threshold: float = 0.1,
        cautious_scale: float = 0.5,
        verbose: bool = False,
        *,
        decoupled_weight_decay: bool = True,
        normalization: Optional[str] = None,
        sinkgd_iterations: int = 0,
        orthogonalize: bool = True,
        lr_free: bool = False,
        stochastic_rounding: bool = True,
        foreach: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(_unknown_arguments_message(kwargs))
        _check_bool("lr_free", lr_free)
        if lr is None:
            lr = 1.0 if lr_free else 1e-4
        if not isinstance(normalize_frequency, int) or isinstance(normalize_frequency, bool) or normalize_frequency < 1:
            raise ValueError(f"Invalid normalize_frequency: {normalize_frequency!r} (must be an integer >= 1)")
        if normalization is None:  # a normalize_frequency other than 1 only means something when alternating
            normalization = "layer" if normalize_frequency == 1 else "alternating"
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Invalid normalization: {normalization!r} (must be one of {', '.join(map(repr, NORMALIZATIONS))})"
            )
        if normalization != "alternating" and normalize_frequency != 1:
            raise ValueError(
                f"Invalid normalize_frequency: {normalize_frequency} applies only to normalization='alternating' "
                f"(got normalization={normalization!r})"
            )
        if not isinstance(sinkgd_iterations, int) or isinstance(sinkgd_iterations, bool) or sinkgd_iterations < 0:
            raise ValueError(f"Invalid sinkgd_iterations: {sinkgd_iterations!r} (must be an integer >= 0)")
        _check_bool("orthogonalize", orthogonalize)
        _check_bool("verbose", verbose)
        _check_bool("stochastic_rounding", stochastic_rounding)
        if foreach is not None:
            _check_bool("foreach", foreach)
        defaults = dict(
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            global_norm_weight=global_norm_weight,
            layer_norm_weight=layer_norm_weight,
            adaptive_eps=adaptive_eps,
            use_cautious_update=use_cautious_update,
            cautious_threshold=cautious_threshold,
            cautious_scale=cautious_scale,
        )
        _validate_group_options(defaults)
        self.normalization = normalization
        self.normalize_frequency = normalize_frequency
        self.sinkgd_iterations = sinkgd_iterations
        self.orthogonalize = orthogonalize
        self.lr_free = lr_free
        self.stochastic_rounding = stochastic_rounding
        self.foreach = True if foreach is None else foreach
        self.verbose = verbose
        self._init_runtime_state()
        super().__init__(params, defaults)
        if lr_free and max(group["lr"] for group in self.param_groups) < 1e-2:
            warnings.warn(
                "ANLO(lr_free=True): lr multiplies the estimated step size (1.0 = as estimated), but the largest "
                f"group lr is {max(group['lr'] for group in self.param_groups):g}; for the estimate itself use "
                "lr=1 (--learning_rate 1), and per-group lrs as ratios to it",
                stacklevel=2,
            )

    def _init_runtime_state(self) -> None:
        """Counters and caches that are not hyperparameters (also rebuilt after unpickling)."""
        self._step = 0
        self._layout: Optional[_Layout] = None
        self._last: Optional[_StepRecord] = None
        self._skipped: Optional[Tensor] = None  # device int64 counter of skipped steps
        self._skipped_reported = 0
        self._warned_skip = False
        self._cautious_fired: Optional[Tensor] = None  # device int64 counter per group
        self._cautious_evaluated: list[int] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._lr_free = _LRFreeEstimator()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            _step=self._step,
            normalization=self.normalization,
            normalize_frequency=self.normalize_frequency,
            sinkgd_iterations=self.sinkgd_iterations,
            orthogonalize=self.orthogonalize,
            lr_free=self.lr_free,
            _lr_free_state=self._lr_free.state_dict(),
            stochastic_rounding=self.stochastic_rounding,
            foreach=self.foreach,
            verbose=self.verbose,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if hasattr(self, "_layout"):
            # torch's load_state_dict() calls this on a live optimizer with only "state" and "param_groups"
            # (accelerate's prepare() does that too): the options and counters stay as they are.
            super().__setstate__(state)
            return
        step = state.pop("_step", 0)
        lr_free_state = state.pop("_lr_free_state", None)
        # Pickled before these options existed: what ANLO did then.
        state.pop("fused", None)  # an option of the fused CPU kernel, removed
        legacy = {"normalization": "alternating", "sinkgd_iterations": 0, "orthogonalize": False, "lr_free": False}
        for name, value in legacy.items():
            state.setdefault(name, value)
        self._init_runtime_state()
        super().__setstate__(state)
        self._step = step
        self._lr_free.load_state_dict(lr_free_state)

    # ----------------------------------------------------------------------------------------------
    # parameter groups and state dict

    def _warn_about_changed_options(self, saved: Optional[dict[str, Any]]) -> None:
        """Warn where this optimizer's all-group options differ from those an ANLO state was saved with. A state
        saved before they were recorded comes from an ANLO whose default was ``orthogonalize=False``."""
        if saved is None:
            saved = {"orthogonalize": False}
        changed = [f"{name}={getattr(self, name)!r} (saved: {saved[name]!r})" for name in _RECORDED_OPTIONS
                   if name in saved and saved[name] != getattr(self, name)]
        if changed:
            warnings.warn(
                "ANLO: resuming with other options than the state was saved with: " + ", ".join(changed)
                + "; pass the saved values in --optimizer_args to continue as before",
                stacklevel=3,
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (validated like the constructor arguments)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_group_options(group)
            names = group.get("param_names")
            if names is not None and (
                len(names) != len(group["params"]) or not all(isinstance(n, str) for n in names)
            ):
                raise ValueError(
                    f"Invalid param_names: expected {len(group['params'])} strings, one per parameter "
                    f"of the group, got {len(names)} entries"
                )
        except ValueError:
            self.param_groups.pop()
            raise
        self._layout = None

    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state dict plus the step counter under ``"anlo_step"`` (an int)."""
        state_dict = super().state_dict()
        state_dict[STEP_KEY] = self._step
        state_dict[OPTIONS_KEY] = {name: getattr(self, name) for name in _RECORDED_OPTIONS}
        lr_free_state = self._lr_free.state_dict() if self.lr_free else None
        if lr_free_state is not None:
            state_dict[LR_FREE_KEY] = lr_free_state
        self._report_skipped_steps()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`.

        A state dict without ``"anlo_step"`` (e.g. saved by another optimizer) restarts the step
        counter at 0: adaptive eps starts over, and an alternating run's next step is a global one.
        Options that apply to all groups stay the constructor's; where they differ from those the state was
        saved with (``"anlo_options"``), a warning names them.
        Per-parameter state from another optimizer is dropped with a warning (ANLO keeps none), and
        option keys missing from the saved groups take the constructor's values.
        """
        state_dict = dict(state_dict)
        step = state_dict.pop(STEP_KEY, None)
        lr_free_state = state_dict.pop(LR_FREE_KEY, None)
        saved_options = state_dict.pop(OPTIONS_KEY, None)
        if step is not None:
            self._warn_about_changed_options(saved_options)
        super().load_state_dict(state_dict)
        if self.lr_free:
            if lr_free_state is None and step:
                warnings.warn(
                    "ANLO(lr_free=True): the state dict has no step-size estimate (saved without lr_free?); "
                    "tensors that are nonzero now count as not starting at zero, so the estimate starts over "
                    "only from those that are zero",
                    stacklevel=2,
                )
            self._lr_free.load_state_dict(lr_free_state)
        if step is None:
            logger.info("ANLO: state dict has no %r; the step counter restarts at 0", STEP_KEY)
        self._step = int(step) if step is not None else 0
        if self.state:
            warnings.warn(
                "ANLO keeps no per-parameter state; ignoring the per-parameter state in the loaded "
                "state dict (saved by another optimizer?)",
                stacklevel=2,
            )
            self.state.clear()
        for group in self.param_groups:
            for name in _GROUP_OPTIONS:
                group.setdefault(name, self.defaults[name])
            _validate_group_options(group)
        self._layout = None

    # ----------------------------------------------------------------------------------------------
    # the step

    def _mode(self, step: int) -> str:
        if self.normalization != "alternating":
            return self.normalization
        return "global" if (step // self.normalize_frequency) % 2 == 0 else "layer"

    def _effective_eps(self, group: dict[str, Any], step: int) -> float:
        return group["eps"] * _adaptive_eps_factor(step) if group["adaptive_eps"] else group["eps"]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step (:func:`_anlo_step_`).

        Args:
            closure: re-evaluates the model and returns the loss; run with gradients enabled.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, counts = self._collect()
        if params:
            record = self._run_step(params, grads, counts, self._mode(self._step), self._write_pass)
            self._count_cautious_evaluations(counts)
            self._last = record
            self._skipped = _accumulate(self._skipped, ~record.finite)
            if record.fired is not None:
                self._cautious_fired = _accumulate(self._cautious_fired, record.fired)
            if self._layout.on_host and not record.finite:  # the flag is in host memory: no synchronization
                self._report_skipped_steps()
        self._step += 1
        if self.verbose and self._step % self.log_interval == 0:
            self._log_summary()
        return loss

    def _run_step(
        self, params: list[Tensor], grads: list[Tensor], counts: list[int], mode: str,
        write_pass: Optional[Callable[..., WritePass]],
    ) -> _StepRecord:  # fmt: skip
        """:func:`_anlo_step_` with this optimizer's layout, per-tensor options and optimizer-wide options."""
        layout = self._get_layout(params, counts)
        options = self._get_options(layout)
        step = self._step
        if self.lr_free and layout.positions is None:
            self._add_positions(layout)
        return _anlo_step_(
            params, grads, layout, options, mode, step,
            n_groups=len(self.param_groups), foreach=self.foreach, sinkgd_iterations=self.sinkgd_iterations,
            orthogonalize=self.orthogonalize,
            write_pass=None if write_pass is None else functools.partial(write_pass, step=step),
            lr_free=self._lr_free if self.lr_free else None,
        )  # fmt: skip

    def _add_positions(self, layout: _Layout) -> None:
        """lr_free: each active tensor's position among all the optimizer's tensors."""
        positions, offset = [], 0
        for group in self.param_groups:
            positions += [offset + index for index, p in enumerate(group["params"]) if p.grad is not None]
            offset += len(group["params"])
        layout.positions = torch.tensor(positions, device=layout.device)
        layout.total_tensors = offset

    def _count_cautious_evaluations(self, counts: list[int]) -> None:
        """Add each group's tensors with gradients to its count of cautious-gate evaluations, if it has the gate."""
        self._cautious_evaluated += [0] * (len(self.param_groups) - len(self._cautious_evaluated))
        for group_index, (group, count) in enumerate(zip(self.param_groups, counts)):
            if group["use_cautious_update"]:
                self._cautious_evaluated[group_index] += count

    def _write_pass(self, dtype: torch.dtype, device: torch.device, step: int) -> WritePass:
        """The write pass for the parameters of one (device, dtype): the one place that chooses it."""
        if dtype == torch.bfloat16 and self.stochastic_rounding:
            if device not in self._generators:
                self._generators[device] = torch.Generator(device=device)
            generator = self._generators[device]
            generator.manual_seed(_SR_SEED + step)  # reproducible, equal on every rank, no state to save
            return functools.partial(_write_low_precision_, generator=generator)
        if dtype in (torch.float16, torch.bfloat16):
            return _write_low_precision_
        return _write_foreach_ if self.foreach else _write_per_tensor_

    def _collect(self) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """Parameters with gradients, group by group: the tensors, their gradients and the count per group."""
        params, grads, counts = [], [], []
        for group in self.param_groups:
            group_params = group["params"]
            group_grads = [p.grad for p in group_params]
            if any(g is None for g in group_grads):
                group_params = [p for p in group_params if p.grad is not None]
                group_grads = [p.grad for p in group_params]
            params += group_params
            grads += group_grads
            counts.append(len(group_grads))
        for grad in grads:
            if grad.layout != torch.strided:
                raise RuntimeError(
                    f"ANLO does not support sparse gradients (got layout {grad.layout}); "
                    "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
                )
        return params, grads, counts

    def _active_names(self) -> list[Optional[str]]:
        """Names of the parameters :meth:`_collect` returns (``None`` where a group has no ``param_names``)."""
        names: list[Optional[str]] = []
        for group in self.param_groups:
            group_names = group.get("param_names") or [None] * len(group["params"])
            names += [n for n, p in zip(group_names, group["params"]) if p.grad is not None]
        return names

    def _get_layout(self, params: list[Tensor], counts: list[int]) -> _Layout:
        """The cached :class:`_Layout`, rebuilt when the tensors with gradients, their dtypes or devices change."""
        # Separate flat tuples: cheaper to build each step than one small tuple per tensor.
        key = (
            tuple(counts),
            tuple(map(id, params)),
            tuple(p.dtype for p in params),
            tuple(p.device for p in params),
        )
        if self._layout is None or self._layout.key != key:
            self._layout = _build_layout(key, params, self._active_names(), counts)
        return self._layout

    def _get_options(self, layout: _Layout) -> _TensorOptions:
        """The layout's :class:`_TensorOptions`, expanded again when a group's option changes (an lr schedule)."""
        values = tuple(group[name] for group in self.param_groups for name in _GROUP_OPTIONS)
        if layout.options is None or layout.options[0] != values:
            layout.options = (values, _expand_options(self.param_groups, layout.group_slices))
        return layout.options[1]

    # ----------------------------------------------------------------------------------------------
    # the seed's seams

    def _apply_global_normalization(self) -> Tensor:
        """The per-tensor scales ``s`` a global step would apply to the current gradients (nothing is written)."""
        return self._preview_scales("global")

    def _apply_layer_normalization(self) -> Tensor:
        """The per-tensor scales ``s_L`` a layer step would apply to the current gradients (nothing is written)."""
        return self._preview_scales("layer")

    def _preview_scales(self, mode: str) -> Tensor:
        params, grads, counts = self._collect()
        if not params:
            return torch.empty(0)
        return self._run_step(params, [g.clone() for g in grads], counts, mode, write_pass=None).scale

    @staticmethod
    def _apply_cautious_update_optimized(
        update: Tensor, grad: Tensor, threshold: float = 0.1, scale: float = 0.5
    ) -> Tensor:
        """Return ``update * scale`` if cosine(update, grad) < ``threshold``, else ``update``.

        Works on one tensor pair without host synchronization (the choice is a ``torch.where``).
        A zero ``update`` or ``grad`` is returned unchanged. ``step()`` applies the same gate
        (:func:`_cautious_gate`) to per-tensor norms without materializing the update.
        """
        dtype = torch.promote_types(update.dtype, torch.float32)
        u, g = update.reshape(-1).to(dtype), grad.reshape(-1).to(dtype)
        factor, _ = _cautious_gate(torch.dot(u, g), torch.dot(u, u), torch.dot(g, g), threshold, scale)
        return update * factor.to(update.dtype)


    # ----------------------------------------------------------------------------------------------
    # statistics (these synchronize with the device; step() never does)

    def _report_skipped_steps(self) -> int:
        """Return the number of skipped steps; warn the first time any are seen."""
        skipped = int(self._skipped) if self._skipped is not None else 0
        if skipped > self._skipped_reported:
            if not self._warned_skip:
                warnings.warn(
                    f"ANLO skipped {skipped} step(s) because the gradients were not finite (inf/NaN); "
                    "no weights were changed in those steps. Further skips are counted in "
                    "get_normalization_stats()['skipped_steps'].",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_skip = True
            self._skipped_reported = skipped
        return skipped

    def get_normalization_stats(self) -> dict[str, Any]:
        """Step counter, modes, norms of the last step and skip count.

        Keys: ``step_count`` (steps taken), ``normalization_mode`` (mode of the last step, ``None``
        before the first), ``next_normalization_mode``, ``normalization`` and ``normalize_frequency``
        (the options), ``num_layers`` (layers of the last step), ``global_norm`` (global L2 norm of
        the last step's normalized quantity: gradients plus coupled decay), ``skipped_steps``,
        ``cautious_update_enabled`` and ``groups``: per group ``lr``, ``effective_eps`` (for the next
        step), ``num_params``, ``num_params_with_grad``, ``grad_norm_min/mean/max`` (per-tensor raw
        gradient L2 norms of the last step, ``None`` if none).
        """
        last = self._last
        per_group: dict[int, Tensor] = {}
        if last is not None:
            grad_norms = last.grad_sq.sqrt().cpu()
            per_group = {gi: grad_norms[start:end] for gi, start, end in last.group_slices}
        groups = []
        for gi, group in enumerate(self.param_groups):
            norms = per_group.get(gi)
            groups.append(
                {
                    "lr": group["lr"],
                    "effective_eps": self._effective_eps(group, self._step),
                    "num_params": len(group["params"]),
                    "num_params_with_grad": 0 if norms is None else len(norms),
                    "grad_norm_min": None if norms is None else norms.min().item(),
                    "grad_norm_mean": None if norms is None else norms.mean().item(),
                    "grad_norm_max": None if norms is None else norms.max().item(),
                }
            )
        stats = {
            "step_count": self._step,
            "normalization_mode": None if last is None else last.mode,
            "next_normalization_mode": self._mode(self._step),
            "normalization": self.normalization,
            "normalize_frequency": self.normalize_frequency,
            "num_layers": None if last is None else last.num_layers,
            "global_norm": None if last is None else last.total_sq.sqrt().item(),
            "skipped_steps": self._report_skipped_steps(),
            "cautious_update_enabled": any(g["use_cautious_update"] for g in self.param_groups),
            "groups": groups,
        }
        if self.lr_free and last is not None and last.step_size is not None:
            stats.update(self._lr_free_stats(last, groups))
        return stats

    def _lr_free_stats(self, last: _StepRecord, groups: list[dict[str, Any]]) -> dict[str, float]:
        """lr_free: the estimate ``d`` (step RMS at lr 1) of the last step, and each group's step ``lr * d``, per group
        (into ``groups``) and at top level as ``lr_free_step_group<i>``, so that a trainer logging top-level numbers
        logs them per group."""
        d = last.step_size[0].item()
        top: dict[str, float] = {"lr_free_d": d}
        for gi, _, _ in last.group_slices:
            groups[gi]["lr_free_d"] = d
            groups[gi]["lr_free_step"] = self.param_groups[gi]["lr"] * d
            top[f"lr_free_step_group{gi}"] = self.param_groups[gi]["lr"] * d
        return top

    def get_cautious_update_stats(self) -> dict[str, Any]:
        """Cautious-gate configuration per group and how often it fired.

        Keys: ``enabled_groups``, ``total_groups``, ``cautious_update_config`` (``group_<i>`` ->
        ``enabled``/``threshold``/``scale``), ``fired_per_group`` and ``evaluated_per_group`` (tensor
        updates scaled / checked), ``fired_total``, ``evaluated_total``.
        """
        n_groups = len(self.param_groups)
        fired = [0] * n_groups
        if self._cautious_fired is not None:
            fired[: len(self._cautious_fired)] = self._cautious_fired.tolist()
        evaluated = (self._cautious_evaluated + [0] * n_groups)[:n_groups]
        return {
            "enabled_groups": sum(g["use_cautious_update"] for g in self.param_groups),
            "total_groups": n_groups,
            "cautious_update_config": {
                f"group_{i}": {
                    "enabled": g["use_cautious_update"],
                    "threshold": g["cautious_threshold"],
                    "scale": g["cautious_scale"],
                }
                for i, g in enumerate(self.param_groups)
            },
            "fired_per_group": fired,
            "evaluated_per_group": evaluated,
            "fired_total": sum(fired),
            "evaluated_total": sum(evaluated),
        }

    def get_memory_usage(self) -> dict[str, Any]:
        """Dtype-aware memory of parameters, gradients and optimizer state (``*_mb`` are MiB).

        ``optimizer_state_*`` counts the tensors in ``self.state`` (what ``state_dict()`` saves), which
        ANLO leaves empty; ``workspace_*`` counts its per-tensor caches (a few tens of bytes per tensor).
        """
        params = {id(p): p for g in self.param_groups for p in g["params"]}.values()
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        state_bytes = sum(_tensor_bytes(s) for s in self.state.values())
        workspace_bytes = self._layout.nbytes() if self._layout is not None else 0
        total_parameters = sum(p.numel() for p in params)
        mib = float(1 << 20)
        return {
            "total_parameters": total_parameters,
            "parameter_memory_bytes": param_bytes,
            "gradient_memory_bytes": grad_bytes,
            "optimizer_state_memory_bytes": state_bytes,
            "workspace_memory_bytes": workspace_bytes,
            "parameter_memory_mb": param_bytes / mib,
            "gradient_memory_mb": grad_bytes / mib,
            "optimizer_state_memory_mb": state_bytes / mib,
            "workspace_memory_mb": workspace_bytes / mib,
            "total_memory_mb": (param_bytes + grad_bytes + state_bytes + workspace_bytes) / mib,
            "state_bytes_per_parameter": state_bytes / total_parameters if total_parameters else 0.0,
        }

    def _log_summary(self) -> None:
        stats = self.get_normalization_stats()
        cautious = self.get_cautious_update_stats()
        logger.info(
            "ANLO step %d: mode=%s global_norm=%.4g layers=%s skipped=%d cautious_fired=%d/%d",
            stats["step_count"],
            stats["normalization_mode"],
            stats["global_norm"],
            stats["num_layers"],
            stats["skipped_steps"],
            cautious["fired_total"],
            cautious["evaluated_total"],
        )


def _accumulate(counter: Optional[Tensor], value: Tensor) -> Tensor:
    """Add ``value`` (bool or integer) to an int64 ``counter`` on ``value``'s device, in place when
    possible; a missing counter starts at 0 and a shorter one is padded with zeros."""
    if counter is None or counter.device != value.device or counter.shape != value.shape:
        grown = torch.zeros(value.shape, dtype=torch.long, device=value.device)
        if counter is not None:
            grown.view(-1)[: counter.numel()] += counter.to(value.device).view(-1)
        counter = grown
    return counter.add_(value)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _unknown_arguments_message(kwargs: dict[str, Any]) -> str:
    valid = _GROUP_OPTIONS + _OPTIMIZER_OPTIONS
    parts = []
    for name in sorted(kwargs):
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (
        f"ANLO got unexpected keyword argument(s): {', '.join(parts)}. "
        f"Valid arguments: params, {', '.join(valid)}"
    )
