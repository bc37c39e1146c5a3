"""Loading Stable Diffusion models (SD 1.x / 2.x / SDXL) into one ``ModelBundle``.

Sources: an embedded tiny model (``tiny-sd1`` / ``tiny-sdxl``, built offline), a diffusers folder, or a
single ``.safetensors`` / ``.ckpt`` file. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from library import tiny_models

SD1_LATENT_SCALE = 0.18215
SDXL_LATENT_SCALE = 0.13025


@dataclass
class ModelBundle:
    """Everything the trainer needs from a base model.

    ``text_encoders`` / ``tokenizers`` have one entry for SD 1.x/2.x and two for SDXL (CLIP-L, then
    CLIP-G with projection). ``model_version`` is the ``ss_base_model_version`` string.
    """

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    is_sdxl: bool = False
    v2: bool = False
    v_parameterization: bool = False
    model_version: str = "sd_v1"
    name_or_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_scale(self) -> float:
        return SDXL_LATENT_SCALE if self.is_sdxl else SD1_LATENT_SCALE


def load_embedded(name: str, seed: int = 0) -> ModelBundle:
    """The embedded tiny model ``name`` (see ``library.tiny_models``) as a bundle."""
    parts = tiny_models.build_tiny(name, seed)
    is_sdxl = name == tiny_models.TINY_SDXL
    encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if is_sdxl else [])
    tokenizers = [parts["tokenizer"]] + ([parts["tokenizer_2"]] if is_sdxl else [])
    return ModelBundle(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=parts["scheduler"],
        is_sdxl=is_sdxl,
        model_version="sdxl_base_v1-0" if is_sdxl else "sd_v1",
        name_or_path=name,
    )
