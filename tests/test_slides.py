"""open_slide on real slides (HER2+ JPEG, Aperio SVS, generic tiled TIFF), broken files,
odd pixel formats and the napari reader."""

from __future__ import annotations

import pickle
import tracemalloc
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides import (
    DEFAULT_MPP,
    ENV_MPP,
    flat,
    napari_get_reader,
    open_slide,
)
from napari_m2ort.io.slides.pyramid import half_np
from napari_m2ort.slide import open_image


@pytest.fixture(scope="session")
def c2_jpeg(her2st):
    return her2st / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"


@pytest.fixture(scope="session")
def fixtures(data_dir):
    return data_dir / "slide_fixtures"


@pytest.fixture(scope="module")
def c2(c2_jpeg):
    with open_slide(c2_jpeg, mpp=0.69) as slide:
        yield slide


@pytest.fixture(scope="module")
def c2_pixels(c2_jpeg):
    """The whole C2 image as Pillow decodes it: the reference for exact reads."""
    with open_image(c2_jpeg) as im:
        return np.asarray(im.convert("RGB"))


def _quiet_open(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_slide(path, **kw)


# --------------------------------------------------------------------------------------
# HER2+ JPEG (flat, 9274 x 9911)
# --------------------------------------------------------------------------------------


def test_jpeg_open_is_lazy_and_warns_default_mpp(c2_jpeg, monkeypatch):
    def no_decoding(self, k):
        raise AssertionError("open_slide decoded pixels")

    monkeypatch.setattr(flat._FlatSource, "_compute", no_decoding)
    tracemalloc.start()
    with pytest.warns(UserWarning, match="no pixel-size metadata") as record:
        slide = open_slide(c2_jpeg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50e6  # lazy: no pixels decoded (speed is benchmarks/bench_open.py's job)
    message = str(record[0].message)
    assert c2_jpeg.name in message and "mpp=" in message and "--mpp" in message
    h, w = slide.shape
    assert 9850 <= h <= 9950 and 9200 <= w <= 9350
    assert slide.mpp == DEFAULT_MPP and slide.mpp_source == "default"
    assert slide.name == "5714_HE_BT_C2"


def test_jpeg_user_mpp_wins_without_warning(c2_jpeg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slide = open_slide(c2_jpeg, mpp=0.69)
    assert (slide.mpp, slide.mpp_source) == (0.69, "user")
    assert slide.size_um == pytest.approx((slide.shape[0] * 0.69, slide.shape[1] * 0.69))


def test_jpeg_pyramid_shape(c2):
    shapes = c2.level_shapes
    assert len(shapes) == 5
    for (h0, w0), (h1, w1) in zip(shapes, shapes[1:]):
        assert (h1, w1) == ((h0 + 1) // 2, (w0 + 1) // 2)
    assert max(shapes[-1]) < 1024 <= max(shapes[-2])
    assert c2.downsamples[0] == 1.0
    assert c2.downsamples == sorted(c2.downsamples)
    assert c2.downsamples[-1] == pytest.approx(16, rel=0.01)
    for level in c2.levels:
        assert level.dtype == np.uint8 and level.shape[2] == 3
    assert [c2.best_level(d) for d in (0.5, 1, 1.99, 2.0, 3.0, 8.0, 100)] == [0, 0, 1, 1, 1, 3, 4]


def test_jpeg_region_matches_pillow_exactly(c2, c2_pixels):
    region = c2.read_region(4000, 3000, 300, 200)
    assert region.shape == (200, 300, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region, c2_pixels[3000:3200, 4000:4300])
    # the dask level gives the same pixels
    np.testing.assert_array_equal(c2.levels[0][3000:3200, 4000:4300].compute(), region)


def test_region_outside_is_white(c2, c2_pixels):
    region = c2.read_region(-10, -20, 40, 50)
    assert (region[:20] == 255).all() and (region[:, :10] == 255).all()
    np.testing.assert_array_equal(region[20:, 10:], c2_pixels[:30, :30])
    h, w = c2.shape
    assert (c2.read_region(w + 5, h + 5, 8, 8) == 255).all()


def test_jpeg_lower_levels_are_area_averages(c2, c2_pixels):
    block = c2_pixels[4000:4800, 4000:4800]
    # 1/8 level comes from libjpeg DCT scaling: close to the box average, not identical
    coarse = c2.read_region(500, 500, 100, 100, level=3)
    assert np.abs(coarse.astype(int) - half_np(half_np(half_np(block)))).mean() < 2
    # level 4 is computed from level 3 exactly
    np.testing.assert_array_equal(c2.levels[4].compute(), half_np(c2.levels[3].compute()))


def test_thumbnail(c2):
    thumb, ds = c2.thumbnail(512)
    assert max(thumb.shape[:2]) == 512 and thumb.dtype == np.uint8
    assert ds == pytest.approx(c2.shape[1] / thumb.shape[1])
    assert 100 < thumb.mean() < 250  # an H&E section on white, not black


def test_layer_data(c2):
    [(data, meta, kind)] = c2.layer_data()
    assert kind == "image"
    assert isinstance(data, list) and len(data) == 5
    assert meta["multiscale"] is True and meta["rgb"] is True
    assert meta["scale"] == (0.69, 0.69)
    assert meta["units"] == ("µm", "µm")
    assert meta["contrast_limits"] == (0, 255)
    assert meta["metadata"] == {"mpp": 0.69, "mpp_source": "user", "path": str(c2.path)}


def test_layer_data_is_accepted_by_napari(c2):
    from napari.layers import Image as ImageLayer

    [(data, meta, _)] = c2.layer_data()
    layer = ImageLayer(data, **meta)
    assert layer.multiscale and layer.rgb
    assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")


def test_pickle_reopens(c2):
    clone = pickle.loads(pickle.dumps(c2))
    assert clone.shape == c2.shape and clone.mpp == 0.69 and clone.mpp_source == "user"
    level = pickle.loads(pickle.dumps(c2.levels[4]))
    np.testing.assert_array_equal(level.compute(), c2.levels[4].compute())


# --------------------------------------------------------------------------------------
# TIFF family
# --------------------------------------------------------------------------------------


def test_svs_metadata_and_region(fixtures):
    path = fixtures / "small.svs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.499) and slide.mpp_source == "metadata"
    assert slide.format == "svs" and slide.shape == (16, 16)
    expected = tifffile.imread(path)
    np.testing.assert_array_equal(slide.read_region(0, 0, 16, 16), expected)
    np.testing.assert_array_equal(slide.read_region(4, 2, 5, 7), expected[2:9, 4:9])
    [(data, meta, _)] = slide.layer_data()
    assert meta["multiscale"] is False and data.shape == (16, 16, 3)
    assert open_slide(path, mpp=0.25).mpp_source == "user"


def test_generic_tiled_tiff_pyramid(fixtures):
    path = fixtures / "boxes.tiff"
    with pytest.warns(UserWarning, match="boxes.tiff"):  # 72 dpi is not a pixel size
        slide = open_slide(path)
    assert slide.mpp_source == "default"
    assert slide.level_shapes == [(250, 300), (125, 150), (62, 75), (31, 37)]
    assert slide.downsamples[:3] == [1.0, 2.0, 4.0]
    with tifffile.TiffFile(path) as tif:
        level2 = tif.series[0].levels[2].asarray()
    np.testing.assert_array_equal(slide.read_region(0, 0, 75, 62, level=2), level2)
    np.testing.assert_array_equal(slide.levels[2].compute(), level2)
    assert slide.best_level(5) == 2


@pytest.mark.parametrize("name", ["unreadable.svs", "unopenable.tiff"])
def test_broken_fixtures_fail_clearly(fixtures, name):
    with pytest.raises(M2ORTError) as info:
        open_slide(fixtures / name)
    message = str(info.value)
    assert name in message and "Could not decode" in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(M2ORTError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(M2ORTError, match="is a folder"):
        open_slide(tmp_path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("hello")
    with pytest.raises(M2ORTError, match="notes.tif"):
        open_slide(path)


def test_truncated_jpeg(tmp_path, c2_jpeg):
    data = c2_jpeg.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(M2ORTError, match=r"cut\.jpg.*truncated"):
        open_slide(path, mpp=0.5)


def test_bad_user_mpp(c2_jpeg):
    with pytest.raises(M2ORTError, match="positive number"):
        open_slide(c2_jpeg, mpp=-1)


def test_non_ascii_path_with_dots(tmp_path, c2_pixels):
    folder = tmp_path / "scan.v2 ünïcødé"
    folder.mkdir()
    path = folder / "sec.1.2.jpg"
    crop = c2_pixels[2000:3300, 2000:3100]
    Image.fromarray(crop).save(path, quality=95)
    slide = _quiet_open(path)
    assert slide.name == "sec.1.2" and slide.shape == (1300, 1100)
    assert len(slide.levels) == 2
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(slide.read_region(0, 0, 1100, 1300), expected)
    assert napari_get_reader(str(path)) is not None


def test_single_level_tiff_gets_lazy_pyramid(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1100, 2100, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb")
    slide = _quiet_open(path)
    assert slide.level_shapes == [(1100, 2100), (550, 1050), (275, 525)]
    np.testing.assert_array_equal(slide.levels[1].compute(), half_np(image))
    quarter = half_np(half_np(image))
    np.testing.assert_array_equal(slide.read_region(10, 20, 30, 40, 2), quarter[20:60, 10:40])


# --------------------------------------------------------------------------------------
# Pixel formats: everything becomes RGB uint8
# --------------------------------------------------------------------------------------

_RNG = np.random.default_rng(42)
_GRAY = _RNG.integers(0, 256, (64, 80), dtype=np.uint8)
_RGB = _RNG.integers(0, 256, (64, 80, 3), dtype=np.uint8)


def _write_gray_png(path):
    Image.fromarray(_GRAY, "L").save(path)
    return np.repeat(_GRAY[..., None], 3, axis=2)


def _write_rgba_png(path):
    alpha = np.zeros((64, 80), np.uint8)
    alpha[:, 40:] = 255
    Image.fromarray(np.dstack([_RGB, alpha]), "RGBA").save(path)
    expected = _RGB.copy()
    expected[:, :40] = 255  # transparent -> white
    return expected


def _write_palette_png(path):
    im = Image.fromarray(_RGB).quantize(16)
    im.save(path)
    return np.asarray(im.convert("RGB"))


def _write_16bit_png(path):
    values = _GRAY.astype(np.uint16) * 257  # full 16-bit range
    Image.fromarray(values).save(path)
    return np.repeat(_GRAY[..., None], 3, axis=2)


def _write_gray_tiff(path):
    tifffile.imwrite(path, _GRAY, tile=(32, 32), photometric="minisblack")
    return np.repeat(_GRAY[..., None], 3, axis=2)


def _write_12bit_tiff(path):
    values = _GRAY.astype(np.uint16) * 16  # 12-bit data in uint16 (max <= 4095)
    values[0, 0] = 4095
    tifffile.imwrite(path, values, tile=(32, 32), compression="zlib")
    expected = np.clip(np.round(values / 4095 * 255), 0, 255).astype(np.uint8)
    return np.repeat(expected[..., None], 3, axis=2)


def _write_rgba_tiff(path):
    alpha = np.full((64, 80), 255, np.uint8)
    alpha[:32] = 0
    tifffile.imwrite(
        path,
        np.dstack([_RGB, alpha]),
        photometric="rgb",
        extrasamples=["unassalpha"],
        tile=(32, 32),
    )
    expected = _RGB.copy()
    expected[:32] = 255
    return expected


def _write_planar_tiff(path):
    tifffile.imwrite(path, np.moveaxis(_RGB, 2, 0), photometric="rgb", planarconfig="separate")
    return _RGB


def _write_float_tiff(path):
    tifffile.imwrite(path, (_RGB / 255.0).astype(np.float32), photometric="rgb")
    return _RGB


def _write_miniswhite_tiff(path):
    tifffile.imwrite(path, 255 - _GRAY, photometric="miniswhite")
    return np.repeat(_GRAY[..., None], 3, axis=2)


@pytest.mark.parametrize(
    "writer, suffix",
    [
        (_write_gray_png, ".png"),
        (_write_rgba_png, ".png"),
        (_write_palette_png, ".png"),
        (_write_16bit_png, ".png"),
        (_write_gray_tiff, ".tif"),
        (_write_12bit_tiff, ".tif"),
        (_write_rgba_tiff, ".tif"),
        (_write_planar_tiff, ".tif"),
        (_write_float_tiff, ".tif"),
        (_write_miniswhite_tiff, ".tif"),
    ],
    ids=lambda v: getattr(v, "__name__", v).replace("_write_", ""),
)
def test_pixel_formats_become_rgb8(tmp_path, writer, suffix):
    path = tmp_path / f"img{suffix}"
    expected = writer(path)
    slide = _quiet_open(path)
    region = slide.read_region(0, 0, 80, 64)
    assert region.dtype == np.uint8 and region.shape == (64, 80, 3)
    assert np.abs(region.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(slide.levels[0].compute(), region)


def test_multichannel_tiff_is_refused_and_left_to_other_readers(tmp_path):
    path = tmp_path / "multiplex.tif"
    tifffile.imwrite(path, np.zeros((6, 32, 32), np.uint16), metadata={"axes": "CYX"})
    with pytest.raises(M2ORTError, match="6 channels"):
        open_slide(path)
    assert napari_get_reader(str(path)) is None


# --------------------------------------------------------------------------------------
# Pixel size from metadata
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"resolution": (1e4 / 0.25, 1e4 / 0.25), "resolutionunit": "CENTIMETER"}, 0.25),
        ({"resolution": (25400 / 0.5, 25400 / 0.5), "resolutionunit": "INCH"}, 0.5),
        ({"resolution": (1 / 0.3, 1 / 0.3), "imagej": True, "metadata": {"unit": "um"}}, 0.3),
        ({"resolution": (72, 72), "resolutionunit": "INCH"}, None),
        ({"resolution": (1, 1), "resolutionunit": "NONE"}, None),
    ],
    ids=["cm", "inch", "imagej", "72dpi", "no-unit"],
)
def test_tiff_mpp(tmp_path, kwargs, expected):
    path = tmp_path / "res.tif"
    tifffile.imwrite(path, _RGB, photometric="rgb", **kwargs)
    slide = _quiet_open(path)
    if expected is None:
        assert slide.mpp_source == "default" and slide.mpp == DEFAULT_MPP
    else:
        assert slide.mpp_source == "metadata" and slide.mpp == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dpi, expected", [(25400 / 0.5, 0.5), (300, None)])
def test_jpeg_dpi(tmp_path, dpi, expected):
    path = tmp_path / "dpi.jpg"
    Image.fromarray(_RGB).save(path, dpi=(dpi, dpi))
    slide = _quiet_open(path)
    if expected is None:
        assert slide.mpp_source == "default"
    else:
        assert slide.mpp_source == "metadata" and slide.mpp == pytest.approx(expected, rel=1e-3)


# --------------------------------------------------------------------------------------
# napari reader
# --------------------------------------------------------------------------------------


def test_get_reader_declines_what_it_cannot_read(tmp_path, c2_jpeg):
    assert napari_get_reader(tmp_path) is None
    assert napari_get_reader(str(tmp_path / "table.csv")) is None
    assert napari_get_reader([str(c2_jpeg), str(c2_jpeg)]) is None
    assert napari_get_reader([str(c2_jpeg)]) is not None


def test_get_reader_env_mpp(c2_jpeg, monkeypatch):
    monkeypatch.setenv(ENV_MPP, "0.69")
    [(data, meta, kind)] = napari_get_reader(str(c2_jpeg))(str(c2_jpeg))
    assert meta["metadata"]["mpp_source"] == "user" and meta["scale"] == (0.69, 0.69)
    monkeypatch.setenv(ENV_MPP, "abc")
    with pytest.raises(M2ORTError, match=ENV_MPP):
        napari_get_reader(str(c2_jpeg))(str(c2_jpeg))


def test_npe2_reads_jpeg_as_multiscale(c2_jpeg, monkeypatch):
    npe2 = pytest.importorskip("npe2")
    monkeypatch.setenv(ENV_MPP, "0.69")
    npe2.PluginManager.instance().discover()  # what napari does at start-up
    [(data, meta, kind)] = npe2.read([str(c2_jpeg)], stack=False, plugin_name="napari-m2ort")
    assert kind == "image" and meta["multiscale"] and len(data) == 5


def test_reader_surfaces_clear_errors(fixtures):
    reader = napari_get_reader(str(fixtures / "unreadable.svs"))
    assert reader is not None
    with pytest.raises(M2ORTError, match="unreadable.svs"):
        reader(str(fixtures / "unreadable.svs"))


def test_close_and_context_manager(fixtures):
    with _quiet_open(fixtures / "boxes.tiff") as slide:
        first = slide.read_region(0, 0, 64, 64)
    # arrays handed to napari keep working after close: the file is re-opened
    np.testing.assert_array_equal(slide.read_region(0, 0, 64, 64), first)
    np.testing.assert_array_equal(slide.levels[0][:64, :64].compute(), first)
    slide.close()
