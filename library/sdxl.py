"""What differs for SDXL: two text encoders, the pooled text embedding, size/crop conditioning, cached captions.

``SdxlNetworkTrainer`` is the SD 1.x ``NetworkTrainer`` with these seams overridden:

* text conditioning: ``context`` = concat(TE1's penultimate hidden state, TE2's penultimate hidden state), 768 + 1280
  = 2048 wide for SDXL base (hidden state 11 of the 12-layer CLIP-L), no final LayerNorm; ``pooled`` = TE2's
  projected EOS embedding (``text_embeds``, 1280). With ``--max_token_length`` the captions are encoded in 75-token
  windows, the hidden states joined and the pooled embedding taken from the first window (as sd-scripts does).
* U-Net call: ``added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}`` with the six size/crop ids
  (original h, w, crop top, left, target h, w) of each image, from the batch (see :func:`size_conditioning`).
* ``--cache_text_encoder_outputs[_to_disk]``: every caption encoded once before training (``library.text_cache``),
  the text encoders then moved to the CPU. With ``--weighted_captions`` the cached outputs are the weighted ones
  (sd-scripts' ``is_weighted`` caching), and the weighting is part of each disk file's fingerprint.
* ``--weighted_captions``: both encoders' hidden states multiplied by the caption's token weights, the pooled
  embedding left as it is (``library.prompt_weights``).
* ``--text_encoder_lr A B``: A for TE1, B for TE2 when the network accepts one lr per encoder (``networks.lora``).

The latent scale (0.13025), ``ss_base_model_version`` (``sdxl_base_v1-0``) and ``modelspec.architecture``
(``stable-diffusion-xl-v1-base/lora``) come from the model bundle and ``is_sdxl``.
"""

from __future__ import annotations

import argparse
import logging
import random
from typing import Any

import torch

from library.dataset import DatasetGroup, process_caption
from library.errors import UserInputError
from library.prompt_weights import apply_token_weights, tokenize_with_weights
from library.text_cache import CacheEntry, TextCache, build_text_cache
from library.text_encoding import merge_chunks, split_into_chunks, tokenize
from library.trainer import NetworkTrainer, first_text_encoder_lr

logger = logging.getLogger(__name__)

# Keys of the cached outputs (sd-scripts' names in ``*_te_outputs.npz``).
HIDDEN_STATE_1, HIDDEN_STATE_2, POOLED_2 = "hidden_state1", "hidden_state2", "pool2"
TEXT_OUTPUT_KEYS = (HIDDEN_STATE_1, HIDDEN_STATE_2, POOLED_2)
# Subset options that change a caption from step to step: its encoding cannot be cached with them.
VARYING_CAPTION_OPTIONS = (
    "shuffle_caption",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "token_warmup_step",
    "enable_wildcard",
)


def size_conditioning(
    original_sizes_hw: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes_hw: torch.Tensor
) -> torch.Tensor:
    """SDXL's time ids (B, 6): original height, width, crop top, left, target height, width of each image."""
    return torch.cat([original_sizes_hw, crop_top_lefts, target_sizes_hw], dim=1).to(torch.float32)


def _encode_in_windows(
    text_encoder: torch.nn.Module, tokenizer: Any, input_ids: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """Run one encoder over captions split into 75-token windows: the penultimate hidden states merged back to
    (B, L, D), and the encoder's raw output (one row per window, windows of a caption consecutive)."""
    chunks = split_into_chunks(input_ids, tokenizer).to(text_encoder.device)
    output = text_encoder(chunks, output_hidden_states=True)
    return merge_chunks(output.hidden_states[-2], input_ids.shape[0]), output


def encode_sdxl_text(
    text_encoders: list[torch.nn.Module],
    tokenizers: list[Any],
    captions: list[str],
    max_token_length: int | None,
    weighted: bool = False,
) -> dict[str, torch.Tensor]:
    """Encode ``captions`` with SDXL's two text encoders: ``hidden_state1`` (B, L, D1) and ``hidden_state2``
    (B, L, D2), each encoder's penultimate hidden state, and ``pool2`` (B, P), TE2's projected EOS embedding
    (of the first 75-token window when captions are longer).

    L is 77, or ``max_token_length`` + 2. Runs on the encoders' device and returns tensors there. With
    ``weighted`` (``--weighted_captions``), each encoder's tokens get the parsed weights and both hidden states
    are multiplied by them; ``pool2`` stays unweighted (as in sd-scripts).
    """
    if len(text_encoders) != 2 or len(tokenizers) != 2:
        raise ValueError(f"SDXL needs two text encoders and tokenizers, got {len(text_encoders)} and {len(tokenizers)}")
    hidden = []
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        if weighted:
            ids, weights = tokenize_with_weights(tokenizer, captions, max_token_length)
        else:
            ids = tokenize(tokenizer, captions, max_token_length)
        states, output = _encode_in_windows(encoder, tokenizer, ids)
        hidden.append(apply_token_weights(states, weights) if weighted else states)
    pooled2 = output.text_embeds  # TE2's, one row per window
    pooled2 = pooled2.reshape(len(captions), -1, pooled2.shape[-1])[:, 0]
    return {HIDDEN_STATE_1: hidden[0], HIDDEN_STATE_2: hidden[1], POOLED_2: pooled2}


def sdxl_conditioning(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The U-Net's text conditioning from the encoders' outputs: ``context`` (B, L, D1 + D2), ``pooled`` (B, P)."""
    context = torch.cat([outputs[HIDDEN_STATE_1], outputs[HIDDEN_STATE_2].to(outputs[HIDDEN_STATE_1].dtype)], dim=2)
    return {"context": context, "pooled": outputs[POOLED_2]}


def fixed_captions(dataset: DatasetGroup) -> list[CacheEntry]:
    """Every image of ``dataset`` with the caption the loop will give it, for caching.

    Raises ``ValueError`` naming the subset and option when a subset changes its captions from step to step.
    """
    entries = []
    for bucketed in dataset.datasets:
        for subset in bucketed.subsets:
            varying = [name for name in VARYING_CAPTION_OPTIONS if getattr(subset, name)]
            if varying:
                raise UserInputError(
                    f"--cache_text_encoder_outputs cannot be used with {', '.join(varying)} (set for the subset "
                    f"{subset.metadata_file or subset.image_dir}): they change the caption every step, so its "
                    "encoding cannot be cached"
                )
        for item in bucketed.items:
            # With no varying option, the caption does not depend on the rng, epoch or step.
            caption = process_caption(item.caption, item.subset, random.Random(0), epoch=1)
            entries.append(CacheEntry(item.path, caption))
    return entries


def multiple_text_encoder_lrs_supported(network: Any) -> bool:
    """Whether ``network.prepare_optimizer_params`` takes one text-encoder lr per encoder (``networks.lora`` does;
    LyCORIS and other sd-scripts-style modules take a single number)."""
    return hasattr(network, "num_text_encoders")


class SdxlNetworkTrainer(NetworkTrainer):
    """Trains a LoRA on an SDXL model (``sdxl_train_network.py``); the loop is ``NetworkTrainer``'s."""

    is_sdxl = True

    def __init__(self) -> None:
        super().__init__()
        self.text_cache: TextCache | None = None

    def train(self, args: argparse.Namespace) -> str:
        """Check the SDXL-only argument combinations before anything is loaded, then run the shared loop."""
        if args.cache_text_encoder_outputs and not args.network_train_unet_only:
            raise UserInputError(
                "--cache_text_encoder_outputs requires --network_train_unet_only "
                "(a text encoder whose outputs are cached cannot be trained)"
            )
        if args.clip_skip is not None:
            logger.warning("--clip_skip has no effect for SDXL (it uses each encoder's penultimate layer)")
        self.text_cache = None  # set again by prepare_text_encoders when this run caches
        return super().train(args)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{"context": (B, L, D1 + D2), "pooled": (B, P)}``, from the cache when captions are cached."""
        if self.text_cache is not None:
            outputs = self.text_cache.lookup(captions, self.accelerator.device)
        else:
            outputs = encode_sdxl_text(
                self.models.text_encoders,
                self.models.tokenizers,
                captions,
                self.args.max_token_length,
                weighted=self.args.weighted_captions,
            )
        return sdxl_conditioning(outputs)

    def unet_forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor], batch: dict
    ) -> torch.Tensor:
        context, pooled = conditioning["context"], conditioning["pooled"]
        time_ids = size_conditioning(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])
        added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, dtype=pooled.dtype)}
        return self.models.unet(noisy_latents, timesteps, context, added_cond_kwargs=added_cond_kwargs).sample

    def text_encoder_lr(self, args: argparse.Namespace, network: Any) -> float | list[float] | None:
        """``--text_encoder_lr``: two values are TE1's and TE2's lrs when the network supports that."""
        lrs = args.text_encoder_lr
        if isinstance(lrs, (list, tuple)) and len(lrs) > 1:
            if multiple_text_encoder_lrs_supported(network):
                return list(lrs)
            logger.warning("%s takes one text-encoder lr; using %s for both encoders", args.network_module, lrs[0])
        return first_text_encoder_lr(lrs)

    def prepare_text_encoders(self, dataset: DatasetGroup, weight_dtype: torch.dtype) -> None:
        """Without caching, as for SD 1.x. With ``--cache_text_encoder_outputs``: encode every caption now (on the
        device, in ``weight_dtype``, main process first so that the others reuse its disk files), then move the
        encoders to the CPU."""
        args, accelerator, encoders = self.args, self.accelerator, self.models.text_encoders
        if not args.cache_text_encoder_outputs:
            super().prepare_text_encoders(dataset, weight_dtype)
            return
        entries = fixed_captions(dataset)
        for encoder in encoders:
            encoder.to(accelerator.device, dtype=weight_dtype)
            encoder.eval()
        settings = (
            f"model={self.models.name_or_path}|max_token_length={args.max_token_length}|dtype={weight_dtype}"
            f"|widths={[encoder.config.hidden_size for encoder in encoders]}"
            + ("|weighted_captions" if args.weighted_captions else "")
        )

        def encode(captions: list[str]) -> dict[str, torch.Tensor]:
            with accelerator.autocast():
                return encode_sdxl_text(
                    encoders, self.models.tokenizers, captions, args.max_token_length, weighted=args.weighted_captions
                )

        with accelerator.main_process_first():
            self.text_cache = build_text_cache(
                entries,
                encode,
                TEXT_OUTPUT_KEYS,
                settings,
                to_disk=args.cache_text_encoder_outputs_to_disk,
                batch_size=args.train_batch_size,
                skip_cache_check=args.skip_cache_check,
            )
        for encoder in encoders:
            encoder.to("cpu")
