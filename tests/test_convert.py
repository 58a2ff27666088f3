"""OME-TIFF conversion round trips, series-as-levels OME files and synthetic pyramids."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.convert import (
    convert_to_ome_tiff,
    iter_convert_to_ome_tiff,
    make_synthetic_pyramid,
)
from napari_m2ort.io.slides import open_slide
from napari_m2ort.io.slides.pyramid import half_np, level_shapes
from napari_m2ort.progress import Progress
from napari_m2ort.slide import open_image


@pytest.fixture(scope="module")
def crop(her2st, tmp_path_factory):
    """A 3000 x 3000 crop of a real H&E section, saved losslessly (PNG, no pixel size)."""
    with open_image(her2st / "ST-imgs" / "C" / "C3" / "5714_HE_BT_D1.jpg") as im:
        pixels = np.asarray(im.crop((3000, 3000, 6000, 6000)).convert("RGB"))
    path = tmp_path_factory.mktemp("src") / "crop.png"
    Image.fromarray(pixels).save(path, compress_level=1)
    return path, pixels


@pytest.fixture(scope="module")
def converted(crop, tmp_path_factory):
    src, _ = crop
    out = tmp_path_factory.mktemp("out") / "crop.ome.tif"
    events: list[Progress] = []
    result = convert_to_ome_tiff(src, out, mpp=0.69, progress=events.append)
    return result, events


def test_roundtrip_pixels_and_mpp(crop, converted):
    _, pixels = crop
    out, _ = converted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slide = open_slide(out)
    assert slide.format == "ome-tiff"
    assert (slide.mpp, slide.mpp_source) == (pytest.approx(0.69), "metadata")
    assert slide.level_shapes == [(3000, 3000), (1500, 1500), (750, 750)]
    level0 = slide.read_region(0, 0, 3000, 3000)
    assert np.abs(level0.astype(int) - pixels).mean() < 3
    # lower levels carry more detail per pixel, so JPEG error is larger; a misplaced or
    # mis-scaled level would be off by tens of grey levels
    level1 = slide.levels[1].compute()
    assert np.abs(level1.astype(int) - half_np(pixels)).mean() < 5


def test_file_layout(converted):
    out, _ = converted
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.is_bigtiff
        page = tif.pages[0]
        assert len(page.subifds) == 2  # pyramid as SubIFDs
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert [lv.shape for lv in tif.series[0].levels] == [
            (3000, 3000, 3),
            (1500, 1500, 3),
            (750, 750, 3),
        ]
        assert 'PhysicalSizeX="0.69"' in tif.ome_metadata
        assert 'PhysicalSizeXUnit="µm"' in tif.ome_metadata
    # written atomically: nothing but the result in the folder
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_progress_events(converted):
    _, events = converted
    assert events and all(e.stage == "convert" for e in events)
    done = [e.done for e in events]
    assert done == sorted(done)
    assert events[-1].done == events[-1].total == 36 + 9 + 4


def test_npe2_reads_converted_as_multiscale(converted):
    npe2 = pytest.importorskip("npe2")
    out, _ = converted
    npe2.PluginManager.instance().discover()  # what napari does at start-up
    [(data, meta, kind)] = npe2.read([str(out)], stack=False, plugin_name="napari-m2ort")
    assert kind == "image" and meta["multiscale"] and len(data) == 3
    assert meta["scale"] == pytest.approx((0.69, 0.69))


def test_source_without_pixel_size_needs_mpp(crop, tmp_path):
    src, _ = crop
    with pytest.raises(M2ORTError, match="mpp"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_ome_tiff(src, tmp_path / "x.ome.tif")
    assert list(tmp_path.iterdir()) == []


def test_stopping_leaves_nothing(crop, tmp_path):
    src, _ = crop
    out = tmp_path / "stopped.ome.tif"
    job = iter_convert_to_ome_tiff(src, out, mpp=0.5, tile=64)
    first = next(job)
    assert first.done == 0 and first.total > 2000
    next(job)
    job.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("a.tif", {}, "ome.tif"),
        ("missing/a.ome.tif", {}, "does not exist"),
        ("a.ome.tif", {"tile": 100}, "multiple of 16"),
        ("a.ome.tif", {"quality": 0}, "between 1 and 100"),
    ],
)
def test_bad_options(crop, tmp_path, name, kwargs, match):
    src, _ = crop
    with pytest.raises(M2ORTError, match=match):
        convert_to_ome_tiff(src, tmp_path / name, mpp=0.5, **kwargs)


def test_ome_with_levels_as_series(crop, tmp_path):
    """Older OME writers store each resolution as its own Image (series)."""
    _, pixels = crop
    level0 = np.ascontiguousarray(pixels[:2048, :2048])
    levels = [level0, half_np(level0), half_np(half_np(level0))]
    path = tmp_path / "series.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for i, data in enumerate(levels):
            mpp = 0.5 * 2**i
            tw.write(
                data,
                photometric="rgb",
                tile=(256, 256),
                compression="zlib",
                metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
            )
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 3 and len(tif.series[0].levels) == 1
    slide = open_slide(path)
    assert slide.level_shapes == [(2048, 2048), (1024, 1024), (512, 512)]
    assert slide.downsamples == [1.0, 2.0, 4.0]
    assert (slide.mpp, slide.mpp_source) == (0.5, "metadata")
    region = slide.read_region(100, 200, 64, 32, 2)
    np.testing.assert_array_equal(region, levels[2][200:232, 100:164])


def test_synthetic_pyramid_and_reconversion(tmp_path):
    src = make_synthetic_pyramid(tmp_path / "syn.ome.tif", 5000, 3000, mpp=0.25, tile=256)
    slide = open_slide(src)
    assert slide.mpp == 0.25 and slide.mpp_source == "metadata"
    assert slide.level_shapes == level_shapes(3000, 5000)
    assert slide.level_shapes[-1] == (375, 625)
    # the texture is periodic, so each level is (up to JPEG error) the average of the one above
    fine = slide.read_region(0, 0, 1024, 1024, 0)
    coarse = slide.read_region(0, 0, 512, 512, 1)
    assert np.abs(half_np(fine).astype(int) - coarse).mean() < 6
    # converting a pyramidal source reads each level tile by tile from its own pyramid
    out = convert_to_ome_tiff(src, tmp_path / "re.ome.tif", tile=256)
    again = open_slide(out)
    assert again.level_shapes == slide.level_shapes and again.mpp == 0.25
    region = again.read_region(700, 300, 256, 256, 2)
    assert np.abs(region.astype(int) - slide.read_region(700, 300, 256, 256, 2)).mean() < 4


def test_convert_single_level_tiff_source(tmp_path):
    """No pyramid in the source: levels 1-2 tile by tile, level 3 materialised once."""
    y, x = np.mgrid[:2100, :4100].astype(np.float32)
    waves = [np.sin(x / 37 + p) * np.cos(y / 53 - p) for p in (0.0, 1.0, 2.0)]
    image = np.clip(128 + 100 * np.dstack(waves), 0, 255).astype(np.uint8)  # smooth
    src = tmp_path / "flat.tif"
    tifffile.imwrite(
        src,
        image,
        tile=(256, 256),
        photometric="rgb",
        resolution=(1e4 / 0.4, 1e4 / 0.4),
        resolutionunit="CENTIMETER",
    )
    out = convert_to_ome_tiff(src, tmp_path / "flat.ome.tif", tile=256, quality=95)
    slide = open_slide(out)
    assert slide.mpp == pytest.approx(0.4)
    assert slide.level_shapes == level_shapes(2100, 4100)
    expected = image
    for level in range(len(slide.levels)):
        got = slide.levels[level].compute()
        assert np.abs(got.astype(int) - expected).mean() < 3, level
        expected = half_np(expected)
