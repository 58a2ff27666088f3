"""Viewer responsiveness while a prediction runs on the CPU (run under Xvfb).

Opens the sample section in a shown viewer, docks the Predict widget, starts a
prediction over a region of about 100 spots, and pans the camera every 50 ms while it
runs. Prints one markdown table row: the time from pressing Predict to the first
coloured spots and to the last spot on screen, the model-only time of the same spots
(their patches read first, then only the forward passes, same device, precision and
batches, in the same process after the GUI run), the first batch's model-only time, and
the gaps between pan steps (how long the UI thread was unavailable): median, p95, max.
``--settle S``: the click comes S seconds after the sample opens and the widget docks
(default 1: a cold start, as a script would click; a user drawing a region takes 5-10 s,
during which the widget loads the model and prepares the slide in the background).
``--no-pan`` leaves the camera still: under Xvfb every pan step is rendered in software
on the same two cores the model runs on.

    OMP_NUM_THREADS=1 xvfb-run -a python benchmarks/bench_gui_pan.py [--settle 5]
"""

from __future__ import annotations

import time

import numpy as np


def main(settle: float = 1.0, panning: bool = True):
    import napari_m2ort  # noqa: F401, I001  (torch before Qt)
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    viewer.open_sample("napari-m2ort", "her2st_c2")
    _, widget = viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression")
    shapes = widget.add_regions_layer()
    x0, y0 = 3100.0, 3400.0
    shapes.add_rectangles(np.array([[y0, x0], [y0 + 1000.0, x0 + 1000.0]]))
    viewer.camera.center = (y0 + 500, x0 + 500)
    viewer.camera.zoom = 0.5
    app = QApplication.instance()
    t_open = time.perf_counter()
    while time.perf_counter() - t_open < settle:
        app.processEvents()
        time.sleep(0.05)

    ticks: list[float] = []
    start = viewer.camera.center

    def pan():
        ticks.append(time.perf_counter())
        k = len(ticks)
        viewer.camera.center = (start[-2] + 50 * np.sin(k / 5), start[-1] + 50 * np.cos(k / 5))

    timer = QTimer()
    timer.timeout.connect(pan)
    t0 = time.perf_counter()
    widget.predict_regions()
    if panning:
        timer.start(50)
    while widget.running and time.perf_counter() - t0 < 600:
        app.processEvents()
        time.sleep(0.005)
    t_done = time.perf_counter() - t0
    timer.stop()
    gaps = np.diff(ticks) * 1000 if len(ticks) > 1 else np.array([np.nan])
    layer = widget.predictions_layer()
    n = len(layer.data) if layer is not None else 0
    t_first = widget._run.t_first if widget._run is not None else None
    model_s, first_s = model_only(widget, layer)
    print(
        "| settle (s) | spots | model-only (s) | first batch model-only (s) | Predict -> first colours (s) "
        "| Predict -> all spots shown (s) | pan steps | gap median (ms) | gap p95 (ms) | gap max (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {settle:g} | {n} | {model_s:.1f} | {first_s:.1f} | {t_first if t_first is not None else float('nan'):.1f} | {t_done:.1f} "
        f"| {len(ticks)} | {np.median(gaps):.0f} | {np.percentile(gaps, 95):.0f} | {gaps.max():.0f} |"
    )
    viewer.close()


def model_only(widget, layer) -> tuple[float, float]:
    """Seconds of the forward passes alone over the spots the widget predicted (all, first
    batch), with the widget's model, device, precision and batch size."""
    from napari_m2ort.devices import resolve_device, resolve_precision
    from napari_m2ort.inference import forward_views
    from napari_m2ort.io.slides import open_slide
    from napari_m2ort.patches import sample_spots, spatial_order
    from napari_m2ort.widgets.predict import FIRST_BATCH

    s = widget.settings
    model, card = widget.models.load(s.model)
    dev = resolve_device(s.device)
    amp = resolve_precision("auto", dev)
    slide_layer = widget.slide_layer()
    slide = open_slide(slide_layer.metadata["path"], mpp=slide_layer.metadata["mpp"])
    xy = np.asarray(layer.data, dtype=float)[:, ::-1]  # the layer's data are (y, x) slide µm
    xy = xy[spatial_order(xy)]
    level1 = sample_spots(slide, xy, card.mpp).level1
    model = model.to(dev).eval()
    bs = int(s.batch_size)
    head = min(FIRST_BATCH, bs, len(level1))  # the widget's batches: a small first one
    bounds = [0, head] + list(range(head + bs, len(level1), bs)) + [len(level1)]
    times = []
    for i, j in zip(bounds[:-1], bounds[1:]):
        if j <= i:
            continue
        t = time.perf_counter()
        forward_views(model, level1[i:j], dev, amp, s.tta)
        times.append(time.perf_counter() - t)
    return float(sum(times)), float(times[0]) if times else float("nan")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between opening and Predict")
    parser.add_argument("--no-pan", action="store_true", help="leave the camera still while predicting")
    args = parser.parse_args()
    main(args.settle, not args.no_pan)
