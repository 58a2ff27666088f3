"""Viewer responsiveness while a prediction runs on the CPU (run under Xvfb).

Opens the sample section in a shown viewer, docks the Predict widget, starts a
prediction over a region of about 100 spots, and pans the camera every 50 ms while it
runs. Prints the time from pressing Predict to the last spot on screen and the gaps
between pan steps (how long the UI thread was unavailable): median, 95th percentile, max.

    xvfb-run -a python benchmarks/bench_gui_pan.py
"""

from __future__ import annotations

import time

import numpy as np


def main():
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
    for _ in range(20):
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
    timer.start(50)
    while widget.running and time.perf_counter() - t0 < 600:
        app.processEvents()
        time.sleep(0.005)
    t_done = time.perf_counter() - t0
    timer.stop()
    gaps = np.diff(ticks) * 1000 if len(ticks) > 1 else np.array([np.nan])
    n = len(widget.predictions_layer().data) if widget.predictions_layer() is not None else 0
    print("| spots | Predict → all spots shown (s) | pan steps | gap median (ms) | gap p95 (ms) | gap max (ms) |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {n} | {t_done:.1f} | {len(ticks)} | {np.median(gaps):.0f} | {np.percentile(gaps, 95):.0f} | {gaps.max():.0f} |"
    )
    viewer.close()


if __name__ == "__main__":
    main()
