"""``--base_weights`` / ``--base_weights_multiplier``: LoRA files merged into the base model before training.

As in sd-scripts, each file is added to the frozen weights with its multiplier (``1.0`` for files without one)
after the models load and before the network is created, so the new LoRA learns on top of the merged model. The
merge is permanent for the run; the saved LoRA holds only the new network.

Key formats read (module name ``<prefix>_<module path with dots as underscores>``, see ``library.lora_format``;
SDXL U-Net names in the SAI/LDM layout):

* kohya LoRA and LyCORIS LoCon: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, optional ``<name>.alpha``
  (default: the rank). ``ΔW = alpha / rank · up @ down`` for Linear layers; for convolutions ``down`` holds the
  kernel (``r × in × kh × kw``) and ``up`` is ``out × r × 1 × 1``.
* LyCORIS LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``alpha``:
  ``ΔW = alpha / rank · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, reshaped to the layer's weight.
* LyCORIS full weight differences: ``<name>.diff`` (``ΔW`` itself) and optional ``<name>.diff_b`` (bias).

Any layer in the text encoders or the U-Net that is a Linear or Conv2d can be a target (LyCORIS reaches more
layers than ``networks.lora``). Other formats (LoKr, Tucker/CP ``lora_mid`` / ``hada_t1``, DoRA ``dora_scale``),
names with no layer in the model and shapes that do not fit are errors naming the file. Cost: one file in memory
at a time plus one float32 copy of the layer being merged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import safetensors
import torch
from torch import nn

from library import lora_format, sai_names
from library.errors import UserInputError

logger = logging.getLogger(__name__)

_LORA_KEYS = {"lora_down.weight", "lora_up.weight", "alpha"}
_LOHA_KEYS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
_DIFF_KEYS = {"diff", "diff_b"}


class BaseWeightsError(UserInputError):
    """A ``--base_weights`` file is missing, unreadable, of an unknown format or made for another model."""


def multipliers(paths: Sequence[str], given: Sequence[float] | None) -> list[float]:
    """The multiplier of each file: ``--base_weights_multiplier``'s value at the same position, else 1.0."""
    given = list(given or [])
    return [given[i] if i < len(given) else 1.0 for i in range(len(paths))]


def check_args(args: Any) -> None:
    """Checks that need no model: every ``--base_weights`` file exists and (``.safetensors``: from its header) holds
    only formats this module reads; warns about multipliers without a file."""
    paths = args.base_weights or []
    given = args.base_weights_multiplier or []
    if len(given) > len(paths):
        logger.warning(
            "--base_weights_multiplier has %d values for %d --base_weights files; the extra ones have no effect",
            len(given), len(paths),
        )
    for path in paths:
        if not os.path.isfile(path):
            raise BaseWeightsError(f"--base_weights: {path} not found (expected a LoRA .safetensors/.pt file)")
        if path.lower().endswith(lora_format.SAFETENSORS_SUFFIX):
            try:
                with safetensors.safe_open(path, framework="pt") as file:
                    keys = list(file.keys())
            except Exception as error:  # corrupt or foreign file: report which
                raise BaseWeightsError(f"--base_weights: cannot read {path}: {error}") from None
            for name, weight_names in group_by_module(dict.fromkeys(keys), path).items():
                _weight_format(set(weight_names), f"--base_weights {path}: {name}")


def target_layers(text_encoders: Sequence[nn.Module], unet: nn.Module) -> dict[str, nn.Module]:
    """kohya module name → layer, for every Linear and Conv2d of the text encoders and the U-Net."""
    layers: dict[str, nn.Module] = {}
    prefixes = lora_format.text_encoder_prefixes(len(text_encoders))
    for prefix, text_encoder in zip(prefixes, text_encoders):
        for path, module in text_encoder.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                layers[lora_format.text_encoder_lora_name(prefix, path)] = module
                # LyCORIS under transformers 5 names the module from its path alone (no "text_model_" level)
                layers.setdefault(lora_format.kohya_name(prefix, path), module)
    sai_map = sai_names.diffusers_to_sai_module_map(unet) if lora_format.is_sdxl_unet(unet) else None
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            layers[lora_format.unet_lora_name(path, sai_map)] = module
    return layers


def group_by_module(state_dict: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """``{"<name>.lora_up.weight": t, ...}`` → ``{"<name>": {"lora_up.weight": t, ...}}``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if "." not in key:
            raise BaseWeightsError(f"--base_weights {source}: key {key!r} is not '<module name>.<weight name>'")
        name, weight_name = key.split(".", 1)
        modules.setdefault(name, {})[weight_name] = value
    return modules


def _weight_format(keys: set[str], where: str) -> str:
    """``"lora"``, ``"loha"`` or ``"diff"`` from one module's weight names; anything else is an error."""
    if {"lora_down.weight", "lora_up.weight"} <= keys <= _LORA_KEYS:
        return "lora"
    if _LOHA_KEYS - {"alpha"} <= keys <= _LOHA_KEYS:
        return "loha"
    if "diff" in keys and keys <= _DIFF_KEYS:
        return "diff"
    raise BaseWeightsError(
        f"{where}: unsupported weights {sorted(keys)}; --base_weights reads LoRA/LoCon "
        "(lora_down/lora_up/alpha), LoHa (hada_w*) and full diff files"
    )


def delta_weight(parts: dict[str, torch.Tensor], shape: torch.Size, where: str) -> torch.Tensor:
    """The change ``ΔW`` (float32, shaped ``shape``) one module's tensors make to its layer's weight."""
    kind = _weight_format(set(parts), where)
    if kind == "lora":
        down = parts["lora_down.weight"].float()
        up = parts["lora_up.weight"].float()
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        up_2d = up.reshape(up.shape[0], -1)
        if up_2d.shape[1] != rank:
            raise BaseWeightsError(f"{where}: lora_up.weight {tuple(up.shape)} does not fit rank {rank}")
        delta = up_2d @ down.reshape(rank, -1) * scale
    elif kind == "loha":
        rank = parts["hada_w1_b"].shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
        w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
        delta = w1 * w2 * scale
    else:
        delta = parts["diff"].float()
    rows, columns = shape[0], shape.numel() // shape[0]
    if delta.dim() < 2 or delta.shape[0] != rows or delta.numel() != shape.numel():
        raise BaseWeightsError(
            f"{where}: gives a weight change of shape {tuple(delta.shape)} but the layer's weight is "
            f"{tuple(shape)} ({rows} × {columns}); is it a LoRA for another base model?"
        )
    return delta.reshape(shape)


@torch.no_grad()
def merge_file(path: str, multiplier: float, layers: dict[str, nn.Module]) -> int:
    """Add ``multiplier · ΔW`` of every module in the LoRA file ``path`` to ``layers``; returns the modules merged.

    Every module is checked before any layer changes, so a file that does not fit leaves the model untouched.
    """
    try:
        state_dict, _ = lora_format.load_lora_file(path)
    except (FileNotFoundError, ValueError) as error:
        raise BaseWeightsError(f"--base_weights: {error}") from None
    modules = group_by_module(state_dict, path)
    unknown = sorted(set(modules) - set(layers))
    if unknown:
        raise BaseWeightsError(
            f"--base_weights {path}: {len(unknown)} of its {len(modules)} modules have no layer in this model "
            f"(e.g. {unknown[0]}); is it a LoRA for another base model?"
        )
    deltas = {}
    for name, parts in modules.items():
        layer = layers[name]
        where = f"--base_weights {path}: {name}"
        try:
            deltas[name] = delta_weight(parts, layer.weight.shape, where)
        except RuntimeError as error:  # factors whose shapes do not multiply
            raise BaseWeightsError(f"{where}: {error}") from None
        if "diff_b" in parts and (layer.bias is None or parts["diff_b"].numel() != layer.bias.numel()):
            raise BaseWeightsError(f"--base_weights {path}: {name}.diff_b does not fit the layer's bias")
    for name, delta in deltas.items():
        layer = layers[name]
        weight = layer.weight
        weight.copy_((weight.float() + multiplier * delta.to(weight.device)).to(weight.dtype))
        if "diff_b" in modules[name]:
            bias = layer.bias
            diff_b = modules[name]["diff_b"].float().reshape(bias.shape).to(bias.device)
            bias.copy_((bias.float() + multiplier * diff_b).to(bias.dtype))
    return len(deltas)


def merge_base_weights(args: Any, text_encoders: Sequence[nn.Module], unet: nn.Module) -> None:
    """Merge every ``--base_weights`` file into the models, in order, each with its multiplier."""
    if not args.base_weights:
        return
    layers = target_layers(text_encoders, unet)
    for path, multiplier in zip(args.base_weights, multipliers(args.base_weights, args.base_weights_multiplier)):
        count = merge_file(path, multiplier, layers)
        logger.info("merged %s into the base model (%d modules, multiplier %s)", path, count, multiplier)
