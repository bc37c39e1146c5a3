"""Aspect-ratio buckets: predefined bucket lists, bucket choice, bucket_no_upscale, the single-resolution mode."""

import logging

import pytest

from library.buckets import BucketManager, adjust_min_max_bucket_reso, crop_box, make_bucket_resolutions


def test_bucket_resolutions_match_hand_computation():
    # Area 64*64 = 4096, sides 32..128 in steps of 16: for each width w the height is the largest multiple of 16
    # with w*h <= 4096 (capped at 128), e.g. w=48 -> 4096//48 = 85 -> 80; w=96 -> 42 -> 32.
    expected = [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]
    assert make_bucket_resolutions((64, 64), 32, 128, 16) == expected


def test_every_bucket_respects_area_and_steps():
    resos = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in resos and (256, 1024) in resos and (1024, 256) in resos
    for w, h in resos:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0
        assert 256 <= min(w, h) and max(w, h) <= 1024


def test_odd_aspect_goes_to_closest_bucket_and_covers_it():
    manager = BucketManager.predefined((64, 64), 32, 128, 16)
    # 96x64 has aspect 1.5; candidates 80/48 = 1.667 (error 0.167) and 64/64 = 1 (error 0.5) -> 80x48.
    # The image is narrower than the bucket's aspect, so widths are matched: scale 80/96, height 64*80/96 = 53.3 -> 53.
    wide = manager.select(96, 64)
    assert wide.bucket == (80, 48)
    assert wide.resized_size == (80, 53)
    assert wide.aspect_ratio_error == pytest.approx(80 / 48 - 1.5)
    # 64x96 (aspect 0.667) -> 48x80 (0.6); the image is wider than the bucket, so heights match: 64*80/96 = 53.3.
    tall = manager.select(64, 96)
    assert tall.bucket == (48, 80)
    assert tall.resized_size == (53, 80)


def test_image_with_a_bucket_size_keeps_its_size():
    manager = BucketManager.predefined((64, 64), 32, 128, 16)
    choice = manager.select(80, 48)
    assert choice.bucket == (80, 48) and choice.resized_size == (80, 48)


def test_small_image_is_upscaled_without_no_upscale():
    choice = BucketManager.predefined((64, 64), 32, 128, 16).select(20, 20)
    assert choice.bucket == (64, 64) and choice.resized_size == (64, 64)


def test_no_upscale_small_image_gets_its_own_bucket_rounded_down():
    manager = BucketManager((64, 64), steps=16, no_upscale=True)
    choice = manager.select(40, 24)  # area 960 <= 4096: not resized; 40 -> 32, 24 -> 16
    assert choice.bucket == (32, 16) and choice.resized_size == (40, 24)


def test_no_upscale_large_image_is_scaled_to_the_area_first():
    manager = BucketManager((64, 64), steps=16, no_upscale=True)
    # 200x100 (aspect 2) scaled to area 4096: 90.5 x 45.3. Rounding the width: 91 -> 80, height 40 -> 32, aspect 2.5.
    # Rounding the height: 45 -> 32, width 64 -> 64, aspect 2.0 (exact) -> resized (64, 32), bucket (64, 32).
    choice = manager.select(200, 100)
    assert choice.resized_size == (64, 32) and choice.bucket == (64, 32)


def test_no_upscale_image_smaller_than_steps_is_an_error():
    with pytest.raises(ValueError, match="smaller than bucket_reso_steps"):
        BucketManager((64, 64), steps=16, no_upscale=True).select(10, 40)


def test_single_bucket_covers_and_center_crops():
    choice = BucketManager.single((64, 64)).select(96, 64)
    assert choice.bucket == (64, 64) and choice.resized_size == (96, 64)
    assert crop_box(choice.resized_size, choice.bucket) == (16, 0, 80, 64)
    assert crop_box((96, 64), (64, 64), (5, 0)) == (5, 0, 69, 64)


def test_min_max_bucket_reso_are_rounded_to_steps(caplog):
    with caplog.at_level(logging.WARNING):
        assert adjust_min_max_bucket_reso((64, 64), 40, 100, 16) == (32, 112)
    assert "min_bucket_reso 40 adjusted to 32" in caplog.text
    assert "max_bucket_reso 100 adjusted to 112" in caplog.text


def test_resolution_outside_bucket_range_is_an_error():
    with pytest.raises(ValueError, match=r"min_bucket_reso \(128\) must be <= the smaller side"):
        adjust_min_max_bucket_reso((64, 64), 128, 256, 64)
    with pytest.raises(ValueError, match=r"max_bucket_reso \(64\) must be >= the larger side"):
        adjust_min_max_bucket_reso((128, 64), 64, 64, 64)


def test_resolution_that_buckets_round_down_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="library.buckets"):
        manager = BucketManager.predefined((63, 63), 32, 128, 32)
    assert max(w for w, h in manager.fixed if w == h) == 32  # 63x63 would fit no 64x64 bucket
    assert "resolution 63x63 is not a multiple of bucket_reso_steps 32: buckets are rounded down to multiples of 32 " \
           "(the square bucket is 32x32); use a resolution that is a multiple of 32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="library.buckets"):
        BucketManager.predefined((64, 64), 32, 128, 32)
    assert caplog.text == ""
