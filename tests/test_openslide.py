"""Slides through OpenSlide: the SVS fixture read by both backends agrees, and a real
Hamamatsu VMS slide (a text index plus JPEGs, which only OpenSlide reads) opens by name."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from PIL import Image

import napari_m2ort
from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides import napari_get_reader, open_slide
from napari_m2ort.slide import SlideLike, open_image

pytest.importorskip("openslide", reason="the 'wsi' extra (openslide-python, openslide-bin) is not installed")

C2_JPEG = Path(napari_m2ort.__file__).parent / "data" / "her2st_C2" / "5714_HE_BT_C2.jpg"


@pytest.fixture(scope="module")
def vms(tmp_path_factory):
    """A Hamamatsu VMS slide: 1024 x 768 px of a real H&E section at 0.69 µm/px.

    VMS tiles are the JPEG's restart intervals, so the image is written with restart
    markers (and 4:4:4, which OpenSlide's restart-marker tiling needs); the map file
    is OpenSlide's coarse level.
    """
    folder = tmp_path_factory.mktemp("vms")
    with open_image(C2_JPEG) as im:
        pixels = np.asarray(im.crop((3000, 3000, 4024, 3768)).convert("RGB"))
    image = Image.fromarray(pixels)
    image.save(folder / "s.jpg", quality=95, subsampling=0, restart_marker_blocks=16)
    image.resize((256, 192), Image.Resampling.BOX).save(
        folder / "s_map.jpg", quality=95, subsampling=0, restart_marker_blocks=16
    )
    path = folder / "s.vms"
    path.write_text(
        "[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
        "ImageFile=s.jpg\nMapFile=s_map.jpg\n"
        f"PhysicalWidth={1024 * 690}\nPhysicalHeight={768 * 690}\nSourceLens=20\n"  # nm
    )
    with Image.open(folder / "s.jpg") as im:
        decoded = np.asarray(im.convert("RGB"))
    return path, decoded


def test_svs_fixture_agrees_with_tifffile(data_dir):
    path = data_dir / "slide_fixtures" / "small.svs"
    with open_slide(path, backend="openslide") as ours, open_slide(path) as tiff:
        assert isinstance(ours, SlideLike)
        assert (ours.format, tiff.format) == ("openslide-aperio", "svs")
        assert ours.level_shapes == tiff.level_shapes == [(16, 16)]
        assert ours.downsamples == tiff.downsamples
        assert (ours.mpp, ours.mpp_source) == (tiff.mpp, "metadata") == (0.499, "metadata")
        assert isinstance(ours.levels[0], da.Array) and ours.levels[0].dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(ours.levels[0]), np.asarray(tiff.levels[0]))
        # Regions past the edge are white glass in both.
        np.testing.assert_array_equal(ours.read_region(-4, 10, 24, 12), tiff.read_region(-4, 10, 24, 12))
        np.testing.assert_array_equal(ours.thumbnail(8)[0], tiff.thumbnail(8)[0])


def test_vms_opens_by_name_with_mpp(vms):
    path, decoded = vms
    with open_slide(path) as slide:
        assert slide.format == "openslide-hamamatsu"
        assert slide.shape == (768, 1024)
        assert slide.mpp == pytest.approx(0.69) and slide.mpp_source == "metadata"
        assert slide.level_shapes[:3] == [(768, 1024), (384, 512), (192, 256)]
        level0 = slide.levels[0]
        assert isinstance(level0, da.Array) and level0.dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(level0), decoded)
        corner = slide.read_region(1000, 700, 50, 100)
        np.testing.assert_array_equal(corner[:68, :24], decoded[700:, 1000:])
        assert (corner[68:] == 255).all() and (corner[:, 24:] == 255).all()
        # Level 2 is the map file itself.
        with Image.open(path.with_name("s_map.jpg")) as im:
            np.testing.assert_array_equal(slide.read_region(0, 0, 256, 192, 2), np.asarray(im.convert("RGB")))
        assert slide.best_level(4.0) == 2
        # Slides and their lazy levels travel to other processes.
        again = pickle.loads(pickle.dumps(slide))
        assert again.format == "openslide-hamamatsu"
        np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(level0))[:8, :8]), decoded[:8, :8])


def test_napari_reader_takes_vendor_files(vms):
    path, _ = vms
    reader = napari_get_reader(str(path))
    assert reader is not None
    ((data, kwargs, kind),) = reader(str(path))
    assert kind == "image" and kwargs["multiscale"] and kwargs["scale"] == pytest.approx((0.69, 0.69))
    assert data[0].shape == (768, 1024, 3)
    for suffix in (".mrxs", ".vmu", ".ndpi", ".scn", ".bif"):
        assert napari_get_reader(f"slide{suffix}") is not None


def test_missing_openslide_names_the_package(vms, monkeypatch):
    path, _ = vms
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if it were not installed
    with pytest.raises(M2ORTError, match="pip install openslide-python openslide-bin"):
        open_slide(path)


def test_generic_tiff_under_a_vendor_name_stays_with_tifffile(data_dir, tmp_path):
    """OpenSlide goes first for .ndpi/.scn/.bif only when it sees that vendor's file."""
    fake = tmp_path / "boxes.scn"
    fake.write_bytes((data_dir / "slide_fixtures" / "boxes.tiff").read_bytes())
    with open_slide(fake, quiet=True) as slide:
        assert slide.format == "tiff"


def test_pickled_slide_keeps_the_backend_it_was_opened_with(data_dir):
    """Dask workers unpickle slides: one opened with backend="openslide" must not come
    back through format detection (which gives SVS to tifffile)."""
    path = data_dir / "slide_fixtures" / "small.svs"
    with open_slide(path, backend="openslide", memory_budget=2**30) as slide:
        again = pickle.loads(pickle.dumps(slide))
        try:
            assert again.format == "openslide-aperio"
            assert again.backend == "openslide" and again.decode_budget == 2**30
            np.testing.assert_array_equal(again.read_region(0, 0, 16, 16), slide.read_region(0, 0, 16, 16))
        finally:
            again.close()
    with open_slide(path) as detected, pickle.loads(pickle.dumps(detected)) as again:
        assert again.format == "svs" and again.backend is None
