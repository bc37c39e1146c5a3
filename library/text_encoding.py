"""Captions to text-encoder hidden states, as sd-scripts computes them (training, sampling and the SDXL cache).

* ``tokenize``: ids of length 77, or ``--max_token_length`` (150 / 225) + 2;
* ``split_into_chunks`` / ``merge_chunks``: long ids run through the 77-token encoder in windows of
  ``BOS + 75 + EOS`` and the windows' hidden states joined again;
* ``encode_with_clip_skip``: the last layer, or with ``--clip_skip`` k the k-th from the end through the final
  LayerNorm (SD 1.x/2.x);
* ``encode_sd_text``: all of it for SD 1.x/2.x captions, with ``weighted`` the ``--weighted_captions`` syntax read
  and each token's hidden state multiplied by its weight (``library.prompt_weights``). SDXL's two encoders are in
  ``library/sdxl.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from library.prompt_weights import apply_token_weights, tokenize_with_weights


def final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The CLIP text encoder's final LayerNorm (transformers 5 dropped the ``text_model`` level; 4.x has it)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def tokenize(tokenizer: Any, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """Token ids (B, L): L = the tokenizer's 77 by default, or ``max_token_length`` + 2 (150 / 225 tokens)."""
    length = tokenizer.model_max_length if max_token_length is None else max_token_length + 2
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def split_into_chunks(input_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Split long token ids (B, n·75 + 2) into n windows of the encoder's length 77, each ``BOS + 75 + EOS``:
    returns (B·n, 77), batch-major. Ids of the default length are returned as they are.

    When the tokenizer pads with a token other than EOS (SD 2.x, SDXL's second tokenizer), a window whose text
    fills it gets EOS as its last token, and a window that starts in the padding starts with EOS, as sd-scripts
    does.
    """
    window = tokenizer.model_max_length
    if input_ids.shape[1] == window:
        return input_ids
    inner = window - 2
    bos, eos = input_ids[:, :1], input_ids[:, -1:]
    chunks = []
    for start in range(1, input_ids.shape[1] - inner, inner):
        chunk = torch.cat([bos, input_ids[:, start : start + inner], eos], dim=1)
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            text_fills_window = (chunk[:, -2] != tokenizer.eos_token_id) & (chunk[:, -2] != tokenizer.pad_token_id)
            chunk[text_fills_window, -1] = tokenizer.eos_token_id
            starts_in_padding = chunk[:, 1] == tokenizer.pad_token_id
            chunk[starts_in_padding, 1] = tokenizer.eos_token_id
        chunks.append(chunk)
    return torch.stack(chunks, dim=1).reshape(-1, window)


def merge_chunks(hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Inverse of ``split_into_chunks`` for hidden states (B·n, 77, D) → (B, n·75 + 2, D): the first window's
    BOS state, the 75 inner states of every window, the last window's EOS state."""
    n_chunks = hidden.shape[0] // batch_size
    if n_chunks == 1:
        return hidden
    hidden = hidden.reshape(batch_size, n_chunks, hidden.shape[1], hidden.shape[2])
    inner = hidden[:, :, 1:-1].reshape(batch_size, -1, hidden.shape[3])
    return torch.cat([hidden[:, 0, :1], inner, hidden[:, -1, -1:]], dim=1)


def encode_with_clip_skip(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """Hidden states of a CLIP text encoder: the last layer, or with ``clip_skip`` = k the k-th layer from the
    end passed through the final LayerNorm (SD 1.x convention)."""
    if clip_skip is None or clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    output = text_encoder(input_ids, output_hidden_states=True)
    return final_layer_norm(text_encoder)(output.hidden_states[-clip_skip])


def encode_sd_text(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    captions: list[str],
    max_token_length: int | None,
    clip_skip: int | None,
    device: torch.device | str,
    weighted: bool = False,
) -> torch.Tensor:
    """SD 1.x/2.x text conditioning for ``captions``: hidden states (B, 77 or n·75 + 2, D). With ``weighted``,
    ``(word:1.2)``-style weights are parsed out of the captions and multiply their tokens' hidden states (as
    sd-scripts' ``--weighted_captions``: no renormalization)."""
    if weighted:
        input_ids, weights = tokenize_with_weights(tokenizer, captions, max_token_length)
    else:
        input_ids = tokenize(tokenizer, captions, max_token_length)
    chunks = split_into_chunks(input_ids, tokenizer).to(device)
    hidden = merge_chunks(encode_with_clip_skip(text_encoder, chunks, clip_skip), len(captions))
    return apply_token_weights(hidden, weights) if weighted else hidden
