"""Training data: images, captions, augmentation, buckets and batches from the resolved dataset settings.

``build_dataset(args)`` returns a :class:`DatasetGroup`, a ``torch.utils.data.Dataset`` whose items are whole
batches from one bucket (see docs/ARCHITECTURE.md for the batch contract). The loop uses it as::

    dataset = build_dataset(args)
    if args.cache_latents:
        dataset.cache_latents(vae, args.cache_latents_to_disk, device, vae_dtype, args.vae_batch_size)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=lambda b: b[0], ...)
    for epoch in range(first_epoch, num_epochs):
        dataset.set_current_epoch(epoch + 1)      # sd-scripts numbers epochs from 1; call before iterating
        for batch in loader: ...

The sources (``--dataset_config``, ``--in_json``, DreamBooth folders), the config schema and the precedence of
settings live in ``library.dataset_config``; the ``ss_*`` summaries of a dataset in ``library.metadata``.
Regularization images are repeated or cut so that they count as many as the training images (images × repeats),
like sd-scripts.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from library import finetune_dataset, latents as latent_cache, masks, upstream_flags
from library.buckets import BucketChoice, BucketManager, adjust_min_max_bucket_reso, crop_box
from library.dataset_config import (
    DatasetSettings,
    SubsetSettings,
    resolve_settings,
    subset_name,
    user_config_from_args,
)
from library.errors import UserInputError
from library.resize import resize_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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

    def log_summary(self) -> None:
        """Log the image counts and buckets."""
        logger.info("training images (× repeats): %d, regularization images (× repeats): %d, batches per epoch: %d",
                    self.num_train_images, self.num_reg_images, len(self))
        counts: Counter = Counter()
        for dataset in self.datasets:
            counts.update({bucket: len(members) for bucket, members in dataset.buckets.items()})
        for (width, height), count in sorted(counts.items()):
            logger.info("bucket %dx%d: %d images (× repeats)", width, height, count)

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


def build_dataset(args: Any) -> DatasetGroup:
    """The training data described by ``args`` (``--dataset_config``, or ``--train_data_dir``/``--reg_data_dir``)."""
    user_config, source = user_config_from_args(args)
    resolved = resolve_settings(user_config, args, source)
    masks.warn_if_unused([s for d in resolved for s in d.subsets], bool(getattr(args, "masked_loss", False)))
    datasets = [BucketedDataset(settings, source) for settings in resolved]
    corrupt = [path for d in datasets for path in d.corrupt]
    if corrupt:
        logger.warning("skipping %d unreadable image(s): %s", len(corrupt), ", ".join(corrupt))
    datasets = [d for d in datasets if d.items]
    if not datasets:
        dirs = [s.metadata_file or s.image_dir for settings in resolved for s in settings.subsets]
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

