"""VAE encoding and the latent cache (in memory, or on disk next to each image).

Latents are the VAE posterior **mean**, unscaled (the training loop multiplies by the model's latent scale),
both when cached and when encoded on the fly, so cached and uncached runs see the same numbers.

Disk cache: ``<image stem>.npz`` next to the image, with sd-scripts' keys ``latents`` (C, h, w float32),
``original_size`` (w, h), ``crop_ltrb`` (left, top, right, bottom) and ``latents_flipped`` when ``flip_aug`` is on,
``alpha_mask`` (H, W float32 in [0, 1], the cropped, unflipped loss mask of ``--alpha_mask`` subsets; see
``library.masks``) when the subset uses it, plus ``cache_fingerprint``: a string describing the image file (size,
modification time) and the settings that shape the latents (bucket, resize, crop, flip, alpha mask). A file is
reused only when its fingerprint matches (or with ``--skip_cache_check``, when its latent shape matches the bucket);
otherwise the latents are recomputed and the file is rewritten atomically. sd-scripts files (no fingerprint) are
recomputed once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from library.atomic import atomic_output

LATENT_DOWNSCALE = 8  # SD VAEs map an image of H×W pixels to latents of H/8 × W/8
_FINGERPRINT_VERSION = "anlo-latents-v1 posterior-mean"


@dataclass
class CachedLatents:
    """Latents of one image (C, h, w float32 on the CPU), and of its mirror image when ``flip_aug`` is on; the
    image's alpha loss mask (H, W float32, unflipped) for ``alpha_mask`` subsets."""

    latents: torch.Tensor
    latents_flipped: torch.Tensor | None = None
    alpha_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class CacheRequest:
    """One image to cache: its path, bucket ``(w, h)``, whether to cache the flipped latents too, and the
    fingerprint of everything that determines its latents (see :func:`cache_fingerprint`); ``alpha_mask``: cache
    the image's alpha loss mask too."""

    image_path: str
    bucket: tuple[int, int]
    flip: bool
    fingerprint: str
    original_size: tuple[int, int]
    crop_ltrb: tuple[int, int, int, int]
    alpha_mask: bool = False


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Encode ``images`` (B, 3, H, W in [-1, 1]) to the unscaled posterior mean (B, C, H/8, W/8), computed on
    the VAE's device and dtype and returned there."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(images).latent_dist.mean


def latents_npz_path(image_path: str | os.PathLike) -> Path:
    """The disk-cache file of an image: ``<stem>.npz`` in the image's folder."""
    return Path(image_path).with_suffix(".npz")


def cache_fingerprint(
    image_path: str | os.PathLike,
    bucket: tuple[int, int],
    resized_size: tuple[int, int],
    crop_ltrb: tuple[int, int, int, int],
    flip: bool,
    alpha_mask: bool = False,
) -> str:
    """A string that changes whenever the cached latents (or alpha mask) of this image would change."""
    stat = os.stat(image_path)
    return (
        f"{_FINGERPRINT_VERSION}|file={stat.st_size}:{stat.st_mtime_ns}|bucket={bucket[0]}x{bucket[1]}"
        f"|resized={resized_size[0]}x{resized_size[1]}|crop={','.join(map(str, crop_ltrb))}|flip={int(flip)}"
        + ("|alpha_mask" if alpha_mask else "")
    )


def save_latents_npz(path: Path, request: CacheRequest, cached: CachedLatents) -> None:
    """Write one image's latents to ``path`` atomically (temporary file in the same folder, then replace)."""
    arrays = {
        "latents": cached.latents.float().cpu().numpy(),
        "original_size": np.array(request.original_size),
        "crop_ltrb": np.array(request.crop_ltrb),
        "cache_fingerprint": np.array(request.fingerprint),
    }
    if cached.latents_flipped is not None:
        arrays["latents_flipped"] = cached.latents_flipped.float().cpu().numpy()
    if cached.alpha_mask is not None:
        arrays["alpha_mask"] = cached.alpha_mask.float().cpu().numpy()
    with atomic_output(path) as file:
        np.savez(file, **arrays)


def _expected_shape_ok(latents: np.ndarray, bucket: tuple[int, int]) -> bool:
    return latents.ndim == 3 and latents.shape[1:] == (bucket[1] // LATENT_DOWNSCALE, bucket[0] // LATENT_DOWNSCALE)


def load_latents_npz(path: Path, bucket: tuple[int, int], flip: bool, alpha_mask: bool = False) -> CachedLatents:
    """Read one image's cached latents (and alpha mask); a file that does not fit the bucket is an error naming it."""
    try:
        with np.load(path) as data:
            latents = data["latents"]
            flipped = data["latents_flipped"] if flip else None
            mask = data["alpha_mask"] if alpha_mask else None
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"latent cache file {path} is unreadable or incomplete ({err}); delete it") from err
    if not _expected_shape_ok(latents, bucket):
        raise ValueError(
            f"latent cache file {path} holds latents of shape {latents.shape}, expected (C, "
            f"{bucket[1] // LATENT_DOWNSCALE}, {bucket[0] // LATENT_DOWNSCALE}) for bucket {bucket[0]}x{bucket[1]}; "
            "delete it or run without --skip_cache_check"
        )
    if mask is not None and mask.shape != (bucket[1], bucket[0]):
        raise ValueError(f"latent cache file {path} holds an alpha mask of shape {mask.shape}, expected "
                         f"({bucket[1]}, {bucket[0]}) for bucket {bucket[0]}x{bucket[1]}; delete it")
    return CachedLatents(torch.from_numpy(latents), None if flipped is None else torch.from_numpy(flipped),
                         None if mask is None else torch.from_numpy(mask))


def is_disk_cache_valid(request: CacheRequest, skip_cache_check: bool) -> bool:
    """Whether the image's ``.npz`` can be reused: its fingerprint matches (or, with ``skip_cache_check``,
    it exists and its latents fit the bucket, with flipped latents and the alpha mask when needed)."""
    path = latents_npz_path(request.image_path)
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            if request.flip and "latents_flipped" not in data.files:
                return False
            if request.alpha_mask and "alpha_mask" not in data.files:
                return False
            if skip_cache_check:
                return _expected_shape_ok(data["latents"], request.bucket)
            return "cache_fingerprint" in data.files and str(data["cache_fingerprint"]) == request.fingerprint
    except (OSError, ValueError, KeyError):
        return False


def cache_latents(
    requests: Sequence[CacheRequest],
    load_image: Callable[[CacheRequest], tuple[torch.Tensor, torch.Tensor | None]],
    vae: torch.nn.Module,
    to_disk: bool,
    device: torch.device | str,
    dtype: torch.dtype,
    batch_size: int,
    skip_cache_check: bool = False,
) -> dict[str, CachedLatents]:
    """Encode every requested image (grouped by bucket, ``batch_size`` at a time, with a progress bar).

    ``load_image`` returns the image as the dataset feeds it (3, H, W in [-1, 1], resized and cropped to its
    bucket, not flipped) and its alpha loss mask (H, W) for requests with ``alpha_mask`` (else ``None``). The VAE
    is moved to ``device``/``dtype`` and put in eval mode. With ``to_disk``, results go to ``<stem>.npz`` files
    (valid ones are reused, not recomputed) and the returned dict is empty; otherwise the returned dict maps image
    path → latents (and alpha masks).
    """
    if batch_size < 1:
        raise ValueError(f"VAE batch size must be >= 1, got {batch_size}")
    todo = [r for r in requests if not (to_disk and is_disk_cache_valid(r, skip_cache_check))]
    if vae.device != torch.device(device) or vae.dtype != dtype:
        vae.to(device=device, dtype=dtype)
    vae.eval()
    by_bucket: dict[tuple[int, int], list[CacheRequest]] = {}
    for request in todo:
        by_bucket.setdefault(request.bucket, []).append(request)

    in_memory: dict[str, CachedLatents] = {}
    with tqdm(total=len(todo), desc="caching latents", unit="img") as progress:
        for bucket_requests in by_bucket.values():
            for start in range(0, len(bucket_requests), batch_size):
                chunk = bucket_requests[start : start + batch_size]
                loaded = [load_image(r) for r in chunk]
                images = torch.stack([image for image, _ in loaded])
                latents = encode_latents(vae, images).float().cpu()
                flipped = None
                if any(r.flip for r in chunk):
                    flipped = encode_latents(vae, torch.flip(images, dims=[3])).float().cpu()
                for i, request in enumerate(chunk):
                    cached = CachedLatents(latents[i].clone(), flipped[i].clone() if request.flip else None,
                                           loaded[i][1] if request.alpha_mask else None)
                    if to_disk:
                        save_latents_npz(latents_npz_path(request.image_path), request, cached)
                    else:
                        in_memory[request.image_path] = cached
                progress.update(len(chunk))
    return in_memory
