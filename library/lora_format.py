"""The kohya / sd-scripts LoRA file format: key names, atomic save, load, hashes and ModelSpec metadata.

Keys are ``<lora_name>.lora_down.weight``, ``<lora_name>.lora_up.weight`` and ``<lora_name>.alpha`` (0-dim),
where ``lora_name`` = prefix + module path with ``.`` → ``_``:

* U-Net, prefix ``lora_unet``. SD 1.x/2.x use diffusers paths (``lora_unet_down_blocks_0_attentions_0_proj_in``);
  SDXL uses the original SAI/LDM paths (``lora_unet_input_blocks_4_1_proj_in``), see ``library.sai_names``.
* Text encoders: ``lora_te`` (SD 1.x/2.x, one encoder) or ``lora_te1`` / ``lora_te2`` (SDXL). The path always
  starts with ``text_model.``, also for transformers 5's ``CLIPTextModel`` whose module paths lack that level.

Safetensors metadata values are all strings. Files saved here carry sd-scripts' precomputed hashes
``sshs_model_hash`` / ``sshs_legacy_hash`` (sd-webui-additional-networks' hashes of a serialization whose
metadata keeps only the ``ss_*`` keys). ``.pt`` / ``.ckpt`` files are plain ``torch.save`` state dicts.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import safetensors
import safetensors.torch
import torch

from library import sai_names
from library.atomic import atomic_output

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
LORA_PREFIX_TEXT_ENCODER_1 = "lora_te1"
LORA_PREFIX_TEXT_ENCODER_2 = "lora_te2"

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".ckpt")

# ModelSpec (Stability AI's metadata standard) values used by sd-scripts.
MODELSPEC_VERSION = "1.0.0"
ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base"
ADAPTER_LORA = "lora"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"

_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_LENGTH = 0x10000


# --------------------------------------------------------------------------------------------- key names


def is_sdxl_unet(unet: Any) -> bool:
    """SDXL is recognised from its U-Net's added ``text_time`` conditioning."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def text_encoder_prefixes(num_text_encoders: int) -> list[str]:
    """``["lora_te"]`` for one encoder (SD 1.x/2.x), ``["lora_te1", "lora_te2"]`` for two (SDXL)."""
    if num_text_encoders == 1:
        return [LORA_PREFIX_TEXT_ENCODER]
    if num_text_encoders == 2:
        return [LORA_PREFIX_TEXT_ENCODER_1, LORA_PREFIX_TEXT_ENCODER_2]
    raise ValueError(f"expected 1 or 2 text encoders, got {num_text_encoders}")


def kohya_name(prefix: str, module_path: str) -> str:
    """``prefix`` + ``_`` + ``module_path`` with dots turned into underscores."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def text_encoder_lora_name(prefix: str, module_path: str) -> str:
    """kohya name of a text-encoder module; ``text_model.`` is added when the path lacks it (transformers 5)."""
    if not module_path.startswith("text_model."):
        module_path = f"text_model.{module_path}"
    return kohya_name(prefix, module_path)


def unet_lora_name(module_path: str, sai_module_map: Mapping[str, str] | None = None) -> str:
    """kohya name of a U-Net module given by its diffusers path.

    Pass ``sai_module_map`` (``sai_names.diffusers_to_sai_module_map(unet)``) for SDXL, whose files use the
    SAI/LDM layout; leave it ``None`` for SD 1.x/2.x, whose files use the diffusers paths.
    """
    if sai_module_map is not None:
        module_path = sai_names.convert_module_path(module_path, sai_module_map)
    return kohya_name(LORA_PREFIX_UNET, module_path)


# --------------------------------------------------------------------------------------------- hashes


def _data_section(serialized: bytes) -> bytes:
    """The bytes of a safetensors serialization after its 8-byte length and JSON header."""
    header_length = int.from_bytes(serialized[:8], "little")
    return serialized[8 + header_length :]


def safetensors_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """sd-scripts' ``(sshs_model_hash, sshs_legacy_hash)`` for a state dict about to be saved.

    Both are taken from a safetensors serialization whose metadata keeps only the ``ss_*`` keys:
    the model hash is the SHA-256 of everything after the header; the legacy hash is the first 8 hex digits
    of the SHA-256 of the 64 KiB at offset 1 MiB (of nothing, for smaller files).
    """
    training_metadata = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    serialized = safetensors.torch.save(dict(state_dict), training_metadata or None)
    model_hash = hashlib.sha256(_data_section(serialized)).hexdigest()
    legacy_chunk = serialized[_LEGACY_HASH_OFFSET : _LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]
    legacy_hash = hashlib.sha256(legacy_chunk).hexdigest()[:8]
    return model_hash, legacy_hash


# --------------------------------------------------------------------------------------------- files


def _check_metadata(metadata: Mapping[str, Any], path: str) -> dict[str, str]:
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        names = ", ".join(map(str, bad))
        raise TypeError(f"metadata for {path} must map strings to strings; non-string entries: {names}")
    return dict(metadata)


def save_lora_file(
    state_dict: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Save a LoRA state dict to ``path`` atomically; return the metadata written.

    ``.safetensors``: ``metadata`` (all strings) plus ``sshs_model_hash`` / ``sshs_legacy_hash``.
    ``.pt`` / ``.ckpt``: ``torch.save`` of the state dict (no metadata). Tensors are saved contiguous, on CPU.
    """
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    extension = os.path.splitext(path)[1].lower()
    if extension in TORCH_SUFFIXES:
        with atomic_output(path) as file:
            torch.save(tensors, file)
        return {}
    if extension != SAFETENSORS_SUFFIX:
        raise ValueError(f"cannot save LoRA file {path}: expected a .safetensors, .pt or .ckpt extension")
    written = _check_metadata(metadata or {}, path)
    written["sshs_model_hash"], written["sshs_legacy_hash"] = safetensors_hashes(tensors, written)
    with atomic_output(path) as file:
        file.write(safetensors.torch.save(tensors, written))
    return written


def load_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file into ``(state_dict, metadata)`` on CPU; ``.pt`` / ``.ckpt`` files have no metadata."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    try:
        if extension in TORCH_SUFFIXES:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            metadata: dict[str, str] = {}
        else:
            with safetensors.safe_open(path, framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # corrupt, truncated or foreign files: report which file
        raise ValueError(f"cannot read LoRA file {path}: {error}") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"LoRA file {path} does not hold a flat state dict of tensors")
    return state_dict, metadata


# --------------------------------------------------------------------------------------------- ModelSpec


def modelspec_metadata(
    *,
    sdxl: bool,
    v2: bool = False,
    v_parameterization: bool = False,
    timestamp: float,
    title: str | None = None,
    resolution: int | tuple[int, int] | str | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    clip_skip: int | None = None,
) -> dict[str, str]:
    """``modelspec.*`` metadata for a LoRA, with sd-scripts' values.

    Architecture ``stable-diffusion-v1/lora``, ``stable-diffusion-v2-512/lora``, ``stable-diffusion-v2-768-v/lora``
    or ``stable-diffusion-xl-v1-base/lora``; implementation: the SAI repository for SDXL LoRAs (SAI key names),
    ``diffusers`` for SD 1.x/2.x; title ``LoRA@<timestamp>`` by default; date ISO-8601 (local time, seconds);
    resolution ``WxH`` (default 1024 SDXL, 768 v2-v, else 512); prediction type ``v`` or ``epsilon``.
    """
    if sdxl:
        architecture = ARCH_SD_XL_V1_BASE
    elif v2:
        architecture = ARCH_SD_V2_768_V if v_parameterization else ARCH_SD_V2_512
    else:
        architecture = ARCH_SD_V1

    if resolution is None:
        resolution = 1024 if sdxl else 768 if (v2 and v_parameterization) else 512
    if isinstance(resolution, str):
        resolution = tuple(int(part) for part in resolution.split(","))
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if len(resolution) == 1:
        resolution = (resolution[0], resolution[0])

    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/{ADAPTER_LORA}",
        "modelspec.implementation": IMPL_STABILITY_AI if sdxl else IMPL_DIFFUSERS,
        "modelspec.title": title if title is not None else f"LoRA@{timestamp}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    optional = {
        "modelspec.author": author,
        "modelspec.description": description,
        "modelspec.license": license,
        "modelspec.tags": tags,
        "modelspec.encoder_layer": None if clip_skip is None else str(clip_skip),
    }
    metadata.update({key: value for key, value in optional.items() if value is not None})
    return metadata
