"""Which Stable Diffusion a single checkpoint file holds, told from its tensor names and shapes alone.

A ``.safetensors`` file is recognised from its header (a few hundred kilobytes of JSON; no weight is read); a
``.ckpt`` / ``.pt`` is a pickle, so its caller loads it once and passes the shapes of what it loaded. The result
is an :class:`Architecture`: SD 1.x, SD 2.x or SDXL base with the published component configs
(``library.architectures``) and the CLIP tokenizers (``library.clip_tokenizer``) it needs, after every tensor those
components need was found in the file with the right shape. Anything else (a LoRA, an SD3 / FLUX / refiner file, a
U-Net alone, a damaged file) is a :class:`~library.errors.UserInputError` naming the file.

The expected layout is computed, once per architecture and process, by building the components on the ``meta``
device (no memory) and naming their weights as the original single files do (``library.ldm_convert``).
``read_safetensors_tensors`` then reads the tensors of one component at a time, cast to the loading dtype as each
is read, so that the loader never holds the whole file next to the models.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library import architectures, clip_tokenizer, ldm_convert
from library.errors import UserInputError

Shapes = dict[str, tuple[int, ...]]

# A safetensors header larger than this is not a model header (real ones are well under 1 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# The first U-Net transformer's input projection: a 1×1 convolution or a linear layer, depending on the file.
PROJ_IN_KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
# safetensors dtype names → torch dtypes (little-endian bytes, as torch stores them on the machines it runs on)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
} | ({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2} if hasattr(torch, "float8_e4m3fn") else {})


@dataclass(frozen=True)
class Architecture:
    """One recognised architecture: the configs of its diffusers / transformers components and its tokenizers."""

    key: str  # "sd1", "sd2", "sdxl"
    label: str  # as messages name it
    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    text_encoders: tuple[tuple[str, Mapping[str, Any]], ...]  # (pipeline name, transformers config)
    tokenizers: tuple[Callable[[], Any], ...]

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2


SD1 = Architecture(
    "sd1",
    "SD 1.x",
    architectures.SD15_UNET,
    architectures.SD_VAE,
    (("text_encoder", architectures.CLIP_L_TEXT_CONFIG),),
    (clip_tokenizer.build_clip_tokenizer,),
)
SD2 = Architecture(
    "sd2",
    "SD 2.x",
    architectures.SD2_UNET,
    architectures.SD_VAE,
    (("text_encoder", architectures.OPENCLIP_H_TEXT_CONFIG),),
    (clip_tokenizer.build_open_clip_tokenizer,),
)
SDXL = Architecture(
    "sdxl",
    "SDXL base",
    architectures.SDXL_UNET,
    architectures.SDXL_VAE,
    (
        ("text_encoder", architectures.CLIP_L_TEXT_CONFIG),
        ("text_encoder_2", architectures.OPENCLIP_BIGG_TEXT_CONFIG),
    ),
    (clip_tokenizer.build_clip_tokenizer, clip_tokenizer.build_open_clip_tokenizer),
)
ARCHITECTURES = {arch.key: arch for arch in (SD1, SD2, SDXL)}

# The token embedding of each architecture's (last) text encoder, which tells them apart.
_TEXT_ENCODER_MARKERS = (
    ("sdxl", ldm_convert.SDXL_TEXT_ENCODER_2_PREFIX + "token_embedding.weight"),
    ("sd2", ldm_convert.SD2_TEXT_ENCODER_PREFIX + "token_embedding.weight"),
    ("sd1", ldm_convert.SD1_TEXT_ENCODER_PREFIX + "text_model.embeddings.token_embedding.weight"),
)
_SUPPORTED = "SD 1.x, SD 2.x or SDXL base"
_OVERRIDE_HINT = "for another model pass --pretrained_model_config DIR (a diffusers folder of its architecture)"


def read_safetensors_header(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """The header of a ``.safetensors`` file: its size in bytes and each tensor's entry (``dtype``, ``shape``,
    ``data_offsets``), after checking the file holds all the bytes the entries list."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UserInputError(f"{path} is not a .safetensors file: it has {size} bytes, fewer than a header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(MAX_HEADER_BYTES, size - 8):
            raise UserInputError(
                f"{path} is not a readable .safetensors file: its header claims {header_size} bytes and the file "
                f"has {size}; the file is damaged or truncated (download it again)"
            )
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
        entries = {key: value for key, value in header.items() if key != "__metadata__"}
        for value in entries.values():
            value["shape"] = tuple(int(n) for n in value["shape"])
            value["data_offsets"] = tuple(int(n) for n in value["data_offsets"])
        data_end = max((value["data_offsets"][1] for value in entries.values()), default=0)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
        raise UserInputError(f"{path} is not a readable .safetensors file: its header is damaged ({error})") from error
    available = size - 8 - header_size
    if data_end > available:
        raise UserInputError(
            f"{path} is truncated: its header lists {data_end} bytes of tensor data and the file holds {available}; "
            f"download it again"
        )
    return header_size, entries


def read_safetensors_shapes(path: Path) -> Shapes:
    """Tensor name → shape from a ``.safetensors`` header, after checking the file holds all the bytes it lists."""
    return {key: entry["shape"] for key, entry in read_safetensors_header(path)[1].items()}


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it holds floating-point values (integer tensors such as position ids stay)."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def read_safetensors_tensors(path: Path, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of a ``.safetensors`` file, floating-point ones cast to ``dtype`` as each is read.

    Reads with plain file reads into tensors of their own (no memory map), so the memory held is that of the
    tensors returned plus one tensor in the file's dtype while it is cast."""
    header_size, entries = read_safetensors_header(path)
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as handle:
        for key in keys:
            entry = entries[key]
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise UserInputError(f"{path}: tensor {key} has the dtype {entry['dtype']}, which torch cannot read")
            start, end = entry["data_offsets"]
            raw = torch.empty(end - start, dtype=torch.uint8)
            handle.seek(8 + header_size + start)
            if handle.readinto(raw.numpy()) != end - start:
                raise UserInputError(f"{path} is truncated: tensor {key} ends after the end of the file")
            tensor = raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
            tensors[key] = cast_floating(tensor, dtype)
    return tensors


def shapes_of(state_dict: Mapping[str, Any]) -> Shapes:
    """Tensor name → shape of a loaded state dict (entries that are not tensors are left out)."""
    return {key: tuple(value.shape) for key, value in state_dict.items() if isinstance(value, torch.Tensor)}


def identify(shapes: Shapes, source: str | os.PathLike) -> Architecture:
    """The architecture whose every needed tensor is in ``shapes`` with the right shape, or a ``UserInputError``
    saying what the file is instead (or what it lacks)."""
    _refuse_other_kinds(shapes, source)
    key = next((key for key, marker in _TEXT_ENCODER_MARKERS if marker in shapes), None)
    if key is None:
        raise UserInputError(
            f"{source} is not a {_SUPPORTED} checkpoint: it has none of their text encoders in the original "
            f"single-file layout ({len(shapes)} tensors, e.g. {', '.join(sorted(shapes)[:3])}); {_OVERRIDE_HINT}"
        )
    arch = ARCHITECTURES[key]
    if key == "sd2" and len(shapes.get(PROJ_IN_KEY, ())) == 4:  # a 2.x file with convolutional projections
        arch = Architecture(
            arch.key, arch.label, dict(arch.unet, use_linear_projection=False), arch.vae, arch.text_encoders,
            arch.tokenizers,
        )
    _check_shapes(shapes, expected_shapes(arch), arch.label, source)
    return arch


def _refuse_other_kinds(shapes: Shapes, source: str | os.PathLike) -> None:
    """Name the model kinds people mistake for a base checkpoint."""
    keys = list(shapes)
    if not keys:
        raise UserInputError(f"{source} holds no tensors; expected a {_SUPPORTED} checkpoint")
    lora_parts = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1", ".oft_blocks")
    if any(key.startswith(("lora_unet_", "lora_te")) or any(part in key for part in lora_parts) for key in keys):
        raise UserInputError(
            f"{source} is a LoRA / LyCORIS network file, not a base model: give the base model it was trained on as "
            f"--pretrained_model_name_or_path, and this file as --network_weights to continue training it"
        )
    if any(".joint_blocks." in key or key.startswith("joint_blocks.") for key in keys):
        raise UserInputError(f"{source} is a Stable Diffusion 3 checkpoint; this trainer trains {_SUPPORTED} models")
    if any(".double_blocks." in key or key.startswith("double_blocks.") for key in keys):
        raise UserInputError(f"{source} is a FLUX checkpoint; this trainer trains {_SUPPORTED} models")
    if "conditioner.embedders.0.model.token_embedding.weight" in shapes:
        raise UserInputError(
            f"{source} is an SDXL refiner checkpoint (one OpenCLIP text encoder); LoRA training needs SDXL base"
        )
    if not any(key.startswith(ldm_convert.UNET_PREFIX) for key in keys) and any(
        key.startswith(("down_blocks.", "conv_in.", "encoder.", "text_model.")) for key in keys
    ):
        raise UserInputError(
            f"{source} holds one component in the diffusers layout, not a whole model; pass the diffusers folder it "
            f"belongs to, or a {_SUPPORTED} single file"
        )


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without trailing 1s: a 1×1 convolution weight and its linear equivalent compare equal."""
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_shapes(shapes: Shapes, expected: Shapes, label: str, source: str | os.PathLike) -> None:
    wrong = [key for key in expected if key in shapes and _squeezed(shapes[key]) != _squeezed(expected[key])]
    if wrong:
        details = ", ".join(f"{key} is {shapes[key]}, expected {expected[key]}" for key in wrong[:3])
        raise UserInputError(
            f"{source} has the layout of an {label} checkpoint but {len(wrong)} tensors of other shapes ({details}): "
            f"a variant or size this trainer does not build in (e.g. inpainting); {_OVERRIDE_HINT}"
        )
    missing = [key for key in expected if key not in shapes]
    if missing:
        raise UserInputError(
            f"{source} looks like an {label} checkpoint but lacks {len(missing)} of the {len(expected)} tensors one "
            f"has, e.g. {', '.join(missing[:3])}: the file is incomplete (a component pruned, or damaged); "
            f"{_OVERRIDE_HINT}"
        )


def build_components(arch: Architecture) -> dict[str, torch.nn.Module]:
    """The U-Net, VAE and text encoders of ``arch`` (pipeline names), built on the current default device."""
    parts: dict[str, torch.nn.Module] = {
        "unet": UNet2DConditionModel(**arch.unet),
        "vae": AutoencoderKL(**arch.vae),
    }
    for name, config in arch.text_encoders:
        model_class = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        parts[name] = model_class(CLIPTextConfig(**config))
    return parts


def expected_shapes(arch: Architecture) -> Shapes:
    """Every tensor name (original single-file layout) the components of ``arch`` need, with its shape.

    Computed once per configuration and process (building SDXL on the meta device takes a few seconds)."""
    cache_key = json.dumps([arch.unet, arch.vae, arch.text_encoders])
    if cache_key not in _EXPECTED_SHAPES:
        with torch.device("meta"):
            layout = ldm_convert.components_to_single_file(build_components(arch), sd2=arch.key == "sd2")
        _EXPECTED_SHAPES[cache_key] = {key: tuple(tensor.shape) for key, tensor in layout.items()}
    return dict(_EXPECTED_SHAPES[cache_key])


_EXPECTED_SHAPES: dict[str, Shapes] = {}


def write_config_folder(arch: Architecture, folder: Path) -> Path:
    """Write ``arch``'s component configs as a diffusers config folder (``model_index.json`` and one
    ``config.json`` per component; no weights, no tokenizer) for diffusers' single-file loaders."""
    pipeline = "StableDiffusionXLPipeline" if arch.is_sdxl else "StableDiffusionPipeline"
    index: dict[str, Any] = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"]}
    index["vae"] = ["diffusers", "AutoencoderKL"]
    for sub, class_name, config in (("unet", "UNet2DConditionModel", arch.unet), ("vae", "AutoencoderKL", arch.vae)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps({"_class_name": class_name, **config}), encoding="utf-8")
    for name, config in arch.text_encoders:
        model_class = "CLIPTextModelWithProjection" if name == "text_encoder_2" else "CLIPTextModel"
        index[name] = ["transformers", model_class]
        CLIPTextConfig(**dict(config, architectures=[model_class])).save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder
