"""The Fine-tune dock widget on the bundled HER2+ section C2 (real spots, real patches).

Training is kept tiny (about 50 legacy-ST spots inside a drawn region, one epoch, batch
16) so the GUI path — loading, alignment, worker, live plot, cancel, save, hand-over to
the Predict widget — is what is tested, not the model's skill.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from sample_genes import SAMPLE_GENES

pytestmark = pytest.mark.gui

SHOTS = Path("/tmp/m2ort_shots")
TIMEOUT_MS = 240_000

# about 50 measured spots of C2 (x0, y0, x1, y1 in µm): 29 train / 20 validation by blocks
TRAIN_RECT = (3000.0, 3400.0, 4400.0, 4800.0)


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """None when the bundled model is installed (selected by default), else a tiny checkpoint."""
    import napari_m2ort  # noqa: F401
    from napari_m2ort.model.weights import BUNDLED_PATH

    if Path(BUNDLED_PATH).is_file():
        return None
    import timm
    import torch

    from napari_m2ort.model.weights import ModelCard, save_checkpoint

    torch.manual_seed(0)
    model = timm.create_model("m2ort_small", num_classes=len(SAMPLE_GENES))
    card = ModelCard(variant="m2ort_small", genes=list(SAMPLE_GENES), mpp=0.69, training_data="untrained test model")
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(model, card, path)
    return path


def _dock(viewer, start_model):
    _, widget = viewer.window.add_plugin_dock_widget("napari-m2ort", "Fine-tune")
    if start_model is not None:
        widget.add_checkpoint(start_model)
    return widget


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def _train_region(viewer):
    x0, y0, x1, y1 = TRAIN_RECT
    shapes = viewer.add_shapes(
        name="M2ORT regions", face_color="transparent", edge_color="yellow", edge_width=8, units=viewer.layers[0].units
    )
    shapes.add_rectangles(np.array([[y0, x0], [y1, x1]]))
    return shapes


def _small_config(widget, epochs=1):
    widget.region_check.setChecked(True)
    widget.epochs_spin.setValue(epochs)
    widget.batch_spin.setValue(16)
    widget.lr_spin.setValue(1e-4)
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("full"))
    widget.val_combo.setCurrentIndex(widget.val_combo.findData("blocks"))


def _stop_after(monkeypatch, first):
    """Make the widget's training stop, as Cancel does, right after the first progress
    event ``first`` accepts (Cancel from the test thread alone races the worker)."""
    import napari_m2ort.pipelines as pipelines

    real = pipelines.fine_tune

    def fine_tune(request, should_stop=None):
        hit = []
        job = real(request, lambda: bool(hit) or bool(should_stop and should_stop()))
        try:
            ev = next(job)
            while True:
                if not hit and first(ev):
                    hit.append(ev)
                ev = job.send((yield ev))
        except StopIteration as done:
            return done.value

    monkeypatch.setattr(pipelines, "fine_tune", fine_tune)


def _shot(viewer, name):
    Path("/tmp").joinpath(name).parent.mkdir(parents=True, exist_ok=True)
    viewer.window.screenshot(f"/tmp/{name}", canvas_only=False, flash=False)


def test_finetune_save_and_use_for_prediction(make_napari_viewer, qtbot, start_model, tmp_path):
    import datetime as dt

    from napari_m2ort.model.weights import load_checkpoint

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1500, 1100)
    viewer.open_sample("napari-m2ort", "her2st_c2")
    widget = _dock(viewer, start_model)
    # the sample's measured spots are offered as a training section, ticked
    assert [s.name for s in widget.selected_sections()] == ["her2st C2"]
    _train_region(viewer)
    _small_config(widget, epochs=1)
    assert not widget.save_btn.isEnabled() and not widget.use_btn.isEnabled()

    widget.train()
    assert widget.running and widget.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: len(widget.plot.losses) >= 1, timeout=TIMEOUT_MS)
    _shot(viewer, "h13_finetune_during.png")
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    res = widget.result
    assert res is not None and not res.stopped and res.epochs_done == 1
    assert len(res.history) == 1 and "val" in res.history[0]
    assert np.isfinite(res.history[0]["train_loss"])
    assert res.history[0]["val"]["n_spots"] >= 10
    # live plot got the steps and the epoch
    assert len(widget.plot.losses) == 2 and len(widget.plot.epoch_loss) == 1 and len(widget.plot.val_pcc) == 1
    assert "Done" in widget.status.text() and "kept epoch 1 (validation PCC-gene" in widget.status.text()

    # hand over to the Predict widget (docked on demand): unsaved, and listed so
    spec = widget.use_for_prediction()
    assert spec is not None and spec.startswith("memory:")
    from napari_m2ort.widgets._workers import predict_widget_for

    pw = predict_widget_for(widget.viewer)
    assert pw is not None and pw.model_spec() == spec
    assert "fine-tuned on her2st C2" in pw.model_combo.currentText()
    assert "unsaved" in pw.model_combo.currentText()

    # save: safetensors + a card describing this training, loadable; the list names the file
    path = widget.save(tmp_path / "finetuned.safetensors")
    assert path is not None and path.exists()
    text = pw.model_combo.currentText()
    assert "finetuned.safetensors" in text and "unsaved" not in text, text
    assert pw.models.labels[spec] == text
    model, card = load_checkpoint(path)
    assert list(card.genes) == list(res.card.genes)
    assert card.metrics.get("best_epoch") == 1
    # its own training: data, epochs, validation, fit, start, date; nothing inherited
    tune = card.metrics["fine_tune"]
    assert list(tune["sections"]) == ["her2st C2"]
    assert 10 < tune["sections"]["her2st C2"] < widget.selected_sections()[0].n_spots  # the region's spots
    assert tune["epochs_done"] == 1 and tune["epochs_planned"] == 1 and not tune["stopped"]
    assert tune["validation_on"].startswith("held-out spatial blocks") and tune["started_from"]
    assert card.metrics["validation"]["pcc_gene_mean"] == pytest.approx(res.best_metrics["pcc_gene_mean"])
    assert card.metrics["fit"]["per_section"], card.metrics["fit"]
    assert not any(k.startswith("leave_one_section_out") for k in card.metrics), list(card.metrics)
    assert "training_command" not in card.metrics and "held_out_spatial_blocks" not in card.metrics
    assert "cross-valid" not in card.notes.lower() and " CV " not in card.notes
    for words in ("her2st C2", "1 of 1 epoch", "Validation on held-out", "starting from", "her2st C2:train PCC-gene"):
        assert words in card.notes, card.notes
    assert card.created[:10] == dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    assert card.training_data.startswith("fine-tuned from") and "her2st C2" in card.training_data

    qtbot.wait(200)
    SHOTS.mkdir(parents=True, exist_ok=True)
    viewer.window.screenshot(str(SHOTS / "finetune_then_predict.png"), canvas_only=False, flash=False)
    from napari_m2ort.widgets._workers import _dock_of

    _dock_of(widget).raise_()
    qtbot.wait(200)
    _shot(viewer, "h13_finetune_after.png")


def test_cancel_in_first_epoch_keeps_nothing(make_napari_viewer, qtbot, start_model, tmp_path, monkeypatch):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-m2ort", "her2st_c2")
    widget = _dock(viewer, start_model)
    _train_region(viewer)
    _small_config(widget, epochs=2)
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("head"))
    _stop_after(monkeypatch, lambda ev: ev.stage == "train" and (ev.data or {}).get("step", 0) >= 1)
    widget.train()
    qtbot.waitUntil(lambda: len(widget.plot.losses) >= 1, timeout=TIMEOUT_MS)
    widget.cancel()
    assert not widget.cancel_btn.isEnabled()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    # a half-updated model is never offered
    assert widget.result is None
    assert not widget.save_btn.isEnabled() and not widget.use_btn.isEnabled()
    assert widget.progress_bar.value() < widget.progress_bar.maximum()  # not shown as complete
    assert widget.status.text() == (
        "Cancelled in epoch 1: no epoch finished, the starting weights are kept; nothing to save."
    )
    _shot(viewer, "h13_cancel_in_epoch1.png")
    assert widget.save(tmp_path / "half.safetensors") is None and not (tmp_path / "half.safetensors").exists()
    assert widget.train_btn.isEnabled()


def test_cancel_keeps_best_epoch(make_napari_viewer, qtbot, start_model, tmp_path, monkeypatch):
    from napari_m2ort.model.weights import load_checkpoint

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-m2ort", "her2st_c2")
    widget = _dock(viewer, start_model)
    _train_region(viewer)
    _small_config(widget, epochs=3)
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("head"))
    widget.genes_combo.setCurrentIndex(widget.genes_combo.findData("top"))  # a new head on this data's genes
    widget.top_spin.setValue(30)
    _stop_after(monkeypatch, lambda ev: ev.stage == "epoch")  # stops inside epoch 2
    widget.train()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    res = widget.result
    assert res is not None and res.stopped and res.epochs_done == 1 and res.best_epoch == 1
    pcc = res.best_metrics["pcc_gene_mean"]
    assert widget.status.text().startswith(f"Cancelled in epoch 2: kept epoch 1 (validation PCC-gene {pcc:.3f})")
    assert len(res.card.genes) == 30
    _shot(viewer, "h13_cancel_in_epoch2.png")
    path = widget.save(tmp_path / "partial.safetensors")
    _, card = load_checkpoint(path)
    tune = card.metrics["fine_tune"]
    assert tune["stopped"] and tune["epochs_done"] == 1 and tune["epochs_planned"] == 3 and tune["best_epoch"] == 1
    assert "(cancelled)" in card.notes and "kept epoch 1" in card.notes
    assert widget.train_btn.isEnabled()


def test_train_needs_data(make_napari_viewer, qtbot, start_model):
    viewer = make_napari_viewer()
    widget = _dock(viewer, start_model)
    assert not widget.train_btn.isEnabled() and "tick a section" in widget.train_btn.toolTip()
    viewer.open_sample("napari-m2ort", "her2st_c2")
    assert widget.settings.sections == ("her2st C2",) and widget.train_btn.isEnabled()
    item = widget.sections_list.item(0)
    from qtpy.QtCore import Qt

    item.setCheckState(Qt.CheckState.Unchecked)
    assert widget.settings.sections == () and not widget.train_btn.isEnabled()
    item.setCheckState(Qt.CheckState.Checked)
    assert widget.train_btn.isEnabled()


def test_plot_plain_axes_and_legend_outside(qtbot):
    from napari_m2ort.widgets.panels.plot import PCC_MIN_SPAN, LivePlot

    plot = LivePlot()
    qtbot.addWidget(plot)
    plot.resize(420, 260)
    for step, loss in enumerate((0.52, 0.5201, 0.5202, 0.5201), start=1):
        plot.add_step(step, loss, 1 + (step > 2))
    plot.add_epoch(1, 0.52005, 0.26050)
    plot.add_epoch(2, 0.52015, 0.26051)
    plot.canvas.draw()
    for axis in (plot.ax.yaxis, plot.ax2.yaxis):
        assert axis.get_offset_text().get_text() == ""
        labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
        assert labels and not any("e" in t.lower() or "+" in t for t in labels), labels
    lo, hi = plot.ax2.get_ylim()
    assert hi - lo >= PCC_MIN_SPAN - 1e-9 and lo < 0.2605 < hi  # a 0.00001 change stays flat
    lo, hi = plot.ax.get_ylim()
    assert hi - lo >= 0.1 * 0.52
    # the legend sits above the axes, never over the curves
    renderer = plot.canvas.get_renderer()
    legend = plot.legend.get_window_extent(renderer)
    axes = plot.ax.get_window_extent(renderer)
    assert legend.y0 >= axes.y1 - 1, (legend, axes)
    plot.figure.savefig("/tmp/h13_plot_small_change.png", facecolor=plot.figure.get_facecolor())


def test_both_docks_fit_1600x1000(make_napari_viewer, qtbot, start_model):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample("napari-m2ort", "her2st_c2")
    pdock, pw = viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression")
    fdock, fw = viewer.window.add_plugin_dock_widget("napari-m2ort", "Fine-tune")
    window = viewer.window._qt_window
    # tabs, each with the whole height (done once the dock is first shown)
    qtbot.waitUntil(lambda: fdock in window.tabifiedDockWidgets(pdock), timeout=10_000)
    for dock, name in ((pdock, "predict"), (fdock, "finetune")):
        dock.raise_()
        qtbot.wait(200)
        _shot(viewer, f"h13_both_docks_{name}.png")
        # each dock has the whole side column, not a share of it
        assert dock.height() >= 0.8 * window.height(), (name, dock.height(), window.height())
    for tab in range(fw.tabs.count()):  # the fine-tune dock, either form shown, needs no scrolling
        fw.tabs.setCurrentIndex(tab)
        qtbot.wait(100)
        bar = fw._scroll_area.verticalScrollBar()
        assert bar.maximum() == 0, f"the fine-tune dock scrolls ({bar.maximum()} px) at 1600x1000"
        plot_bottom = fw.plot.mapTo(fw, fw.plot.rect().bottomLeft()).y()
        assert fw.plot.height() >= 150 and plot_bottom <= fw.height()
        assert fw.save_btn.mapTo(fw, fw.save_btn.rect().bottomLeft()).y() <= fw.height()
    _shot(viewer, "h13_both_docks_finetune_training_tab.png")


def test_load_legacy_st_aligns_with_slide(make_napari_viewer, qtbot, start_model, her2st):
    from napari_m2ort.progress import Progress

    viewer = make_napari_viewer()
    viewer.open_sample("napari-m2ort", "her2st_c2")
    measured = viewer.layers["her2st C2 measured ST"]
    widget = _dock(viewer, start_model)
    # one section: held-out blocks; a whole section is listed but cannot be held out yet
    assert widget.val_combo.currentData() == "blocks" and widget.val_combo.itemText(0).startswith("Held-out blocks")
    one = widget.val_combo.findData("her2st C2")
    assert one >= 0 and not widget.val_combo.model().item(one).isEnabled()
    widget.format_combo.setCurrentIndex(widget.format_combo.findData("legacy"))
    widget.load(counts=str(her2st / "ST-cnts" / "C2.tsv.gz"), spots=str(her2st / "ST-spotfiles" / "C2_selection.tsv"))
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    new = viewer.layers[-1]
    assert new.name != measured.name and (new.metadata or {}).get("st_section") is not None
    # the same spots land on the same tissue as the sample's own layer (world coordinates, µm)
    world_new = np.asarray(new.data) * np.asarray(new.scale) + np.asarray(new.translate)
    world_ref = np.asarray(measured.data) * np.asarray(measured.scale) + np.asarray(measured.translate)
    np.testing.assert_allclose(np.sort(world_new, axis=0), np.sort(world_ref, axis=0), atol=1.0)
    assert widget.sections_list.count() == 2
    # two sections: either can be the validation set, and the request says which
    name = new.metadata["st_section"].name
    for held in ("her2st C2", name):
        index = widget.val_combo.findData(held)
        assert index >= 0 and widget.val_combo.model().item(index).isEnabled()
    widget.val_combo.setCurrentIndex(widget.val_combo.findData(name))
    assert widget.settings.val == name and widget._request().val == name
    # the live metrics: the mean over sections of each one's own PCC-gene, each named
    per = {"her2st C2:val": {"pcc_gene_mean": 0.3, "n_spots": 20}, f"{name}:val": {"pcc_gene_mean": 0.2, "n_spots": 22}}
    val = {"pcc_gene_mean": 0.25, "per_section": per, "pcc_spot_mean": 0.5}
    widget._on_progress(Progress("epoch", 1, 3, "", data={"epoch": 1, "train_loss": 0.5, "val": val}))
    text = widget.status.text()
    assert text.startswith("Epoch 1/3: loss 0.5000; validation PCC-gene 0.250 (mean over sections:"), text
    assert "her2st C2:val 0.300 (20 spots)" in text and f"{name}:val 0.200 (22 spots)" in text
    assert widget.plot.val_pcc == [0.25]


def test_errors_are_notified(make_napari_viewer, qtbot, start_model, tmp_path, errors):
    import anndata as ad

    viewer = make_napari_viewer()
    widget = _dock(viewer, start_model)
    # nothing to train on
    assert widget.train() is None
    assert "No ST section" in widget.last_error and errors
    viewer.open_sample("napari-m2ort", "her2st_c2")
    slide = viewer.layers[0]
    widget.format_combo.setCurrentIndex(widget.format_combo.findData("h5ad"))
    # an .h5ad without spot coordinates
    bad = tmp_path / "nospatial.h5ad"
    ad.AnnData(np.ones((5, 3), np.float32)).write_h5ad(bad)
    widget.load(h5ad=str(bad))
    _wait(qtbot, widget)
    assert "obsm['spatial']" in widget.last_error
    assert any("spatial" in m for m in errors)
    # spots whose coordinates are not on this slide
    far = tmp_path / "elsewhere.h5ad"
    a = ad.AnnData(np.ones((5, 3), np.float32))
    a.var_names = ["ERBB2", "GRB7", "ACTB"]
    a.obsm["spatial"] = np.full((5, 2), 1e6) + np.arange(5)[:, None]
    a.write_h5ad(far)
    widget.mpp_spin.setValue(float(slide.metadata["mpp"]))
    n_layers = len(viewer.layers)
    widget.load(h5ad=str(far))
    _wait(qtbot, widget)
    # the reader's words ("…spots lie outside the 9274 × 9911 px image…") or the widget's
    assert re.search(r"outside the (\d+ × \d+ px )?image", widget.last_error) or "falls on" in widget.last_error, (
        widget.last_error
    )
    assert len(viewer.layers) == n_layers
    # a gene list naming genes the data lacks
    widget.region_check.setChecked(False)
    widget.genes_combo.setCurrentIndex(widget.genes_combo.findData("list"))
    widget.genes_edit.setText("NOT_A_GENE_1, NOT_A_GENE_2")
    widget.epochs_spin.setValue(1)
    widget.train()
    _wait(qtbot, widget)
    assert "panel genes" in widget.last_error or "none of" in widget.last_error
    assert widget.train_btn.isEnabled()
