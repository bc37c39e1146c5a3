"""library/resize.py: sd-scripts' default interpolation (area when shrinking, Lanczos when enlarging) and pixel-area
resampling, compared with references computed another way (block means, hand-computed overlaps, PIL's filters)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from library.resize import area_resize, default_method, resize_image


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("fy", "fx"), [(2, 2), (3, 3), (2, 3), (5, 4)])
def test_area_equals_the_block_mean_for_integer_factors(fy, fx):
    image = random_image(60, 120)
    pixels = np.asarray(image, dtype=np.int64)
    blocks = pixels.reshape(60 // fy, fy, 120 // fx, fx, 3).sum(axis=(1, 3))
    reference = np.floor(blocks / (fy * fx) + 0.5)  # the mean, rounded half up
    got = np.asarray(area_resize(image, (120 // fx, 60 // fy)))
    np.testing.assert_array_equal(got, reference)
    # PIL's own box reduce agrees up to its fixed-point rounding (at most 1 level)
    pil = np.asarray(image.reduce((fx, fy)), dtype=np.int64)
    assert np.abs(pil - got).max() <= 1


def overlap_reference(pixels: np.ndarray, new_height: int, new_width: int) -> np.ndarray:
    """Each output pixel: sum of source pixels times the area of overlap with its footprint, over the footprint's
    area; written as plain loops."""
    height, width = pixels.shape[:2]
    sy, sx = height / new_height, width / new_width
    out = np.zeros((new_height, new_width) + pixels.shape[2:])
    for i in range(new_height):
        for j in range(new_width):
            total = 0.0
            for y in range(height):
                wy = max(0.0, min(y + 1, (i + 1) * sy) - max(y, i * sy))
                for x in range(width):
                    wx = max(0.0, min(x + 1, (j + 1) * sx) - max(x, j * sx))
                    total = total + wy * wx * pixels[y, x].astype(np.float64)
            out[i, j] = total / (sy * sx)
    return out


def test_area_weighs_partly_covered_pixels_by_the_covered_fraction():
    row = Image.fromarray(np.array([[0, 30, 60]], dtype=np.uint8), mode="L")
    # 3 -> 2 pixels: each output covers 1.5 inputs: (0 + 30 / 2) / 1.5 = 10 and (30 / 2 + 60) / 1.5 = 50
    np.testing.assert_array_equal(np.asarray(area_resize(row, (2, 1))), [[10, 50]])
    image = random_image(13, 17, seed=1)
    got = np.asarray(area_resize(image, (7, 5)), dtype=np.float64)
    reference = overlap_reference(np.asarray(image), 5, 7)
    assert np.abs(got - reference).max() <= 0.5 + 1e-9  # rounding only


def test_default_is_area_when_shrinking_and_lanczos_when_enlarging():
    image = random_image(40, 60)
    assert default_method((60, 40), (30, 20)) == "area" and default_method((60, 40), (60, 40)) == "area"
    assert default_method((60, 40), (30, 80)) == "lanczos" and default_method((60, 40), (90, 60)) == "lanczos"
    assert np.array_equal(np.asarray(resize_image(image, (30, 20))), np.asarray(area_resize(image, (30, 20))))
    for size in ((90, 60), (30, 80)):  # both sides grow; one side grows
        expected = image.resize(size, Image.Resampling.LANCZOS)
        assert np.array_equal(np.asarray(resize_image(image, size)), np.asarray(expected))
    assert resize_image(image, (60, 40)) is image


@pytest.mark.parametrize(("method", "pil_filter"), [("lanczos", Image.Resampling.LANCZOS),
                                                    ("nearest", Image.Resampling.NEAREST),
                                                    ("bilinear", Image.Resampling.BILINEAR),
                                                    ("linear", Image.Resampling.BILINEAR),
                                                    ("bicubic", Image.Resampling.BICUBIC),
                                                    ("cubic", Image.Resampling.BICUBIC),
                                                    ("box", Image.Resampling.BOX)])
def test_named_methods_use_their_pil_filter(method, pil_filter):
    image = random_image(40, 60)
    for size in ((25, 17), (90, 70)):
        assert np.array_equal(np.asarray(resize_image(image, size, method)),
                              np.asarray(image.resize(size, pil_filter)))


def test_an_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="resize_interpolation: expected one of .*got 'sinc'"):
        resize_image(random_image(8, 8), (4, 4), "sinc")
