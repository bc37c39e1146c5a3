"""CLIP's tokenizer built offline from the BPE merges OpenAI published with CLIP (``library/data``).

The vocabulary is laid out as CLIP lays it out: the 256 byte symbols, the same symbols with the word-end marker
``</w>``, one entry per merge rule, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407) — 49,408 ids,
identical to ``openai/clip-vit-large-patch14``'s. Building it costs about a second (reading 48,894 merges).

* :func:`build_clip_tokenizer` — SD 1.x's tokenizer and SDXL's first one: pads with ``<|endoftext|>``.
* :func:`build_open_clip_tokenizer` — SD 2.x's tokenizer and SDXL's second one: pads with ``!`` (id 0), as
  sd-scripts' (``stabilityai/stable-diffusion-2``'s tokenizer; SDXL's second gets ``pad_token_id = 0``).

The embedded tiny models keep their own small tokenizer (``library.tiny_models``); a diffusers folder's own
tokenizer is always used when the folder has one.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

MERGES_FILE = Path(__file__).resolve().parent / "data" / "clip_bpe_merges.txt.gz"
# CLIP's tokenizer uses the first 49152 - 256 - 2 merge rules of the published file.
NUM_MERGES = 48894
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
OPEN_CLIP_PAD_TOKEN = "!"
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table: printable bytes map to themselves, the others to
    U+0100 onwards, in byte order. Its values, in this order, are the first 256 ids of the vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's token → id table and merge rules, read once per process from ``MERGES_FILE``."""
    with gzip.open(MERGES_FILE, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[1 : 1 + NUM_MERGES]  # line 0 is the version line
    merges = tuple(tuple(line.split(" ")) for line in lines)
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise RuntimeError(f"{MERGES_FILE} is damaged: expected {NUM_MERGES} merge rules of two symbols each")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def _build(pad_token: str) -> CLIPTokenizer:
    vocab, merges = _vocabulary()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer


def build_clip_tokenizer() -> CLIPTokenizer:
    """``openai/clip-vit-large-patch14``'s tokenizer: 77 tokens, padded with ``<|endoftext|>`` (49407)."""
    return _build(EOS_TOKEN)


def build_open_clip_tokenizer() -> CLIPTokenizer:
    """The same vocabulary padded with ``!`` (id 0), as OpenCLIP pads: SD 2.x's tokenizer, SDXL's second."""
    return _build(OPEN_CLIP_PAD_TOKEN)
