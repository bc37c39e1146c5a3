"""ANLO: Alternating Norm LoRA Optimizer.

A stateless optimizer for LoRA training. Every step normalizes the current gradient to unit RMS and
then applies each parameter's own learning rate; no moment buffers are kept. A step divides either by
a *layer* norm (one norm per LoRA module, e.g. ``lora_down`` + ``lora_up``) or by a *global* norm (one
norm over every gradient of every parameter group)::

    u_p   = g_p + wd * p                      (coupled weight decay; u_p = g_p by default)
    s_L   = w_layer  * sqrt(N_L) / (||u_L||_2   + eps_t)       layer steps
    s     = w_global * sqrt(N)   / (||u_all||_2 + eps_t)       global steps
    p    <- p - lr_p * s * u_p                (per parameter group lr, so LoRA+ ratios survive)

By default every step is a layer step (``normalization="layer"``): in the LoRA benchmark it ended 1 %
below the seed algorithm, ``normalization="alternating"``, which alternates global and layer steps
every ``normalize_frequency`` steps (docs/benchmarks.md).

See ``docs/ANLO.md`` for the full definition, the options and the statistics. The module depends on
torch only.
"""

from __future__ import annotations

import contextlib
import difflib
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

# Per-group options: constructor defaults, overridable per parameter group (like torch.optim).
_GROUP_OPTIONS = (
    "lr", "eps", "weight_decay", "decoupled_weight_decay", "global_norm_weight", "layer_norm_weight",
    "adaptive_eps", "use_cautious_update", "cautious_threshold", "cautious_scale",
)  # fmt: skip
# Optimizer-wide options: constructor only.
_OPTIMIZER_OPTIONS = (
    "normalization", "normalize_frequency", "sinkgd_iterations", "orthogonalize", "stochastic_rounding", "foreach",
    "verbose",
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


# --------------------------------------------------------------------------------------------------
# functional core: every function works on lists of tensors of one device and dtype


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


def _squared_norms(tensors: list[Tensor], dtype: torch.dtype, foreach: bool) -> Tensor:
    """Squared L2 norm of each tensor, accumulated in ``dtype``, as one 1-D tensor."""
    if foreach:
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]
    return torch.stack(norms).square_()


def _sum_per_layer(values: Tensor, layer_members: Tensor) -> Tensor:
    """Per layer, the sum of its tensors' entries of ``values`` (one per tensor), by ``_Layout.layer_members``.

    A gather and a sum over a fixed axis, not an ``index_add_``: on CUDA that adds atomically, in an order
    that changes from run to run, so layers of three or more tensors (LyCORIS, DoRA) would get sums that
    differ in the last bit between runs and between data-parallel ranks.
    """
    padded = torch.cat([values, values.new_zeros(1)])  # index n, the padding, reads 0
    return padded[layer_members].sum(dim=1)


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


def _update_(
    params: list[Tensor],
    grads: list[Tensor],
    coefs: Sequence[Tensor],
    decays: Sequence[Optional[Tensor]],
    foreach: bool,
) -> None:
    """``p <- p * d + c * g`` in place, ``d`` skipped where ``None``. ``c`` and ``d`` are 0-dim tensors."""
    decayed = [(p, d) for p, d in zip(params, decays) if d is not None]
    if foreach:
        if decayed:
            torch._foreach_mul_([p for p, _ in decayed], [d for _, d in decayed])
        # The 0-dim coefficients go first: pytorch/pytorch#172731 gives a 0-dim list in that position a
        # one-launch CUDA path (which torch versions have it is not checked here, no GPU). c * g == g * c.
        torch._foreach_addcmul_(params, coefs, grads)
    else:
        for p, d in decayed:
            p.mul_(d)
        for p, g, c in zip(params, grads, coefs):
            p.addcmul_(c, g)


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


def _update_low_precision_(
    params: list[Tensor],
    grads: list[Tensor],
    coefs: Sequence[Tensor],
    decays: Sequence[Optional[Tensor]],
    generator: Optional[torch.Generator],
) -> None:
    """Same update as :func:`_update_` for float16/bfloat16 params, computed in float32.

    The coefficients are float32 and may exceed float16's range when gradients are tiny, so they are
    never cast to the parameter dtype. The result is rounded stochastically into bfloat16 params when
    a ``generator`` is given, else to nearest. Works one tensor at a time, so the temporaries never
    exceed one parameter (in float32).
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


def _safe_div(numerator: Union[Tensor, float], denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and 0 where the denominator is 0 (a zero norm with ``eps=0``)."""
    return torch.where(denominator > 0, numerator / denominator, 0.0)


def _cautious_gate(
    dot: Tensor, update_sq: Tensor, grad_sq: Tensor, threshold: float, scale: float
) -> tuple[Tensor, Tensor]:
    """Cautious-update factors from ``<u, g>``, ``||u||^2`` and ``||g||^2`` (element-wise, no host sync).

    Returns ``(factor, fired)``: ``factor`` is ``scale`` where cosine(u, g) < ``threshold`` and both
    norms are positive, else 1; ``fired`` is the boolean mask of those entries.
    """
    cosine = dot / (update_sq.sqrt() * grad_sq.sqrt())
    fired = (cosine < threshold) & (update_sq > 0) & (grad_sq > 0)
    return torch.where(fired, torch.full_like(dot, scale), 1.0), fired


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

    def nbytes(self) -> int:
        tensors = [self.layer_index, self.layer_members, self.layer_sqrt_numel, self.inverse_order]
        tensors += [t for b in self.buckets for t in b.tensors()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class _StepRecord:
    """Device tensors kept from the last step for the statistics (read lazily, never in ``step()``)."""

    mode: str
    grad_sq: Tensor  # (n,) squared norms of the raw gradients
    total_sq: Tensor  # squared global norm of what was normalized (gradients + coupled decay)
    group_slices: list[tuple[int, int, int]]
    num_layers: int


class ANLO(torch.optim.Optimizer):
    r"""Alternating Norm LoRA Optimizer: stateless, unit-RMS normalized gradient steps.

    Each step normalizes the gradients (plus coupled weight decay, if any) to unit RMS, by default with
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
        lr: learning rate; with unit-RMS updates it sits in AdamW's range. (default: 1e-4)
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
            seed algorithm (``wd * p`` added to the gradient before normalization), which in the LoRA
            benchmark (docs/benchmarks.md) cost 26 % validation loss at wd 0.01. (default: True)
        normalization: ``"layer"`` (every step a layer step), ``"alternating"`` (global and layer steps
            in turn, see ``normalize_frequency``: the seed algorithm) or ``"global"`` (every step a global
            step). (default: None = ``"layer"``, or ``"alternating"`` if ``normalize_frequency`` > 1)
        sinkgd_iterations: before normalizing, rescale the rows and columns of every >= 2-D gradient
            to unit RMS this many times, in place in ``p.grad`` (SinkGD, arXiv 2502.06742). 0 = off.
            At 1 it ended 0.2-0.5 % below the default in the LoRA benchmark (5 did no better), but its
            per-tensor loops made a CPU step about 3.7x slower. (default: 0)
        orthogonalize: before normalizing (after SinkGD), replace every >= 2-D gradient, in place in
            ``p.grad``, by its orthogonal polar factor: every singular value set to 1 (SWAN's whitening,
            arXiv 2412.13148; Muon without momentum), singular values far below the largest damped instead.
            From each gradient's small Gram matrix (rank x rank for a LoRA factor): by ``eigh`` on the CPU,
            by Newton-Schulz steps without host synchronization on CUDA. In the LoRA benchmark it ended about
            1 % below AdamW, but it made a CPU step about 10x as long. (default: False)
        stochastic_rounding: update bfloat16 parameters in float32 and round stochastically, so tiny
            updates are not lost to round-to-nearest. Other dtypes are unaffected. (default: True)
        foreach: use the multi-tensor (``torch._foreach_*``) implementation; False runs a plain loop
            over tensors with the same arithmetic. (default: None = True)
    All options except ``normalization``, ``normalize_frequency``, ``sinkgd_iterations``, ``orthogonalize``,
    ``stochastic_rounding``, ``foreach`` and ``verbose`` can be set per parameter group.
    Unknown keyword arguments raise ``TypeError``.
    """

    #: Steps between two ``verbose`` log lines.
    log_interval: int = 100

    def __init__(
        self,
        params: Iterable[Union[Tensor, tuple[str, Tensor], dict[str, Any]]],
        lr: float = 1e-4,
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
        orthogonalize: bool = False,
        stochastic_rounding: bool = True,
        foreach: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(_unknown_arguments_message(kwargs))
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
        self.stochastic_rounding = stochastic_rounding
        self.foreach = True if foreach is None else foreach
        self.verbose = verbose
        self._init_runtime_state()
        super().__init__(params, defaults)

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

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            _step=self._step,
            normalization=self.normalization,
            normalize_frequency=self.normalize_frequency,
            sinkgd_iterations=self.sinkgd_iterations,
            orthogonalize=self.orthogonalize,
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
        # Pickled before these options existed: what ANLO did then.
        state.pop("fused", None)  # an option of the fused CPU kernel, removed
        legacy = {"normalization": "alternating", "sinkgd_iterations": 0, "orthogonalize": False}
        for name, value in legacy.items():
            state.setdefault(name, value)
        self._init_runtime_state()
        super().__setstate__(state)
        self._step = step

    # ----------------------------------------------------------------------------------------------
    # parameter groups and state dict

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
        self._report_skipped_steps()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`.

        A state dict without ``"anlo_step"`` (e.g. saved by another optimizer) restarts the step
        counter at 0: adaptive eps starts over, and an alternating run's next step is a global one.
        Per-parameter state from another optimizer is dropped with a warning (ANLO keeps none), and
        option keys missing from the saved groups take the constructor's values.
        """
        state_dict = dict(state_dict)
        step = state_dict.pop(STEP_KEY, None)
        super().load_state_dict(state_dict)
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
        if not group["adaptive_eps"]:
            return group["eps"]
        warmup = max(0.0, 1.0 - step / _EPS_WARMUP_STEPS)
        return group["eps"] * (1.0 + (_EPS_BOOST - 1.0) * warmup)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step.

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
        step, mode = self._step, self._mode(self._step)
        if not params:
            self._step += 1
            return loss
        layout = self._get_layout(params, counts)
        if self.sinkgd_iterations:
            for grad in grads:
                _row_column_normalize_(grad, self.sinkgd_iterations)
        if self.orthogonalize:
            _orthogonalize_(grads)

        # Pass 1 reads every gradient once: squared norms per tensor, then everything else works on
        # vectors with one entry per tensor.
        grad_sq = self._gather(
            [_squared_norms(bucket.select(grads), layout.stat_dtype, self.foreach) for bucket in layout.buckets],
            layout,
        )
        update_sq, update_dot_grad = self._apply_coupled_decay_to_norms(params, grads, grad_sq, layout)
        total_sq = update_sq.sum()
        finite = torch.isfinite(total_sq)
        if mode == "global":
            scales = self._apply_global_normalization(total_sq, layout, step)
        else:
            scales = self._apply_layer_normalization(update_sq, layout, step)
        coefs, decays, decayed = self._coefficients(scales, grad_sq, update_sq, update_dot_grad, finite, layout)
        # Pass 2 (in _apply_updates) reads every gradient and parameter once and writes the parameter.
        self._skipped = _accumulate(self._skipped, ~finite)
        self._last = _StepRecord(mode, grad_sq, total_sq, layout.group_slices, layout.num_layers)
        if layout.on_host and not finite:
            # The flag is already in host memory, so reading it costs no synchronization; skip here.
            self._report_skipped_steps()
        else:
            self._apply_updates(params, grads, coefs, decays, decayed, layout, step)
        self._step += 1
        if self.verbose and self._step % self.log_interval == 0:
            self._log_summary()
        return loss

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
        # Separate flat tuples: cheaper to build each step than one small tuple per tensor.
        key = (
            tuple(counts),
            tuple(map(id, params)),
            tuple(p.dtype for p in params),
            tuple(p.device for p in params),
        )
        if self._layout is None or self._layout.key != key:
            self._layout = self._build_layout(key, params, self._active_names(), counts)
        return self._layout

    def _build_layout(
        self, key: tuple, params: list[Tensor], names: list[Optional[str]], counts: list[int]
    ) -> _Layout:
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
                warnings.warn(f"ANLO: parameter name {name!r} repeats; the repeat is its own layer", stacklevel=4)
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

    @staticmethod
    def _gather(vectors: list[Tensor], layout: _Layout) -> Tensor:
        """Per-bucket vectors -> one vector in group-major tensor order, on the layout's device."""
        if layout.inverse_order is None:
            return vectors[0]
        return torch.cat([v.to(layout.device) for v in vectors])[layout.inverse_order]

    def _apply_coupled_decay_to_norms(
        self, params: list[Tensor], grads: list[Tensor], grad_sq: Tensor, layout: _Layout
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``||u||^2`` and ``<u, g>`` per tensor, with ``u = g + wd * p`` in groups with coupled decay.

        Uses ``||g + wd p||^2 = ||g||^2 + 2 wd <g, p> + wd^2 ||p||^2`` so ``u`` is never materialized
        and the gradients are not modified. Returns ``(grad_sq, None)`` when no group has coupled decay.
        """
        pieces_sq, pieces_dot, any_decay = [], [], False
        for group_index, start, end in layout.group_slices:
            group = self.param_groups[group_index]
            grad_sq_g = grad_sq[start:end]
            wd = group["weight_decay"]
            if wd == 0 or group["decoupled_weight_decay"]:
                pieces_sq.append(grad_sq_g)
                pieces_dot.append(grad_sq_g)
                continue
            any_decay = True
            dots, params_sq = _decay_terms(
                grads[start:end], params[start:end], layout.stat_dtype, layout.device
            )
            pieces_sq.append((grad_sq_g + 2 * wd * dots + wd * wd * params_sq).clamp_min_(0))
            pieces_dot.append(grad_sq_g + wd * dots)
        if not any_decay:
            return grad_sq, None
        return torch.cat(pieces_sq), torch.cat(pieces_dot)

    def _apply_global_normalization(self, total_sq: Tensor, layout: _Layout, step: int) -> Tensor:
        """Per-tensor scales of a global step: ``w_global * sqrt(N) / (||u_all||_2 + eps_t)``.

        ``total_sq`` is the squared norm over every tensor of every group, so the scale is the same
        for all groups (up to each group's ``global_norm_weight`` and ``eps``).
        """
        norm = total_sq.sqrt()
        sqrt_numel = math.sqrt(layout.numel)
        pieces = []
        for group_index, start, end in layout.group_slices:
            group = self.param_groups[group_index]
            eps = self._effective_eps(group, step)
            scale = _safe_div(group["global_norm_weight"] * sqrt_numel, norm + eps)
            pieces.append(scale.expand(end - start))
        return torch.cat(pieces)

    def _apply_layer_normalization(self, update_sq: Tensor, layout: _Layout, step: int) -> Tensor:
        """Per-tensor scales of a layer step: ``w_layer * sqrt(N_L) / (||u_L||_2 + eps_t)``.

        A layer's squared norm is the sum over its tensors (which may sit in several groups).
        """
        layer_norm = _sum_per_layer(update_sq, layout.layer_members).sqrt_()[layout.layer_index]
        pieces = []
        for group_index, start, end in layout.group_slices:
            group = self.param_groups[group_index]
            pieces.append(
                _safe_div(
                    group["layer_norm_weight"] * layout.layer_sqrt_numel[start:end],
                    layer_norm[start:end] + self._effective_eps(group, step),
                )
            )
        return torch.cat(pieces)

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

    def _coefficients(
        self,
        scales: Tensor,
        grad_sq: Tensor,
        update_sq: Tensor,
        update_dot_grad: Optional[Tensor],
        finite: Tensor,
        layout: _Layout,
    ) -> tuple[Tensor, Optional[Tensor], list[bool]]:
        """Per-tensor ``c`` and ``d`` of ``p <- p * d + c * g``: lr, cautious gate, decay and skip.

        ``c = -lr * s * factor``, or ``-0.0`` when the step is skipped (``p + (-0.0) * 0`` is ``p`` bit
        for bit, ``-0.0`` included). ``d = 1 + c * wd`` for coupled decay, ``1 - lr * wd`` for
        decoupled decay (exactly 1 when skipped). Returns ``(c, d, decayed)``: ``d`` is ``None`` when no
        group decays, and ``decayed`` tells per tensor whether ``d`` applies.
        """
        n_groups = len(self.param_groups)
        self._cautious_evaluated += [0] * (n_groups - len(self._cautious_evaluated))
        coef_pieces, fired_by_group = [], {}
        for group_index, start, end in layout.group_slices:
            group = self.param_groups[group_index]
            coef = scales[start:end] * -group["lr"]
            if group["use_cautious_update"]:
                self._cautious_evaluated[group_index] += end - start
                # Without coupled decay the update is a positive multiple of the gradient: cosine 1.
                if group["weight_decay"] != 0 and not group["decoupled_weight_decay"]:
                    factor, fired = _cautious_gate(
                        update_dot_grad[start:end], update_sq[start:end], grad_sq[start:end],
                        group["cautious_threshold"], group["cautious_scale"],
                    )  # fmt: skip
                    coef = coef * factor
                    fired_by_group[group_index] = (fired & finite).sum()
            coef_pieces.append(coef)
        coefs = torch.where(finite, torch.cat(coef_pieces), -0.0)
        if fired_by_group:
            zero = torch.zeros((), dtype=torch.long, device=layout.device)
            fired = torch.stack([fired_by_group.get(i, zero) for i in range(n_groups)])
            self._cautious_fired = _accumulate(self._cautious_fired, fired)

        decayed: list[bool] = []
        for group_index, start, end in layout.group_slices:
            decayed += [self.param_groups[group_index]["weight_decay"] != 0] * (end - start)
        if not any(decayed):
            return coefs, None, decayed
        decay_pieces = []
        for group_index, start, end in layout.group_slices:
            group = self.param_groups[group_index]
            wd, coef = group["weight_decay"], coefs[start:end]
            if wd == 0:
                decay_pieces.append(torch.ones_like(coef))
            elif group["decoupled_weight_decay"]:
                decay_pieces.append(torch.where(finite, torch.full_like(coef, 1.0 - group["lr"] * wd), 1.0))
            else:
                decay_pieces.append(1.0 + coef * wd)
        return coefs, torch.cat(decay_pieces), decayed

    def _apply_updates(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        coefs: Tensor,
        decays: Optional[Tensor],
        decayed: list[bool],
        layout: _Layout,
        step: int,
    ) -> None:
        """Write ``p <- p * d + c * g``, one (device, dtype) bucket at a time."""
        for bucket in layout.buckets:
            b_params, b_grads = bucket.select(params), bucket.select(grads)
            if not layout.on_host:
                # The skip decision stays on the device, so non-finite gradients must not reach the
                # update as NaN * 0: zero them in place (a no-op for finite gradients).
                for g in b_grads:
                    torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            bucket.load(bucket.coefs, coefs)
            if decays is not None:
                bucket.load(bucket.decays, decays)
            b_decays: list[Optional[Tensor]] = [None] * len(b_params)
            if decays is not None:
                b_decays = [d if decayed[i] else None for d, i in zip(bucket.decay_views, bucket.positions)]
            if bucket.dtype in (torch.float16, torch.bfloat16):
                generator = None
                if bucket.dtype == torch.bfloat16 and self.stochastic_rounding:
                    generator = self._generator(bucket.device)
                    generator.manual_seed(_SR_SEED + step)
                _update_low_precision_(b_params, b_grads, bucket.coef_views, b_decays, generator)
            else:
                _update_(b_params, b_grads, bucket.coef_views, b_decays, self.foreach)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

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
        return {
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
