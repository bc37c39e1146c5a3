"""Fine-tuning datasets: subsets described by a metadata JSON (``--in_json``, or ``metadata_file`` in a
``--dataset_config`` subset), as sd-scripts' ``finetune/`` tools write it.

The JSON maps each image key to its entry: ``{"<image key>": {"caption": ..., "tags": ..., "train_resolution":
[w, h]}, ...}`` (``merge_captions_to_metadata.py``, ``merge_dd_tags_to_metadata.py``,
``prepare_buckets_latents.py``). As in sd-scripts:

* The image of a key is the key itself when that file exists (an absolute path, or relative to the working
  directory), else ``<image_dir>/<key>`` (this trainer also takes keys that carry their extension there), else
  ``<image_dir>/<key><ext>`` for the image extensions. Without an image, the latents file ``<key>.npz`` (next to
  the key, or in ``image_dir``) stands in for it.
* Caption: ``caption``, then ``caption_separator`` and ``tags`` when both are set; ``tags`` alone when there is
  no caption; ``""`` when there is neither. With ``enable_wildcard`` the tags are added to every line of a
  multi-line caption. ``ss_tag_frequency`` (keyed by the metadata file's name) counts the ``tags`` of entries that
  also have a caption — sd-scripts' rule.
* When every entry of a dataset has ``train_resolution``, that is each image's bucket (bucketing is switched on,
  the image resized to it); ``bucket_no_upscale`` is then an error. Otherwise the usual buckets are used.
* Latents from ``prepare_buckets_latents.py`` (``<key>.npz`` beside the key or in ``image_dir``, flipped latents
  in its ``latents_flipped`` entry or a ``<key>_flip.npz``) are used, also without ``--cache_latents``, when every
  entry of the dataset has one that fits its ``train_resolution`` and no subset uses ``color_aug`` or
  ``random_crop``; otherwise they are ignored (with a warning) and images are used.

A missing or malformed metadata file, an entry that is not an object, a ``train_resolution`` that is not two
positive integers and a key with neither an image nor usable latents are errors naming the file and the key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from library.buckets import BucketChoice
from library.latents import LATENT_DOWNSCALE

if TYPE_CHECKING:  # library.dataset imports this module
    from library.dataset import BucketedDataset, ImageItem
    from library.dataset_config import SubsetSettings

logger = logging.getLogger(__name__)

NPZ_SUFFIX = ".npz"
NPZ_FLIP_SUFFIX = "_flip.npz"


def load_metadata(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a metadata JSON: an object mapping image keys to objects; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file {path} not found")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"metadata file {path} is not valid UTF-8 JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata file {path}: expected an object {{image key: {{caption, tags, ...}}}}")
    for key, entry in metadata.items():
        if not isinstance(entry, dict):
            raise ValueError(f"metadata file {path}: entry {key!r} is {type(entry).__name__}, expected an object")
        for field in ("caption", "tags"):
            if entry.get(field) is not None and not isinstance(entry[field], str):
                raise ValueError(f"metadata file {path}: {key!r}.{field} must be a string, got {entry[field]!r}")
    return metadata


def find_image(image_key: str, image_dir: str | None, extensions: tuple[str, ...]) -> str | None:
    """The image file of ``image_key`` (see the module docstring), or ``None``."""
    if os.path.isfile(image_key):
        return image_key
    if not image_dir:
        return None
    candidate = os.path.join(image_dir, image_key)
    if os.path.isfile(candidate) and os.path.splitext(candidate)[1].lower() in extensions:
        return candidate
    for extension in extensions:
        for variant in (extension, extension.upper()):
            if os.path.isfile(candidate + variant):
                return candidate + variant
    return None


def find_npz(image_key: str, image_dir: str | None) -> tuple[str | None, str | None]:
    """sd-scripts' latents files of ``image_key``: ``(<key>.npz, <key>_flip.npz)``, each ``None`` when absent."""
    base = os.path.splitext(image_key)[0]
    if not os.path.isfile(base + NPZ_SUFFIX):
        if not image_dir:
            return None, None
        base = os.path.join(image_dir, image_key)
        if not os.path.isfile(base + NPZ_SUFFIX):
            return None, None
    flipped = base + NPZ_FLIP_SUFFIX
    return base + NPZ_SUFFIX, flipped if os.path.isfile(flipped) else None


def caption_and_tags(entry: dict[str, Any], separator: str, enable_wildcard: bool) -> tuple[str, str | None]:
    """The training caption of an entry, and the tags counted in ``ss_tag_frequency`` (``None``: none)."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        return tags or "", None
    if not tags:
        return caption, None
    if enable_wildcard:
        tags = tags.replace("\n", separator)
        lines = [f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip()]
        return "\n".join(lines), None
    return f"{caption}{separator}{tags}", tags


def _train_resolution(entry: dict[str, Any], key: str, source: str) -> tuple[int, int] | None:
    value = entry.get("train_resolution")
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{source}: {key!r}.train_resolution must be [width, height] in pixels, got {value!r}")
    return int(value[0]), int(value[1])


def _npz_original_size(npz_path: str) -> tuple[int, int] | None:
    try:
        with np.load(npz_path) as data:
            if "original_size" in data.files:
                width, height = (int(v) for v in data["original_size"][:2])
                return width, height
    except (OSError, ValueError):
        pass
    return None


def scan_subset(subset: SubsetSettings, source: str) -> tuple[list[ImageItem], list[str]]:
    """The entries of a fine-tuning subset as images with their captions, and the paths of corrupt images."""
    from library.dataset import IMAGE_EXTENSIONS, ImageItem, probe_image

    metadata_file = subset.metadata_file
    metadata = load_metadata(metadata_file)
    if subset.image_dir and not os.path.isdir(subset.image_dir):
        raise FileNotFoundError(f"{source}: image_dir {subset.image_dir} does not exist or is not a directory")
    items, corrupt = [], []
    for key, entry in metadata.items():
        train_resolution = _train_resolution(entry, key, metadata_file)
        npz, npz_flipped = find_npz(key, subset.image_dir)
        path = find_image(key, subset.image_dir, IMAGE_EXTENSIONS)
        if path is None and npz is None:
            where = f" in image_dir {subset.image_dir}" if subset.image_dir else " (no image_dir given)"
            raise FileNotFoundError(f"{metadata_file}: no image or .npz latents for key {key!r}{where}")
        size = None
        if path is not None:
            size = probe_image(Path(path))
            if size is None:
                corrupt.append(path)
                continue
        else:
            size = _npz_original_size(npz) or train_resolution
        caption, tags = caption_and_tags(entry, subset.caption_separator, subset.enable_wildcard)
        item = ImageItem(path or npz, caption, subset, subset.num_repeats, size or (0, 0))
        item.tags, item.train_resolution = tags, train_resolution
        item.npz_files = (npz, npz_flipped)
        item.has_image = path is not None
        items.append(item)
    if not metadata:
        logger.warning("%s: metadata file %s has no entries; this subset is skipped", source, metadata_file)
    return items, corrupt


def _npz_fits(item: ImageItem) -> bool:
    """Whether an entry's sd-scripts latents are usable: readable, shaped for its ``train_resolution``, and with
    flipped latents when its subset flips."""
    npz, npz_flipped = item.npz_files
    if npz is None or item.train_resolution is None:
        return False
    width, height = item.train_resolution
    expected = (height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE)
    try:
        with np.load(npz) as data:
            if "latents" not in data.files or data["latents"].shape[1:] != expected:
                return False
            has_flipped = "latents_flipped" in data.files
        if item.subset.flip_aug and not has_flipped:
            if npz_flipped is None:
                return False
            with np.load(npz_flipped) as data:
                return "latents" in data.files and data["latents"].shape[1:] == expected
    except (OSError, ValueError):
        return False
    return True


def prepare_items(dataset: BucketedDataset, items: list[ImageItem], source: str) -> None:
    """Per dataset, as sd-scripts: buckets from ``train_resolution`` when every entry has one, and latents from
    the ``.npz`` files when every entry has usable ones (see the module docstring)."""
    entries = [item for item in items if item.subset.metadata_file]
    if not entries:
        return
    settings = dataset.settings
    use_train_resolution = all(item.train_resolution is not None for item in entries)
    if use_train_resolution:
        if settings.bucket_no_upscale:
            raise ValueError(f"{source}: bucket_no_upscale cannot be used when the metadata gives every image's "
                             "train_resolution (the buckets were computed when the metadata was prepared)")
        if not settings.enable_bucket:
            logger.info("%s: the metadata gives bucket resolutions (train_resolution); bucketing is on", source)
        settings.enable_bucket = True
        for item in entries:
            item.bucket = BucketChoice(item.train_resolution, item.train_resolution, 0.0)

    cacheable = not any(item.subset.color_aug or item.subset.random_crop for item in entries)
    with_npz = [item for item in entries if item.npz_files[0] is not None]
    use_npz = cacheable and use_train_resolution and bool(with_npz) and all(_npz_fits(item) for item in entries)
    if with_npz and not use_npz:
        logger.warning("%s: the .npz latents next to the metadata's images are not used (missing for some images, "
                       "no train_resolution, another size, no flipped latents, or color_aug/random_crop)", source)
    for item in entries:
        if use_npz:
            item.latents_npz = item.npz_files[0]
        elif not item.has_image:
            raise FileNotFoundError(f"{item.subset.metadata_file}: key {item.path!r} has only .npz latents, which "
                                    "cannot be used here (see the warning above); its image is needed")


def load_npz_latents(item: ImageItem, flip: bool) -> torch.Tensor:
    """The latents (C, h, w float32) of an entry from its sd-scripts ``.npz`` (the flipped ones when ``flip``)."""
    npz, npz_flipped = item.npz_files
    with np.load(npz) as data:
        if not flip:
            return torch.from_numpy(data["latents"].astype(np.float32))
        if "latents_flipped" in data.files:
            return torch.from_numpy(data["latents_flipped"].astype(np.float32))
    with np.load(npz_flipped) as data:
        return torch.from_numpy(data["latents"].astype(np.float32))
