"""Converting diffusers-layout weights to the original single-file layouts (LDM for SD 1.x, SGM for SDXL).

The names follow from the module structure (block counts are read from the configs and the state dicts), not from
a table for one model size, so the tiny test models and the real ones convert the same way.

Single-file prefixes (SD 1.x LDM / SDXL SGM):

* U-Net: ``model.diffusion_model.`` (both); VAE: ``first_stage_model.`` (both)
* text encoder: ``cond_stage_model.transformer.text_model.`` (SD 1.x, transformers names),
  ``cond_stage_model.model.`` (SD 2.x, OpenCLIP names; read only)
* SDXL: ``conditioner.embedders.0.transformer.text_model.`` (CLIP-L, transformers names) and
  ``conditioner.embedders.1.model.`` (CLIP-G, OpenCLIP names)

Text encoders convert both ways (the loader reads them with these functions); U-Net and VAE are read back by
diffusers' single-file loaders. The U-Net module names come from ``library.sai_names`` (diffusers ↔ SAI/LDM),
shared with the LoRA key mapping.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from library import sai_names

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_ENCODER_PREFIX = "cond_stage_model.model."
SDXL_TEXT_ENCODER_1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

StateDict = dict[str, torch.Tensor]

# Inside a VAE resnet, only the shortcut is renamed.
_VAE_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# The VAE mid-block attention: diffusers Linear layers, LDM 1×1 convolutions.
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# The per-layer names of a CLIP encoder layer in OpenCLIP's layout (q/k/v are fused into in_proj).
_OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _vae_module_to_ldm(module: str, num_up_blocks: int) -> str:
    """The LDM name of one VAE module path (without the parameter suffix), e.g.
    ``decoder.up_blocks.0.resnets.1.conv_shortcut`` → ``decoder.up.3.block.1.nin_shortcut`` (with 4 up blocks)."""
    if module in ("quant_conv", "post_quant_conv") or re.fullmatch(r"(en|de)coder\.conv_(in|out)", module):
        return module
    if match := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module):
        return f"{match[1]}.norm_out"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"encoder.down.{match[1]}.downsample.conv"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        return f"decoder.up.{num_up_blocks - 1 - int(match[1])}.upsample.conv"
    resnet_parts = "|".join(_VAE_RESNET_PARTS)
    if match := re.fullmatch(rf"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.({resnet_parts})", module):
        coder, direction, block, resnet, part = match.groups()
        level = int(block) if direction == "down" else num_up_blocks - 1 - int(block)
        return f"{coder}.{direction}.{level}.block.{resnet}.{_VAE_RESNET_PARTS[part]}"
    if match := re.fullmatch(rf"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.({resnet_parts})", module):
        coder, resnet, part = match.groups()
        return f"{coder}.mid.block_{int(resnet) + 1}.{_VAE_RESNET_PARTS[part]}"
    attention_parts = "|".join(re.escape(part) for part in _VAE_ATTENTION_PARTS)
    if match := re.fullmatch(rf"(encoder|decoder)\.mid_block\.attentions\.0\.({attention_parts})", module):
        return f"{match[1]}.mid.attn_1.{_VAE_ATTENTION_PARTS[match[2]]}"
    raise KeyError(f"VAE module {module!r} has no LDM name; expected an AutoencoderKL of the SD layout")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """An ``AutoencoderKL`` state dict in LDM names (no prefix); attention projections become 1×1 conv weights."""
    num_up_blocks = len(config["up_block_types"])
    converted: StateDict = {}
    for key, tensor in state_dict.items():
        module, parameter = key.rsplit(".", 1)
        ldm_module = _vae_module_to_ldm(module, num_up_blocks)
        is_attention_projection = ".mid.attn_1." in ldm_module and not ldm_module.endswith(".norm")
        if is_attention_projection and parameter == "weight" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        converted[f"{ldm_module}.{parameter}"] = tensor
    return converted


def _text_model_state(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A CLIP text state dict with the ``text_model.`` level, whichever transformers version produced it."""
    return {
        key if key.startswith("text_model.") or key.startswith("text_projection.") else f"text_model.{key}": tensor
        for key, tensor in state_dict.items()
    }


def clip_text_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A ``CLIPTextModel`` state dict in the LDM layout (transformers names under ``text_model.``; no prefix)."""
    return {key: tensor for key, tensor in _text_model_state(state_dict).items() if not key.endswith("position_ids")}


def open_clip_text_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A CLIP text state dict in OpenCLIP's layout (SDXL's second encoder, SD 2.x's encoder; no prefix).

    q/k/v are concatenated into ``attn.in_proj_weight`` / ``in_proj_bias``; the projection is stored transposed
    as the ``text_projection`` matrix (hidden × projection), as OpenCLIP multiplies ``x @ text_projection``.
    """
    source = _text_model_state(state_dict)
    converted: StateDict = {
        "token_embedding.weight": source["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": source["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": source["text_model.final_layer_norm.weight"],
        "ln_final.bias": source["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in source:  # SDXL's second encoder; SD 2.x's CLIPTextModel has none
        converted["text_projection"] = source["text_projection.weight"].T.contiguous()
    layer_ids = sorted({int(m[1]) for key in source if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", key))})
    for i in layer_ids:
        layer, block = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for parameter in ("weight", "bias"):
            converted[f"{block}attn.in_proj_{parameter}"] = torch.cat(
                [source[f"{layer}self_attn.{p}_proj.{parameter}"] for p in ("q", "k", "v")]
            )
            for diffusers_part, open_clip_part in _OPEN_CLIP_LAYER_PARTS.items():
                converted[f"{block}{open_clip_part}.{parameter}"] = source[f"{layer}{diffusers_part}.{parameter}"]
    return converted


def clip_text_from_ldm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`clip_text_to_ldm`: transformers names with the ``text_model.`` level."""
    return _text_model_state(state_dict)


def open_clip_text_from_ldm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`open_clip_text_to_ldm`: OpenCLIP names → transformers names (``text_model.`` level).

    Used for SDXL's second encoder and SD 2.x's encoder; ``text_projection`` is present only if the file has one.
    """
    converted: StateDict = {
        "text_model.embeddings.token_embedding.weight": state_dict["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state_dict["positional_embedding"],
        "text_model.final_layer_norm.weight": state_dict["ln_final.weight"],
        "text_model.final_layer_norm.bias": state_dict["ln_final.bias"],
    }
    if "text_projection" in state_dict:
        converted["text_projection.weight"] = state_dict["text_projection"].T.contiguous()
    layer_ids = sorted({int(m[1]) for key in state_dict if (m := re.match(r"transformer\.resblocks\.(\d+)\.", key))})
    for i in layer_ids:
        layer, block = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for parameter in ("weight", "bias"):
            q, k, v = state_dict[f"{block}attn.in_proj_{parameter}"].chunk(3)
            for name, tensor in (("q", q), ("k", k), ("v", v)):  # copies: a model's parameters must not share memory
                converted[f"{layer}self_attn.{name}_proj.{parameter}"] = tensor.clone()
            for diffusers_part, open_clip_part in _OPEN_CLIP_LAYER_PARTS.items():
                converted[f"{layer}{diffusers_part}.{parameter}"] = state_dict[f"{block}{open_clip_part}.{parameter}"]
    return converted


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """A ``UNet2DConditionModel`` state dict in SAI/LDM names (no prefix), via ``library.sai_names``."""
    module_map = sai_names.diffusers_to_sai_module_map(config)
    return {sai_names.convert_module_path(key, module_map): tensor for key, tensor in state_dict.items()}


def _prefixed(prefix: str, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return {prefix + key: tensor for key, tensor in state_dict.items()}


def select_prefixed(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """The entries of ``state_dict`` under ``prefix``, with the prefix removed."""
    return {key[len(prefix) :]: tensor for key, tensor in state_dict.items() if key.startswith(prefix)}


def components_to_single_file(parts: Mapping[str, Any], sd2: bool = False) -> StateDict:
    """The single-file state dict of a model given as pipeline components (``unet``, ``vae``, ``text_encoder``
    and, for SDXL, ``text_encoder_2``): LDM layout for SD 1.x (SD 2.x with ``sd2``: its text encoder in OpenCLIP's
    layout), SGM layout for SDXL."""
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    state = _prefixed(UNET_PREFIX, unet_to_ldm(unet.state_dict(), unet.config))
    state |= _prefixed(VAE_PREFIX, vae_to_ldm(vae.state_dict(), vae.config))
    if "text_encoder_2" in parts:
        state |= _prefixed(SDXL_TEXT_ENCODER_1_PREFIX, clip_text_to_ldm(text_encoder.state_dict()))
        state |= _prefixed(SDXL_TEXT_ENCODER_2_PREFIX, open_clip_text_to_ldm(parts["text_encoder_2"].state_dict()))
    elif sd2:
        state |= _prefixed(SD2_TEXT_ENCODER_PREFIX, open_clip_text_to_ldm(text_encoder.state_dict()))
    else:
        state |= _prefixed(SD1_TEXT_ENCODER_PREFIX, clip_text_to_ldm(text_encoder.state_dict()))
    return state


def save_single_file(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` as ``.safetensors`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single files are written as .safetensors; use that suffix")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in state_dict.items()}
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(temp), metadata=metadata)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
