"""Loading Stable Diffusion models (SD 1.x / 2.x / SDXL) into one ``ModelBundle``.

``--pretrained_model_name_or_path`` may name

* an embedded tiny model, ``tiny-sd1`` or ``tiny-sdxl`` (built offline with a fixed seed; a real path of that
  name on disk takes precedence),
* a diffusers folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and, for
  SDXL, ``text_encoder_2/`` and ``tokenizer_2/``; a missing tokenizer folder gets the built-in CLIP tokenizer),
* a single ``.safetensors`` / ``.ckpt`` file in the original LDM/SGM layout. SD 1.x, SD 2.x and SDXL base files
  need nothing else: ``library.single_file`` recognises them from their tensor names and shapes and supplies the
  published configs, with CLIP's tokenizer built from its bundled vocabulary (``library.clip_tokenizer``).
  ``--pretrained_model_config DIR`` (a local diffusers folder of the same architecture; only its ``*.json`` /
  ``*.txt`` files are read), or such a folder named like the file without its suffix next to it, overrides that;
  files written by ``tools/make_tiny_model.py`` name their embedded config in their metadata. U-Net and VAE are
  read by diffusers' single-file loaders, the text encoders by ``library.ldm_convert``,
* a Hugging Face Hub id, only when it is already in the local Hugging Face cache.

Nothing is ever downloaded: every ``from_pretrained`` / ``from_single_file`` call gets ``local_files_only=True``
and a local config folder. The components are loaded in the dtypes the trainer keeps them in (``frozen_dtypes``:
bf16 / fp16 under ``--mixed_precision``), not in fp32 first: a ``.safetensors`` single file is read one component
at a time and each tensor is cast as it is read, so loading holds the models in their training dtype plus one
component of the file (a pickle is loaded whole, then handed out component by component). The noise scheduler is
not loaded from the model; like sd-scripts, it is built with the training configuration
(``library.diffusion.make_noise_scheduler``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library import clip_tokenizer, ldm_convert, single_file, tiny_models
from library.diffusion import make_noise_scheduler

logger = logging.getLogger(__name__)

SD1_LATENT_SCALE = 0.18215
SDXL_LATENT_SCALE = 0.13025

MODEL_VERSION_SD1 = "sd_v1"
MODEL_VERSION_SD2 = "sd_v2"
MODEL_VERSION_SDXL = "sdxl_base_v1-0"

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Metadata key, written by tools/make_tiny_model.py, naming the embedded model whose configs a single file uses.
EMBEDDED_CONFIG_METADATA_KEY = "anlo_embedded_config"
# The text encoder of SD 2.x (OpenCLIP ViT-H) is 1024 wide; SD 1.x's CLIP ViT-L is 768.
SD2_TEXT_ENCODER_WIDTH = 1024
MAX_TOKEN_LENGTHS = (None, 75, 150, 225)
# The seed of the embedded models: fixed, so that a name always means the same base weights.
EMBEDDED_MODEL_SEED = 0
# --mixed_precision → the dtype the trainer keeps the frozen U-Net and text encoders in (sd-scripts' weight_dtype)
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtypes(args: Any) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes the trainer keeps the frozen model in, for loading it in them directly: (U-Net and text encoders,
    VAE). The first is fp16 / bf16 under ``--mixed_precision fp16`` / ``bf16`` and fp32 otherwise; the VAE's is the
    same, or fp32 under ``--no_half_vae``. The U-Net and text encoders stay fp32 where their weights are used before
    the trainer casts them: ``--base_weights`` merges into the fp32 weights (then cast, as in sd-scripts), and a
    network module of another package (``lycoris.kohya``) may create its parameters in the base weights' dtype."""
    dtype = MIXED_PRECISION_DTYPES.get(getattr(args, "mixed_precision", None), torch.float32)
    vae_dtype = torch.float32 if getattr(args, "no_half_vae", False) else dtype
    network_module = getattr(args, "network_module", None) or "networks.lora"
    if getattr(args, "base_weights", None) or not network_module.startswith("networks."):
        dtype = torch.float32
    return dtype, vae_dtype


@dataclass
class ModelBundle:
    """Everything the trainer needs from a base model.

    ``text_encoders`` / ``tokenizers`` have one entry for SD 1.x/2.x and two for SDXL (CLIP-L, then
    CLIP-G with projection). ``model_version`` is the ``ss_base_model_version`` string. ``clip_skip`` and
    ``max_token_length`` are stored as given; the trainer applies them when it encodes captions.
    """

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    is_sdxl: bool = False
    v2: bool = False
    v_parameterization: bool = False
    model_version: str = MODEL_VERSION_SD1
    name_or_path: str = ""
    clip_skip: int | None = None
    max_token_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_scale(self) -> float:
        """The factor VAE latents are multiplied by before they enter the U-Net."""
        return SDXL_LATENT_SCALE if self.is_sdxl else SD1_LATENT_SCALE


@dataclass
class LoadOptions:
    """The command-line arguments that model loading reads, gathered in one place."""

    name_or_path: str
    v2: bool = False
    v_parameterization: bool = False
    vae: str | None = None
    pretrained_model_config: str | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    lowram: bool = False
    sdpa: bool = False
    xformers: bool = False
    dtype: torch.dtype = torch.float32  # the U-Net's and text encoders' (see frozen_dtypes)
    vae_dtype: torch.dtype = torch.float32

    @classmethod
    def from_args(cls, args: Any) -> LoadOptions:
        """Read the options from an argparse namespace; flags a parser does not define keep their defaults."""
        name_or_path = getattr(args, "pretrained_model_name_or_path", None)
        if not name_or_path:
            raise ValueError("--pretrained_model_name_or_path is required (a model folder, file or embedded name)")
        options = cls(
            name_or_path=str(name_or_path),
            v2=bool(getattr(args, "v2", False)),
            v_parameterization=bool(getattr(args, "v_parameterization", False)),
            vae=getattr(args, "vae", None) or None,
            pretrained_model_config=getattr(args, "pretrained_model_config", None) or None,
            clip_skip=getattr(args, "clip_skip", None),
            max_token_length=getattr(args, "max_token_length", None),
            lowram=bool(getattr(args, "lowram", False)),
            sdpa=bool(getattr(args, "sdpa", False)),
            xformers=bool(getattr(args, "xformers", False)),
        )
        options.dtype, options.vae_dtype = frozen_dtypes(args)
        if options.max_token_length not in MAX_TOKEN_LENGTHS:
            raise ValueError(
                f"--max_token_length must be one of 75, 150, 225 (or unset), got {options.max_token_length!r}"
            )
        if options.clip_skip is not None and options.clip_skip < 1:
            raise ValueError(f"--clip_skip must be 1 or more, got {options.clip_skip}")
        return options


def load_models(args: Any, sdxl: bool = False) -> ModelBundle:
    """Load the base model named by ``args.pretrained_model_name_or_path`` (see the module docstring).

    Reads ``pretrained_model_name_or_path``, ``v2``, ``v_parameterization``, ``vae``, ``pretrained_model_config``,
    ``clip_skip``, ``max_token_length``, ``lowram``, ``sdpa`` and ``xformers``, and for the dtypes
    ``mixed_precision``, ``no_half_vae``, ``base_weights`` and ``network_module``. ``sdxl`` says which trainer asks:
    a model of the other family is an error.
    """
    options = LoadOptions.from_args(args)
    parts = load_components(options.name_or_path, options.pretrained_model_config, options.dtype, options.vae_dtype)

    model_is_sdxl = "text_encoder_2" in parts
    if sdxl and not model_is_sdxl:
        raise ValueError(
            f"{options.name_or_path} is not an SDXL model (it has one text encoder); use train_network.py for it"
        )
    if not sdxl and model_is_sdxl:
        raise ValueError(f"{options.name_or_path} is an SDXL model; use sdxl_train_network.py for it")

    if options.vae:
        parts["vae"] = load_vae(options.vae, reference=parts["vae"], dtype=options.vae_dtype)

    v2 = False
    if not model_is_sdxl:
        v2 = options.v2
        has_sd2_text_encoder = _has_sd2_text_encoder(parts["text_encoder"])
        if has_sd2_text_encoder and not v2:
            logger.warning("%s has an SD 2.x text encoder; treating it as --v2", options.name_or_path)
            v2 = True
        if v2 and not has_sd2_text_encoder:  # it would train as SD 1.x and write SD 2 metadata
            raise ValueError(
                f"--v2 is set, but {options.name_or_path} is an SD 1.x model (its text encoder is CLIP ViT-L, "
                "not SD 2.x's OpenCLIP); remove --v2"
            )
        if v2 and not options.v_parameterization:
            logger.info("SD 2.x without --v_parameterization: right for 512-base models; 768-v models need the flag")

    set_attention(parts["unet"], parts["vae"], xformers=options.xformers, sdpa=options.sdpa)
    if options.lowram and torch.cuda.is_available():
        # sd-scripts' --lowram: keep the weights in VRAM rather than in (scarce) CPU memory.
        for name in ("unet", "text_encoder", "text_encoder_2"):
            if name in parts:
                parts[name].to("cuda")

    bundle = _bundle_from_parts(parts, options.name_or_path)
    bundle.noise_scheduler = make_noise_scheduler(options.v_parameterization)
    bundle.v_parameterization = options.v_parameterization
    bundle.v2 = v2
    if v2:
        bundle.model_version = MODEL_VERSION_SD2
    bundle.clip_skip = options.clip_skip
    bundle.max_token_length = options.max_token_length
    return bundle


def _has_sd2_text_encoder(text_encoder: Any) -> bool:
    """SD 2.x's OpenCLIP ViT-H: 1024 wide, with GELU where SD 1.x's CLIP ViT-L (768) has quick GELU."""
    config = text_encoder.config
    return config.hidden_size == SD2_TEXT_ENCODER_WIDTH or config.hidden_act == "gelu"


def load_embedded(name: str, seed: int = EMBEDDED_MODEL_SEED) -> ModelBundle:
    """The embedded tiny model ``name`` (see ``library.tiny_models``) as a bundle."""
    return _bundle_from_parts(tiny_models.build_tiny(name, seed), name)


def _bundle_from_parts(parts: dict[str, Any], name_or_path: str) -> ModelBundle:
    """A bundle from a components dict (diffusers pipeline component names)."""
    is_sdxl = "text_encoder_2" in parts
    encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if is_sdxl else [])
    tokenizers = [parts["tokenizer"]] + ([parts["tokenizer_2"]] if is_sdxl else [])
    return ModelBundle(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=parts.get("scheduler") or make_noise_scheduler(),
        is_sdxl=is_sdxl,
        model_version=MODEL_VERSION_SDXL if is_sdxl else MODEL_VERSION_SD1,
        name_or_path=name_or_path,
    )


def load_components(
    name_or_path: str,
    config_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The model's components by diffusers pipeline name: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``
    (and ``text_encoder_2``, ``tokenizer_2`` for SDXL), from whichever source ``name_or_path`` names; the VAE in
    ``vae_dtype``, the others in ``dtype``.

    ``config_dir`` is the diffusers config folder for a single file (``--pretrained_model_config``).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_diffusers_folder(path, dtype, vae_dtype)
    if path.is_file():
        return load_single_file(path, config_dir, dtype, vae_dtype)
    if name_or_path in tiny_models.TINY_MODEL_NAMES:
        parts = tiny_models.build_tiny(name_or_path, EMBEDDED_MODEL_SEED)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if name in parts:
                parts[name].to(vae_dtype if name == "vae" else dtype)
        return parts
    if _looks_like_hub_id(name_or_path):
        return load_diffusers_folder(_cached_hub_snapshot(name_or_path), dtype, vae_dtype)
    raise FileNotFoundError(
        f"model not found: {name_or_path}; expected a diffusers folder, a .safetensors/.ckpt file, "
        f"or one of {', '.join(tiny_models.TINY_MODEL_NAMES)}"
    )


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with no file suffix and no further path parts."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.endswith(SINGLE_FILE_SUFFIXES) and not name.startswith(".")


def _cached_hub_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache folder of ``repo_id``; never downloads."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{repo_id} is not a local path and is not in the local Hugging Face cache; this trainer never "
            f"downloads models. Download it first, e.g. `hf download {repo_id} --local-dir DIR` (huggingface_hub's "
            f"CLI), then pass DIR as --pretrained_model_name_or_path"
        ) from error


def _read_model_index(folder: Path) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"no model_index.json in {folder}; expected a diffusers folder, a .safetensors/.ckpt file, "
            f"or one of {', '.join(tiny_models.TINY_MODEL_NAMES)}"
        )
    try:
        return json.loads(index_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{index_file} is not valid JSON: {error}") from error


def load_diffusers_folder(
    folder: Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Load the components of a diffusers folder (SDXL when ``model_index.json`` lists ``text_encoder_2``); the VAE
    in ``vae_dtype``, the U-Net and text encoders in ``dtype``.

    A folder without ``tokenizer/`` (``tokenizer_2/``) gets the built-in CLIP tokenizer, as sd-scripts takes its
    tokenizers from elsewhere too."""
    index = _read_model_index(folder)
    is_sdxl = "text_encoder_2" in index
    required = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if is_sdxl else [])
    for name in required:
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder} has no {name}/ folder; a diffusers SD model needs {', '.join(required)}")

    local = {"local_files_only": True}
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **local),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=vae_dtype, **local),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, **local),
    }
    open_clip_first = _has_sd2_text_encoder(parts["text_encoder"])
    parts["tokenizer"] = _folder_tokenizer(folder, "tokenizer", open_clip_first)
    if is_sdxl:
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", dtype=dtype, **local
        )
        parts["tokenizer_2"] = _folder_tokenizer(folder, "tokenizer_2", open_clip=True)
    return parts


def _folder_tokenizer(folder: Path, subfolder: str, open_clip: bool) -> Any:
    """The folder's own tokenizer, or the built-in CLIP one (OpenCLIP padding for SD 2.x / SDXL's second)."""
    if (folder / subfolder).is_dir():
        return CLIPTokenizer.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    logger.info("%s has no %s/ folder; using the built-in CLIP tokenizer", folder, subfolder)
    return clip_tokenizer.build_open_clip_tokenizer() if open_clip else clip_tokenizer.build_clip_tokenizer()


def _embedded_config_name(checkpoint: Path) -> str | None:
    """The embedded model named in a ``.safetensors`` file's metadata, if any."""
    if checkpoint.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(checkpoint), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{checkpoint} is not a readable .safetensors file: {error}") from error
    return metadata.get(EMBEDDED_CONFIG_METADATA_KEY)


def _find_config_dir(checkpoint: Path, config_dir: str | None) -> Path | None:
    """The diffusers config folder for a single file: explicit, or the sibling ``<stem>/``; None when neither."""
    if config_dir:
        folder = Path(config_dir).expanduser()
        _read_model_index(folder)
        return folder
    sibling = checkpoint.with_suffix("")
    if (sibling / "model_index.json").is_file():
        return sibling
    return None


def load_single_file(
    checkpoint: Path,
    config_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Load an LDM/SGM-layout single file with the component configs of a local diffusers folder; the VAE in
    ``vae_dtype``, the U-Net and text encoders in ``dtype``.

    The config folder is, in this order: ``config_dir`` (``--pretrained_model_config``), the embedded model named in
    the file's metadata, or the sibling folder ``<file without suffix>/``. Without any, the architecture is
    recognised from the file (``library.single_file``) and its published configs are used.
    """
    if checkpoint.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"{checkpoint} is not a model file; expected one of {', '.join(SINGLE_FILE_SUFFIXES)} or a diffusers folder"
        )
    dtypes = {"dtype": dtype, "vae_dtype": vae_dtype}
    embedded = None if config_dir else _embedded_config_name(checkpoint)
    if embedded is not None:
        if embedded not in tiny_models.TINY_MODEL_NAMES:
            raise ValueError(
                f"{checkpoint} names the embedded config {embedded!r} in its metadata; "
                f"expected one of {', '.join(tiny_models.TINY_MODEL_NAMES)}"
            )
        with tempfile.TemporaryDirectory(prefix="anlo-config-") as temp:
            save_diffusers_folder(tiny_models.build_tiny(embedded, EMBEDDED_MODEL_SEED), Path(temp) / "model")
            return _load_single_file_with_config(_FileTensors(checkpoint), Path(temp) / "model", **dtypes)
    folder = _find_config_dir(checkpoint, config_dir)
    if folder is None:
        return _load_recognised_single_file(checkpoint, **dtypes)
    return _load_single_file_with_config(_FileTensors(checkpoint), folder, **dtypes)


def _load_recognised_single_file(checkpoint: Path, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
    """An SD 1.x / 2.x / SDXL base single file with the built-in configs. A ``.safetensors`` file is recognised
    from its header before any weight is read; a pickle is loaded once and recognised from what it holds."""
    tensors = _FileTensors(checkpoint)
    arch = single_file.identify(tensors.shapes, checkpoint)
    logger.info("%s: %s checkpoint, loaded with the published %s configs", checkpoint, arch.label, arch.label)
    tokenizers = [build() for build in arch.tokenizers]
    with tempfile.TemporaryDirectory(prefix="anlo-config-") as temp:
        folder = single_file.write_config_folder(arch, Path(temp))
        return _load_single_file_with_config(tensors, folder, dtype, vae_dtype, tokenizers=tokenizers)


def read_checkpoint(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch pickle file (``.ckpt`` and the like; a ``state_dict`` wrapper is unwrapped)."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle raises many types for damaged or foreign files
        raise ValueError(f"{checkpoint} could not be read as a model checkpoint: {error}") from error
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


class _FileTensors:
    """A single file's tensors, handed out one component (key prefix) at a time in the dtype it is loaded in.

    A ``.safetensors`` file is read per component from its header's offsets
    (``single_file.read_safetensors_tensors``); a pickle is loaded whole once, and each tensor handed out is
    dropped from it. Either way the memory held beyond the models built is about one component of the file."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.state: dict[str, Any] | None = None
        if checkpoint.suffix == ".safetensors":
            self.shapes = single_file.read_safetensors_shapes(checkpoint)
        else:
            self.state = read_checkpoint(checkpoint)
            self.shapes = single_file.shapes_of(self.state)

    def has(self, prefix: str) -> bool:
        return any(key.startswith(prefix) for key in self.shapes)

    def take(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix`` (names kept), floating-point ones in ``dtype``."""
        keys = [key for key in self.shapes if key.startswith(prefix)]
        if self.state is None:
            return single_file.read_safetensors_tensors(self.checkpoint, keys, dtype)
        return {key: single_file.cast_floating(self.state.pop(key), dtype) for key in keys}

    def component(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """:meth:`take` with ``prefix`` removed from the names: one component's own state dict."""
        return ldm_convert.select_prefixed(self.take(prefix, dtype), prefix)


def _load_text_encoder(
    model_class: type, config_dir: Path, subfolder: str, weights: dict[str, torch.Tensor], source: str
) -> Any:
    """A transformers CLIP text model from ``config_dir/subfolder`` with ``weights`` (transformers names with the
    ``text_model.`` level), in the weights' dtype: the parameters are the tensors given, not copies. Extra entries
    in the file (an unused last layer, a projection) are ignored."""
    config = model_class.config_class.from_pretrained(config_dir, subfolder=subfolder, local_files_only=True)
    with init_empty_weights():  # parameters on the meta device (no memory, no random init); buffers real
        model = model_class(config)
    expected = model.state_dict().keys()
    if not any(key.startswith("text_model.") for key in expected):  # transformers 5 CLIPTextModel: no such level
        weights = {key.removeprefix("text_model."): tensor for key, tensor in weights.items()}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{source}: {subfolder} weights missing from the file: {', '.join(missing[:5])}")
    try:
        model.load_state_dict({key: weights[key] for key in expected}, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{source}: {subfolder} weights do not fit the config in {config_dir}: {error}") from error
    return model.eval()


def _load_single_file_with_config(
    tensors: _FileTensors,
    config_dir: Path,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    tokenizers: list[Any] | None = None,
) -> dict[str, Any]:
    """Load each component of an LDM/SGM single file with the configs in ``config_dir``, one at a time (U-Net,
    VAE, text encoders), each read from the file in its dtype and built from those tensors.

    ``tokenizers`` replace the config folder's (one, or two for SDXL).
    """
    checkpoint = tensors.checkpoint
    is_sdxl = "text_encoder_2" in _read_model_index(config_dir)
    local = {"config": str(config_dir), "local_files_only": True}
    parts: dict[str, Any] = {}
    try:
        for name, model_class, prefix, part_dtype in (
            ("unet", UNet2DConditionModel, ldm_convert.UNET_PREFIX, dtype),
            ("vae", AutoencoderKL, ldm_convert.VAE_PREFIX, vae_dtype),
        ):
            state = tensors.take(prefix, part_dtype)
            parts[name] = model_class.from_single_file(state, subfolder=name, torch_dtype=part_dtype, **local)
            del state
    except (KeyError, RuntimeError, ValueError) as error:
        raise ValueError(f"{checkpoint}: U-Net/VAE do not fit the configs in {config_dir}: {error}") from error
    if tokenizers:
        parts["tokenizer"] = tokenizers[0]
    else:
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(config_dir, subfolder="tokenizer", local_files_only=True)

    if is_sdxl:
        te1 = ldm_convert.clip_text_from_ldm(tensors.component(ldm_convert.SDXL_TEXT_ENCODER_1_PREFIX, dtype))
        parts["text_encoder"] = _load_text_encoder(CLIPTextModel, config_dir, "text_encoder", te1, str(checkpoint))
        del te1
        te2 = ldm_convert.open_clip_text_from_ldm(tensors.component(ldm_convert.SDXL_TEXT_ENCODER_2_PREFIX, dtype))
        parts["text_encoder_2"] = _load_text_encoder(
            CLIPTextModelWithProjection, config_dir, "text_encoder_2", te2, str(checkpoint)
        )
        if tokenizers:
            parts["tokenizer_2"] = tokenizers[1]
        else:
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(
                config_dir, subfolder="tokenizer_2", local_files_only=True
            )
    else:
        if tensors.has(ldm_convert.SD2_TEXT_ENCODER_PREFIX):  # SD 2.x
            te = ldm_convert.open_clip_text_from_ldm(tensors.component(ldm_convert.SD2_TEXT_ENCODER_PREFIX, dtype))
        else:
            te = ldm_convert.clip_text_from_ldm(tensors.component(ldm_convert.SD1_TEXT_ENCODER_PREFIX, dtype))
        parts["text_encoder"] = _load_text_encoder(CLIPTextModel, config_dir, "text_encoder", te, str(checkpoint))
    _check_no_meta_tensors(parts, checkpoint)
    return parts


def _check_no_meta_tensors(parts: dict[str, Any], source: Path) -> None:
    """diffusers leaves weights absent from a file on the meta device; name them instead of failing later."""
    for name, component in parts.items():
        if isinstance(component, torch.nn.Module):
            empty = [key for key, tensor in component.state_dict().items() if tensor.is_meta]
            if empty:
                raise ValueError(f"{source}: {name} weights missing from the file: {', '.join(empty[:5])}")


def load_vae(path: str, reference: AutoencoderKL, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The ``--vae`` replacement, in ``dtype``: a diffusers VAE folder (or a model folder with ``vae/``) or a
    single file.

    A single file takes its config (incl. ``scaling_factor``) from ``reference``, the base model's VAE.
    """
    vae_path = Path(path).expanduser()
    if vae_path.is_dir():
        if (vae_path / "config.json").is_file():
            return AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype, local_files_only=True)
        if (vae_path / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(vae_path, subfolder="vae", torch_dtype=dtype, local_files_only=True)
        raise FileNotFoundError(f"--vae {path}: no config.json (or vae/config.json) in this folder")
    if not vae_path.is_file():
        raise FileNotFoundError(f"--vae {path}: no such file or folder; expected a VAE folder or a .safetensors/.ckpt")
    if vae_path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"--vae {path}: expected a diffusers VAE folder or one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    with tempfile.TemporaryDirectory(prefix="anlo-vae-config-") as config_dir:
        reference.save_config(config_dir)
        try:
            return AutoencoderKL.from_single_file(
                str(vae_path), config=config_dir, torch_dtype=dtype, local_files_only=True
            )
        except (KeyError, RuntimeError, ValueError) as error:
            raise ValueError(f"--vae {path}: not a VAE matching the base model's VAE config: {error}") from error


def set_attention(unet: Any, vae: Any, xformers: bool = False, sdpa: bool = False) -> None:
    """``--xformers`` (wins, as in sd-scripts) or ``--sdpa`` attention in the U-Net and the VAE."""
    if xformers:
        if importlib.util.find_spec("xformers") is None:
            raise ImportError("--xformers needs the xformers package, which is not installed; install it or use --sdpa")
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
    elif sdpa:
        unet.set_attn_processor(AttnProcessor2_0())
        vae.set_attn_processor(AttnProcessor2_0())


def save_diffusers_folder(parts: dict[str, Any], folder: Path) -> None:
    """Write components (pipeline names, as ``load_components`` returns) as a diffusers folder.

    Written to a temporary sibling folder first and renamed into place; ``folder`` must not exist yet or be empty.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} already exists and is not an empty folder; choose a new output folder")
    scheduler = parts.get("scheduler") or make_noise_scheduler()
    if "text_encoder_2" in parts:
        pipeline = StableDiffusionXLPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            text_encoder_2=parts["text_encoder_2"],
            tokenizer=parts["tokenizer"],
            tokenizer_2=parts["tokenizer_2"],
            unet=parts["unet"],
            scheduler=scheduler,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            unet=parts["unet"],
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as temp:
        staging = Path(temp) / "model"
        pipeline.save_pretrained(staging)
        os.replace(staging, folder)
