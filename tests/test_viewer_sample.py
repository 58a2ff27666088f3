"""File > Open Sample in a shown napari viewer: the slide and its measured spots, aligned."""

import os
from pathlib import Path

import numpy as np

SHOTS = Path(os.environ.get("M2ORT_SHOTS", "/tmp/m2ort_shots"))


def test_open_sample_in_viewer_screenshot(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open_sample("napari-m2ort", "her2st_c2")
    assert len(layers) == 2
    image = [ly for ly in viewer.layers if ly._type_string == "image"][0]
    points = [ly for ly in viewer.layers if ly._type_string == "points"][0]
    assert image.multiscale and image.rgb
    assert np.allclose(image.scale[-2:], image.metadata["mpp"], rtol=1e-6)
    assert 0.6 < image.metadata["mpp"] < 0.8
    # spots (µm) lie inside the image extent (µm) and carry gene features
    h_um = image.data[0].shape[0] * image.scale[-2]
    w_um = image.data[0].shape[1] * image.scale[-1]
    assert (points.data[:, 0] > 0).all() and (points.data[:, 0] < h_um).all()
    assert (points.data[:, 1] > 0).all() and (points.data[:, 1] < w_um).all()
    assert np.allclose(points.size, 100.0)
    assert "ERBB2" in points.features.columns
    viewer.reset_view()
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    SHOTS.mkdir(parents=True, exist_ok=True)
    viewer.window.screenshot(str(SHOTS / "sample_in_viewer.png"), canvas_only=False, flash=False)
    assert shot.shape[-1] == 4
    rgb = shot[..., :3].astype(float)
    assert rgb.std() > 20, "screenshot is blank"
    # H&E pink/purple present (tissue rendered, not just a black canvas)
    assert ((rgb[..., 0] > 120) & (rgb[..., 2] > 120) & (rgb[..., 1] < rgb[..., 0])).mean() > 0.02
