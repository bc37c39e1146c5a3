"""Loss masks: sd-scripts' ``--masked_loss`` (mask images in ``conditioning_data_dir``) and ``--alpha_mask``.

A loss mask weights the training loss per pixel: 1 where the image is learned, 0 where it is ignored, grey values
in between. As in sd-scripts it comes from one of two places:

* **mask images** (``--masked_loss`` and ``conditioning_data_dir`` on every subset of a ``--dataset_config``
  dataset): for each training image, the image with the same stem in ``conditioning_data_dir`` (any image
  extension), of the same size as the training image; its **red** channel is the mask (value / 255). Every
  training image needs one and every mask image needs its training image, else an error lists them. Such subsets
  cannot hold regularization images (sd-scripts' ControlNet subsets have no ``is_reg``).
* **the image's alpha channel** (``--alpha_mask`` for every subset, or ``alpha_mask = true`` on a subset):
  alpha / 255; an image without alpha counts as fully opaque (all ones). Used with or without ``--masked_loss``.
  In a batch that mixes subsets with and without ``alpha_mask``, the images without get all ones.

The mask follows its image through every step that moves pixels: resized with the same filter to the same size,
cropped with the same box (centre or ``random_crop``), mirrored when the image is flipped. With cached latents the
alpha mask is cached with them (in memory, or as ``alpha_mask`` in the ``.npz``, as sd-scripts stores it); mask
images are read at each step. In the loss (:func:`latent_loss_mask`) the mask is shrunk to the latent size by
averaging each 8×8 block (``torch.nn.functional.interpolate(mode="area")``, as sd-scripts) and multiplies the
element-wise loss before its mean, so masked-out pixels get no gradient and the loss is not renormalised by the
masked area.

One difference from sd-scripts: it stretches a mask image straight to the bucket size, so with buckets whose aspect
ratio differs from the image's the mask drifts off its image by up to the crop; here it is resized and cropped
exactly like its image (and ``random_crop`` works with mask images, which sd-scripts refuses).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from library.errors import UserInputError
from library.resize import resize_image

logger = logging.getLogger(__name__)



class MaskError(UserInputError):
    """A mask setting or mask file the user has to fix."""


# ---------------------------------------------------------------------------------------------------------------
# Settings


def uses_alpha_mask(subset: Any) -> bool:
    """Whether a subset's loss mask is its images' alpha channel (mask images take precedence, as in sd-scripts,
    whose subsets with ``conditioning_data_dir`` have no ``alpha_mask`` option)."""
    return bool(subset.alpha_mask) and not subset.conditioning_data_dir


def check_dataset_config(user_config: dict, source: str, masked_loss: bool) -> None:
    """The rules sd-scripts' config schema enforces for mask images: ``conditioning_data_dir`` only with
    ``--masked_loss``, on every subset of a dataset or on none, and not with ``is_reg`` or ``alpha_mask``."""
    for i, dataset in enumerate(user_config.get("datasets", [])):
        subsets = dataset.get("subsets", [])
        with_dir = [j for j, subset in enumerate(subsets) if subset.get("conditioning_data_dir") is not None]
        if not with_dir:
            continue
        where = f"{source}: datasets[{i}]"
        if not masked_loss:
            raise MaskError(f"{where}: conditioning_data_dir (mask images) needs --masked_loss; add it, or remove "
                            "conditioning_data_dir")
        if len(with_dir) != len(subsets):
            missing = [j for j in range(len(subsets)) if j not in with_dir]
            raise MaskError(f"{where}: conditioning_data_dir is set on some subsets but not on subsets {missing}; "
                            "sd-scripts needs it on every subset of a dataset (put the others in another dataset)")
        for j in with_dir:
            for key in ("is_reg", "alpha_mask"):
                if subsets[j].get(key):
                    raise MaskError(f"{where}.subsets[{j}]: {key} cannot be used with conditioning_data_dir "
                                    "(sd-scripts' mask-image subsets have no such option)")


def warn_if_unused(subsets: list[Any], masked_loss: bool) -> None:
    """sd-scripts trains unmasked when ``--masked_loss`` finds no mask; say so instead of doing it silently."""
    if masked_loss and not any(s.conditioning_data_dir or s.alpha_mask for s in subsets):
        logger.warning("--masked_loss has no effect: no subset has conditioning_data_dir (mask images) or "
                       "alpha_mask (set --alpha_mask to use the images' alpha channel); the loss is not masked")


# ---------------------------------------------------------------------------------------------------------------
# Mask files


def _stem_map(paths: list[Path]) -> dict[str, list[Path]]:
    stems: dict[str, list[Path]] = {}
    for path in paths:
        stems.setdefault(path.stem, []).append(path)
    return stems


def pair_mask_files(image_paths: list[Path], listed_images: list[Path], conditioning_dir: str | os.PathLike,
                    mask_paths: list[Path]) -> dict[str, str]:
    """``{image path: mask path}`` for ``image_paths`` from the ``mask_paths`` found in ``conditioning_dir``
    (same stem). ``listed_images`` are all image files of the folder (a mask of a skipped, unreadable image is
    not an extra). Missing, extra and ambiguous mask files are one error listing them."""
    masks = _stem_map(mask_paths)
    problems = []
    ambiguous = sorted(str(p) for paths in masks.values() if len(paths) > 1 for p in paths)
    if ambiguous:
        problems.append(f"several mask images with the same name: {', '.join(ambiguous)}")
    missing = [str(p) for p in image_paths if p.stem not in masks]
    if missing:
        problems.append(f"no mask image in {conditioning_dir} for {len(missing)} image(s): {', '.join(missing)}")
    image_stems = {p.stem for p in listed_images}
    extra = sorted(str(p) for stem, paths in masks.items() if stem not in image_stems for p in paths)
    if extra:
        problems.append(f"mask image(s) without a training image of the same name: {', '.join(extra)}")
    if problems:
        raise MaskError("conditioning_data_dir: " + "; ".join(problems))
    return {str(p): str(masks[p.stem][0]) for p in image_paths}


def check_mask_file(mask_path: str | os.PathLike, image_path: str | os.PathLike, image_size: tuple[int, int]) -> None:
    """A mask image must decode and have its training image's size ``(w, h)``; else an error naming it."""
    try:
        with Image.open(mask_path) as mask:
            mask.load()
            size = mask.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise MaskError(f"cannot read mask image {mask_path}: {err}") from None
    if size != tuple(image_size):
        raise MaskError(f"mask image {mask_path} is {size[0]}x{size[1]} but its image {image_path} is "
                        f"{image_size[0]}x{image_size[1]}; a mask image must have its image's size")


def assign_mask_files(subset: Any, items: list[Any], list_images: Callable[[Path], list[Path]]) -> None:
    """Set ``item.mask_path`` for the items of a subset with ``conditioning_data_dir``, after checking every
    mask file (found, readable, the image's size), so that errors come before the first training step.
    ``list_images(folder)`` is the dataset's rule for which files in a folder are images."""
    conditioning_dir = Path(subset.conditioning_data_dir)
    if not conditioning_dir.is_dir():
        raise MaskError(f"conditioning_data_dir {conditioning_dir} (subset {subset.image_dir}) does not exist or is "
                        "not a directory")
    pairs = pair_mask_files([Path(item.path) for item in items], list_images(Path(subset.image_dir)),
                            conditioning_dir, list_images(conditioning_dir))
    for item in items:
        item.mask_path = pairs[item.path]
        check_mask_file(item.mask_path, item.path, item.size)


# ---------------------------------------------------------------------------------------------------------------
# Masks as the dataset serves them


def _open_mask_source(path: str | os.PathLike, what: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy() if image.mode in ("RGB", "RGBA") else image.convert("RGBA")
    except (OSError, SyntaxError, ValueError) as err:
        raise MaskError(f"cannot read {what} {path}: {err}") from None


def read_mask_image(path: str | os.PathLike) -> Image.Image:
    """The mask of a mask image: its red channel (as sd-scripts reads it: the image converted to RGB, then R)."""
    return _open_mask_source(path, "mask image").convert("RGB").getchannel("R")


def read_alpha(path: str | os.PathLike) -> Image.Image:
    """An image's alpha channel (``L``); 255 everywhere for an image without alpha (PIL's RGBA conversion)."""
    return _open_mask_source(path, "image").convert("RGBA").getchannel("A")


def fit_mask(mask: Image.Image, resized_size: tuple[int, int], box: tuple[int, int, int, int],
             flip: bool, method: str | None = None) -> torch.Tensor:
    """The mask moved like its image: resized to ``resized_size`` ``(w, h)`` as the image is (``method``: the
    subset's ``resize_interpolation``, see ``library/resize.py``), cropped to ``box``, mirrored when ``flip``; a
    float32 (h, w) tensor of value / 255."""
    mask = resize_image(mask, resized_size, method).crop(box)
    if flip:
        mask = ImageOps.mirror(mask)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def mask_file_tensor(path: str, resized_size: tuple[int, int], box: tuple[int, int, int, int],
                     flip: bool, method: str | None = None) -> torch.Tensor:
    """The loss mask from a mask image, moved like its image (see :func:`fit_mask`)."""
    return fit_mask(read_mask_image(path), resized_size, box, flip, method)


def flip_mask(mask: torch.Tensor | None, flip: bool) -> torch.Tensor | None:
    """A cached (unflipped) mask for a flipped or unflipped image."""
    return torch.flip(mask, dims=[1]) if mask is not None and flip else mask


def stack_masks(masks: list[torch.Tensor | None], size_hw: tuple[int, int]) -> torch.Tensor | None:
    """The batch's ``loss_masks`` (B, H, W): ``None`` when no image has a mask, otherwise the masks with all ones
    for images without one (sd-scripts' rule for mixed batches)."""
    if all(mask is None for mask in masks):
        return None
    ones = torch.ones(size_hw, dtype=torch.float32)
    return torch.stack([ones if mask is None else mask for mask in masks])


# ---------------------------------------------------------------------------------------------------------------
# The loss


def latent_loss_mask(masks: torch.Tensor | None, latent_hw: tuple[int, int] | torch.Size,
                     device: torch.device | str | None = None) -> torch.Tensor | None:
    """Pixel masks (B, H, W) → (B, 1, h, w) at the latent size, each value the mean of its H/h × W/w block
    (``interpolate(mode="area")``, as sd-scripts), to multiply the element-wise loss before its mean."""
    if masks is None:
        return None
    masks = masks.to(device=device, dtype=torch.float32).unsqueeze(1)
    return F.interpolate(masks, size=tuple(latent_hw), mode="area")
