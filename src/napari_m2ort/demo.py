"""``napari-m2ort demo``: the real GUI path, driven headless.

Opens the bundled HER2+ sample in a napari viewer, docks the Predict expression widget,
draws a tissue-rich rectangle holding about ``--spots`` Visium spots, presses Predict,
and writes ``predictions.h5ad`` (the same structure as ``napari-m2ort predict`` writes:
``pipelines.write_prediction`` of the widget's result) and ``overlay.png`` (a
screenshot of the canvas: predicted expression of one gene over the tissue, colorbar,
legend and scale bar).  With ``--compare`` it presses "Predict at measured spots"
instead (the sample's own measured spots) and writes ``compare.json`` (the scores
``napari-m2ort evaluate`` gives on that section) and ``compare.png`` (the whole window:
the overlay, the per-gene table and the scatter plot).  Without a display it starts a private Xvfb server for the run
(napari needs a real OpenGL context: Qt's ``offscreen`` platform cannot draw layers).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .errors import M2ORTError

# ------------------------------------------------------------------ display


def _free_display() -> int:
    for n in range(99, 400):
        if not Path(f"/tmp/.X{n}-lock").exists() and not Path(f"/tmp/.X11-unix/X{n}").exists():
            return n
    raise M2ORTError("No free X display number for Xvfb (all of :99-:399 are taken).")


@contextlib.contextmanager
def virtual_display(size: str = "1600x1200x24"):
    """Yield with a usable X display: the current one, or a private Xvfb started here."""
    if os.environ.get("QT_QPA_PLATFORM", "") == "offscreen":
        os.environ.pop("QT_QPA_PLATFORM")  # offscreen Qt cannot render napari layers
    if sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        yield None
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise M2ORTError(
            "There is no display and Xvfb is not installed: run the demo on a desktop, install "
            "Xvfb (e.g. apt-get install xvfb), or run it under xvfb-run -a."
        )
    n = _free_display()
    proc = subprocess.Popen(
        [xvfb, f":{n}", "-screen", "0", size, "-nolisten", "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    sock = Path(f"/tmp/.X11-unix/X{n}")
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise M2ORTError(f"Xvfb could not start on display :{n}; run the demo under xvfb-run -a.")
        time.sleep(0.05)
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{n}"
    try:
        yield n
    finally:
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------ region choice


def tissue_rich_region(slide_layer, n_spots: int, pitch_um: float = 100.0) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) µm of a square holding about ``n_spots`` hex spots, where the
    tissue is densest (tissue mask of the slide, box-filtered)."""
    from scipy import ndimage

    from .io.slides.layer import LayerSlide, layer_mpp
    from .spots import tissue_mask

    mpp, source = layer_mpp(slide_layer)
    path = (slide_layer.metadata or {}).get("path")
    if path:
        from .io.slides import open_slide

        slide = open_slide(path, mpp=mpp)
    else:
        slide = LayerSlide(slide_layer, mpp, source)
    side = math.sqrt(max(1, n_spots) * pitch_um * pitch_um * math.sqrt(3) / 2)
    mask = tissue_mask(slide, max_px=1024)
    win = max(1, int(round(side / mask.um_per_px)))
    density = ndimage.uniform_filter(mask.mask.astype(np.float32), size=win, mode="constant")
    r, c = np.unravel_index(int(np.argmax(density)), density.shape)
    cy, cx = (r + 0.5) * mask.um_per_px, (c + 0.5) * mask.um_per_px
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


# ------------------------------------------------------------------ the demo


def _wait(app, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise M2ORTError(f"The demo timed out after {timeout:.0f} s.")
        app.processEvents()
        time.sleep(0.01)
    app.processEvents()


def _open_widget(viewer, device: str, model: str, tta: str, smooth_um: float):
    """The sample (image + measured spots) and the docked Predict widget, set up."""
    from .pipelines import BUNDLED, checkpoint_path

    viewer.open_sample("napari-m2ort", "her2st_c2")
    _, widget = viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression")
    if model != BUNDLED:
        widget.add_checkpoint(str(checkpoint_path(model)))
    if widget.model_spec() is None:
        checkpoint_path(BUNDLED)  # raises the clear "bundled weights missing" error
    if widget.device_combo.findText(device) < 0:
        raise M2ORTError(
            f"--device {device}: not available here (use one of "
            f"{', '.join(widget.device_combo.itemText(i) for i in range(widget.device_combo.count()))})."
        )
    widget.device_combo.setCurrentText(device)
    widget.tta_combo.setCurrentText(tta)
    widget.smooth_spin.setValue(float(smooth_um))
    return widget


def _run(out: Path, gene: str, n_spots: int, device: str, model: str, tta: str, smooth_um: float) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from .pipelines import write_prediction

    t_start = time.perf_counter()
    viewer = napari.Viewer(show=True, title="napari-m2ort demo")
    try:
        viewer.window.resize(1600, 1100)
        app = QApplication.instance()
        widget = _open_widget(viewer, device, model, tta, smooth_um)
        widget.layout_combo.setCurrentIndex(widget.layout_combo.findData("visium"))
        widget.tissue_check.setChecked(True)
        slide_layer = widget.slide_layer()
        for layer in [x for x in viewer.layers if x.unique_id != slide_layer.unique_id]:
            viewer.layers.remove(layer)  # the measured spots would hide the predicted ones
        x0, y0, x1, y1 = tissue_rich_region(slide_layer, n_spots)
        shapes = widget.add_regions_layer()
        shapes.add_rectangles(np.array([[y0, x0], [y1, x1]]))
        shapes.mode = "pan_zoom"
        shapes.opacity = 0.8
        _wait(app, lambda: True, 1)
        t_load = time.perf_counter() - t_start

        t0 = time.perf_counter()
        job = widget.predict_regions()
        if job is None:
            raise M2ORTError(widget.last_error or "The prediction did not start.")
        _wait(app, lambda: not widget.running, 1800)
        if widget.last_error:
            raise M2ORTError(widget.last_error)
        layer = widget.predictions_layer()
        if layer is None or not len(layer.data):
            raise M2ORTError("The demo predicted no spots.")
        widget.set_gene(gene)
        # zoom onto the region, with a margin
        h, w = viewer.canvas.size
        viewer.camera.center = ((y0 + y1) / 2, (x0 + x1) / 2)
        viewer.camera.zoom = 0.85 * min(h / (y1 - y0), w / (x1 - x0))
        _wait(app, lambda: True, 1)
        for _ in range(10):
            app.processEvents()
            time.sleep(0.02)
        png = out / "overlay.png"
        viewer.screenshot(str(png), canvas_only=True, flash=False)
        t_overlay = time.perf_counter() - t0
        if job.result is None or getattr(job.result, "prediction", None) is None:
            raise M2ORTError(widget.last_error or "The demo predicted no spots.")
        h5ad = write_prediction(job.result, out / "predictions.h5ad", overwrite=True)
        run = widget.last_run
        print(f"wrote {h5ad}")
        print(f"wrote {png}")
        print(f"spots: {len(layer.data)} predicted ({run.get('device', '?')}), gene shown: {gene}")
        print(
            f"time from Predict to overlay: {t_overlay:.1f} s "
            f"(prediction {run.get('seconds', float('nan')):.1f} s, "
            f"{run.get('spots_per_s') or float('nan'):.1f} spots/s; viewer and sample opened in {t_load:.1f} s)"
        )
        return 0
    finally:
        viewer.close()


def _run_compare(out: Path, gene: str, device: str, model: str, tta: str, smooth_um: float) -> int:
    """Predict at the sample's measured spots in the widget; write compare.json/.png."""
    import napari
    from qtpy.QtWidgets import QApplication

    from .pipelines import write_json

    viewer = napari.Viewer(show=True, title="napari-m2ort demo: predicted vs measured")
    try:
        viewer.window.resize(1600, 1180)
        app = QApplication.instance()
        widget = _open_widget(viewer, device, model, tta, smooth_um)
        t0 = time.perf_counter()
        if widget.predict_at_measured() is None:
            raise M2ORTError(widget.last_error or "Predict at measured spots did not start.")
        _wait(app, lambda: not widget.running, 1800)
        res = widget.at_measured.result
        if widget.last_error or res is None:
            raise M2ORTError(widget.last_error or "Predict at measured spots gave no result.")
        seconds = time.perf_counter() - t0
        widget.set_gene(gene)
        # the overlay: the compared spots, with a margin; the dock scrolled to table + scatter
        xy = np.asarray(res.centers_um, dtype=float)
        (x0, y0), (x1, y1) = xy.min(axis=0) - 150, xy.max(axis=0) + 150
        h, w = viewer.canvas.size
        viewer.camera.center = ((y0 + y1) / 2, (x0 + x1) / 2)
        viewer.camera.zoom = 0.95 * min(h / (y1 - y0), w / (x1 - x0))
        for _ in range(10):
            app.processEvents()
            time.sleep(0.02)
        panel = widget.measured_panel
        rows = panel.gene_table.selectedItems()
        if rows:
            panel.gene_table.scrollToItem(rows[0])
        area = getattr(widget, "_scroll_area", None)
        if area is not None:  # the table and the scatter plot below the fold: scroll to them
            area.ensureWidgetVisible(panel.canvas if panel.canvas is not None else panel, 0, 0)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        m = res.metrics
        record = {k: m.get(k) for k in ("pcc_gene_mean", "pcc_spot_mean", "pcc_spot_mean_baseline", "per_gene")}
        record.update(
            section=res.section, n_spots=m.get("n_spots"), n_genes=m.get("n_genes"), genes_missing=res.genes_missing,
            tta=m.get("tta", tta), smooth_um=m.get("smooth_um", smooth_um), model=model, gene_shown=gene,
        )  # fmt: skip
        js = write_json(out / "compare.json", record)
        png = out / "compare.png"
        viewer.screenshot(str(png), canvas_only=False, flash=False)
        print(f"wrote {js}")
        print(f"wrote {png}")
        print(f"{widget.summary_label.text()}")
        print(f"time from Predict at measured spots to the scores: {seconds:.1f} s")
        return 0
    finally:
        viewer.close()


OUTPUTS = ("predictions.h5ad", "overlay.png")
COMPARE_OUTPUTS = ("compare.json", "compare.png")


def run_demo(
    out="demo_out",
    gene: str | None = None,
    spots: int = 100,
    device: str = "auto",
    model: str = "bundled",
    overwrite: bool = False,
    compare: bool = False,
    tta: str | None = None,
    smooth_um: float | None = None,
) -> int:
    """Run the demo into folder ``out``: about ``spots`` Visium spots, showing ``gene``
    (``compare``: predict at the sample's measured spots and score them instead).
    ``tta`` / ``smooth_um``: the inference options (default: the CLI's defaults).

    Everything the user typed is checked before a window opens: the output folder (its
    files are refused unless ``overwrite``), the spot count, the model and the gene."""
    import napari_m2ort

    napari_m2ort.load()  # torch before Qt

    from .devices import resolve_device
    from .pipelines import checkpoint_path, checks, read_model_card
    from .tta import DEFAULT_SMOOTH_UM, DEFAULT_TTA, check_smooth_um, check_tta

    resolve_device(device or "auto")  # "cuda" on a machine without one: said before any window
    tta = check_tta(DEFAULT_TTA if tta is None else tta)
    smooth_um = check_smooth_um(DEFAULT_SMOOTH_UM if smooth_um is None else smooth_um)
    out = checks.output_folder(out or "demo_out", overwrite, holds=COMPARE_OUTPUTS if compare else OUTPUTS)
    n_spots = checks.number("Spots (--spots)", 100 if spots is None else spots, lo=1, hi=5000, integer=True)
    model = str(model or "bundled")
    if checkpoint_path(model) is None:  # fails fast, before any window, for a missing file
        raise M2ORTError(f"--model {model}: the demo needs trained weights ('bundled' or a .safetensors file).")
    genes = list(read_model_card(model).genes)
    gene = gene or ("ERBB2" if "ERBB2" in genes else genes[0])
    if gene not in genes:
        raise M2ORTError(f"--gene {gene}: not in the model's panel ({len(genes)} genes, e.g. {', '.join(genes[:5])}).")
    out.mkdir(parents=True, exist_ok=True)
    with virtual_display():
        if compare:
            return _run_compare(out, gene, device or "auto", model, tta, smooth_um)
        return _run(out, gene, n_spots, device or "auto", model, tta, smooth_um)
