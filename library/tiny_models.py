"""Tiny Stable Diffusion–architecture models, built offline from configs with a fixed seed.

They have the real architectures (diffusers ``UNet2DConditionModel`` and ``AutoencoderKL``, transformers CLIP
text encoders, a byte-level BPE ``CLIPTokenizer``) at toy sizes, so the whole trainer — LoRA targets, key names,
SDXL conditioning — runs in seconds on a CPU without downloading anything.

* ``tiny-sd1``: SD 1.x layout (one CLIP text encoder, 32 wide; U-Net with a cross-attention level).
* ``tiny-sdxl``: SDXL layout (CLIPTextModel + CLIPTextModelWithProjection, context 32 + 32 = 64 wide,
  ``text_time`` added conditioning with six size/crop ids).

The VAE has four levels like the real one, so latents are 1/8 of the image size, as with real checkpoints.
The loader (``library.models``) builds these when ``--pretrained_model_name_or_path`` names them.
"""

from __future__ import annotations

import string
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.clip_tokenizer import bytes_to_unicode
from library.diffusion import make_noise_scheduler

TINY_SD1 = "tiny-sd1"
TINY_SDXL = "tiny-sdxl"
TINY_MODEL_NAMES = (TINY_SD1, TINY_SDXL)

VOCAB_SIZE = 1000
MAX_TOKEN_LENGTH = 77

# Words the BPE merges are learned from: the demo captions and common caption vocabulary.
_CORPUS = """
a an the of and with in on at by photo picture painting drawing style sks dog cat shape circle square triangle
red green blue yellow orange purple white black gray pink brown background small large big tiny simple
person man woman girl boy face portrait landscape sky tree flower house car city night day light dark
anime illustration art render detailed high quality best masterpiece sharp colorful bright digit number
""".split()


def _learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """A deterministic miniature BPE: repeatedly merge the most frequent adjacent pair (ties by name)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
    return merges


def build_tokenizer() -> CLIPTokenizer:
    """An offline CLIP tokenizer: byte alphabet, word-final bytes, learned merges, then the two specials.

    The text encoders keep ``vocab_size=1000`` (unused rows are harmless); the learned merges stop when the
    corpus has no pair left, so the tokenizer itself has fewer entries.
    """
    alphabet = list(bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    n_merges = VOCAB_SIZE - len(vocab_list) - 2
    merges = _learn_merges(_CORPUS + list(string.ascii_lowercase), n_merges)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = MAX_TOKEN_LENGTH
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, **overrides: Any) -> CLIPTextConfig:
    """CLIP text config at toy size; special-token ids come from ``tokenizer`` (CLIP pools at the EOS token)."""
    base = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_TOKEN_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
    )
    base.update(overrides)
    return CLIPTextConfig(**base)


def _vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


# The tiny U-Nets: SD's block structure at toy width (see _build_tiny_sdxl for the SDXL widths).
TINY_SD1_UNET: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
)
TINY_SDXL_UNET: dict[str, Any] = dict(
    TINY_SD1_UNET,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
)


def _build_tiny_sd1() -> dict[str, Any]:
    """Components of a tiny SD 1.x model: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``."""
    unet = UNet2DConditionModel(**TINY_SD1_UNET)
    vae = _vae(scaling_factor=0.18215)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": make_noise_scheduler(),
    }


def _build_tiny_sdxl() -> dict[str, Any]:
    """Components of a tiny SDXL model: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``,
    ``tokenizer``, ``tokenizer_2``, ``scheduler``.

    Context width = 32 (encoder 1) + 32 (encoder 2) = 64; the added embedding takes the pooled, projected
    text embedding (32) plus six time ids × 8 = 80 features, as in SDXL's ``text_time`` conditioning.
    """
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    vae = _vae(scaling_factor=0.13025)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=32, hidden_act="gelu"))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": build_tokenizer(),
        "scheduler": make_noise_scheduler(),
    }


def build_tiny(name: str, seed: int = 0) -> dict[str, Any]:
    """Build the embedded model called ``name`` (one of ``TINY_MODEL_NAMES``) from ``seed``, leaving torch's
    global random state as it was (a run's ``--seed`` still decides the LoRA's initialisation and the noise)."""
    builders = {TINY_SD1: _build_tiny_sd1, TINY_SDXL: _build_tiny_sdxl}
    if name not in builders:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {', '.join(TINY_MODEL_NAMES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builders[name]()
