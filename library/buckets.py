"""Aspect-ratio buckets with kohya-ss/sd-scripts' semantics.

All sizes in this module are ``(width, height)`` pairs, as in sd-scripts.

* Predefined buckets (the default): :func:`make_bucket_resolutions` lists every ``(w, h)`` whose sides are
  multiples of ``steps`` between ``min_size`` and ``max_size`` and whose area does not exceed the training
  resolution's area (plus the square bucket). Each image goes to the bucket with the closest aspect ratio
  and is resized so that it *covers* the bucket, then cropped to it. Images smaller than their bucket are
  therefore upscaled.
* ``bucket_no_upscale``: each image gets a bucket from its own size. An image whose area exceeds the
  resolution's area is first scaled down (aspect kept) to that area; then each side is rounded *down* to a
  multiple of ``steps`` and the image is cropped to that. No image is ever upscaled, so an image smaller than
  ``min_bucket_reso`` gets a bucket smaller than ``min_bucket_reso`` (the minimum does not apply in this mode).
* Without ``enable_bucket``: a single bucket, the training resolution; every image is resized to cover it
  and cropped (sd-scripts instead requires images to be already at the resolution, or ``random_crop``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket, the size it is resized to before cropping, and the aspect error."""

    bucket: Size
    resized_size: Size
    aspect_ratio_error: float


def make_bucket_resolutions(max_reso: Size, min_size: int, max_size: int, steps: int) -> list[Size]:
    """The predefined buckets for a training resolution ``max_reso`` (sorted ``(w, h)`` list).

    The square bucket has side ``floor(sqrt(area) / steps) * steps``; for every width ``w`` from ``min_size``
    to ``max_size`` in ``steps``, the height is the largest multiple of ``steps`` keeping ``w * h <= area``
    (capped at ``max_size``), and both ``(w, h)`` and ``(h, w)`` are added when ``h >= min_size``.
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // steps) * steps)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def adjust_min_max_bucket_reso(resolution: Size, min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """Round ``min_bucket_reso`` down and ``max_bucket_reso`` up to multiples of ``steps`` (warning when
    changed) and check that the training resolution lies between them."""
    if steps <= 0:
        raise ValueError(f"bucket_reso_steps must be a positive integer, got {steps}")
    if min_reso % steps:
        adjusted = min_reso - min_reso % steps
        logger.warning("min_bucket_reso %d adjusted to %d, a multiple of bucket_reso_steps %d",
                       min_reso, adjusted, steps)
        min_reso = adjusted
    if max_reso % steps:
        adjusted = max_reso + steps - max_reso % steps
        logger.warning("max_bucket_reso %d adjusted to %d, a multiple of bucket_reso_steps %d",
                       max_reso, adjusted, steps)
        max_reso = adjusted
    if min(resolution) < min_reso:
        raise ValueError(f"min_bucket_reso ({min_reso}) must be <= the smaller side of resolution {resolution}")
    if max(resolution) > max_reso:
        raise ValueError(f"max_bucket_reso ({max_reso}) must be >= the larger side of resolution {resolution}")
    return min_reso, max_reso


class BucketManager:
    """Assigns images to buckets (see the module docstring for the three modes).

    ``fixed`` lists the allowed buckets (predefined or the single resolution); ``None`` with
    ``no_upscale=True`` means per-image buckets.
    """

    def __init__(self, max_reso: Size, steps: int, no_upscale: bool = False, fixed: list[Size] | None = None):
        if not no_upscale and not fixed:
            raise ValueError("BucketManager needs the list of buckets unless no_upscale is set")
        self.max_reso = max_reso
        self.max_area = max_reso[0] * max_reso[1]
        self.steps = steps
        self.no_upscale = no_upscale
        self.fixed = list(fixed) if fixed else []

    @classmethod
    def single(cls, resolution: Size) -> BucketManager:
        """One bucket, the training resolution (training without ``enable_bucket``)."""
        return cls(resolution, steps=1, fixed=[resolution])

    @classmethod
    def predefined(cls, resolution: Size, min_size: int, max_size: int, steps: int) -> BucketManager:
        """Buckets from :func:`make_bucket_resolutions` (``enable_bucket`` without ``bucket_no_upscale``); a
        resolution whose sides are not multiples of ``steps`` gets smaller buckets than it says, with a warning."""
        buckets = make_bucket_resolutions(resolution, min_size, max_size, steps)
        if resolution[0] % steps or resolution[1] % steps:
            side = max(w for w, h in buckets if w == h)
            logger.warning(
                "resolution %dx%d is not a multiple of bucket_reso_steps %d: buckets are rounded down to multiples "
                "of %d (the square bucket is %dx%d); use a resolution that is a multiple of %d",
                *resolution, steps, steps, side, side, steps,
            )
        return cls(resolution, steps, fixed=buckets)

    def _round_to_steps(self, x: float) -> int:
        rounded = int(x + 0.5)
        return rounded - rounded % self.steps

    def select(self, width: int, height: int) -> BucketChoice:
        """The bucket for an image of ``width`` × ``height`` pixels."""
        aspect = width / height
        if self.no_upscale:
            resized = self._no_upscale_size(width, height, aspect)
            bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if bucket[0] == 0 or bucket[1] == 0:
                raise ValueError(
                    f"image of {width}x{height} is smaller than bucket_reso_steps ({self.steps}) "
                    "and cannot be bucketed with bucket_no_upscale"
                )
        else:
            if (width, height) in self.fixed:
                bucket = (width, height)
            else:
                bucket = min(self.fixed, key=lambda b: abs(b[0] / b[1] - aspect))
            if aspect > bucket[0] / bucket[1]:
                scale = bucket[1] / height  # image wider than the bucket: match heights, crop the width
            else:
                scale = bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect)

    def _no_upscale_size(self, width: int, height: int, aspect: float) -> Size:
        """The size an image is scaled to with ``bucket_no_upscale`` (its own size unless over the max area)."""
        if width * height <= self.max_area:
            return (width, height)
        scaled_w = math.sqrt(self.max_area * aspect)
        scaled_h = self.max_area / scaled_w
        # Round one side to steps, derive the other from the aspect ratio; keep whichever distorts less.
        w_rounded = self._round_to_steps(scaled_w)
        h_for_w = self._round_to_steps(w_rounded / aspect)
        h_rounded = self._round_to_steps(scaled_h)
        w_for_h = self._round_to_steps(h_rounded * aspect)
        error_w = abs(w_rounded / h_for_w - aspect) if h_for_w else math.inf
        error_h = abs(w_for_h / h_rounded - aspect) if h_rounded else math.inf
        if error_w < error_h:
            return (w_rounded, int(w_rounded / aspect + 0.5))
        return (int(h_rounded * aspect + 0.5), h_rounded)


def crop_box(resized_size: Size, bucket: Size, left_top: Size | None = None) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box of ``bucket`` inside an image resized to ``resized_size``:
    centred, or at ``left_top`` (random crop)."""
    if left_top is None:
        left_top = ((resized_size[0] - bucket[0]) // 2, (resized_size[1] - bucket[1]) // 2)
    left, top = left_top
    return (left, top, left + bucket[0], top + bucket[1])
