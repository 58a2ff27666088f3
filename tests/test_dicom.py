"""DICOM whole-slide images through wsidicom, on a real pyramid converted with wsidicomizer.

The source is a two-level OME-TIFF made by ``napari_m2ort.io.convert`` from a crop of
section C2; wsidicomizer writes it as DICOM WSI instances (uncompressed, so the pixels
must come back exactly), one per level.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import napari_m2ort
from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.convert import convert_to_ome_tiff
from napari_m2ort.io.slides import napari_get_reader, open_slide
from napari_m2ort.slide import SlideLike, open_image

pytest.importorskip("wsidicom", reason="the 'wsi' extra (wsidicom) is not installed")
pytest.importorskip("wsidicomizer", reason="wsidicomizer (test extra) is not installed")

C2_JPEG = Path(napari_m2ort.__file__).parent / "data" / "her2st_C2" / "5714_HE_BT_C2.jpg"


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """(DICOM folder, source OME-TIFF): 1536 x 1536 px at 0.69 µm/px, levels 1536 and 768."""
    from wsidicom.codec import NumpySettings
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    tmp = tmp_path_factory.mktemp("dicom")
    with open_image(C2_JPEG) as im:
        Image.fromarray(np.asarray(im.crop((3000, 3000, 4536, 4536)).convert("RGB"))).save(tmp / "crop.png")
    source = convert_to_ome_tiff(tmp / "crop.png", tmp / "crop.ome.tif", mpp=0.69)
    folder = tmp / "slide"
    WsiDicomizer.convert(
        source,
        folder,
        preferred_source=SourceIdentifier.TIFFSLIDE,  # tifffile-based; no libturbojpeg needed
        encoding=NumpySettings(),  # uncompressed: lossless
        include_label=False,
        include_overview=False,
        include_thumbnail=False,
        workers=1,
    )
    return folder, source


def test_folder_matches_source(pyramid):
    folder, source = pyramid
    with open_slide(folder) as slide, open_slide(source) as ref:
        assert isinstance(slide, SlideLike)
        assert slide.format == "dicom"
        assert slide.level_shapes == ref.level_shapes == [(1536, 1536), (768, 768)]
        assert slide.downsamples == [1.0, 2.0]
        assert slide.mpp == pytest.approx(0.69) and slide.mpp_source == "metadata"
        for ours, theirs in zip(slide.levels, ref.levels):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
        for region in [(1500, -20, 100, 60, 0), (300, 200, 64, 32, 1)]:
            np.testing.assert_array_equal(slide.read_region(*region), ref.read_region(*region))
        again = pickle.loads(pickle.dumps(slide))
        assert again.format == "dicom" and again.shape == slide.shape
        level = pickle.loads(pickle.dumps(slide.levels[1]))
        np.testing.assert_array_equal(np.asarray(level[:16, :16]), np.asarray(ref.levels[1][:16, :16]))


def test_one_dcm_file_opens_its_folder(pyramid):
    folder, source = pyramid
    instance = sorted(folder.glob("*.dcm"))[-1]
    with open_slide(instance) as slide, open_slide(source) as ref:
        assert slide.path == folder
        assert slide.level_shapes == ref.level_shapes
        assert slide.mpp == pytest.approx(0.69)
        np.testing.assert_array_equal(slide.read_region(700, 900, 128, 96), ref.read_region(700, 900, 128, 96))


def test_napari_reader_takes_folder_and_file(pyramid, tmp_path):
    folder, _ = pyramid
    for path in (folder, sorted(folder.glob("*.dcm"))[0]):
        reader = napari_get_reader(str(path))
        assert reader is not None
        ((data, kwargs, kind),) = reader(str(path))
        assert kind == "image" and kwargs["multiscale"] and kwargs["scale"] == pytest.approx((0.69, 0.69))
        assert [d.shape for d in data] == [(1536, 1536, 3), (768, 768, 3)]
    assert napari_get_reader(str(tmp_path)) is None  # a folder without DICOM files


def test_errors_say_what_to_do(pyramid, tmp_path, monkeypatch):
    folder, _ = pyramid
    stray = tmp_path / "notes.dcm"
    stray.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with pytest.raises(M2ORTError, match="no readable DICOM whole-slide image"):
        open_slide(stray)
    monkeypatch.setitem(sys.modules, "wsidicom", None)  # as if it were not installed
    with pytest.raises(M2ORTError, match="pip install wsidicom"):
        open_slide(folder)
