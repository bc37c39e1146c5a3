"""Text-encoder output caching (``--cache_text_encoder_outputs``, ``--cache_text_encoder_outputs_to_disk``).

When the text encoders are frozen and every image's caption is fixed, each caption is encoded once before training;
the loop then reads the stored outputs and the encoders can leave the accelerator. The outputs are a dict of
per-caption tensors (for SDXL: ``hidden_state1``, ``hidden_state2``, ``pool2``, see ``library.sdxl``).

* In memory: one float32 CPU copy per distinct caption.
* On disk: ``<image stem>_te_outputs.npz`` next to each image (sd-scripts' file name and keys), plus
  ``cache_fingerprint``, a string of the caption and the encoding settings. A file is reused only when its
  fingerprint matches (with ``skip_cache_check``: when it merely has every key); otherwise the caption is encoded
  again and the file rewritten atomically. Files written by sd-scripts (no fingerprint) are recomputed once.
  In memory only the caption → file map is kept; the loop loads a file when a batch needs it.

Usage::

    cache = build_text_cache(entries, encode, settings="...", to_disk=True, batch_size=4)
    outputs = cache.lookup(batch_captions, device)    # {"hidden_state1": (B, ...), ...}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from library.atomic import atomic_output

TE_OUTPUTS_SUFFIX = "_te_outputs.npz"  # sd-scripts' name for SDXL text-encoder output caches
FINGERPRINT_KEY = "cache_fingerprint"
_FINGERPRINT_VERSION = "anlo-te-outputs-v1"

# A function from a list of captions to a dict of tensors whose first dimension is the caption index.
EncodeFn = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class CacheEntry:
    """One image whose caption is cached: its path (where a disk cache file goes) and its caption."""

    image_path: str
    caption: str


def te_outputs_npz_path(image_path: str | os.PathLike) -> Path:
    """The disk-cache file of an image's caption: ``<image stem>_te_outputs.npz`` in the image's folder."""
    path = Path(image_path)
    return path.with_name(path.stem + TE_OUTPUTS_SUFFIX)


def cache_fingerprint(caption: str, settings: str) -> str:
    """The string stored with a cached caption: the outputs are reused only for the same caption and settings."""
    return f"{_FINGERPRINT_VERSION}|{settings}|caption={caption}"


def save_outputs_npz(path: Path, outputs: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Write one caption's outputs (float32) and fingerprint to ``path`` atomically (temporary file, then replace)."""
    arrays = {key: value.detach().float().cpu().numpy() for key, value in outputs.items()}
    arrays[FINGERPRINT_KEY] = np.array(fingerprint)
    with atomic_output(path) as file:
        np.savez(file, **arrays)


def load_outputs_npz(path: Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Read one caption's outputs; a damaged or incomplete file is an error that names it."""
    try:
        with np.load(path) as data:
            return {key: torch.from_numpy(data[key]) for key in keys}
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"text-encoder output cache file {path} is unreadable or incomplete ({error}); delete it"
        ) from error


def is_disk_cache_valid(path: Path, keys: Sequence[str], fingerprint: str, skip_cache_check: bool) -> bool:
    """Whether ``path`` holds every key and (unless ``skip_cache_check``) the expected fingerprint."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            if any(key not in data.files for key in keys):
                return False
            if skip_cache_check:
                return True
            return FINGERPRINT_KEY in data.files and str(data[FINGERPRINT_KEY]) == fingerprint
    except (OSError, ValueError):
        return False


@dataclass
class TextCache:
    """Cached text-encoder outputs by caption: tensors in memory, or the ``.npz`` file that holds them."""

    keys: tuple[str, ...]
    in_memory: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def __contains__(self, caption: str) -> bool:
        return caption in self.in_memory or caption in self.files

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        """The outputs of one caption (CPU tensors without a batch dimension)."""
        if caption in self.in_memory:
            return self.in_memory[caption]
        if caption in self.files:
            return load_outputs_npz(self.files[caption], self.keys)
        raise KeyError(
            f"caption {caption!r} has no cached text-encoder outputs; with --cache_text_encoder_outputs every "
            "caption must be known before training (no shuffling, dropout or wildcards)"
        )

    def lookup(self, captions: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """The outputs of a batch of captions, stacked along a new first dimension and moved to ``device``."""
        per_caption = [self.get(caption) for caption in captions]
        return {key: torch.stack([outputs[key] for outputs in per_caption]).to(device) for key in self.keys}


def build_text_cache(
    entries: Sequence[CacheEntry],
    encode: EncodeFn,
    keys: Sequence[str],
    settings: str,
    to_disk: bool,
    batch_size: int = 1,
    skip_cache_check: bool = False,
) -> TextCache:
    """Encode every distinct caption of ``entries`` once, ``batch_size`` captions per ``encode`` call.

    ``encode`` returns a dict with (at least) ``keys``; ``settings`` describes everything besides the caption that
    the outputs depend on (model, token length, dtype) and goes into each disk file's fingerprint. With
    ``to_disk``, every image gets its own ``<stem>_te_outputs.npz``; valid files are reused and not recomputed.
    """
    if batch_size < 1:
        raise ValueError(f"text-encoder caching batch size must be >= 1, got {batch_size}")
    keys = tuple(keys)
    cache = TextCache(keys)

    pending: dict[str, list[Path]] = {}  # caption → disk files to write (empty list: memory only)
    for entry in entries:
        if not to_disk:
            pending.setdefault(entry.caption, [])
            continue
        path = te_outputs_npz_path(entry.image_path)
        if is_disk_cache_valid(path, keys, cache_fingerprint(entry.caption, settings), skip_cache_check):
            cache.files.setdefault(entry.caption, path)
        else:
            pending.setdefault(entry.caption, []).append(path)

    captions = list(pending)
    with torch.no_grad(), tqdm(total=len(captions), desc="caching text encoder outputs", unit="caption") as progress:
        for start in range(0, len(captions), batch_size):
            chunk = captions[start : start + batch_size]
            outputs = encode(chunk)
            missing = [key for key in keys if key not in outputs]
            if missing:
                raise KeyError(f"the text encoding gave no {', '.join(missing)}; expected {', '.join(keys)}")
            for index, caption in enumerate(chunk):
                single = {key: outputs[key][index].detach().float().cpu().clone() for key in keys}
                if not to_disk:
                    cache.in_memory[caption] = single
                    continue
                for path in pending[caption]:
                    save_outputs_npz(path, single, cache_fingerprint(caption, settings))
                cache.files.setdefault(caption, pending[caption][0])
            progress.update(len(chunk))
    return cache
