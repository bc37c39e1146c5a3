"""The published Stable Diffusion architectures, as diffusers / transformers config values.

Built on the ``meta`` device they give full-size modules with no memory and no weights: the benchmarks use
them for real LoRA shapes, the tests for real module names and counts. The single-file loader
(``library.single_file``) builds SD 1.x, SD 2.x and SDXL base from them when a checkpoint comes without configs.
The tiny test models are in ``library/tiny_models.py``.
"""

from __future__ import annotations

from typing import Any

# Stable Diffusion 1.5's U-Net (runwayml/stable-diffusion-v1-5, unet/config.json): 859.5 M parameters.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
)

# Stable Diffusion 2.x's U-Net (stabilityai/stable-diffusion-2-1, unet/config.json; sd-scripts' v2 values): 64 heads
# wide attention, 1024-wide context. 2.0/2.1 files store the transformer projections as linear layers; a file with
# 1×1 convolutions instead is read with use_linear_projection=False (library.single_file checks the shapes).
SD2_UNET: dict[str, Any] = dict(
    SD15_UNET,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)

# SDXL base 1.0's U-Net (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 2.567 B parameters.
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
)

# Text encoders (transformers CLIPTextConfig values of the released checkpoints): CLIP ViT-L/14 (SD 1.x and
# SDXL's first encoder) and OpenCLIP ViT-bigG/14 (SDXL's second, with its projection).
CLIP_L_TEXT: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
OPENCLIP_BIGG_TEXT: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280
)

# The complete text-encoder configs of the released checkpoints (text_encoder*/config.json), for loading weights:
# SD 1.x's and SDXL's CLIP ViT-L/14, SD 2.x's OpenCLIP ViT-H/14 (23 of its 24 layers: SD 2.x conditions on the
# penultimate layer, so diffusers and sd-scripts drop the last one) and SDXL's OpenCLIP ViT-bigG/14.
_RELEASED_TEXT: dict[str, Any] = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5
)
CLIP_L_TEXT_CONFIG: dict[str, Any] = dict(_RELEASED_TEXT, **CLIP_L_TEXT, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H_TEXT_CONFIG: dict[str, Any] = dict(
    _RELEASED_TEXT,
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    hidden_act="gelu",
    projection_dim=512,
)
OPENCLIP_BIGG_TEXT_CONFIG: dict[str, Any] = dict(_RELEASED_TEXT, **OPENCLIP_BIGG_TEXT, hidden_act="gelu")

# The VAE of SD 1.x / 2.x and of SDXL (same shapes; SDXL's latents are scaled by 0.13025, SD's by 0.18215).
SD_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SDXL_VAE: dict[str, Any] = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025)
