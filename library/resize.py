"""Resizing training images as sd-scripts does (``--resize_interpolation``, dataset key ``resize_interpolation``).

Without a method, sd-scripts (``library/utils.py: resize_image``) uses "area" when the image shrinks or keeps its
size on both sides, and "lanczos" when either side grows; so does :func:`resize_image`. sd-scripts resizes with
OpenCV for some methods; OpenCV is no dependency here, so every method runs on PIL or NumPy:

==================  =======================================  ==============================================
method              sd-scripts                               here
==================  =======================================  ==============================================
lanczos             PIL ``LANCZOS``                           PIL ``LANCZOS`` (the same)
box                 PIL ``BOX``                               PIL ``BOX`` (the same)
nearest             ``cv2.INTER_NEAREST_EXACT``               PIL ``NEAREST`` (OpenCV documents equal results)
area                ``cv2.INTER_AREA``                        :func:`area_resize`: each output pixel is the
                                                              mean of the source area it covers, partial
                                                              pixels weighted by their covered fraction (what
                                                              INTER_AREA computes when shrinking; for integer
                                                              factors it equals PIL's ``Image.reduce``)
bilinear, linear    ``cv2.INTER_LINEAR``                      PIL ``BILINEAR``: differs when shrinking (PIL
                                                              averages over the whole footprint, OpenCV
                                                              samples 2x2 pixels)
bicubic, cubic      ``cv2.INTER_CUBIC``                       PIL ``BICUBIC``: differs (PIL's kernel has
                                                              a = -0.5, OpenCV's -0.75; PIL low-passes when
                                                              shrinking)
==================  =======================================  ==============================================

Cost: PIL's filters as documented by PIL. :func:`area_resize` reads each source pixel once per axis (a weighted sum
of the few source rows under each output row, in float64), so its extra memory is the float64 image at the output's
height (and a few source rows at a time), never a float copy of the whole source image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# The values sd-scripts accepts on the command line; the dataset-config key also takes "box".
COMMAND_LINE_METHODS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")
METHODS = (*COMMAND_LINE_METHODS, "box")

_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
}


def default_method(size: tuple[int, int], new_size: tuple[int, int]) -> str:
    """sd-scripts' choice without ``--resize_interpolation``: "area" when neither side grows, else "lanczos"."""
    return "area" if size[0] >= new_size[0] and size[1] >= new_size[1] else "lanczos"


def resize_image(image: Image.Image, new_size: tuple[int, int], method: str | None = None) -> Image.Image:
    """``image`` resized to ``new_size`` (width, height) with ``method`` (None: :func:`default_method`)."""
    if image.size == tuple(new_size):
        return image
    method = method or default_method(image.size, new_size)
    if method == "area":
        return area_resize(image, new_size)
    try:
        return image.resize(tuple(new_size), _PIL_FILTERS[method])
    except KeyError:
        raise ValueError(f"resize_interpolation: expected one of {', '.join(METHODS)}, got {method!r}") from None


def _area_integrals(pixels: np.ndarray, new_length: int, axis: int) -> np.ndarray:
    """Sums of ``pixels`` along ``axis`` over ``new_length`` equal intervals covering it, each source pixel weighted
    by the length of its overlap with the interval (1 for pixels inside it): one weighted row sum per output row."""
    moved = np.moveaxis(pixels, axis, 0)
    length = moved.shape[0]
    edges = np.arange(new_length + 1) * length / new_length  # exact where an edge falls on a pixel border
    sums = np.empty((new_length, *moved.shape[1:]))
    for i in range(new_length):
        start, end = edges[i], edges[i + 1]
        rows = np.arange(int(start), min(int(np.ceil(end)), length))  # the source rows that overlap [start, end)
        weights = np.minimum(rows + 1, end) - np.maximum(rows, start)
        sums[i] = np.tensordot(weights, moved[rows[0]:rows[-1] + 1], axes=1)
    return np.moveaxis(sums, 0, axis)


def area_resize(image: Image.Image, new_size: tuple[int, int]) -> Image.Image:
    """Pixel-area resampling (OpenCV's ``INTER_AREA`` when shrinking), rounded half up like PIL's ``reduce``."""
    width, height = image.size
    new_width, new_height = new_size
    pixels = np.asarray(image)
    sums = _area_integrals(_area_integrals(pixels, new_height, 0), new_width, 1)
    mean = sums / ((width * height) / (new_width * new_height))
    result = np.clip(np.floor(mean + 0.5), 0, 255).astype(np.uint8)
    return Image.fromarray(result, mode=image.mode)
