"""Module paths of a diffusers ``UNet2DConditionModel`` ↔ the original SAI/LDM U-Net layout.

Stability AI's checkpoints (and kohya's SDXL LoRA files) name U-Net modules after the original LDM code:
``input_blocks.{i}.{j}``, ``middle_block.{j}``, ``output_blocks.{i}.{j}``, ``time_embed``, ``label_emb``, ``out``.
diffusers names the same modules ``down_blocks``, ``mid_block``, ``up_blocks`` and so on. The map here is derived
from the U-Net's config (block types, ``layers_per_block``, number of levels), so it fits the tiny test models
and real SD 1.x / 2.x / SDXL alike.

Layout rules (LDM side):

* ``input_blocks.0.0`` is ``conv_in``. Then, level by level, each resnet ``j`` of down level ``i`` is
  ``input_blocks.{n}.0`` with its attention (if the level has one) at ``input_blocks.{n}.1``; every level
  but the last ends with a downsampler ``input_blocks.{n}.0`` whose conv is ``op``.
* ``middle_block.0`` / ``.1`` / ``.2`` are resnet, attention, resnet.
* Up level ``i`` has ``layers_per_block + 1`` resnets (``output_blocks.{n}.0``) each with its attention at
  ``output_blocks.{n}.1``; the upsampler sits in the level's last output block after them (``.1`` without
  attention, ``.2`` with it) and its conv keeps the name ``conv``.
* Resnet internals: ``norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut`` ↔
  ``in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection``.
* Attention blocks keep their inner names (``proj_in``, ``transformer_blocks.0.attn1.to_q``, ...), so a path
  inside one is converted by its block prefix alone.

Use :func:`diffusers_to_sai_module_map` / :func:`sai_to_diffusers_module_map` for the maps and
:func:`convert_module_path` to convert any module or parameter path (longest mapped prefix wins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# diffusers ResnetBlock2D child → LDM ResBlock child.
RESNET_CHILD_NAMES: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_MID_BLOCK_CROSS_ATTN = "UNetMidBlock2DCrossAttn"


def _unet_config(unet_or_config: Any) -> Mapping[str, Any]:
    """The config mapping of a ``UNet2DConditionModel`` (or the mapping itself)."""
    config = getattr(unet_or_config, "config", unet_or_config)
    if not isinstance(config, Mapping):
        raise TypeError(
            f"expected a diffusers UNet2DConditionModel or its config mapping, got {type(unet_or_config).__name__}"
        )
    for key in ("down_block_types", "up_block_types", "layers_per_block"):
        if key not in config:
            raise ValueError(f"U-Net config lacks {key!r}; cannot derive the SAI/LDM module layout")
    return config


def _per_level(value: int | Sequence[int], n_levels: int, key: str) -> list[int]:
    """``layers_per_block`` may be one int or one int per level."""
    if isinstance(value, int):
        return [value] * n_levels
    values = list(value)
    if len(values) != n_levels:
        raise ValueError(f"U-Net config {key!r} has {len(values)} entries; expected {n_levels} (one per level)")
    return values


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def _add_resnet(mapping: dict[str, str], diffusers_path: str, sai_path: str) -> None:
    mapping[diffusers_path] = sai_path
    for diffusers_child, sai_child in RESNET_CHILD_NAMES.items():
        mapping[f"{diffusers_path}.{diffusers_child}"] = f"{sai_path}.{sai_child}"


def diffusers_to_sai_module_map(unet_or_config: Any) -> dict[str, str]:
    """Map every diffusers module path of a U-Net to its SAI/LDM path.

    Keys are block-level containers (``down_blocks.1.attentions.0`` → ``input_blocks.4.1``), resnet children
    (``down_blocks.0.resnets.0.conv1`` → ``input_blocks.1.0.in_layers.2``), sampler convs and the top-level
    layers (``conv_in``, ``time_embedding.linear_1``, ``add_embedding.linear_1``, ``conv_norm_out``, ``conv_out``).
    Paths inside attention blocks are not listed: they keep their names under the block's prefix.
    """
    config = _unet_config(unet_or_config)
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    n_levels = len(down_types)
    if len(up_types) != n_levels:
        raise ValueError(f"U-Net config has {n_levels} down blocks but {len(up_types)} up blocks")
    layers = _per_level(config["layers_per_block"], n_levels, "layers_per_block")

    mapping: dict[str, str] = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL's size/crop + pooled-text MLP
        mapping["add_embedding.linear_1"] = "label_emb.0.0"
        mapping["add_embedding.linear_2"] = "label_emb.0.2"
    elif config.get("class_embed_type") == "projection":  # SD 2.x unCLIP
        mapping["class_embedding.linear_1"] = "label_emb.0.0"
        mapping["class_embedding.linear_2"] = "label_emb.0.2"
    elif config.get("num_class_embeds") is not None:  # SD 2.x upscaler: an nn.Embedding
        mapping["class_embedding"] = "label_emb"

    sai_index = 1
    for level, block_type in enumerate(down_types):
        for j in range(layers[level]):
            _add_resnet(mapping, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{sai_index}.0")
            if _has_attention(block_type):
                mapping[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{sai_index}.1"
            sai_index += 1
        if level < n_levels - 1:
            mapping[f"down_blocks.{level}.downsamplers.0"] = f"input_blocks.{sai_index}.0"
            mapping[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{sai_index}.0.op"
            sai_index += 1

    mid_type = config.get("mid_block_type", _MID_BLOCK_CROSS_ATTN)
    if mid_type == _MID_BLOCK_CROSS_ATTN:
        _add_resnet(mapping, "mid_block.resnets.0", "middle_block.0")
        mapping["mid_block.attentions.0"] = "middle_block.1"
        _add_resnet(mapping, "mid_block.resnets.1", "middle_block.2")
    elif mid_type is not None:
        raise ValueError(f"U-Net mid_block_type {mid_type!r} is not supported; expected {_MID_BLOCK_CROSS_ATTN!r}")

    up_layers = list(reversed(layers))
    sai_index = 0
    for level, block_type in enumerate(up_types):
        n_resnets = up_layers[level] + 1
        for j in range(n_resnets):
            _add_resnet(mapping, f"up_blocks.{level}.resnets.{j}", f"output_blocks.{sai_index}.0")
            if _has_attention(block_type):
                mapping[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{sai_index}.1"
            sai_index += 1
        if level < n_levels - 1:
            slot = 2 if _has_attention(block_type) else 1
            last = sai_index - 1
            mapping[f"up_blocks.{level}.upsamplers.0"] = f"output_blocks.{last}.{slot}"
            mapping[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{last}.{slot}.conv"
    return mapping


def sai_to_diffusers_module_map(unet_or_config: Any) -> dict[str, str]:
    """The inverse of :func:`diffusers_to_sai_module_map` (SAI/LDM path → diffusers path)."""
    return {sai: diffusers for diffusers, sai in diffusers_to_sai_module_map(unet_or_config).items()}


def convert_module_path(path: str, module_map: Mapping[str, str]) -> str:
    """Convert a dotted module or parameter ``path`` with ``module_map`` (either direction).

    The longest prefix of ``path`` (on ``.`` boundaries) found in the map is replaced; the rest is kept,
    e.g. ``down_blocks.1.attentions.0.proj_in.weight`` → ``input_blocks.4.1.proj_in.weight``.
    Raises ``KeyError`` naming the path when no prefix is mapped.
    """
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in module_map:
            return ".".join([module_map[prefix], *parts[cut:]])
    raise KeyError(f"U-Net module path {path!r} has no SAI/diffusers counterpart in this U-Net's layout")
