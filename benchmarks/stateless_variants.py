"""Stateless ANLO variants benchmarked in ``benchmarks/lora_quality.py`` before any of them moves into ANLO.

:class:`PairTransformANLO` is ANLO whose ``step()`` first rewrites, in place, the gradients of every LoRA pair
(``lora_down``, ``lora_up``) with a transform computed from the current weights and gradients only; no buffer
outlives a step, so the optimizer stays stateless. Kohya's naming: a module adds ``scale · up @ down`` to its
weight, ``down`` of shape ``(r, in[, k, k])`` (a matrix ``(r, in·k·k)``) and ``up`` of shape ``(out, r[, 1, 1])``.
The transforms:

* :func:`riemannian_precondition_`: the Riemannian preconditioner of Zhang & Pilanci ("Riemannian Preconditioned
  LoRA for Fine-Tuning Foundation Models", arXiv 2402.02347)::

      grad_down <- (upᵀ up + δ I)⁻¹ grad_down          (r × r solve)
      grad_up   <- grad_up (down downᵀ + δ I)⁻¹        (r × r solve)

  The reference implementation's damping is δ = 1e-6; PEFT's port defaults to 1e-2. At kohya's initialisation
  ``up = 0``, hence ``grad_down = 0`` too and the first step preconditions nothing but ``grad_up``.
* :func:`lora_muon_`: the factor directions of LoRA-Muon (Cesista, Crowson, Simal & Biderman, "LoRA-Muon:
  Spectral Steepest Descent on the Low-Rank Manifold", arXiv 2606.12921), without its momentum: Muon's step for
  the product ``up @ down`` taken on the rank-r manifold, one half through each factor, each factor's gradient
  whitened by the other factor's Gram matrix (``msign(X) = U Vᵀ`` for ``X = U S Vᵀ``)::

      R_down = (down downᵀ)^(-1/2),   grad_up   <- msign(grad_up R_down) R_down
      R_up   = (upᵀ up)^(-1/2),       grad_down <- R_up msign(R_up grad_down)

  Unlike a factor's own orthogonalization (``ANLO(orthogonalize=True)``), the change of the product does not
  depend on how ``up`` and ``down`` share its scale. :class:`LoRAMuonSGD` steps along them as the paper does;
  in :class:`PairTransformANLO` ANLO's norms rescale them.
* :func:`row_normalize_tensors_`: every row of ``grad_down`` and ``grad_up`` to unit RMS, the step SWAN (Ma et al.,
  "SWAN: SGD with Normalization and Whitening", arXiv 2412.13148) takes before its whitening (which is
  ``ANLO(orthogonalize=True)``).
* :func:`normalize_tensors_`: ``grad_down`` and ``grad_up`` each to unit RMS, to follow the preconditioner (the
  same normalization alone is ``ANLO(normalization="layer")`` on unnamed parameters).

:func:`chain` applies several transforms in turn.

:class:`DistanceBoundEstimator` is the step-size estimator ``ANLO(lr_free=True)`` had before the one it has now: the
distance bound of D-Adaptation in closed form (docs/benchmarks.md has both measured).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from library.hina_anlo import (
    _LR_FREE_D0,
    _ORTHOGONAL_FLOOR,
    ANLO,
    _damped_inverse_sqrt_,
    _LRFreeEstimator,
    _orthogonalize_,
    lora_module_key,
)

__all__ = [
    "LoRAMuonSGD", "PairTransformANLO", "chain", "lora_muon_", "lora_pairs", "normalize_tensors_",
    "riemannian_precondition_", "row_normalize_tensors_",
]  # fmt: skip

_EPS = 1e-12  # added to the norms of the normalizing transforms

#: A transform of one LoRA pair's gradients, in place: ``transform(down, up)``.
PairTransform = Callable[[Tensor, Tensor], None]


def lora_pairs(groups: list[dict[str, Any]]) -> list[tuple[Tensor, Tensor]]:
    """``(lora_down.weight, lora_up.weight)`` of every LoRA module in ``groups``, paired by ``param_names``
    (the two factors of one module may sit in different groups, as with LoRA+)."""
    factors: dict[str, dict[str, Tensor]] = {}
    for group in groups:
        for name, param in zip(group["param_names"], group["params"]):
            module = lora_module_key(name)
            if module is not None and name.endswith(("lora_down.weight", "lora_up.weight")):
                factors.setdefault(module, {})[name.rsplit(".", 2)[-2]] = param
    return [(pair["lora_down"], pair["lora_up"]) for pair in factors.values() if len(pair) == 2]


def _damped_gram_solve(gram: Tensor, rhs: Tensor, delta: float) -> Tensor:
    """``(gram + δ I)⁻¹ rhs`` by a Cholesky solve (``gram`` is symmetric positive semi-definite)."""
    damped = gram + delta * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(damped))


@torch.no_grad()
def riemannian_precondition_(down: Tensor, up: Tensor, delta: float) -> None:
    """Precondition ``down.grad`` and ``up.grad`` in place (see the module docstring); computed in float32."""
    r = down.shape[0]
    down_matrix = down.detach().reshape(r, -1).float()  # (r, in·k·k)
    up_matrix = up.detach().reshape(up.shape[0], r).float()  # (out, r)
    new_grads: list[tuple[Tensor, Tensor]] = []  # (p.grad, its preconditioned value)
    if down.grad is not None:
        grad = down.grad.reshape(r, -1).float()
        new_grads.append((down.grad, _damped_gram_solve(up_matrix.T @ up_matrix, grad, delta)))
    if up.grad is not None:
        grad = up.grad.reshape(up.shape[0], r).float()
        new_grads.append((up.grad, _damped_gram_solve(down_matrix @ down_matrix.T, grad.T, delta).T))
    for grad, preconditioned in new_grads:
        grad.copy_(preconditioned.view(grad.shape))


@torch.no_grad()
def lora_muon_(down: Tensor, up: Tensor, relative_floor: float = _ORTHOGONAL_FLOOR) -> None:
    """Replace ``down.grad`` and ``up.grad`` in place by LoRA-Muon's directions (see the module docstring),
    computed in float64. The inverse square roots and ``msign`` are damped as ``ANLO(orthogonalize=True)`` damps
    its own (singular values below ``relative_floor`` of the largest are scaled down, not raised); while ``up``
    is zero (kohya's initialisation), so are ``R_up`` and ``grad_down``."""
    r = down.shape[0]
    down_matrix = down.detach().reshape(r, -1).double()  # (r, in·k·k)
    up_matrix = up.detach().reshape(up.shape[0], r).double()  # (out, r)
    r_down, r_up = _damped_inverse_sqrt_(
        torch.stack([down_matrix @ down_matrix.T, up_matrix.T @ up_matrix]), relative_floor
    ).unbind(0)
    if up.grad is not None:
        direction = up.grad.reshape(up.shape[0], r).double() @ r_down
        _orthogonalize_([direction], relative_floor)
        up.grad.copy_((direction @ r_down).view(up.grad.shape))
    if down.grad is not None:
        direction = r_up @ down.grad.reshape(r, -1).double()
        _orthogonalize_([direction], relative_floor)
        down.grad.copy_((r_up @ direction).view(down.grad.shape))


@torch.no_grad()
def normalize_tensors_(down: Tensor, up: Tensor) -> None:
    """``down.grad`` and ``up.grad`` each to unit RMS."""
    for grad in (down.grad, up.grad):
        if grad is not None:
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            grad.mul_((grad.numel() ** 0.5 / (norm + _EPS)).to(grad.dtype))


@torch.no_grad()
def row_normalize_tensors_(down: Tensor, up: Tensor) -> None:
    """Every row of ``down.grad`` and ``up.grad`` (as matrices ``(rows, rest)``) to unit RMS."""
    for grad in (down.grad, up.grad):
        if grad is not None and grad.dim() >= 2:
            matrix = grad.view(grad.shape[0], -1)
            matrix.mul_(matrix.shape[1] ** 0.5 / (matrix.norm(dim=1, keepdim=True) + _EPS))


def chain(*transforms: PairTransform) -> PairTransform:
    """One transform that applies ``transforms`` in order."""

    def chained(down: Tensor, up: Tensor) -> None:
        for transform in transforms:
            transform(down, up)

    return chained


class _TransformedStep:
    """An optimizer whose ``step()`` first applies ``self.transform(down, up)`` to every pair of
    ``self.lora_pairs``, then takes its own step."""

    lora_pairs: list[tuple[Tensor, Tensor]]
    transform: PairTransform

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for down, up in self.lora_pairs:
            self.transform(down, up)
        super().step()  # type: ignore[misc]
        return loss


class PairTransformANLO(_TransformedStep, ANLO):
    """ANLO whose ``step()`` first applies ``transform(down, up)`` to every LoRA pair of ``groups``.

    ``groups`` must carry ``param_names`` (to pair ``lora_down`` with ``lora_up``). ``per_tensor`` hands ANLO the
    groups without their names, so its layer norm treats every tensor as its own layer instead of every module.
    Other keyword arguments go to :class:`ANLO`.
    """

    def __init__(
        self, groups: list[dict[str, Any]], transform: PairTransform, per_tensor: bool = False, **anlo_kwargs: Any
    ) -> None:
        self.lora_pairs = lora_pairs(groups)
        self.transform = transform
        if per_tensor:
            groups = [{k: v for k, v in group.items() if k != "param_names"} for group in groups]
        super().__init__(groups, **anlo_kwargs)


class LoRAMuonSGD(_TransformedStep, torch.optim.SGD):
    """LoRA-Muon without momentum or weight decay, so stateless: every LoRA pair of ``groups`` (named, as for
    :class:`PairTransformANLO`) steps by ``-lr / 2`` times its :func:`lora_muon_` directions (the paper's split of
    the step between the two factors). Parameters outside a pair take plain SGD steps."""

    def __init__(self, groups: list[dict[str, Any]], lr: float) -> None:
        self.lora_pairs = lora_pairs(groups)
        self.transform = lora_muon_
        super().__init__(groups, lr=lr / 2)


class DistanceBoundEstimator(_LRFreeEstimator):
    """``lr_free``'s step size as the RMS distance from the start to a minimizer that D-Adaptation's lower bound
    gives (Defazio & Mishchenko, arXiv 2301.07733), never shrinking: over the tensors that started at zero, ``X²``
    their squared norms, ``P`` the sum of their squared steps and ``N0`` their elements,
    ``d = max(d0, d of the step before, (X² - P) / (2 X sqrt(N0)))``. Replaced in ANLO by the cosine steering;
    kept so that the rows measured with it reproduce (not saved in state dicts)."""

    def __init__(self, d0: float = _LR_FREE_D0) -> None:
        super().__init__(d0)
        self.path_sq: Tensor | None = None  # (tensors,): each tensor's sum of squared steps

    def step_sizes(self, params: list[Tensor], layout: Any, foreach: bool) -> Tensor:
        all_started, scalars = self._prepare(layout)
        if self.path_sq is None or len(self.path_sq) < len(all_started):
            grown = all_started.new_zeros(len(all_started))
            if self.path_sq is not None:
                grown[: len(self.path_sq)] = self.path_sq
            self.path_sq = grown
        positions = layout.positions
        param_sq, started = self._norms_and_flags(params, layout, foreach)
        moved_sq = (param_sq * started).sum()
        path_sq = (self.path_sq[positions] * started).sum()
        numels = torch.tensor([p.numel() for p in params], dtype=started.dtype, device=started.device)
        numel = (numels * started).sum()
        bound = (moved_sq - path_sq) / (2 * moved_sq.sqrt() * numel.sqrt())
        bound = torch.where((numel > 0) & (moved_sq > 0), bound, 0.0)
        d = torch.maximum(scalars[0], bound).clamp_min(self.d0)
        self._pending = (positions, started, torch.stack([d, moved_sq]))
        return d.expand(len(positions))

    def commit(self, coef: Tensor, update_sq: Tensor, finite: Tensor) -> None:
        assert self.path_sq is not None and self._pending is not None
        positions, started, _ = self._pending
        step_sq = torch.where(finite, coef.square() * update_sq, 0.0)
        self.path_sq.index_put_((positions,), self.path_sq[positions] + step_sq)
        super().commit(coef, update_sq, finite)
