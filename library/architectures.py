"""The published Stable Diffusion architectures, as diffusers / transformers config values.

Built on the ``meta`` device they give full-size modules with no memory and no weights: the benchmarks use
them for real LoRA shapes, the tests for real module names and counts. The tiny test models are in
``library/tiny_models.py``.
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
