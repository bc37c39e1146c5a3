"""DyLoRA (Valipour et al., 2023, arXiv:2210.07558) with sd-scripts' interface (``--network_module networks.dylora``).

Each module keeps its rank ``r`` as ``r`` separate rows: ``lora_A.{i}`` (one row of ``lora_down``) and
``lora_B.{i}`` (one column of ``lora_up``). In training, every forward draws a rank ``b`` uniformly from
``0, unit, 2·unit, … < r`` and lets only rows ``b … b + unit − 1`` train (the others get no gradient, so the
optimizer skips them); the output uses all ``r`` rows, scaled by ``alpha / r · √(r / (b + unit))`` — sd-scripts'
rule. Out of training the scale is ``alpha / r``, which is how every LoRA loader reads the saved file. The draw
comes from torch's CPU generator, so ``--seed`` fixes it and gradient checkpointing replays it.

``--network_args``: ``unit`` (default 1; must divide the rank), ``conv_dim`` (must equal ``network_dim``; 3×3
convs then use ``network_alpha``, as in sd-scripts), LoRA+ ratios. The file is a plain kohya LoRA
(``lora_down.weight``, ``lora_up.weight``, ``alpha``), written and read through :mod:`networks.lora`; its
rows ordered by the ranks they were trained for, so cutting it to a smaller rank keeps a working LoRA.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from networks import lora

logger = logging.getLogger(__name__)

KNOWN_NETWORK_ARGS = frozenset(
    {"conv_dim", "conv_alpha", "unit", "dropout", "rank_dropout", "module_dropout",
     "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
)  # fmt: skip


class DyLoRAModule(lora.LoRAModule):
    """A LoRA module trained one ``unit`` of rank rows at a time (see the module docstring)."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1.0,
        unit: int = 1,
    ) -> None:
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha)
        if unit < 1 or lora_dim % unit:
            raise ValueError(f"network_args: unit must be a positive divisor of the rank {lora_dim}, got {unit}")
        self.unit = unit
        down, up = self.lora_down, self.lora_up
        self.is_conv = isinstance(down, nn.Conv2d)
        self.is_conv3x3 = self.is_conv and tuple(down.kernel_size) != (1, 1)
        self.stride, self.padding = (down.stride, down.padding) if self.is_conv else (1, 0)
        down_rows = down.weight.detach() if self.is_conv3x3 else down.weight.detach().flatten(1)
        up_columns = up.weight.detach() if self.is_conv3x3 else up.weight.detach().flatten(1)
        del self.lora_down, self.lora_up
        self.lora_A = nn.ParameterList([nn.Parameter(row.unsqueeze(0).clone()) for row in down_rows])
        self.lora_B = nn.ParameterList([nn.Parameter(up_columns[:, i : i + 1].clone()) for i in range(lora_dim)])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_down, lora_up)`` put together from the rows, shaped as the file stores them."""
        down = torch.cat(tuple(self.lora_A), dim=0)
        up = torch.cat(tuple(self.lora_B), dim=1)
        if self.is_conv and not self.is_conv3x3:
            down, up = down[:, :, None, None], up[:, :, None, None]
        return down, up

    def _sample_trainable_rank(self) -> int:
        """Draw ``b`` and let only rows ``b … b + unit − 1`` take gradients."""
        rank = int(torch.randint(self.lora_dim, ()))
        rank -= rank % self.unit
        for i, (row, column) in enumerate(zip(self.lora_A, self.lora_B)):
            trainable = rank <= i < rank + self.unit
            row.requires_grad_(trainable)
            column.requires_grad_(trainable)
        return rank

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        org_out = self.org_forward(x, *args, **kwargs)
        scale = self.scale
        if self.training:
            rank = self._sample_trainable_rank()
            scale *= math.sqrt(self.lora_dim / (rank + self.unit))
        down, up = self.factors()
        x = x.to(down.dtype)
        if self.is_conv:
            lx = F.conv2d(F.conv2d(x, down, stride=self.stride, padding=self.padding), up)
        else:
            lx = F.linear(F.linear(x, down), up)
        return org_out + (lx * (self.multiplier * scale)).to(org_out.dtype)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The kohya LoRA layout: ``lora_down.weight`` / ``lora_up.weight`` in place of the rows."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith((prefix + "lora_A.", prefix + "lora_B."))]:
            del state[key]
        down, up = self.factors()
        state[prefix + "lora_down.weight"] = down if keep_vars else down.detach()
        state[prefix + "lora_up.weight"] = up if keep_vars else up.detach()
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001 (torch's hook)
        down = state_dict.pop(prefix + "lora_down.weight", None)
        up = state_dict.pop(prefix + "lora_up.weight", None)
        if down is not None and up is not None:
            if not self.is_conv3x3:
                down, up = down.flatten(1), up.flatten(1)
            state_dict.update({f"{prefix}lora_A.{i}": down[i : i + 1] for i in range(down.shape[0])})
            state_dict.update({f"{prefix}lora_B.{i}": up[:, i : i + 1] for i in range(up.shape[1])})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DyLoRANetwork(lora.LoRANetwork):
    """A :class:`~networks.lora.LoRANetwork` of :class:`DyLoRAModule` (LoRA+ splits off the ``lora_B`` rows)."""

    UP_FACTOR = "lora_B"

    def __init__(self, *args: Any, unit: int = 1, **kwargs: Any) -> None:
        object.__setattr__(self, "unit", unit)  # read by _new_module during LoRANetwork.__init__
        super().__init__(*args, **kwargs)

    def _new_module(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None) -> DyLoRAModule:
        return DyLoRAModule(lora_name, org_module, self.multiplier, dim, alpha, unit=self.unit)


def _warn_without_effect(kwargs: dict[str, Any], neuron_dropout: float | None) -> None:
    given = [key for key in ("dropout", "rank_dropout", "module_dropout") if kwargs.get(key) not in (None, "None")]
    if neuron_dropout is not None and "dropout" not in given:
        given.insert(0, "network_dropout")
    if given:
        logger.warning("networks.dylora: %s have no effect (DyLoRA has no dropout, as in sd-scripts)", ", ".join(given))


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> DyLoRANetwork:
    """A DyLoRA network: :func:`networks.lora.create_network`'s targets and names, ``unit`` from ``kwargs``."""
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    _warn_without_effect(kwargs, neuron_dropout)
    unit = lora._optional(kwargs, "unit", int) or 1
    if network_dim % unit:
        raise ValueError(f"network_args: unit must divide network_dim {network_dim}, got unit={unit}")
    conv_dim = lora._optional(kwargs, "conv_dim", int)
    options = {k: v for k, v in kwargs.items() if k not in ("dropout", "rank_dropout", "module_dropout")}
    if conv_dim is not None:
        if conv_dim != network_dim:
            raise ValueError(f"network_args: networks.dylora needs conv_dim equal to network_dim ({network_dim}), "
                             f"got {conv_dim}")  # fmt: skip
        conv_alpha = lora._optional(kwargs, "conv_alpha", float)
        if conv_alpha is not None and conv_alpha != network_alpha:
            logger.warning("networks.dylora: conv_alpha has no effect; 3x3 convs use network_alpha (as in sd-scripts)")
        options["conv_alpha"] = network_alpha
    return lora.build_network(DyLoRANetwork, KNOWN_NETWORK_ARGS, multiplier, network_dim, network_alpha,
                              text_encoder, unet, None, options, unit=unit)  # fmt: skip


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[DyLoRANetwork, dict[str, torch.Tensor]]:
    """A DyLoRA network shaped like a LoRA file, its weights loaded (``unit`` from ``kwargs``, default 1)."""
    unit = lora._optional(kwargs, "unit", int) or 1
    return lora.build_network_from_weights(DyLoRANetwork, multiplier, file, text_encoder, unet, weights_sd, unit=unit)
