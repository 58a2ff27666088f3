"""Predict expression dock widget: a composer of panels over evented state.

The panels (``panels/``) hold the controls and bind them to ``PredictSettings`` and
``DisplayState`` (``state.py``); this module wires them to the viewer and runs the
use case — ``pipelines.plan_slide`` then ``pipelines.run_plan`` — in a napari thread
worker, putting spots on the layer as they arrive: the first (small) batch at once, later
ones together every ``REDRAW_S``, the last with the result.  Spots live on a global
grid, so a second, overlapping region adds only spots not predicted yet (their ids are
stable): the widget leaves out the ids its layers already hold.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QWidget

from ..errors import M2ORTError
from ..progress import Progress
from . import _layers as L
from ._models import BUNDLED, ModelCatalogue, model_key, model_name
from ._qt import compact_combos, fit_width, scroll_body
from ._workers import cancel_on_destroy, notify, register_predict_widget, start_job
from .panels.compare import Comparison
from .panels.display import Display, DisplayPanel, default_gene
from .panels.export import ExportPanel, write_layer
from .panels.inputs import LAYOUT_CHOICES, InputsPanel
from .panels.measured import AtMeasured, MeasuredPanel
from .panels.run import RunPanel
from .state import DisplayState, PredictSettings, RunState, RunSummary

REDRAW_S = 1.5  # seconds between drawing the spots received since the last draw
FIRST_BATCH = 16  # spots in the first batch: first colours after a quarter of a 64-spot batch

__all__ = ["BUNDLED", "LAYOUT_CHOICES", "PredictWidget"]


class PredictWidget(QWidget):
    """Plugins → napari-m2ort → Predict expression."""

    def __init__(self, napari_viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.job = None  # _workers.JobHandle of the running/last prediction
        self._compare_stale = False  # a redraw during a run left the comparison line behind
        self._jobs = cancel_on_destroy(self)
        self.last_error: Optional[str] = None
        self.last_run: Mapping = {}
        self.settings = PredictSettings()
        self.display = DisplayState()
        self.models = ModelCatalogue()
        self._slides: dict = {}  # (kind, path or layer id, mpp) -> open slide
        self._masks: dict = {}  # same keys -> spots.TissueMask
        self._slides_lock = threading.Lock()
        # one job at a time runs the widget's models: torch.compile tracing a model while
        # another thread runs it (the background warm-up) deadlocked a test run
        self._model_lock = threading.Lock()
        self._prepared: set = set()  # slide keys and model specs prepared in the background
        self._run: Optional[RunState] = None
        self.models.add_bundled()
        if self.settings.model is None and self.models.labels:
            self.settings.model = next(iter(self.models.labels))
        self._build()
        self._connect()
        self._refresh_layer_choices()
        register_predict_widget(self)
        L.prefer_plugin_writers()
        self._prepare()

    # ================================================================== composition
    def _build(self) -> None:
        root = scroll_body(self)
        self.inputs = InputsPanel(self.settings, self.models)
        self.run_panel = RunPanel(self.settings)
        self.display_panel = DisplayPanel(self.display)
        self.export_panel = ExportPanel()
        self.measured_panel = MeasuredPanel()
        for panel in (self.inputs, self.run_panel, self.display_panel, self.measured_panel, self.export_panel):
            root.addWidget(panel)
        root.addStretch(1)
        self.renderer = Display(
            self.viewer, self.display, self.display_panel, on_changed=self._compare_update, measured=self.measured_layer
        )
        self.comparison = Comparison(
            self.viewer, self.display, self.display_panel, self.slide_layer, self._geometry, self._fail
        )
        # the widget's public face (scripts, the demo and the tests drive these)
        for panel, names in (
            (
                self.inputs,
                "slide_combo mpp_spin mpp_src model_combo model_browse model_info device_combo "
                "layout_combo pitch_spin diam_spin tissue_check batch_spin compile_check tta_combo smooth_spin force_check",
            ),
            (
                self.run_panel,
                "regions_combo add_regions_btn predict_regions_btn predict_view_btn "
                "predict_tissue_btn progress_bar cancel_btn status",
            ),
            (
                self.display_panel,
                "gene_combo cmap_combo clim_min clim_max clim_auto heatmap_check "
                "compare_check flagged_check hover_label compare_label",
            ),
            (self.export_panel, "export_h5ad_btn export_csv_btn export_zarr_btn clear_btn"),
            (self.measured_panel, "predict_measured_btn summary_label gene_table"),
        ):
            for name in names.split():
                setattr(self, name, getattr(panel, name))
        self.at_measured = AtMeasured(self, self.measured_panel)
        self._update_buttons()
        compact_combos(self)
        fit_width(self)

    def _connect(self) -> None:
        self.model_browse.clicked.connect(lambda: self.add_checkpoint(None))
        self.add_regions_btn.clicked.connect(self.add_regions_layer)
        self.predict_regions_btn.clicked.connect(self.predict_regions)
        self.predict_view_btn.clicked.connect(self.predict_view)
        self.predict_tissue_btn.clicked.connect(self.predict_tissue)
        self.cancel_btn.clicked.connect(self.cancel)
        self.export_h5ad_btn.clicked.connect(lambda: self.export_h5ad(None))
        self.export_csv_btn.clicked.connect(lambda: self.export_csv(None))
        self.export_zarr_btn.clicked.connect(lambda: self.export_zarr(None))
        self.clear_btn.clicked.connect(self.clear_predictions)
        self.settings.events.slide.connect(self._on_slide_changed)
        self.settings.events.model.connect(self._update_buttons)
        self.settings.events.model.connect(self._prepare)
        self.settings.events.device.connect(self._prepare)
        self.display.events.layer.connect(self._update_buttons)
        ev = self.viewer.layers.events
        ev.inserted.connect(self._on_layers_changed)
        ev.removed.connect(self._on_layers_changed)
        ev.reordered.connect(self._on_layers_changed)
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)

    # ================================================================== viewer wiring
    def _on_layers_changed(self, event=None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._refresh_layer_choices)
            self._place(event.value)
        layer = self.display.layer
        if layer is not None and layer not in self.viewer.layers:
            self.display.layer = None
        self._refresh_layer_choices()

    def _place(self, layer) -> None:
        """Several slides: each opens beside the others, its measured spots with it."""
        from napari.layers import Image, Points

        kind = (layer.metadata or {}).get("m2ort_kind")
        if isinstance(layer, Image) and kind is None:
            L.place_slide(self.viewer, layer)
        elif isinstance(layer, Points) and kind is None and (layer.metadata or {}).get("st_section") is not None:
            L.tie_measured(self.viewer, layer)

    def _on_active_layer(self, event=None) -> None:
        layer = self.viewer.layers.selection.active
        if layer is not None and (layer.metadata or {}).get("m2ort_kind") == L.PRED_KIND:
            if not _same(layer, self.display.layer):
                self.display.layer = layer

    def _refresh_layer_choices(self, event=None) -> None:
        from napari.layers import Image, Shapes

        layers = self.viewer.layers
        images = [ly.name for ly in layers if isinstance(ly, Image) and (ly.metadata or {}).get("m2ort_kind") is None]
        self.inputs.set_slides(images)
        self.run_panel.set_regions_layers([ly.name for ly in layers if isinstance(ly, Shapes)], L.REGIONS_NAME)
        self._update_buttons()

    # ================================================================== slide
    def slide_layer(self):
        name = self.settings.slide
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_slide_changed(self, *_) -> None:
        layer = self.slide_layer()
        if layer is None:
            self.settings.mpp_source = ""
            return
        self.settings.mpp, self.settings.mpp_source = L.layer_mpp(layer)
        self._prepare()

    def _open_slide(self, key, factory):
        """The one open slide per key (the worker and the background preparation share
        it, and with it a flat image's decoded pixels)."""
        with self._slides_lock:
            slide = self._slides.get(key)
            if slide is None:
                slide = self._slides[key] = factory()
            return slide

    def _prepare(self, *_) -> None:
        """Load and warm up the selected model and prepare the selected slide (decode,
        tissue mask, colour thumbnail) in a background thread, while the user draws a
        region: the first Predict then waits only for the model's forward passes. Errors
        are left to Predict, which reports them."""
        from ..pipelines.predict import prepare_slide

        spec, layer = self.settings.model, self.slide_layer()
        jobs = []
        if spec is not None and ("model", spec, self.settings.device) not in self._prepared:
            from ..inference import warm_up_model

            self._prepared.add(("model", spec, self.settings.device))
            device, lock = self.settings.device, self._model_lock

            def warm():
                model = self.models.load(spec)[0]
                if lock.acquire(blocking=False):  # else a job runs the model: it warms up
                    try:
                        warm_up_model(model, device)
                    finally:
                        lock.release()

            jobs.append(warm)
        if layer is not None and (layer.metadata or {}).get("path"):
            try:
                key, factory = self._slide_source(layer)
            except M2ORTError:
                key = None
            if key is not None and key not in self._prepared:
                self._prepared.add(key)
                jobs.append(lambda: prepare_slide(self._open_slide(key, factory)))
        if not jobs:
            return

        from ..background import start, stopping

        def work():
            for job in jobs:
                if stopping():
                    return
                try:
                    job()
                except Exception:
                    pass

        start(work, "m2ort-prepare")

    def _slide_mpp(self, layer) -> tuple[float, str]:
        """The layer's own pixel size, unless the user typed another one."""
        mpp, source = L.layer_mpp(layer)
        if abs(self.settings.mpp - mpp) > 0.6 * 10 ** -self.mpp_spin.decimals():
            return float(self.settings.mpp), "user"
        return mpp, source

    def _geometry(self, layer):
        return L.geometry(layer, self._slide_mpp(layer)[0])

    def _slide_source(self, layer):
        """What the worker needs to get a slide: (cache key, factory)."""
        mpp, source = self._slide_mpp(layer)
        path = (layer.metadata or {}).get("path")
        if path and Path(path).exists():
            from ..io.slides import open_slide

            return ("file", str(path), round(mpp, 6)), lambda: open_slide(path, mpp=mpp)
        adapter = L.LayerSlide(layer, mpp, source)
        return ("layer", layer.unique_id, round(mpp, 6)), lambda: adapter

    # ================================================================== model
    def model_spec(self) -> Optional[str]:
        return self.settings.model

    def add_checkpoint(self, path=None, select: bool = True) -> Optional[str]:
        """Add a .safetensors checkpoint to the model list (file dialog when no path)."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Open M2ORT checkpoint", "", "M2ORT checkpoint (*.safetensors)")
            if not path:
                return None
        try:
            spec = self.models.add_checkpoint(path)
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        if select:
            self.settings.model = spec
        return spec

    def set_model(self, model, card, name: str = "fine-tuned model", select: bool = True) -> str:
        """Use an in-memory model (e.g. from the fine-tuning widget) for prediction."""
        spec = self.models.add_memory(model, card, name)
        if select:
            self.settings.model = spec
        self.inputs.show_model()
        return spec

    # ================================================================== regions
    def add_regions_layer(self):
        """Create (or select) the 'M2ORT regions' Shapes layer, in rectangle mode."""
        if L.REGIONS_NAME in self.viewer.layers:
            shapes = self.viewer.layers[L.REGIONS_NAME]
        else:
            layer = self.slide_layer()
            kw = self._geometry(layer).layer_kwargs if layer is not None else {}
            shapes = self.viewer.add_shapes(
                name=L.REGIONS_NAME, edge_color="#ffd23f", edge_width=4, face_color="transparent", ndim=2, **kw
            )
        self.settings.regions = shapes.name
        self.viewer.layers.selection.active = shapes
        try:
            shapes.mode = "add_rectangle"
        except Exception:  # pragma: no cover
            pass
        return shapes

    def _regions_um(self, geom) -> list:
        name = self.settings.regions
        if not name or name not in self.viewer.layers:
            raise M2ORTError(
                "There is no regions layer: press 'Add regions layer' and draw a rectangle "
                "over the tissue (or use 'Predict view' / 'Predict tissue')."
            )
        regions = L.shapes_regions_um(self.viewer.layers[name], geom)
        if not regions:
            raise M2ORTError(f"The layer '{name}' holds no rectangle or polygon: draw one over the tissue.")
        return regions

    # ================================================================== predict
    def predict_regions(self):
        return self._start("regions")

    def predict_view(self):
        return self._start("view")

    def predict_tissue(self):
        return self._start("tissue")

    def predict_at_measured(self):
        """Predict at the measured spots of this slide and score them (``AtMeasured``)."""
        return self.at_measured.start()

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()
            self.cancel_btn.setEnabled(False)
            self.status.setText("Stopping after the current batch…")

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.status.setText(f"⚠ {message}")
        notify("error", message)

    def _request(self, what: str, layer):
        """The use-case request for this click, and the slide's cache key and factory."""
        from ..pipelines import PredictRequest

        s = self.settings
        if s.model is None:
            raise M2ORTError("No model is selected: the bundled weights are missing; open a checkpoint (.safetensors).")
        geom = self._geometry(layer)
        if what == "regions":
            regions = self._regions_um(geom)
        elif what == "view":
            regions = [L.view_region_um(self.viewer, geom)]
        else:
            regions = None  # the whole slide
        custom = s.layout == "custom"
        request = PredictRequest(
            slide=None,
            model=s.model,
            regions=regions,
            layout=s.layout,
            pitch_um=float(s.pitch_um) if custom else None,
            diameter_um=float(s.diameter_um) if custom else None,
            tissue_only=s.tissue_only or what == "tissue",
            device=s.device,
            batch_size=int(s.batch_size),
            first_batch=FIRST_BATCH,
            compile="on" if s.compile else "auto",
            tta=s.tta,
            smooth_um=float(s.smooth_um),
            force=bool(s.force),
        )
        return request, geom

    def _start(self, what: str):
        if self.running:
            return None
        self.last_error = None
        layer = self.slide_layer()
        try:
            if layer is None:
                raise M2ORTError("Open an H&E slide first (File > Open, or File > Open Sample > napari M2ORT).")
            request, geom = self._request(what, layer)
            slide_key, open_slide = self._slide_source(layer)
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        existing = L.predicted_ids(self.viewer, layer.name)
        models, masks, open_cached, model_lock = self.models, self._masks, self._open_slide, self._model_lock

        def make_job(should_stop):
            from ..pipelines import plan_slide, run_plan

            yield Progress("prepare", 0, 1, "loading the model and slide")
            req = dataclasses.replace(
                request,
                model=models.load(request.model),
                slide=open_cached(slide_key, open_slide),
                tissue_mask=masks.get(slide_key),
            )
            plan = yield from plan_slide(req)
            if plan.tissue_mask is not None:
                masks[slide_key] = plan.tissue_mask
            plan = plan.without(existing.get(L.layer_key(model_key(plan.card), plan.spots), ()))
            with model_lock:
                return (yield from run_plan(plan, req, should_stop))

        self._run = RunState(what=what, geom=geom, slide_layer=layer.name)
        self.run_panel.busy()
        self.status.setText("Preparing…")
        self.job = start_job(
            make_job,
            desc="M2ORT prediction",
            on_progress=self._on_progress,
            on_done=self._on_done,
            on_failed=self._on_failed,
            on_finished=self._on_finished,
        )
        self._jobs[:] = [self.job]
        self._update_buttons()
        return self.job

    def _target_layer(self, plan):
        """The predictions layer of this slide, model and layout (created on first use)."""
        slide_name, spots = self._run.slide_layer, plan.spots
        key = model_key(plan.card)
        layer = L.find_predictions_layer(self.viewer, slide_name, L.layer_key(key, spots))
        if layer is not None:
            return layer
        label = model_name(plan.card, self.settings.model)
        name = f"{self.current_gene() or default_gene(plan.card.genes)} - {label}"
        if L.predictions_layers(self.viewer):
            name += f" [{spots.layout}, {spots.pitch_um:g} µm pitch, {spots.diameter_um:g} µm spots]"
        layer = L.new_predictions_layer(
            self.viewer, self._run.geom, plan.card.genes, spots.diameter_um, plan.card.to_json(), spots.layout,
            key, slide_name, colormap=self.display.colormap, name=name, pitch_um=spots.pitch_um,
            grid=getattr(spots, "grid", ""), model_name=label,
        )  # fmt: skip
        layer.metadata["name_suffix"] = name.split(label, 1)[1]
        layer.mouse_move_callbacks.append(self._on_hover)
        return layer

    def _on_progress(self, ev: Progress) -> None:
        run = self._run
        plan = ev.data.get("plan") if ev.data else None
        if plan is not None:
            run.spots, run.layer = plan.spots, self._target_layer(plan)
            run.colour = plan.colour
            for note in plan.notes:
                notify("warning", note)
            if not _same(run.layer, self.display.layer):
                self.display.layer = run.layer
        if ev.stage in ("prepare", "plan"):
            self.status.setText(ev.message or ev.stage)
            return
        if ev.stage != "predict":
            return
        self.run_panel.progress(ev.done, ev.total)
        self.status.setText(f"Predicting: {ev.message}")
        if not ev.data or "indices" not in ev.data:
            return
        run.pending.append((np.asarray(ev.data["indices"]), ev.data["values"]))
        last = ev.total is not None and ev.done >= ev.total  # the result follows at once: draw then
        since = time.perf_counter() - run.t_drawn if run.t_drawn is not None else None
        if not last and (since is None or since >= REDRAW_S):
            self._draw_pending()

    def _draw_pending(self, recolour: bool = True) -> None:
        """Put the batches received since the last draw on the layer and recolour it once.

        Each redraw costs the UI thread 0.2-0.4 s of software OpenGL here (and napari's
        per-property recolouring), time the model thread loses on a small machine, so the
        first batch is drawn at once and later ones at most every ``REDRAW_S``."""
        run = self._run
        pending, run.pending = run.pending, []
        layer = run.layer
        if not pending or layer is None or layer not in self.viewer.layers:
            return  # (the user may have removed the layer mid-run)
        idx = np.concatenate([i for i, _ in pending])
        values = np.concatenate([np.asarray(v) for _, v in pending], axis=0)
        spots = run.spots
        shown = _same(layer, self.display.layer)  # then the display recolours it just after
        gene = None if shown or not recolour else self.current_gene() or default_gene(list(layer.features.columns))
        flags = None if run.colour is None else np.asarray(run.colour)[idx]
        L.append_spots(
            layer, spots.centers_um[idx][:, ::-1], values, spots.ids[idx], spots.diameter_um, gene, flags=flags,
        )  # fmt: skip
        run.n_done = len(layer.data)
        run.t_drawn = time.perf_counter()
        if run.t_first is None:
            run.t_first = run.t_drawn - run.t0
        if shown and recolour:
            self.renderer.refresh()

    def _on_done(self, result) -> None:
        run = self._run
        self._draw_pending(recolour=False)  # recoloured below, with the final values
        seconds = time.perf_counter() - run.t0
        pred = result.prediction
        if pred is None:
            self.run_panel.complete()
            msg = f"All {result.n_candidates} spots of this region are already predicted."
            self.status.setText(msg)
            notify("info", msg)
            self.last_run = RunSummary(n_spots=0, skipped=result.n_skipped, seconds=seconds)
            return
        info = dict(pred.info)
        summary = RunSummary(
            n_spots=int(pred.n_done), n_requested=len(pred.done), skipped=result.n_skipped, seconds=seconds,
            seconds_to_first_batch=run.t_first, stopped=bool(info.get("stopped")), device=info.get("device"),
            spots_per_s=info.get("spots_per_s"), compiled=bool(info.get("compiled")),
        )  # fmt: skip
        self.last_run = summary
        if run.layer is not None and run.layer in self.viewer.layers:
            run.layer.metadata.setdefault("runs", []).append(summary.record())
            L.set_flags(run.layer, list(map(str, result.spots.ids)), list(result.flags))
            done = np.asarray(pred.done, dtype=bool)
            L.finish_run(
                run.layer, [str(i) for i in np.asarray(result.spots.ids)[done]], pred.values[done],
                None if pred.uncertainty is None else pred.uncertainty[done], info,
            )  # fmt: skip
            if not _same(run.layer, self.display.layer):  # (the display recolours its own below)
                L.color_by(run.layer, self.current_gene() or default_gene(list(run.layer.features.columns)))
        skipped = f", {summary.skipped} already predicted" if summary.skipped else ""
        if summary.stopped:
            msg = f"Stopped: kept {summary.n_spots} of {summary.n_requested} spots ({seconds:.1f} s){skipped}."
        else:
            msg = (
                f"{summary.n_spots} spots predicted in {seconds:.1f} s on {summary.device or '?'}{skipped}."
                " Hover a spot to read its value."
            )
        self.status.setText(msg)
        self.renderer.refresh()

    def _on_failed(self, exc: BaseException) -> None:
        if self._run is not None:
            self._draw_pending()  # what was predicted before the failure is kept
        self.last_error = str(exc)
        self.status.setText(f"⚠ {exc}")

    def _on_finished(self) -> None:
        self.run_panel.idle()
        self._update_buttons()
        if self._compare_stale:
            self._compare_update()

    def _update_buttons(self, *_) -> None:
        busy = self.running
        can_start = not busy and self.slide_combo.count() > 0 and self.model_combo.count() > 0
        self.run_panel.enable(can_start, busy and not (self.job is not None and self.job.cancelled))
        self.measured_panel.enable(can_start)
        layer = self.display.layer
        self.export_panel.enable(layer is not None and len(layer.data) > 0 and not busy)

    # ================================================================== display
    def predictions_layer(self):
        return self.display.layer

    def current_gene(self) -> Optional[str]:
        return self.display.gene or None

    def set_gene(self, gene: str) -> None:
        self.renderer.set_gene(gene)

    def contrast_limits(self) -> tuple[float, float]:
        return self.renderer.contrast_limits()

    def _on_hover(self, layer, event) -> None:
        self.renderer.on_hover(layer, event)

    def measured_layer(self):
        return self.comparison.measured_layer()

    def _compare_update(self) -> None:
        """The comparison line follows every redraw, but not while spots still stream in:
        a partial comparison would be replaced within seconds, and converting the measured
        spots to the model's scale the first time costs the UI thread 0.2-0.4 s."""
        if self.running:
            self._compare_stale = True
            return
        self._compare_stale = False
        self.comparison.update()

    # ================================================================== export
    def _export(self, path, suffix: str) -> Optional[Path]:
        layer = self.display.layer
        if layer is None or not len(layer.data):
            self._fail("There are no predictions to export yet: predict a region first.")
            return None
        path = path or self.export_panel.ask_path(suffix, layer.name)
        if not path:
            return None
        try:
            out = write_layer(layer, path, suffix, slide=self._slide_of(layer))
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        self.status.setText(f"Saved {len(layer.data)} spots × {layer.features.shape[1]} genes to {out}")
        notify("info", f"Saved {len(layer.data)} spots to {out}")
        return out

    def export_h5ad(self, path=None) -> Optional[Path]:
        return self._export(path, ".h5ad")

    def export_csv(self, path=None) -> Optional[Path]:
        return self._export(path, ".csv")

    def export_zarr(self, path=None) -> Optional[Path]:
        return self._export(path, ".zarr")

    def _slide_of(self, layer):
        """The slide a predictions layer lies on (for the images stored with it), or None."""
        name = (layer.metadata or {}).get("slide")
        slide_layer = next((lyr for lyr in L.slide_layers(self.viewer) if lyr.name == name), None)
        slide_layer = slide_layer or self.slide_layer()
        if slide_layer is None:
            return None
        try:
            return self._open_slide(*self._slide_source(slide_layer))
        except M2ORTError:
            return None

    def clear_predictions(self) -> None:
        layer = self.display.layer
        if layer is None:
            return
        self.renderer.remove_heatmap()
        if layer in self.viewer.layers:
            self.viewer.layers.remove(layer)  # layers.removed resets the display
        self.display.layer = None
        self._update_buttons()

    # ================================================================== Qt events
    def showEvent(self, event) -> None:
        # napari's stylesheet (fonts, paddings) is applied when docked: size again then
        super().showEvent(event)
        fit_width(self)
        QTimer.singleShot(0, lambda: fit_width(self))

    def closeEvent(self, event) -> None:  # pragma: no cover - exercised by napari on close
        if self.running:
            self.job.cancel()
        super().closeEvent(event)


def _same(a, b) -> bool:
    """Layer identity through napari's plugin proxies (each access makes a new proxy)."""
    if a is None or b is None:
        return a is b
    return a.unique_id == b.unique_id
