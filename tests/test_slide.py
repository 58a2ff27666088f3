"""The slide contract: file slides and layer slides follow the same rules (napari_m2ort.slide)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides import open_slide
from napari_m2ort.io.slides.layer import LayerSlide, layer_mpp
from napari_m2ort.slide import (
    DEFAULT_MPP,
    SlideLike,
    choose_level,
    pillow_unlimited,
    to_rgb8,
    validate_mpp,
)


def _layer(data, name="img", multiscale=False, rgb=None, metadata=None, scale=(1.0, 1.0), units=("pixel", "pixel")):
    first = data[0] if multiscale else data
    rgb = (first.ndim == 3 and first.shape[-1] in (3, 4)) if rgb is None else rgb
    return SimpleNamespace(
        name=name, data=data, multiscale=multiscale, rgb=rgb, metadata=metadata or {}, scale=scale, units=units
    )


@pytest.fixture(scope="module")
def tiny_tiff(tmp_path_factory):
    """A 16-bit RGB pyramid (12-bit data) with a 4.0003-ish level step, 0.25 µm/px."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4096, (1200, 1601, 3), dtype=np.uint16)
    path = tmp_path_factory.mktemp("slide") / "tiny.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            image, tile=(256, 256), subifds=1, metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
        )
        tw.write(image[::4, ::4], tile=(256, 256), subfiletype=1)
    return path, image


def test_file_and_layer_slides_satisfy_the_contract(tiny_tiff):
    path, image = tiny_tiff
    with open_slide(path) as slide:
        assert isinstance(slide, SlideLike)
        layer_slide = LayerSlide(_layer([np.asarray(lv) for lv in slide.levels], multiscale=True), mpp=slide.mpp)
        assert isinstance(layer_slide, SlideLike)
        assert layer_slide.downsamples == pytest.approx(slide.downsamples)
        for ds in (1.0, 2.0, 3.99, 4.0, 7.0, 100.0):
            assert layer_slide.best_level(ds) == slide.best_level(ds)


def test_layer_uint8_conversion_matches_the_file_reader(tiny_tiff):
    """16-bit data are scaled by their bit depth (4095 here), never stretched to the max."""
    path, image = tiny_tiff
    with open_slide(path) as slide:
        from_file = slide.read_region(-10, 100, 300, 200)
    layer_slide = LayerSlide(_layer(image), mpp=0.25)
    from_layer = layer_slide.read_region(-10, 100, 300, 200)
    np.testing.assert_array_equal(from_layer, from_file)
    assert (from_layer[:, :10] == 255).all()  # outside the image: white
    assert from_layer.dtype == np.uint8 and from_layer.shape == (200, 300, 3)


def test_layer_gray_and_rgba_follow_the_shared_rules():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    slide = LayerSlide(_layer(gray), mpp=0.5)
    np.testing.assert_array_equal(slide.read_region(0, 0, 8, 8), np.repeat(gray[..., None], 3, axis=2))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: the glass behind it is white
    assert (LayerSlide(_layer(rgba), mpp=0.5).read_region(0, 0, 4, 4) == 255).all()
    assert to_rgb8(np.ones((2, 2), np.float32)).max() == 255  # [0, 1] floats: 1.0 is white


def test_layer_mpp_default_and_validation():
    plain = _layer(np.zeros((8, 8, 3), np.uint8))
    assert layer_mpp(plain) == (DEFAULT_MPP, "default")
    assert LayerSlide(plain).mpp_source == "default" and LayerSlide(plain).mpp == DEFAULT_MPP
    microns = _layer(np.zeros((8, 8, 3), np.uint8), scale=(0.69, 0.69), units=("micrometer", "micrometer"))
    assert layer_mpp(microns) == (0.69, "metadata")
    ours = _layer(np.zeros((8, 8, 3), np.uint8), metadata={"mpp": 0.25, "mpp_source": "user"})
    assert layer_mpp(ours) == (0.25, "user")
    with pytest.raises(M2ORTError, match="positive number"):
        LayerSlide(plain, mpp=-1)
    with pytest.raises(M2ORTError, match="2D"):
        LayerSlide(_layer(np.zeros((2, 8, 8, 3), np.uint8), rgb=True), mpp=0.5)


def test_validate_mpp():
    assert validate_mpp("0.5", "x") == 0.5
    for bad in (0, -1, float("nan"), float("inf"), "abc", None):
        with pytest.raises(M2ORTError, match="where: .* not a positive number"):
            validate_mpp(bad, "where")


def test_level_tolerance_is_one_percent():
    assert choose_level([1.0, 4.0003, 16.0], 4.0) == 1
    assert choose_level([1.0, 4.05, 16.0], 4.0) == 0
    assert choose_level([1.0, 2.0, 4.0], 0.5) == 0


def test_pillow_guard_is_lifted_only_inside_the_block():
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    seen = []

    def other():
        with pillow_unlimited():
            seen.append(Image.MAX_IMAGE_PIXELS)

    with pillow_unlimited():
        assert Image.MAX_IMAGE_PIXELS is None
        t = threading.Thread(target=other)
        t.start()
        t.join(0.2)
        assert t.is_alive() and not seen  # another caller waits for this block to end
    t.join(5)
    assert seen == [None] and Image.MAX_IMAGE_PIXELS == limit
