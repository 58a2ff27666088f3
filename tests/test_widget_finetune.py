"""The Fine-tune dock widget on the bundled HER2+ section C2 (real spots, real patches).

Training is kept tiny (about 50 legacy-ST spots inside a drawn region, one epoch, batch
16) so the GUI path — loading, alignment, worker, live plot, cancel, save, hand-over to
the Predict widget — is what is tested, not the model's skill.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

SHOTS = Path("/tmp/m2ort_shots")
TIMEOUT_MS = 240_000
SAMPLE_GENES = (
    "IGKC",
    "IGLC2",
    "ERBB2",
    "IGHG3",
    "TMSB10",
    "PSMB3",
    "IGHA1",
    "MUCL1",
    "ACTG1",
    "TFF3",
    "ACTB",
    "SERF2",
    "PPP1R1B",
    "IGHM",
    "MUC6",
    "PSMD3",
    "PFN1",
    "MIEN1",
    "MGP",
    "DDX5",
)
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


def test_finetune_save_and_use_for_prediction(make_napari_viewer, qtbot, start_model, tmp_path):
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
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    res = widget.result
    assert res is not None and not res.stopped and res.epochs_done == 1
    assert len(res.history) == 1 and "val" in res.history[0]
    assert np.isfinite(res.history[0]["train_loss"])
    assert res.history[0]["val"]["n_spots"] >= 10
    # live plot got the steps and the epoch
    assert len(widget.plot.losses) == 2 and len(widget.plot.epoch_loss) == 1 and len(widget.plot.val_pcc) == 1
    assert "Done" in widget.status.text()

    # save: safetensors + model card, loadable
    path = widget.save(tmp_path / "finetuned.safetensors")
    assert path is not None and path.exists()
    model, card = load_checkpoint(path)
    assert list(card.genes) == list(res.card.genes)
    assert card.metrics.get("best_epoch") == 1

    SHOTS.mkdir(parents=True, exist_ok=True)
    viewer.window.screenshot(str(SHOTS / "finetune_trained.png"), canvas_only=False, flash=False)

    # hand over to the Predict widget (docked on demand)
    spec = widget.use_for_prediction()
    assert spec is not None and spec.startswith("memory:")
    from napari_m2ort.widgets._workers import predict_widget_for

    pw = predict_widget_for(widget.viewer)
    assert pw is not None and pw.model_spec() == spec
    assert "fine-tuned" in pw.model_combo.currentText()

    qtbot.wait(200)
    viewer.window.screenshot(str(SHOTS / "finetune_then_predict.png"), canvas_only=False, flash=False)


def test_cancel_keeps_model(make_napari_viewer, qtbot, start_model, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-m2ort", "her2st_c2")
    widget = _dock(viewer, start_model)
    _train_region(viewer)
    _small_config(widget, epochs=3)
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("head"))
    widget.genes_combo.setCurrentIndex(widget.genes_combo.findData("top"))  # a new head on this data's genes
    widget.top_spin.setValue(30)
    widget.train()
    qtbot.waitUntil(lambda: len(widget.plot.losses) >= 1, timeout=TIMEOUT_MS)
    widget.cancel()
    assert not widget.cancel_btn.isEnabled()
    _wait(qtbot, widget)
    res = widget.result
    assert res is not None and res.stopped and res.epochs_done < 3
    assert "Stopped" in widget.status.text()
    assert len(res.card.genes) == 30
    assert widget.save(tmp_path / "partial.safetensors").exists()
    assert widget.train_btn.isEnabled()


def test_load_legacy_st_aligns_with_slide(make_napari_viewer, qtbot, start_model):
    from napari_m2ort.sample_data import SAMPLE_DIR

    viewer = make_napari_viewer()
    viewer.open_sample("napari-m2ort", "her2st_c2")
    measured = viewer.layers["her2st C2 measured ST"]
    widget = _dock(viewer, start_model)
    widget.format_combo.setCurrentIndex(widget.format_combo.findData("legacy"))
    widget.load(counts=str(SAMPLE_DIR / "C2.tsv.gz"), spots=str(SAMPLE_DIR / "C2_selection.tsv"))
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    new = viewer.layers[-1]
    assert new.name != measured.name and (new.metadata or {}).get("st_section") is not None
    # the same spots land on the same tissue as the sample's own layer (world coordinates, µm)
    world_new = np.asarray(new.data) * np.asarray(new.scale) + np.asarray(new.translate)
    world_ref = np.asarray(measured.data) * np.asarray(measured.scale) + np.asarray(measured.translate)
    np.testing.assert_allclose(np.sort(world_new, axis=0), np.sort(world_ref, axis=0), atol=1.0)
    assert widget.sections_list.count() == 2
    # two sections: either can be the validation set
    assert widget.val_combo.findData(new.metadata["st_section"].name) >= 0


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
    assert "outside the image" in widget.last_error or "falls on" in widget.last_error
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
