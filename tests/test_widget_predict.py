"""The Predict expression dock widget, end to end on the bundled HER2+ sample (under Xvfb).

Each test docks the widget through the plugin manifest, opens the real sample section
(File > Open Sample), draws regions in µm and runs the real worker.  Until the bundled
weights exist, a small untrained M2ORT-S checkpoint (20 genes of the section) stands in:
the GUI path does not depend on what the weights predict.
"""

from __future__ import annotations

import functools
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from sample_genes import SAMPLE_GENES

pytestmark = pytest.mark.gui

SHOTS = Path("/tmp/m2ort_shots")
TIMEOUT_MS = 180_000

_MASKS: dict = {}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """None when the bundled model is installed (the widget selects it), else a tiny checkpoint."""
    import napari_m2ort  # noqa: F401  (timm registration, torch before Qt)
    from napari_m2ort.model.weights import BUNDLED_PATH

    if Path(BUNDLED_PATH).is_file():
        return None
    import timm
    import torch

    from napari_m2ort.model.weights import ModelCard, save_checkpoint

    genes = list(SAMPLE_GENES)
    torch.manual_seed(0)
    model = timm.create_model("m2ort_small", num_classes=len(genes))
    card = ModelCard(variant="m2ort_small", genes=genes, mpp=0.69, training_data="untrained test model")
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(model, card, path)
    return path


def _dock(viewer, model_path):
    _, widget = viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression")
    if model_path is not None:
        assert widget.add_checkpoint(model_path) is not None
    assert widget.model_spec() is not None
    return widget


def _sample(viewer):
    viewer.open_sample("napari-m2ort", "her2st_c2")
    return viewer.layers[0]


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def _expected_ids(slide_layer, rects_um):
    """Spot ids the core places in these rectangles (x0, y0, x1, y1), tissue only."""
    from napari_m2ort.io.slides import open_slide
    from napari_m2ort.spots import layout_spots, restrict_to_tissue, tissue_mask

    slide = open_slide(slide_layer.metadata["path"], mpp=slide_layer.metadata["mpp"])
    mask = _MASKS.get(str(slide.path))
    if mask is None:
        mask = _MASKS[str(slide.path)] = tissue_mask(slide)
    ids = set()
    for r in rects_um:
        spots = restrict_to_tissue(layout_spots(r, "visium", slide_size_um=slide.size_um), mask)
        ids |= set(map(str, spots.ids))
    return ids


def _card(widget):
    return widget.models.card(widget.model_spec())


# ------------------------------------------------------------------ tests


def test_predict_regions_overlap_display_export(make_napari_viewer, qtbot, model_path, tmp_path, monkeypatch):
    import anndata as ad

    from napari_m2ort.widgets import _layers

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1500, 1000)
    slide = _sample(viewer)
    widget = _dock(viewer, model_path)
    widget.batch_spin.setValue(4)
    from napari_m2ort.widgets import predict as P

    monkeypatch.setattr(P, "REDRAW_S", 0.0)  # draw every batch (the default groups them in time)
    batches = []
    real_append = _layers.append_spots

    def counting_append(layer, yx, values, ids, *a, **k):
        batches.append(len(yx))
        return real_append(layer, yx, values, ids, *a, **k)

    monkeypatch.setattr(_layers, "append_spots", counting_append)

    shapes = widget.add_regions_layer()
    assert shapes.name == "M2ORT regions"
    rect_a = (3510.0, 3790.0, 3860.0, 4090.0)  # x0, y0, x1, y1 in µm, on tissue
    shapes.add_rectangles(np.array([[rect_a[1], rect_a[0]], [rect_a[3], rect_a[2]]]))
    ids_a = _expected_ids(slide, [rect_a])
    assert 8 <= len(ids_a) <= 25

    widget.predict_regions()
    assert widget.running
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error

    layer = widget.predictions_layer()
    card = _card(widget)
    from napari_m2ort.widgets._models import model_name

    assert layer.name == f"{widget.current_gene()} - {model_name(card, widget.model_spec())}"
    assert md_flags_ok(layer)
    assert len(layer.data) == len(ids_a)
    assert set(layer.metadata["spot_ids"]) == ids_a
    assert list(layer.features.columns) == list(card.genes)
    assert np.allclose(layer.size, 55.0)
    assert np.isfinite(layer.features.to_numpy()).all()
    md = layer.metadata
    assert md["layout"] == "visium" and md["mpp"] == pytest.approx(slide.metadata["mpp"])
    assert '"genes"' in md["model_card"]
    # data are (y, x) µm inside the drawn rectangle
    y, x = layer.data[:, 0], layer.data[:, 1]
    assert (x >= rect_a[0]).all() and (x <= rect_a[2]).all() and (y >= rect_a[1]).all() and (y <= rect_a[3]).all()
    # points arrived batch by batch (the last with the result)
    assert len(batches) == math.ceil(len(ids_a) / 4) and len(batches) > 1
    assert widget.last_run["n_spots"] == len(ids_a)

    # a second region overlapping the first adds only the new spots
    rect_b = (3710.0, 3790.0, 4010.0, 4090.0)
    shapes.add_rectangles(np.array([[rect_b[1], rect_b[0]], [rect_b[3], rect_b[2]]]))
    ids_ab = _expected_ids(slide, [rect_a, rect_b])
    widget.predict_regions()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    assert widget.predictions_layer() == layer
    assert len(layer.data) == len(ids_ab)
    assert len(set(layer.metadata["spot_ids"])) == len(layer.metadata["spot_ids"])
    assert widget.last_run["n_spots"] == len(ids_ab) - len(ids_a)
    assert widget.last_run["skipped"] == len(ids_a)
    assert len(layer.features) == len(layer.data)
    # the same region again: nothing to do, nothing added
    widget.predict_regions()
    _wait(qtbot, widget)
    assert len(layer.data) == len(ids_ab)
    assert "already predicted" in widget.status.text()

    # display: gene, colormap, contrast, colorbar, heat map, comparison with measured
    gene = [g for g in card.genes if g != widget.current_gene()][0]
    widget.set_gene(gene)
    from napari_m2ort.raster import value_range

    lo, hi = value_range(layer.features[gene].to_numpy(), _layers.on_tissue(layer))  # 1st-99th percentile
    assert layer.face_contrast_limits == pytest.approx((lo, hi), abs=1e-3)
    assert layer.name.startswith(f"{gene} - ")
    assert layer.face_colorbar.visible
    widget.cmap_combo.setCurrentText("magma")
    assert layer.face_colormap.name == "magma"
    widget.clim_max.setValue(lo + (hi - lo) / 2)
    assert layer.face_contrast_limits[1] == pytest.approx(lo + (hi - lo) / 2, abs=1e-3)
    widget.heatmap_check.setChecked(True)
    heat = [ly for ly in viewer.layers if ly.name.startswith("M2ORT heat map")]
    assert len(heat) == 1
    img = np.asarray(heat[0].data)
    assert np.isfinite(img).any() and np.isnan(img).any()  # transparent away from the spots
    assert heat[0].opacity == pytest.approx(0.6)
    widget.heatmap_check.setChecked(False)
    assert not [ly for ly in viewer.layers if ly.name.startswith("M2ORT heat map")]
    if "ERBB2" in card.genes:
        widget.set_gene("ERBB2")
        assert "ERBB2" in widget.compare_label.text()
    # hovering a spot shows its id and value
    from types import SimpleNamespace

    widget._on_hover(layer, SimpleNamespace(position=tuple(layer.data[0]), view_direction=None, dims_displayed=[0, 1]))
    assert widget.hover_label.text().startswith(str(layer.metadata["spot_ids"][0]))
    # side by side with the measured spots: a 1×2 grid, undone when unticked
    order = [ly.name for ly in viewer.layers]
    widget.compare_check.setChecked(True)
    assert viewer.grid.enabled and viewer.grid.stride == 2
    assert any(ly.name.endswith("(measured view)") for ly in viewer.layers)
    widget.compare_check.setChecked(False)
    assert not viewer.grid.enabled
    assert not any(ly.name.endswith("(measured view)") for ly in viewer.layers)
    assert [ly.name for ly in viewer.layers] == order

    # export: .h5ad round trip and CSV
    out = widget.export_h5ad(tmp_path / "pred.h5ad")
    assert out is not None and out.exists()
    adata = ad.read_h5ad(out)
    assert adata.n_obs == len(layer.data)
    assert list(adata.var_names) == list(card.genes)
    assert list(adata.obs_names) == [str(i) for i in layer.metadata["spot_ids"]]
    np.testing.assert_allclose(adata.X, layer.features.to_numpy(np.float32), rtol=1e-6)
    np.testing.assert_allclose(adata.obsm["spatial_um"], layer.data[:, ::-1])
    csv = widget.export_csv(tmp_path / "pred.csv")
    assert csv is not None and csv.read_text().count("\n") == len(layer.data) + 1
    # the same structure as the CLI: images for scanpy, inference options, and a SpatialData store
    lib = next(iter(adata.uns["spatial"]))
    assert {"hires", "lowres"} <= set(adata.uns["spatial"][lib]["images"])
    assert adata.uns["m2ort"]["smooth_um"] == widget.settings.smooth_um
    import spatialdata

    store = widget.export_zarr(tmp_path / "pred.zarr")
    sdata = spatialdata.read_zarr(store)
    assert next(iter(sdata.tables.values())).n_obs == len(layer.data) and len(sdata.images) == 1

    # screenshot: the tissue and the predicted colours are on the canvas
    widget.set_gene(card.genes[0])
    widget.cmap_combo.setCurrentText("viridis")
    layer.opacity = 1.0
    widget.measured_layer().visible = False
    viewer.camera.center = (3940.0, 3760.0)
    viewer.camera.zoom = min(viewer.canvas.size) / 600.0
    qtbot.wait(300)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    SHOTS.mkdir(parents=True, exist_ok=True)
    viewer.window.screenshot(str(SHOTS / "predict_widget.png"), canvas_only=False, flash=False)
    rgb = shot[..., :3].astype(float)
    assert rgb.std() > 20  # not a blank/black canvas
    colours = np.unique(np.round(layer.face_color[:, :3] * 255), axis=0)
    pixels = rgb.reshape(-1, 3)[::7]
    found = sum(np.min(np.abs(pixels - c).sum(axis=1)) < 12 for c in colours)
    assert found >= max(1, len(colours) // 2)


def md_flags_ok(layer) -> bool:
    """Every spot carries a flag; the ones on tissue are "ok" and shown."""
    flags = layer.metadata["flags"]
    return len(flags) == len(layer.data) and set(flags) <= {"ok", "off-slide", "blank", "not-HE"}


def _region_widget(make_napari_viewer, model_path, corners_yx, batch: int = 2):
    """The sample slide, the widget with a small batch size, and one drawn rectangle."""
    viewer = make_napari_viewer()
    _sample(viewer)
    widget = _dock(viewer, model_path)
    widget.batch_spin.setValue(batch)
    shapes = widget.add_regions_layer()
    shapes.add_rectangles(np.array(corners_yx))
    return viewer, widget


def test_cancel_keeps_partial_predictions(make_napari_viewer, qtbot, model_path):
    viewer, widget = _region_widget(make_napari_viewer, model_path, [[3600.0, 3400.0], [4200.0, 4000.0]])
    widget.predict_regions()
    qtbot.waitUntil(
        lambda: widget.predictions_layer() is not None and len(widget.predictions_layer().data) > 0, timeout=TIMEOUT_MS
    )
    assert widget.cancel_btn.isEnabled()
    widget.cancel()
    _wait(qtbot, widget)
    layer = widget.predictions_layer()
    run = widget.last_run
    assert run["stopped"] is True
    assert 0 < len(layer.data) == run["n_spots"] < run["n_requested"]
    assert len(layer.metadata["spot_ids"]) == len(layer.data) == len(layer.features)
    assert np.isfinite(layer.features.to_numpy()).all()
    assert "Stopped" in widget.status.text()
    assert widget.predict_regions_btn.isEnabled() and not widget.cancel_btn.isEnabled()


def test_batches_are_drawn_together_not_one_by_one(make_napari_viewer, qtbot, model_path, monkeypatch):
    """Every redraw costs the UI thread (and so the model) time: the first batch is drawn
    as it arrives, later ones together at most every REDRAW_S, and the last with the
    result; nothing received is left undrawn."""
    from napari_m2ort.widgets import predict as P

    monkeypatch.setattr(P, "REDRAW_S", 1e9)
    viewer, widget = _region_widget(make_napari_viewer, model_path, [[3600.0, 3400.0], [3900.0, 3700.0]])
    drawn = []
    real = widget._draw_pending

    def spy(**kw):
        real(**kw)
        layer = widget._run.layer
        drawn.append(0 if layer is None else len(layer.data))

    monkeypatch.setattr(widget, "_draw_pending", spy)
    widget.predict_regions()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    n = widget.last_run["n_spots"]
    assert n > 4  # several batches of 2
    assert drawn[0] == 2 and drawn[-1] == n == len(widget.predictions_layer().data)
    assert len(set(drawn)) == 2  # the first batch, then everything with the result


def _predict_300um_view(make_napari_viewer, qtbot, model_path):
    """The sample slide, the widget, and a prediction of a 300 µm wide view of tissue."""
    viewer = make_napari_viewer()
    _sample(viewer)
    widget = _dock(viewer, model_path)
    h, w = viewer.canvas.size
    viewer.camera.center = (4000.0, 3800.0)
    viewer.camera.zoom = max(h, w) / 300.0
    widget.predict_view()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    return viewer, widget


def test_predict_view(make_napari_viewer, qtbot, model_path):
    viewer, widget = _predict_300um_view(make_napari_viewer, qtbot, model_path)
    h, w = viewer.canvas.size
    layer = widget.predictions_layer()
    assert 2 <= len(layer.data) <= 20
    half = np.array([h, w]) / viewer.camera.zoom / 2
    lo, hi = np.array([4000.0, 3800.0]) - half, np.array([4000.0, 3800.0]) + half
    assert ((layer.data >= lo - 1e-6) & (layer.data <= hi + 1e-6)).all()
    # another spot layout goes to its own layer (its spots have other sizes and ids)
    viewer.camera.zoom = max(h, w) / 700.0
    widget.layout_combo.setCurrentIndex(widget.layout_combo.findData("st"))
    widget.predict_view()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    st_layer = widget.predictions_layer()
    assert st_layer != layer and st_layer.metadata["layout"] == "st"
    assert np.allclose(st_layer.size, 100.0) and np.allclose(layer.size, 55.0)


def test_predict_view_compiled(make_napari_viewer, qtbot, model_path):
    """The compile checkbox reaches the engine; compiled values match eager ones."""
    import os
    import shutil

    import torch

    from napari_m2ort.devices import resolve_precision

    viewer, widget = _predict_300um_view(make_napari_viewer, qtbot, model_path)
    eager = widget.predictions_layer().features.copy()
    assert widget.last_run["compiled"] is False
    # the same spots again, compiled, into a fresh layer
    viewer.layers.remove(widget.predictions_layer())
    widget.compile_check.setChecked(True)
    widget.predict_view()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    bf16_cpu = resolve_precision("auto", torch.device("cpu")) is not None
    has_cxx = shutil.which(os.environ.get("CXX", "g++")) is not None
    assert widget.last_run["compiled"] is (bf16_cpu and has_cxx)
    comp = widget.predictions_layer().features
    genes = [c for c in eager.columns if c in comp.columns and eager[c].dtype.kind == "f"]
    assert len(comp) == len(eager) and len(genes) >= 10
    a, b = eager[genes].to_numpy(), comp[genes].to_numpy()
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-2


def test_predict_tissue_custom_layout(make_napari_viewer, qtbot, model_path):
    """Whole slide, tissue only, on a coarse custom grid (few spots, so it stays quick)."""
    from napari_m2ort.io.slides import open_slide
    from napari_m2ort.spots import layout_spots, restrict_to_tissue, tissue_mask

    viewer = make_napari_viewer()
    slide_layer = _sample(viewer)
    widget = _dock(viewer, model_path)
    widget.layout_combo.setCurrentIndex(widget.layout_combo.findData("custom"))
    widget.pitch_spin.setValue(700.0)
    widget.diam_spin.setValue(150.0)
    widget.tissue_check.setChecked(False)  # 'Predict tissue' keeps tissue spots anyway
    widget.predict_tissue()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    slide = open_slide(slide_layer.metadata["path"], mpp=slide_layer.metadata["mpp"])
    h, w = slide.size_um
    expected = restrict_to_tissue(
        layout_spots((0, 0, w, h), "custom", pitch_um=700.0, diameter_um=150.0, slide_size_um=slide.size_um),
        tissue_mask(slide),
    )
    layer = widget.predictions_layer()
    assert set(layer.metadata["spot_ids"]) == set(map(str, expected.ids))
    assert np.allclose(layer.size, 150.0) and layer.metadata["layout"] == "custom"


def test_predict_on_in_memory_image(make_napari_viewer, qtbot, model_path):
    """An image layer with no file behind it (e.g. from the console) goes through LayerSlide."""
    from napari_m2ort.io.slides import open_slide
    from napari_m2ort.sample_data import sample_image_path

    mpp = 0.688
    slide = open_slide(sample_image_path(), mpp=mpp)
    x0, y0 = 4900, 5400  # px: a tissue-rich 1400 px (~960 µm) crop
    rgb = slide.read_region(x0, y0, 1400, 1400)
    viewer = make_napari_viewer()
    layer = viewer.add_image(rgb, rgb=True, name="crop", scale=(mpp, mpp), units=("um", "um"))
    widget = _dock(viewer, model_path)
    assert widget.slide_layer() == layer
    assert widget.mpp_spin.value() == pytest.approx(mpp, abs=1e-3)
    widget.tissue_check.setChecked(False)
    shapes = widget.add_regions_layer()
    shapes.add_rectangles(np.array([[310.0, 310.0], [560.0, 560.0]]))
    widget.predict_regions()
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    pred = widget.predictions_layer()
    assert 4 <= len(pred.data) <= 12
    assert np.isfinite(pred.features.to_numpy()).all()


def test_errors_are_notified(make_napari_viewer, qtbot, model_path, errors):
    viewer = make_napari_viewer()
    widget = _dock(viewer, model_path)
    # no slide
    assert widget.predict_regions() is None
    assert "Open an H&E slide" in widget.last_error and errors
    _sample(viewer)
    # no regions layer
    assert widget.predict_regions() is None
    assert "regions layer" in widget.last_error
    # a region off the slide: the core's message comes back from the worker
    shapes = widget.add_regions_layer()
    shapes.add_rectangles(np.array([[-900.0, -900.0], [-500.0, -500.0]]))
    widget.predict_regions()
    _wait(qtbot, widget)
    assert "outside" in widget.last_error
    assert any("outside" in m for m in errors)
    assert widget.predictions_layer() is None
    # a region on glass with 'tissue only'
    shapes.data = [np.array([[200.0, 200.0], [200.0, 600.0], [600.0, 600.0], [600.0, 200.0]])]
    widget.predict_regions()
    _wait(qtbot, widget)
    assert "tissue" in widget.last_error
    # the viewer is still usable and nothing is half-done
    assert widget.predict_regions_btn.isEnabled()
    assert widget.export_h5ad(None) is None


def test_activity_bar_only_for_long_jobs(qtbot, monkeypatch):
    """napari's activity bar relayouts the main window when made and re-described: a job
    over in seconds never gets one, a long one gets it with the current state."""
    from napari_m2ort.progress import Progress
    from napari_m2ort.widgets import _workers

    made = []

    class Bar:
        def __init__(self, total=0, desc=""):
            self.total, self.n, self.desc = total, 0, desc
            made.append(self)

        def set_description(self, desc):
            self.desc = desc

        def update(self, k):
            self.n += k

        def close(self):
            pass

    monkeypatch.setattr(_workers, "napari_progress", Bar)
    seen = []

    def quick(should_stop):
        yield Progress("predict", 1, 2)
        yield Progress("predict", 2, 2)
        return "done"

    handle = _workers.start_job(quick, desc="quick", on_progress=seen.append, activity_delay_ms=60_000)
    qtbot.waitUntil(lambda: handle.finished, timeout=10_000)
    assert handle.result == "done" and [e.done for e in seen] == [1, 2] and not made

    gate = threading.Event()

    def slow(should_stop):
        yield Progress("predict", 1, 4)
        gate.wait(10)
        yield Progress("predict", 4, 4)
        return "done"

    handle = _workers.start_job(slow, desc="slow", activity_delay_ms=50)
    qtbot.waitUntil(lambda: len(made) == 1, timeout=10_000)
    qtbot.waitUntil(lambda: made[0].n == 1, timeout=10_000)  # shown with the state so far
    assert made[0].total == 4 and made[0].desc == "slow: predict"
    gate.set()
    qtbot.waitUntil(lambda: handle.finished, timeout=10_000)
    assert made[0].n == 4 and handle.pbar is None


def test_jobs_hand_the_gil_back_often_while_they_run(qtbot):
    """While a job runs, the GIL switch interval is 0.5 ms (the worker's torch ops get the
    GIL back between ops while the UI renders); the user's own setting returns after the
    last of two overlapping jobs."""
    import sys

    from napari_m2ort.progress import Progress
    from napari_m2ort.widgets import _workers

    before = sys.getswitchinterval()
    gates = [threading.Event(), threading.Event()]

    def job(gate):
        def make(should_stop):
            yield Progress("predict", 0, 1)
            gate.wait(10)
            return "done"

        return make

    first = _workers.start_job(job(gates[0]), desc="a", show_progress=False)
    second = _workers.start_job(job(gates[1]), desc="b", show_progress=False)
    assert sys.getswitchinterval() == pytest.approx(_workers.JOB_SWITCH_INTERVAL_S)
    gates[0].set()
    qtbot.waitUntil(lambda: first.finished, timeout=10_000)
    assert sys.getswitchinterval() == pytest.approx(_workers.JOB_SWITCH_INTERVAL_S)
    gates[1].set()
    qtbot.waitUntil(lambda: second.finished, timeout=10_000)
    assert sys.getswitchinterval() == pytest.approx(before)


def _join_preparation():
    for t in [t for t in threading.enumerate() if t.name == "m2ort-prepare"]:
        t.join(120)


def test_one_job_at_a_time_runs_the_model(make_napari_viewer, qtbot, model_path, monkeypatch):
    """torch.compile tracing a model while the background warm-up ran it deadlocked a test
    run: predictions hold the widget's model lock, and the warm-up skips a busy model."""
    from napari_m2ort import inference, pipelines
    from napari_m2ort.widgets.predict import PredictWidget

    # The lock is read in the worker thread as each predict event leaves run_plan: the GUI
    # handles queued events later, after the job may already have let the lock go.
    held, widgets = [], []
    real_init, real_run_plan = PredictWidget.__init__, pipelines.run_plan

    @functools.wraps(real_init)
    def init_spy(self, *args, **kwargs):
        widgets.append(self)
        real_init(self, *args, **kwargs)

    def run_plan_spy(*args, **kwargs):
        gen = real_run_plan(*args, **kwargs)
        result = None
        try:
            ev = next(gen)
            while True:
                if ev.stage == "predict":
                    held.append(widgets[-1]._model_lock.locked())
                ev = gen.send((yield ev))
        except StopIteration as stop:
            result = stop.value
        return result

    monkeypatch.setattr(PredictWidget, "__init__", init_spy)
    monkeypatch.setattr(pipelines, "run_plan", run_plan_spy)
    viewer, widget = _predict_300um_view(make_napari_viewer, qtbot, model_path)
    assert held and all(held) and not widget._model_lock.locked()

    warmed = []
    monkeypatch.setattr(inference, "warm_up_model", lambda model, device="auto", precision="auto": warmed.append(1))
    widget._prepared.clear()
    with widget._model_lock:  # as while a prediction runs
        widget._prepare()
        _join_preparation()
    assert warmed == []
    widget._prepared.clear()
    widget._prepare()
    _join_preparation()
    assert warmed == [1]
