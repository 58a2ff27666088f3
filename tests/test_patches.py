"""Three-magnification sampling on a real HER2+ slide, checked against direct crops."""

import numpy as np
import pytest

from napari_m2ort.io.slides import open_slide
from napari_m2ort.patches import area_downsample, model_inputs, sample_spots
from napari_m2ort.slide import open_image


@pytest.fixture(scope="module")
def c2_jpeg(her2st):
    return her2st / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"


@pytest.fixture(scope="module")
def c2_pixels(c2_jpeg):
    with open_image(c2_jpeg) as im:
        return np.asarray(im.convert("RGB"))


def test_level1_matches_direct_crop_and_levels_share_fov(c2_jpeg, c2_pixels):
    slide = open_slide(c2_jpeg, mpp=0.69)
    centers_px = np.array([[6930.58, 3510.24], [4000.0, 5000.0], [6674.96, 3517.82]])
    patches = sample_spots(slide, centers_px * 0.69, mpp=0.69)
    assert patches.level1.shape == (3, 224, 224, 3)
    level2, level3 = area_downsample(patches.level1, 2), area_downsample(patches.level1, 4)
    assert level2.shape == (3, 112, 112, 3) and level3.shape == (3, 56, 56, 3)
    for k, (cx, cy) in enumerate(centers_px):
        x0, y0 = int(round(cx - 112)), int(round(cy - 112))
        direct = c2_pixels[y0 : y0 + 224, x0 : x0 + 224]
        assert np.array_equal(patches.level1[k], direct)
        # levels 2 and 3 are the same field of view at half and quarter resolution
        d2 = direct.reshape(112, 2, 112, 2, 3).mean((1, 3))
        d4 = direct.reshape(56, 4, 56, 4, 3).mean((1, 3))
        assert np.abs(level2[k].astype(float) - d2).max() <= 0.5 + 1e-9
        assert np.abs(level3[k].astype(float) - d4).max() <= 0.5 + 1e-9
    assert not patches.outside.any()
    assert not patches.blank[0]  # spot on tissue


def test_resampling_when_slide_resolution_differs(c2_jpeg, c2_pixels):
    # Pretend the scan is at half the model's µm/px: the field of view must cover
    # twice as many file pixels and be resampled down to 224.
    slide = open_slide(c2_jpeg, mpp=0.345)
    cx, cy = 5000.0, 5000.0
    p = sample_spots(slide, np.array([[cx * 0.345, cy * 0.345]]), mpp=0.69)
    direct = c2_pixels[int(cy) - 224 : int(cy) + 224, int(cx) - 224 : int(cx) + 224]
    expect = area_downsample(direct[None], 2)[0]
    assert p.level1.shape == (1, 224, 224, 3)
    assert np.abs(p.level1[0].astype(float) - expect).mean() < 3.0


def test_spots_partly_outside_are_padded_white_and_flagged(c2_jpeg):
    slide = open_slide(c2_jpeg, mpp=0.69)
    p = sample_spots(slide, np.array([[10.0, 10.0], [-500.0, -500.0]]), mpp=0.69)
    assert p.outside.all()
    assert (p.level1[0, :50, :50] == 255).all()
    assert p.blank[1]


def test_model_inputs_are_pooled_levels():
    rng = np.random.default_rng(0)
    l1 = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    a, b, c = model_inputs(l1)
    assert a.shape == (2, 3, 224, 224) and b.shape == (2, 3, 112, 112) and c.shape == (2, 3, 56, 56)
    assert float(a.max()) <= 1.0 and float(a.min()) >= 0.0
    ref = l1.astype(np.float64).reshape(2, 56, 4, 56, 4, 3).mean((2, 4)) / 255.0
    assert np.allclose(c.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)
    # channels-last memory, no copy: the model reads (p, p, 3) patches from contiguous rows
    assert all(t.is_contiguous(memory_format=__import__("torch").channels_last) for t in (a, b, c))
