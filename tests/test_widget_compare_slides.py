"""Several slides: each opens beside the others; spots and predictions stay with theirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_second_slide_opens_beside_and_keeps_its_spots(make_napari_viewer, qtbot):
    import napari_m2ort  # noqa: F401  (torch before Qt)
    from napari_m2ort.model.weights import BUNDLED_PATH

    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression")
    viewer.open_sample("napari-m2ort", "her2st_c2")
    viewer.open_sample("napari-m2ort", "her2st_c2")
    from napari_m2ort.widgets import _layers as L

    first, second = L.slide_layers(viewer)
    a, b = (np.asarray(s.extent.world)[:, -2:] for s in (first, second))
    assert b[0, 1] > a[1, 1]  # side by side along x, not stacked
    assert np.allclose(b[:, 0], a[:, 0])
    meas = L.measured_layers(viewer)
    assert len(meas) == 2
    tied = {m.metadata["slide_layer"]: m for m in meas}
    assert set(tied) == {first.unique_id, second.unique_id}
    for slide in (first, second):
        m = tied[slide.unique_id]
        assert np.allclose(m.translate[-2:], slide.translate[-2:])
        world = np.asarray([m.data_to_world(p) for p in m.data])[:, -2:]
        box = np.asarray(slide.extent.world)[:, -2:]
        assert (world >= box[0]).all() and (world <= box[1]).all()
    widget.settings.slide = second.name
    assert widget.measured_layer().unique_id == tied[second.unique_id].unique_id
    widget.settings.slide = first.name
    assert widget.measured_layer().unique_id == tied[first.unique_id].unique_id
    viewer.reset_view()
    qtbot.wait(300)
    viewer.window._qt_window.grab().save("/tmp/h12_two_slides.png")

    if not Path(BUNDLED_PATH).is_file():
        return
    # predictions on the second slide land on the second slide's spots
    widget.settings.slide = second.name
    widget.settings.device = "cpu"
    assert widget.predict_at_measured() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    assert widget.last_error is None, widget.last_error
    pred = widget.predictions_layer()
    m = tied[second.unique_id]
    pw = np.asarray([pred.data_to_world(p) for p in pred.data])[:, -2:]
    mw = np.asarray([m.data_to_world(p) for p in m.data])[:, -2:]
    assert np.allclose(pw, mw)
    assert pred.metadata["slide"] == second.name
    gene = widget.current_gene()
    assert gene and pred.face_color.std(axis=0)[:3].max() > 0.05  # coloured by the gene at once
    assert widget.contrast_limits() != (0.0, 1.0)
