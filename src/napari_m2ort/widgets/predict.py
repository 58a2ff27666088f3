"""Predict expression dock widget: pickers, buttons, worker wiring and rendering only.

Everything computed goes through the core: ``spots.layout_spots`` / ``tissue_mask`` for
where the spots are, ``inference.predict`` (a generator run in a napari thread worker)
for what they express, ``io.export`` for files.  Spots live on a global grid, so a
second, overlapping region adds only spots not predicted yet (their ids are stable).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QCompleter,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import M2ORTError
from ..progress import Progress
from . import _layers as L
from ._layers import compact_combos as _compact_combos
from ._layers import fit_width, scroll_body, wrap_label
from ._workers import cancel_on_destroy, register_predict_widget, start_job

BUNDLED = "bundled"
LAYOUT_CHOICES = [
    ("Visium (55 µm spots, 100 µm pitch)", "visium"),
    ("Legacy ST (100 µm spots, 200 µm pitch)", "st"),
    ("Custom pitch and diameter", "custom"),
]


@dataclass
class RunResult:
    prediction: object  # inference.Prediction or None (nothing new to predict)
    spots: object  # spots.SpotLayout of the spots sent to the model
    card: object
    key: str
    skipped: int
    n_candidates: int
    info: dict = field(default_factory=dict)


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications as n

    {"error": n.show_error, "warning": n.show_warning, "info": n.show_info}[kind](message)


class PredictWidget(QWidget):
    """Plugins → napari-m2ort → Predict expression."""

    def __init__(self, napari_viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.job = None  # _workers.JobHandle of the running/last prediction
        self._jobs = cancel_on_destroy(self)
        self.last_error: Optional[str] = None
        self.last_run: dict = {}
        self._model_cache: dict[str, tuple] = {}
        self._slides: dict = {}
        self._masks: dict = {}
        self._layer = None  # the predictions layer on display
        self._run: dict = {}
        self._build_ui()
        self._connect_viewer()
        self._refresh_layer_choices()
        self._refresh_model_choices()
        register_predict_widget(self)

    # ================================================================== UI
    def _build_ui(self) -> None:
        root = scroll_body(self)

        # -- input -------------------------------------------------------------------
        box = QGroupBox("Slide and model")
        form = QFormLayout(box)
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("H&E image layer to predict on")
        self.slide_combo.currentIndexChanged.connect(self._on_slide_changed)
        form.addRow("Slide", self.slide_combo)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.01, 50.0)
        self.mpp_spin.setSingleStep(0.01)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setToolTip("Pixel size of the slide's full resolution (from the file; change it "
                                 "if the file has none)")
        self.mpp_src = QLabel("")
        self.mpp_src.setStyleSheet("color: #9a9a9a")
        row = QHBoxLayout()
        row.addWidget(self.mpp_spin, 1)
        row.addWidget(self.mpp_src)
        form.addRow("Pixel size", row)

        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Bundled M2ORT model, a checkpoint file, or a fine-tuned model")
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self.model_browse = QPushButton("Open…")
        self.model_browse.setToolTip("Load a .safetensors checkpoint with its model card")
        self.model_browse.clicked.connect(lambda: self.add_checkpoint(None))
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.model_browse)
        form.addRow("Model", row)
        self.model_info = wrap_label("", lines=2, muted=True)
        form.addRow("", self.model_info)

        self.device_combo = QComboBox()
        from ..devices import available_devices

        self.device_combo.addItems(["auto", *available_devices()])
        form.addRow("Device", self.device_combo)

        self.layout_combo = QComboBox()
        for label, value in LAYOUT_CHOICES:
            self.layout_combo.addItem(label, value)
        self.layout_combo.currentIndexChanged.connect(self._on_layout_changed)
        form.addRow("Spot layout", self.layout_combo)
        self.pitch_spin = QDoubleSpinBox()
        self.pitch_spin.setRange(5.0, 5000.0)
        self.pitch_spin.setValue(100.0)
        self.pitch_spin.setSuffix(" µm pitch")
        self.diam_spin = QDoubleSpinBox()
        self.diam_spin.setRange(1.0, 5000.0)
        self.diam_spin.setValue(55.0)
        self.diam_spin.setSuffix(" µm spots")
        row = QHBoxLayout()
        row.addWidget(self.pitch_spin)
        row.addWidget(self.diam_spin)
        form.addRow("", row)
        self.tissue_check = QCheckBox("Tissue only (skip background spots)")
        self.tissue_check.setChecked(True)
        form.addRow("", self.tissue_check)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 1024)
        self.batch_spin.setValue(64)
        self.batch_spin.setToolTip("Spots per model batch; the display updates after each batch")
        form.addRow("Batch size", self.batch_spin)
        self.compile_check = QCheckBox("Compile the model (large jobs)")
        self.compile_check.setToolTip(
            "torch.compile: the first prediction waits 20-40 s while the model compiles, "
            "then bf16 on CPU runs ~1.3x faster (GPU: not measured yet). Worth it from a "
            "few thousand spots. Unticked, jobs of 10,000+ spots on a bf16 CPU are "
            "compiled anyway; float32 on CPU never is (no faster there).")
        form.addRow("", self.compile_check)
        root.addWidget(box)
        self._on_layout_changed()

        # -- regions and run -----------------------------------------------------------
        box = QGroupBox("Predict")
        v = QVBoxLayout(box)
        row = QHBoxLayout()
        self.regions_combo = QComboBox()
        self.regions_combo.setToolTip("Shapes layer whose rectangles/polygons (in µm) are predicted")
        row.addWidget(QLabel("Regions"))
        row.addWidget(self.regions_combo, 1)
        self.add_regions_btn = QPushButton("Add regions layer")
        self.add_regions_btn.setToolTip("Create an 'M2ORT regions' Shapes layer and start drawing rectangles")
        self.add_regions_btn.clicked.connect(self.add_regions_layer)
        row.addWidget(self.add_regions_btn)
        v.addLayout(row)
        row = QHBoxLayout()
        self.predict_regions_btn = QPushButton("Predict regions")
        self.predict_regions_btn.clicked.connect(self.predict_regions)
        self.predict_view_btn = QPushButton("Predict view")
        self.predict_view_btn.setToolTip("Predict the part of the slide visible in the canvas")
        self.predict_view_btn.clicked.connect(self.predict_view)
        self.predict_tissue_btn = QPushButton("Predict tissue")
        self.predict_tissue_btn.setToolTip("Predict every spot on tissue over the whole slide")
        self.predict_tissue_btn.clicked.connect(self.predict_tissue)
        for b in (self.predict_regions_btn, self.predict_view_btn, self.predict_tissue_btn):
            row.addWidget(b)
        v.addLayout(row)
        row = QHBoxLayout()
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("")
        row.addWidget(self.progress_bar, 1)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.setToolTip("Stop after the current batch; spots done so far are kept")
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.cancel_btn)
        v.addLayout(row)
        self.status = wrap_label("Open a slide, draw a region, then press Predict.", lines=2)
        v.addWidget(self.status)
        root.addWidget(box)

        # -- display -------------------------------------------------------------------
        box = QGroupBox("Display")
        form = QFormLayout(box)
        self.gene_combo = QComboBox()
        self.gene_combo.setEditable(True)
        self.gene_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.gene_combo.setMaxVisibleItems(20)
        self.gene_combo.setToolTip("Gene shown (type to search)")
        completer = QCompleter(self.gene_combo.model(), self.gene_combo)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        completer.setFilterMode(Qt.MatchFlag.MatchContains)
        completer.setCompletionMode(QCompleter.CompletionMode.PopupCompletion)
        self.gene_combo.setCompleter(completer)
        self.gene_combo.currentIndexChanged.connect(self._on_gene_changed)
        form.addRow("Gene", self.gene_combo)
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(L.COLORMAPS)
        self.cmap_combo.currentIndexChanged.connect(self._on_gene_changed)
        form.addRow("Colormap", self.cmap_combo)
        self.clim_min = QDoubleSpinBox()
        self.clim_max = QDoubleSpinBox()
        for sp in (self.clim_min, self.clim_max):
            sp.setDecimals(3)
            sp.setRange(-1e6, 1e6)
            sp.setSingleStep(0.05)
            sp.setKeyboardTracking(False)
            sp.valueChanged.connect(self._on_clim_changed)
        self.clim_min.setToolTip("Value shown with the lowest colour")
        self.clim_max.setToolTip("Value shown with the highest colour")
        self.clim_auto = QPushButton("Auto")
        self.clim_auto.setToolTip("Contrast limits = the gene's range over the predicted spots")
        self.clim_auto.clicked.connect(self._on_gene_changed)
        row = QHBoxLayout()
        row.addWidget(self.clim_min, 1)
        row.addWidget(QLabel("–"))
        row.addWidget(self.clim_max, 1)
        row.addWidget(self.clim_auto)
        form.addRow("Contrast", row)
        self.heatmap_check = QCheckBox("Smooth heat map")
        self.heatmap_check.setToolTip("Interpolated expression image under the spots (opacity 0.6)")
        self.heatmap_check.toggled.connect(self._update_heatmap)
        self.compare_check = QCheckBox("Side by side with measured")
        self.compare_check.setToolTip("Show the measured ST spots (if loaded) next to the predictions "
                                      "in a 1×2 grid, coloured by the same gene")
        self.compare_check.toggled.connect(self._on_compare_toggled)
        row = QHBoxLayout()
        row.addWidget(self.heatmap_check)
        row.addWidget(self.compare_check)
        form.addRow("", row)
        self.hover_label = QLabel("")
        self.hover_label.setStyleSheet("color: #9a9a9a")
        form.addRow("Hover", self.hover_label)
        self.compare_label = wrap_label("", lines=2)
        form.addRow("Measured", self.compare_label)
        root.addWidget(box)

        # -- export --------------------------------------------------------------------
        box = QGroupBox("Export")
        row = QHBoxLayout(box)
        self.export_h5ad_btn = QPushButton("Export .h5ad")
        self.export_h5ad_btn.clicked.connect(lambda: self.export_h5ad(None))
        self.export_csv_btn = QPushButton("Export CSV")
        self.export_csv_btn.clicked.connect(lambda: self.export_csv(None))
        self.clear_btn = QPushButton("Clear")
        self.clear_btn.setToolTip("Remove the predictions layer shown")
        self.clear_btn.clicked.connect(self.clear_predictions)
        for b in (self.export_h5ad_btn, self.export_csv_btn, self.clear_btn):
            row.addWidget(b)
        root.addWidget(box)
        root.addStretch(1)
        self._update_buttons()
        _compact_combos(self)
        fit_width(self)

    # ================================================================== viewer wiring
    def _connect_viewer(self) -> None:
        ev = self.viewer.layers.events
        ev.inserted.connect(self._on_layers_changed)
        ev.removed.connect(self._on_layers_changed)
        ev.reordered.connect(self._on_layers_changed)
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)

    def _on_layers_changed(self, event=None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            layer = event.value
            layer.events.name.connect(self._refresh_layer_choices)
        if self._layer is not None and self._layer not in self.viewer.layers:
            self._layer = None
            self._fill_genes()
        self._refresh_layer_choices()

    def _on_active_layer(self, event=None) -> None:
        layer = self.viewer.layers.selection.active
        if layer is not None and (layer.metadata or {}).get("m2ort_kind") == L.PRED_KIND and not _same(layer, self._layer):
            self._set_active_layer(layer)

    def _refresh_layer_choices(self, event=None) -> None:
        from napari.layers import Image, Shapes

        def refill(combo, names, prefer=None):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            elif prefer in names:
                combo.setCurrentText(prefer)
            combo.blockSignals(False)
            return current != combo.currentText()

        images = [ly.name for ly in self.viewer.layers if isinstance(ly, Image)
                  and (ly.metadata or {}).get("m2ort_kind") is None]
        shapes = [ly.name for ly in self.viewer.layers if isinstance(ly, Shapes)]
        if refill(self.slide_combo, images):
            self._on_slide_changed()
        refill(self.regions_combo, shapes, prefer=L.REGIONS_NAME)
        self._update_buttons()

    # ================================================================== slide
    def slide_layer(self):
        name = self.slide_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_slide_changed(self, *_):
        layer = self.slide_layer()
        if layer is None:
            self.mpp_src.setText("")
            return
        mpp, source = L.layer_mpp(layer)
        self.mpp_spin.blockSignals(True)
        self.mpp_spin.setValue(mpp)
        self.mpp_spin.blockSignals(False)
        self.mpp_src.setText("assumed – check!" if source == "default" else "from layer")
        self.mpp_src.setToolTip({"metadata": "read from the file's metadata", "st-geometry": "derived from the ST spot grid",
                                 "user": "given when the slide was opened", "default": "the file has no pixel size: "
                                 "set the right value before predicting"}.get(source, source))
        if source == "default":
            self.mpp_src.setStyleSheet("color: #e0a040")
        else:
            self.mpp_src.setStyleSheet("color: #9a9a9a")

    def _slide_mpp(self, layer) -> tuple[float, str]:
        mpp, source = L.layer_mpp(layer)
        user = float(self.mpp_spin.value())
        if abs(user - mpp) > 0.6 * 10 ** -self.mpp_spin.decimals():
            return user, "user"
        return mpp, source

    def _slide_source(self, layer):
        """What the worker needs to get a Slide: (key, factory)."""
        mpp, source = self._slide_mpp(layer)
        path = (layer.metadata or {}).get("path")
        if path and Path(path).exists():
            key = ("file", str(path), round(mpp, 6))

            def factory():
                from ..io.slides import open_slide

                return open_slide(path, mpp=mpp)
        else:
            key = ("layer", layer.unique_id, round(mpp, 6))
            adapter = L.LayerSlide(layer, mpp, source)

            def factory():
                return adapter

        return key, factory

    def _get_slide(self, key, factory):
        slide = self._slides.get(key)
        if slide is None:
            slide = self._slides[key] = factory()
        return slide

    # ================================================================== model
    def _refresh_model_choices(self) -> None:
        from ..model.weights import BUNDLED_PATH

        self.model_combo.blockSignals(True)
        if self.model_combo.findData(BUNDLED) < 0 and Path(BUNDLED_PATH).is_file():
            self.model_combo.insertItem(0, "Bundled M2ORT-S (HER2+ breast)", BUNDLED)
            self.model_combo.setCurrentIndex(0)
        self.model_combo.blockSignals(False)
        self._on_model_changed()

    def model_spec(self) -> Optional[str]:
        data = self.model_combo.currentData()
        return str(data) if data is not None else None

    def add_checkpoint(self, path=None, select: bool = True) -> Optional[str]:
        """Add a .safetensors checkpoint to the model list (file dialog when no path)."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Open M2ORT checkpoint", "",
                                                  "M2ORT checkpoint (*.safetensors)")
            if not path:
                return None
        path = str(Path(path).expanduser())
        spec = f"file:{path}"
        try:
            from ..model.weights import read_card

            card = read_card(path)
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        idx = self.model_combo.findData(spec)
        if idx < 0:
            self.model_combo.addItem(f"{Path(path).name} ({card.variant}, {len(card.genes)} genes)", spec)
            idx = self.model_combo.count() - 1
        if select:
            self.model_combo.setCurrentIndex(idx)
        return spec

    def set_model(self, model, card, name: str = "fine-tuned model", select: bool = True) -> str:
        """Use an in-memory model (e.g. from the fine-tuning widget) for prediction."""
        spec = f"memory:{L.model_key(card)}"
        self._model_cache[spec] = (model, card)
        idx = self.model_combo.findData(spec)
        if idx < 0:
            self.model_combo.addItem(f"{name} ({len(card.genes)} genes)", spec)
            idx = self.model_combo.count() - 1
        if select:
            self.model_combo.setCurrentIndex(idx)
        self._on_model_changed()
        return spec

    def _load_model(self, spec: str):
        """(model, card) for a spec, cached; runs in the worker thread."""
        hit = self._model_cache.get(spec)
        if hit is not None:
            return hit
        from ..model.weights import load_bundled, load_checkpoint

        if spec == BUNDLED:
            model, card = load_bundled()
        elif spec.startswith("file:"):
            model, card = load_checkpoint(spec[5:])
        else:
            raise M2ORTError("The selected model is no longer available; choose another one.")
        self._model_cache[spec] = (model, card)
        return model, card

    def _card_for(self, spec: Optional[str]):
        if spec is None:
            return None
        hit = self._model_cache.get(spec)
        if hit is not None:
            return hit[1]
        try:
            from ..model.weights import BUNDLED_PATH, read_card

            return read_card(BUNDLED_PATH if spec == BUNDLED else spec[5:])
        except (M2ORTError, OSError):
            return None

    def _on_model_changed(self, *_):
        spec = self.model_spec()
        card = self._card_for(spec)
        if spec is None:
            self.model_info.setText("No model: the bundled weights are not installed. Open a checkpoint.")
        elif card is None:
            self.model_info.setText("(model card unreadable)")
        else:
            val = (card.metrics or {}).get("validation") or (card.metrics or {}).get("test") or {}
            pcc = val.get("pcc_gene_mean") if isinstance(val, dict) else None
            extra = f", val PCC-gene {pcc:.2f}" if isinstance(pcc, (int, float)) else ""
            self.model_info.setText(f"{card.variant}, {len(card.genes)} genes, {card.mpp:g} µm/px, "
                                    f"{card.fov_um:.0f} µm field{extra}")
        self._update_buttons()

    # ================================================================== layout
    def _on_layout_changed(self, *_):
        layout = self.layout_combo.currentData()
        custom = layout == "custom"
        self.pitch_spin.setEnabled(custom)
        self.diam_spin.setEnabled(custom)
        if not custom:
            from ..spots import LAYOUTS

            _, pitch, diam = LAYOUTS[layout]
            self.pitch_spin.setValue(pitch)
            self.diam_spin.setValue(diam)

    def _layout_params(self) -> dict:
        layout = self.layout_combo.currentData()
        if layout == "custom":
            return {"layout": "custom", "pitch_um": float(self.pitch_spin.value()),
                    "diameter_um": float(self.diam_spin.value())}
        return {"layout": layout}

    # ================================================================== regions
    def add_regions_layer(self):
        """Create (or select) the 'M2ORT regions' Shapes layer, in rectangle mode."""
        layer = self.slide_layer()
        if L.REGIONS_NAME in self.viewer.layers:
            shapes = self.viewer.layers[L.REGIONS_NAME]
        else:
            kw = {}
            if layer is not None:
                geom = L.geometry(layer, self._slide_mpp(layer)[0])
                kw = geom.layer_kwargs
            shapes = self.viewer.add_shapes(name=L.REGIONS_NAME, edge_color="#ffd23f", edge_width=4,
                                            face_color="transparent", ndim=2, **kw)
        self.regions_combo.setCurrentText(shapes.name)
        self.viewer.layers.selection.active = shapes
        try:
            shapes.mode = "add_rectangle"
        except Exception:  # pragma: no cover
            pass
        return shapes

    def _regions_um(self, layer, geom) -> list:
        from ..spots import Region

        name = self.regions_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise M2ORTError("There is no regions layer: press 'Add regions layer' and draw a rectangle "
                             "over the tissue (or use 'Predict view' / 'Predict tissue').")
        shapes = self.viewer.layers[name]
        regions = []
        for verts, kind in zip(shapes.data, shapes.shape_type):
            if kind in ("line", "path"):
                continue
            world = np.asarray([shapes.data_to_world(v) for v in np.asarray(verts)])
            regions.append(Region.from_napari_shape(geom.world_to_um(world)))
        if not regions:
            raise M2ORTError(f"The layer '{name}' holds no rectangle or polygon: draw one over the tissue.")
        return regions

    def _view_region_um(self, geom):
        from ..spots import Region

        cam = self.viewer.camera
        center = np.asarray(cam.center, dtype=float)[-2:]
        size = np.asarray(self.viewer.canvas.size, dtype=float)[-2:]  # (h, w) canvas pixels
        half = size / max(float(cam.zoom), 1e-12) / 2.0
        lo = geom.world_to_um(center - half)
        hi = geom.world_to_um(center + half)
        return Region.rectangle(lo[1], lo[0], hi[1], hi[0])

    # ================================================================== predict
    def predict_regions(self):
        return self._start("regions")

    def predict_view(self):
        return self._start("view")

    def predict_tissue(self):
        return self._start("tissue")

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
        _notify("error", message)

    def _start(self, what: str):
        if self.running:
            return None
        self.last_error = None
        layer = self.slide_layer()
        try:
            if layer is None:
                raise M2ORTError("Open an H&E slide first (File > Open, or File > Open Sample > napari M2ORT).")
            spec = self.model_spec()
            if spec is None:
                raise M2ORTError("No model is selected: the bundled weights are missing; open a checkpoint (.safetensors).")
            mpp, _ = self._slide_mpp(layer)
            geom = L.geometry(layer, mpp)
            tissue_only = self.tissue_check.isChecked() or what == "tissue"
            if what == "regions":
                regions = self._regions_um(layer, geom)
            elif what == "view":
                regions = [self._view_region_um(geom)]
            else:
                regions = None  # whole slide
            slide_key, slide_factory = self._slide_source(layer)
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        layout = self._layout_params()
        device = self.device_combo.currentText()
        batch = int(self.batch_spin.value())
        compile_model = self.compile_check.isChecked()
        existing = self._existing_ids(layer.name)
        mask_key = slide_key

        def make_job(should_stop):
            from ..inference import predict
            from ..spots import Region, layout_spots, restrict_to_tissue, tissue_mask

            yield Progress("prepare", 0, 1, "loading the model and slide")
            model, card = self._load_model(spec)
            slide = self._get_slide(slide_key, slide_factory)
            h, w = slide.size_um
            areas = regions if regions is not None else [Region.rectangle(0, 0, w, h)]
            parts = [layout_spots(r, slide_size_um=slide.size_um, **layout) for r in areas]
            spots = _merge_layouts(parts)
            if tissue_only and len(spots):
                yield Progress("prepare", 0, 1, "finding tissue")
                mask = self._masks.get(mask_key)
                if mask is None:
                    mask = self._masks[mask_key] = tissue_mask(slide)
                spots = restrict_to_tissue(spots, mask)
            n_candidates = len(spots)
            if n_candidates == 0:
                raise M2ORTError("The region holds no spot centres: make it larger than the spot pitch "
                                 f"({spots.pitch_um:g} µm).")
            key = L.model_key(card)
            have = existing.get(_layer_key(key, spots), set())
            keep = np.array([str(i) not in have for i in spots.ids], dtype=bool)
            spots = spots.subset(keep)
            run = RunResult(None, spots, card, key, int((~keep).sum()), n_candidates)
            if len(spots) == 0:
                return run
            yield Progress("plan", 0, len(spots), f"{len(spots)} spots", data={"run": run})
            run.prediction = yield from predict(slide, spots.centers_um, model, card, device=device,
                                                batch_size=batch, should_stop=should_stop,
                                                compile="on" if compile_model else "auto")
            return run

        self._run = {"what": what, "geom": geom, "slide_layer": layer.name, "t0": time.perf_counter(),
                     "t_first": None, "spots": None, "layer": None, "n_done": 0}
        self.progress_bar.setRange(0, 0)
        self.status.setText("Preparing…")
        self.job = start_job(make_job, desc="M2ORT prediction", on_progress=self._on_progress,
                             on_done=self._on_done, on_failed=self._on_failed,
                             on_finished=self._on_finished)
        self._jobs[:] = [self.job]
        self._update_buttons()
        return self.job

    def _existing_ids(self, slide_name: str) -> dict:
        out: dict = {}
        for ly in L.predictions_layers(self.viewer):
            md = ly.metadata
            if md.get("slide") == slide_name:
                out.setdefault(_layer_key_md(md), set()).update(map(str, md.get("spot_ids", [])))
        return out

    def _target_layer(self, run: RunResult):
        """The predictions layer of this slide and model (created on first use)."""
        slide_name = self._run["slide_layer"]
        spots = run.spots
        want = _layer_key(run.key, spots)
        for ly in L.predictions_layers(self.viewer):
            md = ly.metadata
            if md.get("slide") == slide_name and _layer_key_md(md) == want:
                return ly
        others = [ly for ly in L.predictions_layers(self.viewer)]
        name = L.PREDICTIONS_NAME
        if others:
            name += f" [{self.model_combo.currentText()}; {spots.layout} {spots.pitch_um:g}/{spots.diameter_um:g} µm]"
        layer = L.new_predictions_layer(
            self.viewer, self._run["geom"], run.card.genes, spots.diameter_um, run.card.to_json(),
            spots.layout, run.key, slide_name, colormap=self.cmap_combo.currentText(), name=name,
            pitch_um=spots.pitch_um, grid=getattr(spots, "grid", ""))
        layer.mouse_move_callbacks.append(self._on_hover)
        return layer

    def _on_progress(self, ev: Progress) -> None:
        run = ev.data.get("run") if ev.data else None
        if run is not None:
            layer = self._target_layer(run)
            self._run.update(spots=run.spots, layer=layer)
            if not _same(layer, self._layer):
                self._set_active_layer(layer)
        if ev.stage in ("prepare", "plan"):
            self.status.setText(ev.message or ev.stage)
            return
        if ev.stage != "predict":
            return
        self.progress_bar.setFormat("%v / %m spots")
        self.progress_bar.setRange(0, max(1, ev.total))
        self.progress_bar.setValue(ev.done)
        self.status.setText(f"Predicting: {ev.message}")
        if ev.data and "indices" in ev.data and self._run.get("layer") is not None:
            idx = np.asarray(ev.data["indices"])
            spots = self._run["spots"]
            layer = self._run["layer"]
            if layer not in self.viewer.layers:  # the user removed it mid-run
                return
            gene = self.current_gene() or self._default_gene(list(layer.features.columns))
            L.append_spots(layer, spots.centers_um[idx][:, ::-1], ev.data["values"], spots.ids[idx],
                           spots.diameter_um, gene, clim=None)
            self._run["n_done"] = len(layer.data)
            if self._run["t_first"] is None:
                self._run["t_first"] = time.perf_counter() - self._run["t0"]
            if _same(layer, self._layer):
                self._on_gene_changed()

    def _on_done(self, run: RunResult) -> None:
        seconds = time.perf_counter() - self._run.get("t0", time.perf_counter())
        pred = run.prediction
        if pred is None:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(1)
            self.progress_bar.setFormat("")
            msg = f"All {run.n_candidates} spots of this region are already predicted."
            self.status.setText(msg)
            _notify("info", msg)
            self.last_run = {"n_spots": 0, "skipped": run.skipped, "seconds": seconds}
            return
        n_done = int(pred.n_done)
        info = dict(pred.info)
        self.last_run = {
            "n_spots": n_done, "n_requested": len(pred.done), "skipped": run.skipped,
            "seconds": seconds, "seconds_to_first_batch": self._run.get("t_first"),
            "stopped": bool(info.get("stopped")), "device": info.get("device"),
            "spots_per_s": info.get("spots_per_s"), "compiled": bool(info.get("compiled")),
        }
        layer = self._run.get("layer")
        if layer is not None and layer in self.viewer.layers:
            layer.metadata.setdefault("runs", []).append(
                {k: v for k, v in self.last_run.items() if isinstance(v, (int, float, str, bool, type(None)))})
        skipped = f", {run.skipped} already predicted" if run.skipped else ""
        if info.get("stopped"):
            msg = f"Stopped: kept {n_done} of {len(pred.done)} spots ({seconds:.1f} s){skipped}."
        else:
            msg = (f"{n_done} spots predicted in {seconds:.1f} s on {info.get('device', '?')}{skipped}."
                   f" Hover a spot to read its value.")
        self.status.setText(msg)
        self._on_gene_changed()

    def _on_failed(self, exc: BaseException) -> None:
        self.last_error = str(exc)
        self.status.setText(f"⚠ {exc}")

    def _on_finished(self) -> None:
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)
        self._update_buttons()

    def _update_buttons(self) -> None:
        busy = self.running
        have_slide = self.slide_combo.count() > 0
        have_model = self.model_combo.count() > 0
        for b in (self.predict_regions_btn, self.predict_view_btn, self.predict_tissue_btn):
            b.setEnabled(not busy and have_slide and have_model)
        self.cancel_btn.setEnabled(busy and not (self.job is not None and self.job.cancelled))
        have_pred = self._layer is not None and len(self._layer.data) > 0
        for b in (self.export_h5ad_btn, self.export_csv_btn, self.clear_btn):
            b.setEnabled(have_pred and not busy)

    # ================================================================== display
    def predictions_layer(self):
        return self._layer

    def _set_active_layer(self, layer) -> None:
        self._layer = layer
        self._fill_genes()
        self._update_buttons()

    def current_gene(self) -> Optional[str]:
        text = self.gene_combo.currentText().strip()
        return text or None

    def set_gene(self, gene: str) -> None:
        idx = self.gene_combo.findText(gene, Qt.MatchFlag.MatchFixedString)
        if idx < 0:
            raise M2ORTError(f"Gene {gene!r} is not in the model's panel.")
        self.gene_combo.setCurrentIndex(idx)
        self._on_gene_changed()

    @staticmethod
    def _default_gene(genes: list) -> Optional[str]:
        for g in ("ERBB2", "GRB7", "KRT19"):
            if g in genes:
                return g
        return genes[0] if genes else None

    def _fill_genes(self) -> None:
        genes = list(self._layer.features.columns) if self._layer is not None else []
        current = self.current_gene()
        self.gene_combo.blockSignals(True)
        self.gene_combo.clear()
        self.gene_combo.addItems(sorted(genes, key=str.upper))
        gene = current if current in genes else self._default_gene(genes)
        if gene is not None:
            self.gene_combo.setCurrentText(gene)
        self.gene_combo.blockSignals(False)
        self._on_gene_changed()

    def _on_gene_changed(self, *_):
        layer = self._layer
        gene = self.current_gene()
        if layer is None or layer not in self.viewer.layers or gene not in layer.features.columns or not len(layer.data):
            return
        lo, hi = L.gene_range(layer.features[gene].to_numpy())
        self._set_clim_fields(lo, hi)
        self.hover_label.setText("")
        L.color_by(layer, gene, colormap=self.cmap_combo.currentText(), clim=(lo, hi))
        card_target = ""
        try:
            import json

            card_target = json.loads(layer.metadata.get("model_card", "{}")).get("target", "")
        except ValueError:
            pass
        unit = " (log1p CPM)" if card_target.startswith("log1p") else ""
        L.show_legend(self.viewer, f"M2ORT predicted {gene}{unit}")
        self._update_heatmap()
        self._update_comparison()

    def _set_clim_fields(self, lo: float, hi: float) -> None:
        step = max((hi - lo) / 20.0, 1e-3)
        for sp, v in ((self.clim_min, lo), (self.clim_max, hi)):
            sp.blockSignals(True)
            sp.setSingleStep(step)
            sp.setValue(v)
            sp.blockSignals(False)

    def contrast_limits(self) -> tuple[float, float]:
        lo, hi = float(self.clim_min.value()), float(self.clim_max.value())
        return lo, max(hi, lo + 1e-6)

    def _on_clim_changed(self, *_) -> None:
        layer = self._layer
        gene = self.current_gene()
        if layer is None or layer not in self.viewer.layers or gene not in layer.features.columns:
            return
        lo, hi = self.contrast_limits()
        if hi - lo < 1e-9:
            hi = lo + 1e-6
        layer.face_contrast_limits = (lo, hi)
        layer.refresh_colors(update_color_mapping=False)
        hm = self._heatmap_layer()
        if hm is not None:
            hm.contrast_limits = (lo, hi)

    def _heatmap_layer(self):
        for ly in self.viewer.layers:
            if (ly.metadata or {}).get("m2ort_kind") == "m2ort-heatmap" and self._layer is not None \
                    and ly.metadata.get("source") == self._layer.unique_id:
                return ly
        return None

    def _update_heatmap(self, *_):
        layer = self._layer
        hm = self._heatmap_layer()
        if not self.heatmap_check.isChecked() or layer is None or layer not in self.viewer.layers:
            if hm is not None:
                self.viewer.layers.remove(hm)
            return
        gene = self.current_gene()
        if gene not in layer.features.columns or len(layer.data) < 1:
            return
        yx = np.asarray(layer.data, float)
        pitch = float(layer.metadata.get("pitch_um", 100.0))
        img, origin_yx, res = L.heatmap_grid(yx[:, ::-1], layer.features[gene].to_numpy(), pitch)
        s = np.asarray(layer.scale, float)[-2:]
        t = np.asarray(layer.translate, float)[-2:]
        kw = dict(scale=tuple(res * s), translate=tuple(origin_yx * s + t),
                  colormap=self.cmap_combo.currentText(), contrast_limits=self.contrast_limits(),
                  opacity=0.6)
        if layer.units is not None:
            kw["units"] = layer.units
        if hm is None:
            hm = self.viewer.add_image(img, name=f"{L.HEATMAP_NAME}", blending="translucent",
                                       metadata={"m2ort_kind": "m2ort-heatmap", "source": layer.unique_id}, **kw)
            # keep the spots above the heat map
            i_hm, i_pts = self.viewer.layers.index(hm), self.viewer.layers.index(layer)
            if i_hm > i_pts:
                self.viewer.layers.move(i_hm, i_pts)
        else:
            hm.data = img
            for k, v in kw.items():
                setattr(hm, k, v)
        hm.name = f"{L.HEATMAP_NAME}: {gene}"

    def _on_hover(self, layer, event) -> None:
        try:
            idx = layer.get_value(event.position, world=True)
        except Exception:  # pragma: no cover - hover is best effort
            idx = None
        gene = self.current_gene()
        if idx is None or gene not in layer.features.columns or idx >= len(layer.data):
            self.hover_label.setText("")
            return
        ids = layer.metadata.get("spot_ids", [])
        sid = ids[idx] if idx < len(ids) else str(idx)
        self.hover_label.setText(f"{sid}: {gene} = {float(layer.features[gene].iloc[idx]):.3f}")

    # ---------------------------------------------------------------- measured spots
    def measured_layer(self):
        layers = L.measured_layers(self.viewer)
        slide = self.slide_layer()
        if slide is not None:  # prefer the one from the same section
            path = str((slide.metadata or {}).get("path", ""))
            for ly in layers:
                sec = (ly.metadata or {}).get("st_section")
                if sec is not None and path and str(getattr(sec, "image_path", "")) == path:
                    return ly
        return layers[0] if layers else None

    def _update_comparison(self) -> None:
        layer, gene = self._layer, self.current_gene()
        meas = self.measured_layer()
        if meas is None or layer is None or gene is None:
            self.compare_label.setText("" if meas is None else f"'{meas.name}' loaded")
            return
        if gene not in meas.features.columns:
            self.compare_label.setText(f"{gene} is not among the measured genes of '{meas.name}'.")
            return
        L.color_by(meas, gene, colormap=self.cmap_combo.currentText(), colorbar=False)
        r, n = self.compare_pcc(gene)
        if n < 3 or r is None or not np.isfinite(r):
            self.compare_label.setText(f"'{meas.name}' coloured by {gene}; too few predicted spots "
                                       f"near measured ones ({n}) for a correlation.")
        else:
            self.compare_label.setText(f"{gene}: PCC predicted vs measured = {r:.2f} "
                                       f"(n = {n} measured spots, nearest predicted spot)")

    def compare_pcc(self, gene: str):
        """PCC between measured spots and the nearest predicted spot (within one pitch)."""
        from scipy.spatial import cKDTree

        from ..metrics import pcc_gene

        layer, meas = self._layer, self.measured_layer()
        if layer is None or meas is None or gene not in meas.features.columns or not len(layer.data):
            return None, 0
        pw = np.asarray([layer.data_to_world(p) for p in layer.data])[:, -2:]
        mw = np.asarray([meas.data_to_world(p) for p in meas.data])[:, -2:]
        geom = self._run.get("geom") if self._run else None
        upw = geom.um_per_world if geom is not None else 1.0
        pitch_world = float(layer.metadata.get("pitch_um", 100.0)) / upw
        d, j = cKDTree(pw).query(mw, k=1)
        ok = d <= pitch_world
        if ok.sum() < 3:
            return None, int(ok.sum())
        pred = layer.features[gene].to_numpy()[j[ok]][:, None]
        true = meas.features[gene].to_numpy()[ok][:, None]
        r, _ = pcc_gene(pred, true)
        return float(r[0]), int(ok.sum())

    def _on_compare_toggled(self, on: bool) -> None:
        """Side by side: a 1×2 grid, predictions left, measured spots right (same slide)."""
        grid = self.viewer.grid
        slide = self.slide_layer()
        meas = self.measured_layer()
        twin_name = f"{slide.name} (measured view)" if slide is not None else None
        if not on:
            grid.enabled = False
            if twin_name and twin_name in self.viewer.layers:
                self.viewer.layers.remove(twin_name)
            self._restore_order(getattr(self, "_order_before_grid", None))
            return
        if slide is None or meas is None or self._layer is None:
            self.compare_check.blockSignals(True)
            self.compare_check.setChecked(False)
            self.compare_check.blockSignals(False)
            self._fail("Side by side needs a slide, predictions and a measured ST layer (e.g. File > Open "
                       "Sample > napari M2ORT).")
            return
        if self.heatmap_check.isChecked():
            self.heatmap_check.setChecked(False)  # one layer per cell reads better
        if twin_name not in self.viewer.layers:
            # a second view of the same (lazy) pixels, so each grid cell shows the tissue
            twin = self.viewer.add_image(slide.data, name=twin_name, rgb=slide.rgb, multiscale=slide.multiscale,
                                         scale=slide.scale, translate=slide.translate, units=slide.units,
                                         contrast_limits=slide.contrast_limits,
                                         metadata={"m2ort_kind": "m2ort-twin"})
        else:
            twin = self.viewer.layers[twin_name]
        # Grid cells take `stride` consecutive layers from the bottom of the list, and the
        # groups after the last cell wrap around: [slide, predictions] left, [slide copy,
        # measured] right, anything else on top (wrapping onto the cells).
        self._order_before_grid = [ly.unique_id for ly in self.viewer.layers if ly.name != twin_name]
        cells = [slide, self._layer, twin, meas]
        order = cells + [ly for ly in self.viewer.layers if ly not in cells]
        for i, ly in enumerate(order):
            j = self.viewer.layers.index(ly)
            if j != i:
                self.viewer.layers.move(j, i)
        grid.stride = 2
        grid.shape = (1, 2)
        grid.spacing = 10
        grid.enabled = True
        self._update_comparison()
        self.viewer.reset_view()

    def _restore_order(self, ids) -> None:
        if not ids:
            return
        by_id = {ly.unique_id: ly for ly in self.viewer.layers}
        order = [by_id[i] for i in ids if i in by_id]
        order += [ly for ly in self.viewer.layers if ly.unique_id not in ids]
        for i, ly in enumerate(order):
            j = self.viewer.layers.index(ly)
            if j != i:
                self.viewer.layers.move(j, i)

    # ================================================================== export
    def _export(self, path, suffix: str, writer_name: str):
        from ..io import export

        layer = self._layer
        if layer is None or not len(layer.data):
            self._fail("There are no predictions to export yet: predict a region first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Export predictions", f"predictions{suffix}",
                                                  f"{suffix} files (*{suffix})")
            if not path:
                return None
        path = Path(path)
        if path.suffix.lower() != suffix:
            path = path.with_suffix(suffix)
        meta = {"features": layer.features, "metadata": layer.metadata, "size": layer.size, "name": layer.name}
        try:
            adata = export.points_layer_to_anndata(layer.data, meta)
            out = getattr(export, writer_name)(adata, path)
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        except OSError as exc:
            self._fail(f"{path}: could not be written ({exc.strerror or exc}); choose another folder.")
            return None
        self.status.setText(f"Saved {len(layer.data)} spots × {layer.features.shape[1]} genes to {out}")
        _notify("info", f"Saved {len(layer.data)} spots to {out}")
        return Path(out)

    def export_h5ad(self, path=None):
        return self._export(path, ".h5ad", "write_h5ad")

    def export_csv(self, path=None):
        return self._export(path, ".csv", "write_csv")

    def clear_predictions(self) -> None:
        layer = self._layer
        if layer is None:
            return
        hm = self._heatmap_layer()
        if hm is not None:
            self.viewer.layers.remove(hm)
        if layer in self.viewer.layers:
            self.viewer.layers.remove(layer)
        self._layer = None
        self._fill_genes()
        self._update_buttons()

    # ================================================================== teardown
    def showEvent(self, event) -> None:
        # napari's stylesheet (fonts, paddings) is applied when docked: size again then
        super().showEvent(event)
        fit_width(self)
        QTimer.singleShot(0, lambda: fit_width(self))

    def closeEvent(self, event) -> None:  # pragma: no cover - exercised by napari on close
        if self.running:
            self.job.cancel()
        super().closeEvent(event)


def _layer_key(model_key: str, spots) -> tuple:
    """Predictions of one model on one spot layout go to one layer (ids are per layout)."""
    return (model_key, str(spots.layout), round(float(spots.pitch_um), 3), round(float(spots.diameter_um), 3))


def _layer_key_md(md: dict) -> tuple:
    return (md.get("model_key"), str(md.get("layout")), round(float(md.get("pitch_um", 0.0)), 3),
            round(float(md.get("spot_diameter_um", 0.0)), 3))


def _same(a, b) -> bool:
    """Layer identity through napari's plugin proxies (each access makes a new proxy)."""
    if a is None or b is None:
        return a is b
    return a.unique_id == b.unique_id


def _merge_layouts(parts: list):
    """One SpotLayout from several regions' layouts, each spot once (ids are global)."""
    from ..spots import SpotLayout

    first = parts[0]
    if len(parts) == 1:
        return first
    centers = np.concatenate([p.centers_um for p in parts]) if parts else np.zeros((0, 2))
    ids = np.concatenate([np.asarray(p.ids, dtype=object) for p in parts])
    _, keep = np.unique(ids.astype(str), return_index=True)
    keep = np.sort(keep)
    return SpotLayout(centers[keep], ids[keep], first.diameter_um, first.pitch_um, first.layout, first.grid,
                      dict(first.info))
