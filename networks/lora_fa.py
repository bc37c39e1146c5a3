"""LoRA-FA (Zhang et al., 2023, arXiv:2308.03303) with sd-scripts' interface (``--network_module networks.lora_fa``).

A LoRA whose down projection is frozen at its random initialisation (normal, std ``√(2 / (in + rank))``, as
sd-scripts draws it) while only ``lora_up`` trains: the optimizer holds half the LoRA's tensors and the
backward pass needs no gradient for ``lora_down``. Everything else — targets, key names, ``--network_args``
(``conv_dim``, dropouts, LoRA+, block-wise dims and lr weights), the file format — is :mod:`networks.lora`'s; the
saved file, frozen ``lora_down`` included, is an ordinary kohya LoRA that any LoRA loader reads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from networks import lora


class LoRAFAModule(lora.LoRAModule):
    """A :class:`~networks.lora.LoRAModule` whose ``lora_down`` stays frozen."""

    def __init__(self, lora_name: str, org_module: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(lora_name, org_module, *args, **kwargs)
        in_dim = org_module.in_channels if isinstance(org_module, nn.Conv2d) else org_module.in_features
        nn.init.normal_(self.lora_down.weight, std=math.sqrt(2.0 / (in_dim + self.lora_dim)))
        self.lora_down.requires_grad_(False)


class LoRAFANetwork(lora.LoRANetwork):
    """A :class:`~networks.lora.LoRANetwork` of :class:`LoRAFAModule`; only the ``lora_up`` weights train."""

    module_class = LoRAFAModule

    def requires_grad_(self, requires_grad: bool = True) -> LoRAFANetwork:
        """Sets ``requires_grad`` of the ``lora_up`` weights; ``lora_down`` stays frozen."""
        for module in self.text_encoder_loras + self.unet_loras:
            module.lora_up.requires_grad_(requires_grad)
            module.lora_down.requires_grad_(False)
        return self

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [param for param in self.parameters() if param.requires_grad]


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRAFANetwork:
    """:func:`networks.lora.create_network` with frozen ``lora_down`` weights (same ``--network_args``)."""
    return lora.build_network(LoRAFANetwork, lora.KNOWN_NETWORK_ARGS, multiplier, network_dim, network_alpha,
                              text_encoder, unet, neuron_dropout, kwargs)  # fmt: skip


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRAFANetwork, dict[str, torch.Tensor]]:
    """A LoRA-FA network shaped like a LoRA file, with its weights (the frozen ``lora_down`` among them) loaded."""
    return lora.build_network_from_weights(LoRAFANetwork, multiplier, file, text_encoder, unet, weights_sd)
