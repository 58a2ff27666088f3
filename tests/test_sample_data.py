"""The bundled HER2+ sample: files, licence, and image + spots that line up in µm."""

from __future__ import annotations

import importlib
import importlib.resources

import numpy as np
import pytest
import yaml

from napari_m2ort import sample_data
from napari_m2ort.io.st import STDataWarning


def test_bundled_files_and_licence():
    d = sample_data.SAMPLE_DIR
    names = {p.name for p in d.iterdir()}
    assert {"5714_HE_BT_C2.jpg", "C2.tsv.gz", "C2_selection.tsv", "LICENSE", "README.md", "CITATION.txt"} <= names
    total = sum(p.stat().st_size for p in d.iterdir())
    assert 4e6 < total < 6e6
    lic = (d / "LICENSE").read_text()
    assert "CC BY 4.0" in lic and "Andersson" in lic and "6012" in lic
    assert sample_data.sample_image_path().is_file()


def test_sample_section():
    s = sample_data.sample_section()
    assert s.adata.shape == (187, 15706)
    assert s.mpp == pytest.approx(0.69, abs=0.03) and s.mpp_source == "st-geometry"
    assert s.image_path == sample_data.sample_image_path()


def test_manifest_command_resolves():
    import napari_m2ort

    manifest = yaml.safe_load((importlib.resources.files(napari_m2ort) / "napari.yaml").read_text(encoding="utf-8"))
    cmd = next(c for c in manifest["contributions"]["commands"] if c["id"] == "napari-m2ort.sample_her2st")
    module, func = cmd["python_name"].split(":")
    assert getattr(importlib.import_module(module), func) is sample_data.her2st_sample


def test_manifest_python_names_import():
    """Every npe2 command points at something importable (readers/writers live in io.napari)."""
    import napari_m2ort

    manifest = yaml.safe_load((importlib.resources.files(napari_m2ort) / "napari.yaml").read_text(encoding="utf-8"))
    for cmd in manifest["contributions"]["commands"]:
        module, func = cmd["python_name"].split(":")
        assert callable(getattr(importlib.import_module(module), func)), cmd["id"]


def test_her2st_sample_layers_align():
    pytest.importorskip("napari_m2ort.io.slides")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", STDataWarning)  # the sample must read cleanly
        layers = sample_data.her2st_sample()
    (img, ikw, ikind), (pts, pkw, pkind) = layers
    assert ikind == "image" and pkind == "points"
    assert ikw.get("multiscale") and isinstance(img, list) and len(img) > 1
    mpp = ikw["scale"][0]
    assert mpp == pytest.approx(0.69, abs=0.03) and ikw["scale"][1] == mpp
    section = pkw["metadata"]["st_section"]
    assert section.mpp == pytest.approx(mpp)
    h_um, w_um = img[0].shape[0] * mpp, img[0].shape[1] * mpp
    assert (pts >= 0).all() and (pts[:, 0] <= h_um).all() and (pts[:, 1] <= w_um).all()
    np.testing.assert_allclose(pts, section.coords_px[:, ::-1] * mpp)
    assert pkw["size"] == 100.0 and pkw["face_color"] == "ERBB2"
    assert "ERBB2" in pkw["features"] and pkw["features"].shape[0] == 187
    assert pkw.get("units") == ikw.get("units")
    # the measured spots sit on tissue in the pyramid napari will display (µm -> level px)
    level = img[3]
    f = img[0].shape[0] / level.shape[0]
    thumb = np.asarray(level).astype(np.float32).mean(axis=2)
    rows = np.clip((pts[:, 0] / mpp / f).round().astype(int), 0, thumb.shape[0] - 1)
    cols = np.clip((pts[:, 1] / mpp / f).round().astype(int), 0, thumb.shape[1] - 1)
    assert np.median(thumb[rows, cols]) < np.median(thumb[:10, :10]) - 40

    import napari.layers

    napari.layers.Image(img, **ikw)
    napari.layers.Points(pts, **pkw)


def _join_pyramid_build():
    import threading

    for t in threading.enumerate():
        if t.name == "m2ort-sample-pyramid":
            t.join(timeout=300)


def test_display_pyramid_cached_for_the_eye_only(tmp_path, monkeypatch):
    """The first opening writes a tiled pyramid into the cache folder; later openings show
    its tiles (same level shapes, nearly the same pixels), while the layer's path stays
    the JPEG, which predictions and comparisons read."""
    pytest.importorskip("napari_m2ort.io.slides")
    monkeypatch.setenv("NAPARI_M2ORT_CACHE", str(tmp_path / "cache"))
    first = sample_data.her2st_sample()
    _join_pyramid_build()
    written = list((tmp_path / "cache").glob("*.ome.tif"))
    assert len(written) == 1 and not list((tmp_path / "cache").glob(".*part"))
    (img0, kw0, _), _ = first
    (img, kw, kind), _ = sample_data.her2st_sample()
    assert kind == "image" and kw["metadata"]["display_pyramid"] == str(written[0])
    assert kw["metadata"]["path"] == str(sample_data.sample_image_path())
    assert "display_pyramid" not in kw0["metadata"]
    assert [a.shape for a in img] == [a.shape for a in img0]
    a = np.asarray(img[1][2000:2512, 2000:2512]).astype(int)
    b = np.asarray(img0[1][2000:2512, 2000:2512]).astype(int)
    assert np.abs(a - b).mean() < 3  # JPEG tiles at quality 90: the same picture

    monkeypatch.setenv("NAPARI_M2ORT_CACHE", "off")
    (img, kw, _), _ = sample_data.her2st_sample()
    assert "display_pyramid" not in kw["metadata"]
    assert sample_data.display_pyramid(0.69) is None


def test_sample_tissue_mask_found_while_it_opens():
    """Opening the sample finds its tissue in the background; the first 'tissue only'
    prediction then gets that mask (the same as spots.tissue_mask) without redoing it."""
    import threading

    from napari_m2ort.io.slides import open_slide
    from napari_m2ort.pipelines.predict import slide_tissue_mask
    from napari_m2ort.spots import tissue_mask

    (_, ikw, _), _ = sample_data.her2st_sample()
    for t in threading.enumerate():
        if t.name == "m2ort-tissue-prefetch":
            t.join(timeout=120)
    slide = open_slide(ikw["metadata"]["path"], mpp=ikw["metadata"]["mpp"])
    a, b = slide_tissue_mask(slide), slide_tissue_mask(slide)
    assert a is b
    fresh = tissue_mask(slide)
    assert a.um_per_px == fresh.um_per_px and np.array_equal(a.mask, fresh.mask)
