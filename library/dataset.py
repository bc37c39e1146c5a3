"""Training data: DreamBooth folders and ``--dataset_config``, captions, augmentation, buckets, batches.

``build_dataset(args)`` returns a :class:`DatasetGroup`, a ``torch.utils.data.Dataset`` whose items are whole
batches from one bucket (see docs/ARCHITECTURE.md for the batch contract). The loop uses it as::

    dataset = build_dataset(args)
    if args.cache_latents:
        dataset.cache_latents(vae, args.cache_latents_to_disk, device, vae_dtype, args.vae_batch_size)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=lambda b: b[0], ...)
    for epoch in range(first_epoch, num_epochs):
        dataset.set_current_epoch(epoch + 1)      # sd-scripts numbers epochs from 1; call before iterating
        for batch in loader: ...

Sources, as in sd-scripts:

* ``--dataset_config`` TOML: ``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``; each setting is taken
  from the subset, else its dataset, else ``[general]``, else the command line, else the default. Unknown keys,
  wrong types and a subset without ``image_dir`` are errors naming the file and the key. A subset with
  ``metadata_file`` is a fine-tuning subset (captions, buckets and latents from sd-scripts' metadata JSON, see
  ``library.finetune_dataset``); a dataset's subsets are all of one kind, and both kinds mix across datasets.
* ``--in_json`` (without ``--dataset_config``): one fine-tuning subset, its images in ``--train_data_dir``.
* otherwise ``--train_data_dir`` with ``<repeats>_<class tokens>`` folders (``10_sks dog``), and
  ``--reg_data_dir`` the same for regularization images. Regularization images are repeated or cut so that
  they count as many as the training images (images × repeats), like sd-scripts.

Images: PNG/JPEG/WebP/BMP (any case), opened with PIL as RGB, resized to cover their bucket keeping the aspect ratio
(``resize_interpolation``; by default area when shrinking, Lanczos when enlarging, as sd-scripts: see
``library.resize``), then centre-cropped (``random_crop``: a random crop) — see ``library.buckets`` for how buckets
are chosen and what happens to images smaller than the buckets. Unreadable or truncated files are skipped with one
warning listing them. SDXL size conditioning per image: ``original_sizes_hw`` is the file's size;
``crop_top_lefts`` is where the crop starts in the resized image (the SDXL paper's and diffusers' definition,
mirrored when the image is flipped; sd-scripts instead reports the offset the image would have if fitted inside
the bucket); ``target_sizes_hw`` is the bucket.
Loss masks (``alpha_mask``, mask images in ``conditioning_data_dir``) follow their image through resize, crop
and flip: see ``library.masks``.

Determinism: the batch order of an epoch depends only on ``args.seed`` and the epoch; the random choices for one
image (flip, crop, caption shuffle/dropout) only on the seed, epoch, batch index and position in the batch, so
results do not depend on the number of DataLoader workers. The epoch lives in shared memory, so persistent
workers see ``set_current_epoch``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import toml
import torch
import voluptuous as vol
from PIL import Image, ImageOps

from library import finetune_dataset, latents as latent_cache, masks, upstream_flags
from library.buckets import BucketChoice, BucketManager, adjust_min_max_bucket_reso, crop_box
from library.config import parse_resolution
from library.errors import UserInputError
from library.resize import METHODS as RESIZE_METHODS, resize_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class SubsetSettings:
    """One folder of images and how its images and captions are treated (sd-scripts' subset options)."""

    image_dir: str | None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | str | None = None  # accepted for compatibility; see _check_subset
    metadata_file: str | None = None  # a fine-tuning subset (library/finetune_dataset.py); image_dir may be None
    alpha_mask: bool = False  # the images' alpha channel is the loss mask (library.masks)
    conditioning_data_dir: str | None = None  # mask images for --masked_loss (library.masks)
    resize_interpolation: str | None = None  # None: area when shrinking, lanczos when enlarging (library.resize)


@dataclass
class DatasetSettings:
    """One ``[[datasets]]`` entry: resolution ``(w, h)``, batch size, bucketing, and its subsets."""

    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    subsets: list[SubsetSettings] = field(default_factory=list)


# Subset settings that only a subset sets: no command-line flag, [general] or [[datasets]] value gives them
# (sd-scripts' --conditioning_data_dir, for one, is not read by its train_network.py).
SUBSET_ONLY_SETTINGS = ("image_dir", "metadata_file", "is_reg", "conditioning_data_dir")
# Command-line attribute for a setting whose flag has another name than its config key.
# --dataset_repeats gives the repeats of subsets without num_repeats, as in sd-scripts.
_ARGPARSE_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}

_NUMBER = vol.Any(float, int, msg="expected a number")
_RATE = vol.All(_NUMBER, vol.Range(min=0, max=1))
_POSITIVE_INT = vol.All(int, vol.Range(min=1))
_NON_NEGATIVE_INT = vol.All(int, vol.Range(min=0))
_FLOAT_PAIR = vol.All(vol.ExactSequence([_NUMBER, _NUMBER], msg="expected two numbers [low, high]"), vol.Coerce(tuple))
_RESOLUTION = vol.Any(
    _POSITIVE_INT,
    vol.ExactSequence([_POSITIVE_INT, _POSITIVE_INT]),
    msg="expected an integer or [width, height]",
)

# Subset options that may also be given for a whole dataset or in [general].
_SUBSET_ASCENDABLE = {
    "num_repeats": _POSITIVE_INT,
    "class_tokens": str,
    "caption_extension": str,
    "shuffle_caption": bool,
    "caption_separator": str,
    "keep_tokens": _NON_NEGATIVE_INT,
    "keep_tokens_separator": str,
    "secondary_separator": str,
    "enable_wildcard": bool,
    "caption_prefix": str,
    "caption_suffix": str,
    "caption_dropout_rate": _RATE,
    "caption_dropout_every_n_epochs": _NON_NEGATIVE_INT,
    "caption_tag_dropout_rate": _RATE,
    "token_warmup_min": _NON_NEGATIVE_INT,
    "token_warmup_step": vol.All(_NUMBER, vol.Range(min=0)),
    "flip_aug": bool,
    "color_aug": bool,
    "random_crop": bool,
    "face_crop_aug_range": _FLOAT_PAIR,
    "resize_interpolation": vol.In(RESIZE_METHODS, msg="expected one of " + ", ".join(RESIZE_METHODS)),
}
_SUBSET_ONLY = {
    "image_dir": str, "is_reg": bool, "metadata_file": str, "alpha_mask": bool, "conditioning_data_dir": str,
}
_DATASET_ASCENDABLE = {
    "resolution": _RESOLUTION,
    "batch_size": _POSITIVE_INT,
    "enable_bucket": bool,
    "min_bucket_reso": _POSITIVE_INT,
    "max_bucket_reso": _POSITIVE_INT,
    "bucket_reso_steps": _POSITIVE_INT,
    "bucket_no_upscale": bool,
}
# sd-scripts options this trainer does not implement (library.upstream_flags): accepted by the schema, then refused
# with the registry's message, or warned about as without effect.
_UNSUPPORTED = tuple(upstream_flags.dataset_keys_with(upstream_flags.Status.REFUSED))
_IGNORED = tuple(key for key in upstream_flags.dataset_keys_with(upstream_flags.Status.NO_EFFECT)
                 if key not in _SUBSET_ASCENDABLE)  # face_crop_aug_range: BucketedDataset._check_subset
_ACCEPTED_LATER = {vol.Optional(key): object for key in _UNSUPPORTED + _IGNORED}

_SUBSET_SCHEMA = {**_SUBSET_ASCENDABLE, **_SUBSET_ONLY, **_ACCEPTED_LATER}
_DATASET_SCHEMA = {**_DATASET_ASCENDABLE, **_SUBSET_ASCENDABLE, **_ACCEPTED_LATER, "subsets": [_SUBSET_SCHEMA]}
_GENERAL_SCHEMA = {**_DATASET_ASCENDABLE, **_SUBSET_ASCENDABLE, **_ACCEPTED_LATER}
_USER_CONFIG_SCHEMA = vol.Schema({"general": _GENERAL_SCHEMA, "datasets": [_DATASET_SCHEMA]})


def _key_path(path: list[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _value_at(data: Any, path: list[Any]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _describe_invalid(error: vol.Invalid, data: dict, source: str) -> str:
    where = _key_path(error.path)
    if error.error_message == "extra keys not allowed":
        return f"{source}: unknown key '{where}'"
    if error.error_message == "required key not provided":
        return f"{source}: '{_key_path(error.path[:-1])}' has no '{error.path[-1]}' (required)"
    value = _value_at(data, error.path)
    return f"{source}: key '{where}': {error.error_message}, got {type(value).__name__} {value!r}"


def validate_dataset_config(config: dict, source: str) -> dict:
    """Check a ``--dataset_config`` dictionary against the schema; every problem found is listed in one error
    naming ``source`` (the file) and the key."""
    try:
        validated = _USER_CONFIG_SCHEMA(config)
    except vol.MultipleInvalid as err:
        problems = sorted({_describe_invalid(e, config, source) for e in err.errors})
        raise ValueError("invalid dataset config:\n  " + "\n  ".join(problems)) from None
    sections = [("general", validated.get("general", {}))]
    for i, dataset in enumerate(validated.get("datasets", [])):
        sections.append((f"datasets[{i}]", dataset))
        sections += [(f"datasets[{i}].subsets[{j}]", s) for j, s in enumerate(dataset.get("subsets", []))]
    for where, section in sections:
        for key in section:
            if key in _UNSUPPORTED:
                raise ValueError(f"{source}: '{where}.{key}' is an sd-scripts option this trainer does not support: "
                                 f"{upstream_flags.DATASET_KEYS[key].note}")
            if key in _IGNORED:
                logger.warning("%s: '%s.%s' has no effect here: %s", source, where, key,
                               upstream_flags.DATASET_KEYS[key].note)
    for i, dataset in enumerate(validated.get("datasets", [])):
        _check_subset_kinds(dataset.get("subsets", []), source, f"datasets[{i}]")
    return validated


# DreamBooth-only subset keys, an error in a fine-tuning (metadata_file) subset as in sd-scripts' schema.
_DREAMBOOTH_ONLY = ("is_reg", "class_tokens", "caption_extension")


def _check_subset_kinds(subsets: list[dict], source: str, where: str) -> None:
    """As in sd-scripts, a dataset's subsets are all DreamBooth (``image_dir``) or all fine-tuning
    (``metadata_file``, with an optional ``image_dir``)."""
    kinds = {"metadata_file" in subset for subset in subsets}
    if len(kinds) > 1:
        raise ValueError(f"{source}: {where} mixes subsets with and without metadata_file; put the fine-tuning "
                         "(metadata_file) subsets and the DreamBooth (image_dir) subsets in separate [[datasets]]")
    for j, subset in enumerate(subsets):
        if "metadata_file" in subset:
            wrong = [key for key in _DREAMBOOTH_ONLY if key in subset]
            if wrong:
                raise ValueError(f"{source}: '{where}.subsets[{j}]': {', '.join(wrong)} cannot be used with "
                                 "metadata_file (DreamBooth subsets only)")
        elif "image_dir" not in subset:
            raise ValueError(f"{source}: '{where}.subsets[{j}]' has no 'image_dir' (required) and no 'metadata_file'")


def load_dataset_config(path: str | os.PathLike) -> dict:
    """Read and validate a ``--dataset_config`` TOML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset config file not found: {path}")
    try:
        config = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"dataset config {path} is not valid TOML: {err}") from None
    return validate_dataset_config(config, str(path))


def _parse_dreambooth_folder_name(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` → ``(10, "sks dog")``; ``None`` when the name has no numeric repeats prefix."""
    prefix, _, class_tokens = name.partition("_")
    try:
        repeats = int(prefix)
    except ValueError:
        return None
    return repeats, class_tokens


def dreambooth_subsets(base_dir: str | os.PathLike, is_reg: bool) -> list[dict]:
    """Subset configs for the ``<repeats>_<class tokens>`` folders in ``base_dir`` (sorted by name).

    Folders without a numeric prefix or with fewer than one repeat are skipped with a warning; a missing
    ``base_dir`` or one without any usable folder is an error naming it.
    """
    flag = "--reg_data_dir" if is_reg else "--train_data_dir"
    base = Path(base_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"{flag} {base} does not exist or is not a directory")
    subsets = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        parsed = _parse_dreambooth_folder_name(folder.name)
        if parsed is None or parsed[0] < 1:
            logger.warning("%s: skipping folder '%s': its name does not start with '<repeats>_' (e.g. '10_sks dog')",
                           flag, folder)
            continue
        repeats, class_tokens = parsed
        subsets.append(
            {"image_dir": str(folder), "num_repeats": repeats, "class_tokens": class_tokens, "is_reg": is_reg}
        )
    if not subsets:
        raise ValueError(f"{flag} {base} contains no '<repeats>_<class tokens>' folders (e.g. '10_sks dog')")
    return subsets


def _resolution(value: Any, where: str) -> tuple[int, int]:
    """A resolution from the config (``512`` or ``[w, h]``, already validated) or the command line
    (``"512"`` / ``"512,768"``) as ``(width, height)``."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return parse_resolution(value, flag=where)


def _lookup(name: str, levels: list[dict], args: Any, default: Any) -> Any:
    """The first value set (not None): config levels in order, then the command line, then ``default``."""
    for level in levels:
        if level.get(name) is not None:
            return level[name]
    value = getattr(args, _ARGPARSE_NAMES.get(name, name), None)
    if name == "caption_extension" and getattr(args, "caption_extention", None) is not None:
        value = args.caption_extention  # sd-scripts' old misspelled flag wins when given
    return default if value is None else value


def resolve_settings(user_config: dict, args: Any, source: str) -> list[DatasetSettings]:
    """Apply the precedence subset → dataset → general → command line → default to a validated config."""
    general = user_config.get("general", {})
    datasets = user_config.get("datasets", [])
    if not datasets:
        raise ValueError(f"{source}: no [[datasets]] defined")
    resolved = []
    for i, dataset in enumerate(datasets):
        if not dataset.get("subsets"):
            raise ValueError(f"{source}: datasets[{i}] has no [[datasets.subsets]]")
        values = {
            f.name: _lookup(f.name, [dataset, general], args, f.default)
            for f in fields(DatasetSettings)
            if f.name not in ("resolution", "subsets")
        }
        resolution = _lookup("resolution", [dataset, general], args, None)
        if resolution is None:
            raise ValueError(f"{source}: datasets[{i}] has no resolution (set --resolution, or resolution in "
                             "[general] or [[datasets]])")
        settings = DatasetSettings(resolution=_resolution(resolution, f"{source}: datasets[{i}] resolution"), **values)
        for subset in dataset["subsets"]:
            subset_values = {
                f.name: _lookup(f.name, [subset, dataset, general], args, f.default)
                for f in fields(SubsetSettings)
                if f.name not in SUBSET_ONLY_SETTINGS
            }
            subset_values.update({name: subset.get(name) for name in SUBSET_ONLY_SETTINGS})
            subset_values["is_reg"] = bool(subset_values["is_reg"])
            settings.subsets.append(SubsetSettings(**subset_values))
        resolved.append(settings)
    return resolved


# --------------------------------------------------------------------------------------------------------------
# Images and captions


def list_images(image_dir: Path) -> list[Path]:
    """Image files directly in ``image_dir`` (sd-scripts' extensions, any case), sorted by path."""
    return sorted(p for p in image_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_caption(image_path: Path, caption_extension: str, enable_wildcard: bool) -> str | None:
    """The caption of an image from ``<stem><caption_extension>``, or ``None`` without such a file.

    The first line is used; with ``enable_wildcard`` all non-empty lines are kept (one is picked per step).
    The file must be UTF-8 and not empty.
    """
    caption_path = Path(os.path.splitext(image_path)[0] + caption_extension)
    if not caption_path.is_file():
        return None
    try:
        lines = caption_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"caption file {caption_path} is not UTF-8 ({err.reason} at byte {err.start})") from None
    lines = [line.strip() for line in lines]
    if not lines:
        raise ValueError(f"caption file {caption_path} is empty")
    return "\n".join(line for line in lines if line) if enable_wildcard else lines[0]


def probe_image(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of a readable image, or ``None`` when the file is corrupt or truncated.

    The image is decoded (JPEGs at reduced scale, which still reads all the data), so damage is found here and
    not in the middle of training.
    """
    try:
        with Image.open(path) as image:
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
        return size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB; a file that cannot be decoded is an error naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float32 tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def color_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' ``color_aug``: with probability 1/3, either shift the hue by up to ±8/180 of the colour
    circle or apply a gamma in [0.95, 1.05] (half the time each)."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        hsv = np.array(image.convert("HSV"), dtype=np.int32)
        hsv[..., 0] = (hsv[..., 0] + round(rng.uniform(-8, 8) * 256 / 180)) % 256
        return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    array = 255.0 * (np.asarray(image, dtype=np.float32) / 255.0) ** gamma
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "RGB")


def _replace_wildcards(caption: str, rng: random.Random) -> str:
    """One line of a multi-line caption, then ``{a|b|c}`` → one of the options (``{{``/``}}`` are literal)."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "\x00", "\x01"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def process_caption(
    caption: str,
    subset: SubsetSettings,
    rng: random.Random,
    epoch: int,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """Apply a subset's caption options, with sd-scripts' semantics and order.

    1. ``caption_prefix`` / ``caption_suffix`` are added (separated by a space).
    2. The whole caption becomes ``""`` with probability ``caption_dropout_rate``, and in every epoch divisible
       by ``caption_dropout_every_n_epochs``.
    3. Wildcards (``enable_wildcard``) or the first line.
    4. With ``shuffle_caption``, ``caption_tag_dropout_rate`` or ``token_warmup_step``: the caption is split on
       ``caption_separator``; the first ``keep_tokens`` tags stay first (or everything before
       ``keep_tokens_separator`` stays first, and everything after a second one stays last); the others are
       shuffled, truncated by the token warm-up, and each dropped with ``caption_tag_dropout_rate``; tags are
       joined with ``", "``.
    5. ``secondary_separator`` is replaced by ``caption_separator``.
    """
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}"
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}"

    drop = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if drop or (every > 0 and epoch % every == 0):
        return ""

    caption = _replace_wildcards(caption, rng) if subset.enable_wildcard else caption.split("\n")[0]

    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or subset.token_warmup_step > 0:
        separator = subset.caption_separator
        fixed, flex, fixed_suffix = [], [], []
        keep_separator = subset.keep_tokens_separator
        if keep_separator and keep_separator in caption:
            fixed_part, flex_part = caption.split(keep_separator, 1)
            if keep_separator in flex_part:
                flex_part, suffix_part = flex_part.split(keep_separator, 1)
                fixed_suffix = [t.strip() for t in suffix_part.split(separator) if t.strip()]
            fixed = [t.strip() for t in fixed_part.split(separator) if t.strip()]
            flex = [t.strip() for t in flex_part.split(separator) if t.strip()]
        else:
            flex = [t.strip() for t in caption.strip().split(separator)]
            if subset.keep_tokens > 0:
                fixed, flex = flex[: subset.keep_tokens], flex[subset.keep_tokens :]

        warmup_steps = subset.token_warmup_step
        if 0 < warmup_steps < 1:
            warmup_steps = math.floor(warmup_steps * max_train_steps)
        if warmup_steps and step < warmup_steps:
            length = math.floor(step * (len(flex) - subset.token_warmup_min) / warmup_steps) + subset.token_warmup_min
            flex = flex[:length]

        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_suffix)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


# --------------------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class ImageItem:
    """One training image: where it is, its caption (before per-step processing), its subset, how many times it
    is seen per epoch, its size on disk ``(w, h)`` and its bucket."""

    path: str
    caption: str
    subset: SubsetSettings
    num_repeats: int
    size: tuple[int, int]
    bucket: BucketChoice | None = None
    # fine-tuning metadata entries only (library/finetune_dataset.py)
    tags: str | None = None  # the tags counted in ss_tag_frequency
    train_resolution: tuple[int, int] | None = None
    npz_files: tuple[str | None, str | None] = (None, None)  # sd-scripts' <key>.npz and <key>_flip.npz
    has_image: bool = True
    latents_npz: str | None = None  # set when the dataset trains from those latents
    mask_path: str | None = None  # its mask image (conditioning_data_dir), see library.masks


def _scan_subset(subset: SubsetSettings, source: str) -> tuple[list[ImageItem], list[str]]:
    """The readable images of a subset with their captions, and the paths of corrupt images."""
    image_dir = Path(subset.image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{source}: image_dir {image_dir} does not exist or is not a directory")
    items, corrupt = [], []
    for path in list_images(image_dir):
        size = probe_image(path)
        if size is None:
            corrupt.append(str(path))
            continue
        caption = read_caption(path, subset.caption_extension, subset.enable_wildcard)
        if caption is None:
            caption = subset.class_tokens or ""
            if not subset.class_tokens:
                logger.warning("no caption file and no class tokens for %s: using an empty caption", path)
        items.append(ImageItem(str(path), caption, subset, subset.num_repeats, size))
    if not items and not corrupt:
        logger.warning("%s: no images in %s; this subset is skipped", source, image_dir)
    return items, corrupt


def subset_name(subset: SubsetSettings) -> str:
    """How ``ss_dataset_dirs`` / ``ss_tag_frequency`` name a subset: its metadata file's or its folder's name."""
    return os.path.basename(subset.metadata_file or subset.image_dir)


def _balance_regularization(reg_items: list[ImageItem], num_train_images: int) -> list[ImageItem]:
    """sd-scripts' balancing: take regularization images (with their repeats) in order until they count as many
    as the training images; when all are taken and they are still fewer, add one repeat to each in turn."""
    chosen: list[ImageItem] = []
    count = 0
    first_pass = True
    while reg_items and count < num_train_images:
        for item in reg_items:
            if first_pass:
                chosen.append(item)
                count += item.num_repeats
            else:
                item.num_repeats += 1
                count += 1
            if count >= num_train_images:
                break
        first_pass = False
    return chosen


class BucketedDataset:
    """The images of one ``[[datasets]]`` entry, assigned to buckets; the image list of each bucket holds every
    image ``num_repeats`` times."""

    def __init__(self, settings: DatasetSettings, source: str):
        self.settings = settings
        self.subsets: list[SubsetSettings] = []
        self.subset_image_counts: list[int] = []
        train_items: list[ImageItem] = []
        reg_items: list[ImageItem] = []
        self.corrupt: list[str] = []
        for subset in settings.subsets:
            scan = finetune_dataset.scan_subset if subset.metadata_file else _scan_subset
            items, corrupt = scan(subset, source)
            self.corrupt += corrupt
            if not items:
                continue
            if subset.conditioning_data_dir:
                masks.assign_mask_files(subset, items, list_images)
            self.subsets.append(subset)
            self.subset_image_counts.append(len(items))
            (reg_items if subset.is_reg else train_items).extend(items)
            self._check_subset(subset, source)

        self.num_train_images = sum(item.num_repeats for item in train_items)
        self.num_reg_images = sum(item.num_repeats for item in reg_items)
        if reg_items and not train_items:
            raise ValueError(f"{source}: only regularization images were found; training images are required")
        if reg_items:
            reg_items = _balance_regularization(reg_items, self.num_train_images)
        self.items = train_items + reg_items
        finetune_dataset.prepare_items(self, self.items, source)  # buckets / latents from the metadata
        # items bucketed by their metadata's train_resolution need no bucket manager (as in sd-scripts)
        needs_buckets = any(item.bucket is None for item in self.items)
        self.bucket_manager = self._make_bucket_manager(source) if needs_buckets else None
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.items):
            item.bucket = item.bucket or self.bucket_manager.select(*item.size)
            self.buckets.setdefault(item.bucket.bucket, []).extend([index] * item.num_repeats)
        self.buckets = dict(sorted(self.buckets.items()))

    def _check_subset(self, subset: SubsetSettings, source: str) -> None:
        if subset.face_crop_aug_range is not None:
            if not self.settings.enable_bucket:
                raise ValueError(f"{source}: face_crop_aug_range (subset {subset_name(subset)}): "
                                 f"{upstream_flags.FACE_CROP_NOTE}")
            logger.warning("face_crop_aug_range (subset %s) has no effect with enable_bucket, as in sd-scripts",
                           subset_name(subset))

    def _make_bucket_manager(self, source: str) -> BucketManager:
        s = self.settings
        if not s.enable_bucket:
            return BucketManager.single(s.resolution)
        try:
            min_reso, max_reso = adjust_min_max_bucket_reso(s.resolution, s.min_bucket_reso, s.max_bucket_reso,
                                                            s.bucket_reso_steps)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        if s.bucket_no_upscale:
            return BucketManager(s.resolution, s.bucket_reso_steps, no_upscale=True)
        return BucketManager.predefined(s.resolution, min_reso, max_reso, s.bucket_reso_steps)


class DatasetGroup(torch.utils.data.Dataset):
    """All datasets of a run; item ``i`` is the ``i``-th batch of the current epoch (see the module docstring)."""

    def __init__(self, datasets: list[BucketedDataset], seed: int, prior_loss_weight: float = 1.0,
                 skip_cache_check: bool = False):
        self.datasets = datasets
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.skip_cache_check = skip_cache_check
        self.max_train_steps = 0
        self._epoch = torch.ones((), dtype=torch.int64).share_memory_()
        self._step = torch.zeros((), dtype=torch.int64).share_memory_()
        self._order: tuple[int, list[tuple[int, tuple[int, int], list[int]]]] | None = None
        self._memory_latents: dict[str, latent_cache.CachedLatents] | None = None
        self._latents_on_disk = False

    # ---- sizes and metadata

    def __len__(self) -> int:
        return sum(math.ceil(len(members) / d.settings.batch_size)
                   for d in self.datasets for members in d.buckets.values())

    @property
    def num_train_images(self) -> int:
        """Training images × repeats (``ss_num_train_images``)."""
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        """Regularization images × repeats, before balancing (``ss_num_reg_images``)."""
        return sum(d.num_reg_images for d in self.datasets)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``ss_tag_frequency``: per image folder name, how many captions contain each comma-separated tag
        (lower-cased; one count per image, not per repeat)."""
        frequency: dict[str, Counter] = {}
        for dataset in self.datasets:
            for item in dataset.items:
                counter = frequency.setdefault(subset_name(item.subset), Counter())
                text = (item.tags or "") if item.subset.metadata_file else item.caption  # sd-scripts counts tags only
                counter.update(tag.strip().lower() for tag in text.split(",") if tag.strip())
        return {name: dict(counter) for name, counter in frequency.items()}

    def dataset_dirs_info(self, is_reg: bool = False) -> dict[str, dict[str, int]]:
        """``ss_dataset_dirs`` (training folders) or, with ``is_reg``, ``ss_reg_dataset_dirs``:
        ``{folder name: {"n_repeats": r, "img_count": n}}`` (the folder's own repeats, before balancing)."""
        info = {}
        for dataset in self.datasets:
            for subset, count in zip(dataset.subsets, dataset.subset_image_counts):
                if subset.is_reg == is_reg:
                    info[subset_name(subset)] = {"n_repeats": subset.num_repeats, "img_count": count}
        return info

    def bucket_info(self) -> dict[str, Any]:
        """``ss_bucket_info``: images × repeats per bucket resolution ``[w, h]``, and the mean aspect-ratio error."""
        counts: Counter = Counter()
        errors = []
        for dataset in self.datasets:
            for bucket, members in dataset.buckets.items():
                counts[bucket] += len(members)
            errors += [abs(item.bucket.aspect_ratio_error) for item in dataset.items]
        buckets = {str(i): {"resolution": list(b), "count": counts[b]} for i, b in enumerate(sorted(counts))}
        return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}

    def log_summary(self) -> None:
        """Log the image counts and buckets."""
        logger.info("training images (× repeats): %d, regularization images (× repeats): %d, batches per epoch: %d",
                    self.num_train_images, self.num_reg_images, len(self))
        for entry in self.bucket_info()["buckets"].values():
            logger.info("bucket %dx%d: %d images (× repeats)", *entry["resolution"], entry["count"])

    def verify_bucket_reso_steps(self, min_steps: int) -> None:
        """sd-scripts' check: ``bucket_reso_steps`` must be divisible by ``min_steps`` (64 for SD 1/2, 32 for SDXL)."""
        for dataset in self.datasets:
            steps = dataset.settings.bucket_reso_steps
            if dataset.settings.enable_bucket and steps % min_steps:
                raise ValueError(f"bucket_reso_steps is {steps}; it must be divisible by {min_steps} for this model")

    # ---- epochs and steps

    def set_current_epoch(self, epoch: int) -> None:
        """Select the epoch (1-based, as sd-scripts); the batch order is a function of ``seed`` and ``epoch``."""
        self._epoch.fill_(epoch)

    def set_current_step(self, step: int) -> None:
        """The global step, used by ``token_warmup_step``."""
        self._step.fill_(step)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """The run's total steps, used when ``token_warmup_step`` is a fraction."""
        self.max_train_steps = max_train_steps

    def _batches(self, epoch: int) -> list[tuple[int, tuple[int, int], list[int]]]:
        """The epoch's batches ``(dataset index, bucket, item indices)``: each bucket's list shuffled, cut into
        batches of the dataset's batch size, and all batches shuffled."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for d_index, dataset in enumerate(self.datasets):
            batch_size = dataset.settings.batch_size
            for bucket, members in dataset.buckets.items():
                members = list(members)
                rng.shuffle(members)
                batches += [(d_index, bucket, members[i : i + batch_size]) for i in range(0, len(members), batch_size)]
        rng.shuffle(batches)
        self._order = (epoch, batches)
        return batches

    # ---- examples and batches

    def _image_tensor(self, item: ImageItem, rng: random.Random | None,
                      flip: bool) -> tuple[torch.Tensor, tuple, torch.Tensor | None]:
        """The image resized and cropped to its bucket (random crop when ``rng`` is given and the subset asks for
        it), colour-augmented and flipped as chosen; its crop box in the resized image; and for ``alpha_mask``
        subsets its alpha channel moved the same way (``library.masks``; the file is decoded a second time)."""
        choice = item.bucket
        alpha = masks.read_alpha(item.path) if masks.uses_alpha_mask(item.subset) else None
        image = load_rgb(item.path)
        image = resize_image(image, choice.resized_size, item.subset.resize_interpolation)
        left_top = None
        if rng is not None and item.subset.random_crop:
            left_top = (rng.randint(0, choice.resized_size[0] - choice.bucket[0]),
                        rng.randint(0, choice.resized_size[1] - choice.bucket[1]))
        box = crop_box(choice.resized_size, choice.bucket, left_top)
        image = image.crop(box)
        if rng is not None and item.subset.color_aug:
            image = color_augment(image, rng)
        if flip:
            image = ImageOps.mirror(image)
        alpha_mask = None if alpha is None else masks.fit_mask(
            alpha, choice.resized_size, box, flip, item.subset.resize_interpolation
        )
        return to_tensor(image), box, alpha_mask

    def _cached_latents(self, item: ImageItem, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached latents for the flipped or unflipped image, and its alpha loss mask (or ``None``)."""
        if self._latents_on_disk:
            cached = latent_cache.load_latents_npz(latent_cache.latents_npz_path(item.path), item.bucket.bucket,
                                                   item.subset.flip_aug, masks.uses_alpha_mask(item.subset))
        else:
            cached = self._memory_latents[item.path]
        return cached.latents_flipped if flip else cached.latents, masks.flip_mask(cached.alpha_mask, flip)

    def _example(self, item: ImageItem, rng: random.Random, epoch: int, step: int) -> dict[str, Any]:
        choice = item.bucket
        flip = item.subset.flip_aug and rng.random() < 0.5
        if item.latents_npz is not None:  # sd-scripts' latents named by the fine-tuning metadata
            image, latents, loss_mask = None, finetune_dataset.load_npz_latents(item, flip), None
            box = crop_box(choice.resized_size, choice.bucket)
        elif self._memory_latents is not None or self._latents_on_disk:
            image, (latents, loss_mask) = None, self._cached_latents(item, flip)
            box = crop_box(choice.resized_size, choice.bucket)
        else:
            (image, box, loss_mask), latents = self._image_tensor(item, rng, flip), None
        if item.mask_path is not None:
            loss_mask = masks.mask_file_tensor(item.mask_path, choice.resized_size, box, flip,
                                               item.subset.resize_interpolation)
        left, top = box[0], box[1]
        if flip:
            left = choice.resized_size[0] - box[2]  # the crop's left edge in the mirrored image
        caption = process_caption(item.caption, item.subset, rng, epoch, step, self.max_train_steps)
        return {
            "image": image,
            "latents": latents,
            "loss_mask": loss_mask,
            "caption": caption,
            "loss_weight": self.prior_loss_weight if item.subset.is_reg else 1.0,
            "original_size_hw": (item.size[1], item.size[0]),
            "crop_top_left": (top, left),
            "target_size_hw": (choice.bucket[1], choice.bucket[0]),
            "image_key": item.path,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches")
        epoch, step = int(self._epoch), int(self._step)
        d_index, _, members = self._batches(epoch)[index]
        dataset = self.datasets[d_index]
        examples = [
            self._example(dataset.items[m], random.Random(f"{self.seed}:{epoch}:{index}:{position}"), epoch, step)
            for position, m in enumerate(members)
        ]
        cached = examples[0]["latents"] is not None
        bucket = dataset.items[members[0]].bucket.bucket
        return {
            "latents": torch.stack([e["latents"] for e in examples]) if cached else None,
            "images": None if cached else torch.stack([e["image"] for e in examples]),
            "loss_masks": masks.stack_masks([e["loss_mask"] for e in examples], (bucket[1], bucket[0])),
            "captions": [e["caption"] for e in examples],
            "loss_weights": torch.tensor([e["loss_weight"] for e in examples], dtype=torch.float32),
            "original_sizes_hw": torch.tensor([e["original_size_hw"] for e in examples], dtype=torch.long),
            "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.long),
            "target_sizes_hw": torch.tensor([e["target_size_hw"] for e in examples], dtype=torch.long),
            "image_keys": [e["image_key"] for e in examples],
        }

    # ---- latent caching

    def is_latent_cacheable(self) -> bool:
        """Latents can be cached unless a subset uses ``color_aug`` or ``random_crop`` (they change every step)."""
        return not any(s.color_aug or s.random_crop for d in self.datasets for s in d.subsets)

    def cache_latents(self, vae: torch.nn.Module, to_disk: bool, device: torch.device | str, dtype: torch.dtype,
                      batch_size: int = 1) -> None:
        """Encode every image once (and its mirror image for ``flip_aug`` subsets) and serve latents instead of
        images from now on: kept in memory, or in ``<stem>.npz`` files next to the images (``to_disk``; valid
        files are reused, see ``library.latents``). The VAE is moved to ``device``/``dtype``."""
        if not self.is_latent_cacheable():
            offending = [subset_name(s) for d in self.datasets for s in d.subsets if s.color_aug or s.random_crop]
            raise UserInputError("cache_latents / cache_latents_to_disk cannot be used with color_aug or random_crop "
                             f"(set for: {', '.join(offending)})")
        requests: dict[str, latent_cache.CacheRequest] = {}
        for dataset in self.datasets:
            for item in dataset.items:
                if item.latents_npz is not None:  # latents already, from the fine-tuning metadata
                    continue
                box = crop_box(item.bucket.resized_size, item.bucket.bucket)
                alpha = masks.uses_alpha_mask(item.subset)
                fingerprint = latent_cache.cache_fingerprint(item.path, item.bucket.bucket, item.bucket.resized_size,
                                                             box, item.subset.flip_aug, alpha)
                request = latent_cache.CacheRequest(item.path, item.bucket.bucket, item.subset.flip_aug, fingerprint,
                                                    item.size, box, alpha)
                if requests.setdefault(item.path, request) != request:
                    raise ValueError(f"image {item.path} is used by two datasets with different buckets, flip or "
                                     "alpha_mask settings; their cached latents would differ. Cache in memory or "
                                     "copy the image")
        items_by_path = {item.path: item for dataset in self.datasets for item in dataset.items}

        def load(request: latent_cache.CacheRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
            image, _, alpha_mask = self._image_tensor(items_by_path[request.image_path], None, False)
            return image, alpha_mask

        memory = latent_cache.cache_latents(
            list(requests.values()),
            load,
            vae, to_disk, device, dtype, batch_size, self.skip_cache_check,
        )
        self._latents_on_disk = to_disk
        self._memory_latents = None if to_disk else memory

    # ---- debugging

    def debug_dataset(self, max_batches: int = 10) -> None:
        """Log the first ``max_batches`` batches of the current epoch (``--debug_dataset``)."""
        self.log_summary()
        for index in range(min(max_batches, len(self))):
            batch = self[index]
            for i, key in enumerate(batch["image_keys"]):
                logger.info("batch %d: %s size(hw)=%s crop(tl)=%s target(hw)=%s weight=%.2f caption=%r", index, key,
                            batch["original_sizes_hw"][i].tolist(), batch["crop_top_lefts"][i].tolist(),
                            batch["target_sizes_hw"][i].tolist(), batch["loss_weights"][i].item(), batch["captions"][i])


def build_dataset(args: Any) -> DatasetGroup:
    """The training data described by ``args`` (``--dataset_config``, or ``--train_data_dir``/``--reg_data_dir``)."""
    if getattr(args, "dataset_config", None):
        source = str(args.dataset_config)
        user_config = load_dataset_config(args.dataset_config)
        masks.check_dataset_config(user_config, source, bool(getattr(args, "masked_loss", False)))
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, name, None)]
        if ignored:
            logger.warning("ignoring %s because --dataset_config is given", ", ".join(ignored))
    elif getattr(args, "in_json", None):  # sd-scripts' fine-tuning method: one metadata subset
        source = f"--in_json {args.in_json}"
        if getattr(args, "reg_data_dir", None):
            logger.warning("ignoring --reg_data_dir: --in_json datasets have no regularization images")
        image_dir = getattr(args, "train_data_dir", None)
        user_config = {"datasets": [{"subsets": [{"image_dir": image_dir, "metadata_file": args.in_json}]}]}
    else:
        if not getattr(args, "train_data_dir", None):
            raise ValueError("no training data: give --train_data_dir or --dataset_config")
        source = f"--train_data_dir {args.train_data_dir}"
        subsets = dreambooth_subsets(args.train_data_dir, is_reg=False)
        if getattr(args, "reg_data_dir", None):
            subsets += dreambooth_subsets(args.reg_data_dir, is_reg=True)
        user_config = {"datasets": [{"subsets": subsets}]}

    resolved = resolve_settings(user_config, args, source)
    masks.warn_if_unused([s for d in resolved for s in d.subsets], bool(getattr(args, "masked_loss", False)))
    datasets = [BucketedDataset(settings, source) for settings in resolved]
    corrupt = [path for d in datasets for path in d.corrupt]
    if corrupt:
        logger.warning("skipping %d unreadable image(s): %s", len(corrupt), ", ".join(corrupt))
    datasets = [d for d in datasets if d.items]
    if not datasets:
        dirs = [s.metadata_file or s.image_dir for settings in resolve_settings(user_config, args, source)
                for s in settings.subsets]
        raise ValueError(f"{source}: no readable images found in {', '.join(dirs)}")

    seed = getattr(args, "seed", None)
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
        logger.info("no --seed given: the dataset uses seed %d", seed)
    prior_loss_weight = getattr(args, "prior_loss_weight", None)
    group = DatasetGroup(datasets, seed, 1.0 if prior_loss_weight is None else prior_loss_weight,
                         bool(getattr(args, "skip_cache_check", False)))
    group.log_summary()
    return group

