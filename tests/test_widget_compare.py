"""Predict at measured spots: the widget's numbers are the CLI's ``evaluate`` numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

TIMEOUT_MS = 300_000
INFERENCE = ["--tta", "none", "--smooth-um", "0", "--device", "cpu"]


def _bundled():
    import napari_m2ort  # noqa: F401  (torch before Qt)
    from napari_m2ort.model.weights import BUNDLED_PATH

    if not Path(BUNDLED_PATH).is_file():
        pytest.skip("the bundled weights are not installed")


def _dock(viewer):
    viewer.open_sample("napari-m2ort", "her2st_c2")
    _, widget = viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression")
    widget.settings.model = "bundled"
    widget.settings.device = "cpu"
    widget.settings.tta = "none"
    widget.settings.smooth_um = 0.0
    return widget


def test_predict_at_measured_equals_cli_evaluate(make_napari_viewer, qtbot, her2st, tmp_path):
    _bundled()
    from napari_m2ort.cli import main

    out = tmp_path / "metrics.json"
    args = ["evaluate", "--her2st", str(her2st), "--sections", "C2", "--model", "bundled", *INFERENCE]
    assert main([*args, "--out", str(out)]) == 0
    cli = json.loads(out.read_text())

    viewer = make_napari_viewer(show=True)
    widget = _dock(viewer)
    measured = widget.measured_layer()
    assert widget.predict_at_measured() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert widget.last_error is None, widget.last_error
    got = widget.at_measured.result.metrics
    for key in ("pcc_gene_mean", "pcc_spot_mean", "pcc_spot_mean_baseline", "n_spots", "n_genes"):
        assert got[key] == pytest.approx(cli[key], abs=1e-6), key
    ours = {r["gene"]: r["pcc"] for r in got["per_gene"]}
    theirs = {r["gene"]: r["pcc"] for r in cli["per_gene"]}
    assert ours.keys() == theirs.keys()
    assert np.allclose([ours[g] for g in theirs], list(theirs.values()), atol=1e-6, equal_nan=True)

    # the predictions sit on exactly the measured spots; measured values on the model's scale
    layer = widget.predictions_layer()
    assert layer is widget.at_measured.layer or layer.unique_id == widget.at_measured.layer.unique_id
    assert "M2ORT-S bundled" in layer.name
    assert np.allclose(np.asarray(layer.data), np.asarray(measured.data))
    assert "model's target" in measured.metadata["value_scale"]
    res = widget.at_measured.result
    assert np.allclose(measured.features["ERBB2"].to_numpy(), res.values("ERBB2")[1])
    # the summary names the overall numbers and the baseline; the table sorts; the scatter follows
    text = widget.summary_label.text()
    assert f"{cli['pcc_gene_mean']:.3f}" in text and f"{cli['pcc_spot_mean_baseline']:.3f}" in text
    table = widget.gene_table
    assert table.isSortingEnabled() and table.rowCount() == len(theirs)
    top = table.item(0, 1).value
    assert top == pytest.approx(max(v for v in theirs.values() if v is not None), abs=1e-3)
    widget.set_gene("ERBB2")
    assert widget.measured_panel.selected_gene() == "ERBB2"
    ax = widget.measured_panel.canvas.figure.axes[0]
    assert "ERBB2" in ax.get_title() and f"{theirs['ERBB2']:.3f}" in ax.get_title()
    assert widget.compare_label.text().startswith(f"ERBB2: PCC predicted vs measured = {theirs['ERBB2']:.2f}")
    qtbot.wait(300)
    viewer.window._qt_window.grab().save("/tmp/h12_compare.png")


def test_predict_at_measured_refuses_another_slide(make_napari_viewer, qtbot, errors):
    _bundled()
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="another slide")
    widget.settings.slide = "another slide"
    assert widget.predict_at_measured() is None
    assert "not on the slide 'another slide'" in widget.last_error
    assert any("means nothing" in m for m in errors)


def test_model_names_and_cross_validated_pcc():
    from types import SimpleNamespace

    from napari_m2ort.widgets._models import cross_validated_pcc, describe_card, model_name

    tuned = SimpleNamespace(
        variant="m2ort_small", training_data="fine-tuned from bundled on C3", created="2026-11-30T09:00:00+00:00"
    )
    assert model_name(tuned, "memory:abc") == "fine-tuned on C3 (2026-11-30)"
    assert model_name(SimpleNamespace(variant="m2ort_small", training_data="C2"), "bundled") == "M2ORT-S bundled"
    assert model_name(SimpleNamespace(variant="m2ort_small"), "file:/x/my_model.safetensors") == "M2ORT-S my_model"
    runs = {
        "m2ort_small (lr 0.0001 constant, 15 epochs)": {"mean_over_folds": {"pcc_gene_mean": 0.22}},
        "m2ort_small (lr 0.0003 cosine, warmup 2)": {"mean_over_folds": {"pcc_gene_mean": 0.25}},
        "mean": {"mean_over_folds": {"pcc_gene_mean": 0.0}},
    }
    metrics = {"training_command": "train --lr 3e-4 --schedule cosine", "leave_one_section_out_cv_patient_C": runs}
    card = SimpleNamespace(variant="m2ort_small", genes=["A"], mpp=0.69, fov_um=155.0, metrics=metrics)
    assert cross_validated_pcc(card) == (0.25, "leave-one-section-out patient C")
    assert "cross-validated PCC-gene 0.25" in describe_card(card)
    assert cross_validated_pcc(SimpleNamespace(variant="m2ort_small", metrics={})) is None
