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
