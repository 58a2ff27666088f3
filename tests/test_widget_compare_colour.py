"""Honest colours and the out-of-domain guard in the Predict widget (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

TIMEOUT_MS = 180_000


@pytest.fixture
def warnings_shown(monkeypatch):
    import napari.utils.notifications as notifications

    seen: list[str] = []
    real = notifications.show_warning

    def record(message, *a, **k):
        seen.append(str(message))
        return real(message, *a, **k)

    monkeypatch.setattr(notifications, "show_warning", record)
    return seen


def _dock(viewer):
    from pathlib import Path

    import napari_m2ort  # noqa: F401  (torch before Qt)
    from napari_m2ort.model.weights import BUNDLED_PATH

    if not Path(BUNDLED_PATH).is_file():
        pytest.skip("the bundled weights are not installed")
    _, widget = viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression")
    widget.settings.device = "cpu"
    return widget


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def test_glass_spots_hidden_and_out_of_the_colour_range(make_napari_viewer, qtbot, tmp_path):
    from napari_m2ort.raster import value_range
    from napari_m2ort.widgets import _layers as L

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-m2ort", "her2st_c2")
    widget = _dock(viewer)
    widget.tissue_check.setChecked(False)
    shapes = widget.add_regions_layer()
    for x0, y0, x1, y1 in ((3510.0, 3790.0, 3860.0, 4090.0), (150.0, 150.0, 450.0, 450.0)):  # tissue, glass
        shapes.add_rectangles(np.array([[y0, x0], [y1, x1]]))
    widget.predict_regions()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    layer = widget.predictions_layer()
    flags = np.asarray(layer.metadata["flags"])
    ok = flags == "ok"
    assert ok.sum() >= 8 and (~ok).sum() >= 4, flags
    x = np.asarray(layer.data)[:, 1]
    assert (x[~ok] < 500).all()  # the flagged spots are the glass ones
    assert not np.asarray(layer.shown)[~ok].any() and np.asarray(layer.shown)[ok].all()
    gene = widget.current_gene()
    values = layer.features[gene].to_numpy()
    assert widget.contrast_limits() == pytest.approx(value_range(values[ok]), abs=1e-6)
    assert "flagged" in L._canvas_overlay(viewer, "text").text
    assert f"{gene} - M2ORT-S bundled" in L._canvas_overlay(viewer, "text").text
    widget.flagged_check.setChecked(True)
    assert np.asarray(layer.shown).all()
    assert widget.contrast_limits() == pytest.approx(value_range(values[ok]), abs=1e-6)  # range unchanged
    # the hover names a flagged spot's flag; the export carries every flag in obs["flag"]
    from types import SimpleNamespace

    k = int(np.flatnonzero(~ok)[0])
    event = SimpleNamespace(
        position=tuple(layer.data_to_world(layer.data[k])), view_direction=None, dims_displayed=[0, 1]
    )
    widget._on_hover(layer, event)
    assert f"flagged {flags[k]}" in widget.hover_label.text()
    import anndata as ad

    adata = ad.read_h5ad(widget.export_h5ad(tmp_path / "flags.h5ad"))
    assert list(adata.obs["flag"]) == list(flags)
    widget.flagged_check.setChecked(False)
    qtbot.wait(200)
    viewer.window._qt_window.grab().save("/tmp/h12_flagged.png")


def _coarse_image(viewer, mpp):
    from napari_m2ort.io.slides import open_slide
    from napari_m2ort.sample_data import sample_image_path

    slide = open_slide(sample_image_path(), mpp=0.688)
    rgb = slide.read_region(4900, 5400, 1400, 1400)[::4, ::4]  # a 4x coarser copy of a tissue crop
    return viewer.add_image(
        np.ascontiguousarray(rgb), rgb=True, name=f"coarse {mpp}", scale=(mpp, mpp), units=("um", "um")
    )


def test_far_coarser_slide_refused_unless_overridden(make_napari_viewer, qtbot, errors, warnings_shown):
    viewer = make_napari_viewer()
    layer = _coarse_image(viewer, 3.5)  # 5x the model's 0.69 µm/px
    widget = _dock(viewer)
    assert widget.slide_layer() == layer
    widget.tissue_check.setChecked(False)
    shapes = widget.add_regions_layer()
    shapes.add_rectangles(np.array([[400.0, 400.0], [700.0, 700.0]]))
    widget.predict_regions()
    _wait(qtbot, widget)
    assert widget.last_error and "coarser" in widget.last_error
    assert any("coarser" in m and "3.5" in m and "0.69" in m for m in errors)
    assert widget.predictions_layer() is None
    widget.force_check.setChecked(True)
    widget.predict_regions()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    assert len(widget.predictions_layer().data) > 0
    assert any("coarser" in m for m in warnings_shown)


def test_somewhat_coarser_slide_warned(make_napari_viewer, qtbot, errors, warnings_shown):
    viewer = make_napari_viewer()
    _coarse_image(viewer, 1.2)  # 1.7x
    widget = _dock(viewer)
    widget.tissue_check.setChecked(False)
    shapes = widget.add_regions_layer()
    shapes.add_rectangles(np.array([[300.0, 300.0], [500.0, 500.0]]))
    widget.predict_regions()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    assert any("coarser" in m and "1.2" in m for m in warnings_shown)
    assert not errors


def test_fine_tuned_model_named_in_layer_and_legend(make_napari_viewer, qtbot):
    """A model handed over by the fine-tuning widget is named by its own training."""
    from napari_m2ort.pipelines import resolve_model
    from napari_m2ort.widgets import _layers as L

    viewer = make_napari_viewer()
    viewer.open_sample("napari-m2ort", "her2st_c2")
    widget = _dock(viewer)
    model, card = resolve_model("bundled")
    card.training_data = "fine-tuned from bundled on C3"
    card.created = "2026-11-30T08:00:00+00:00"
    widget.set_model(model, card, "fine-tuned model")
    shapes = widget.add_regions_layer()
    shapes.add_rectangles(np.array([[3790.0, 3510.0], [3990.0, 3710.0]]))
    widget.predict_regions()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    layer = widget.predictions_layer()
    gene = widget.current_gene()
    assert layer.name == f"{gene} - fine-tuned on C3 (2026-11-30)"
    assert L._canvas_overlay(viewer, "text").text.startswith(f"{gene} - fine-tuned on C3 (2026-11-30)")
