"""Fine-tune dock widget: load local ST data, check it on the slide, train, save, use.

Thin: reading goes through ``io.st``, model/gene panel/validation choices through
``train_setup`` (the same code the CLI's ``train`` uses), patch sampling and training
through the ``training`` generators, run in a napari thread worker with a live plot.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QStackedWidget,
    QWidget,
)

from ..errors import M2ORTError
from ..progress import Progress
from . import _layers as L
from ._plot import LivePlot
from ._layers import compact_combos as _compact_combos
from ._layers import fit_width, scroll_body, wrap_label
from ._workers import cancel_on_destroy, predict_widget_for, run_in_thread, start_job

BUNDLED = "bundled"
FORMATS = [("Legacy ST (counts + spot table)", "legacy"), ("Visium (Space Ranger folder)", "visium"),
           ("AnnData (.h5ad)", "h5ad")]
GENE_CHOICES = [("Keep the model's genes", "model"), ("Top N genes of this data", "top"),
                ("Gene list (comma separated)", "list")]


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications as n

    {"error": n.show_error, "warning": n.show_warning, "info": n.show_info}[kind](message)


class _PathField(QWidget):
    """A line edit with a browse button."""

    def __init__(self, caption: str, filter_: str = "", folder: bool = False, parent=None):
        super().__init__(parent)
        self.caption, self.filter, self.folder = caption, filter_, folder
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(caption)
        btn = QPushButton("…")
        btn.setFixedWidth(28)
        btn.clicked.connect(self._browse)
        lay.addWidget(self.edit, 1)
        lay.addWidget(btn)

    def _browse(self):
        if self.folder:
            path = QFileDialog.getExistingDirectory(self, self.caption)
        else:
            path, _ = QFileDialog.getOpenFileName(self, self.caption, "", self.filter)
        if path:
            self.edit.setText(path)

    def path(self) -> Optional[str]:
        text = self.edit.text().strip()
        return text or None


class FinetuneWidget(QWidget):
    """Plugins → napari-m2ort → Fine-tune."""

    def __init__(self, napari_viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.job = None
        self._jobs = cancel_on_destroy(self)
        self.result = None  # training.TrainResult of the last run
        self.last_error: Optional[str] = None
        self.sections: dict = {}  # name -> STSection loaded by this widget
        self.saved_path: Optional[Path] = None
        self._tmpdir = Path(tempfile.mkdtemp(prefix="m2ort-finetune-"))
        weakref.finalize(self, shutil.rmtree, str(self._tmpdir), True)
        self._t0 = 0.0
        self._build_ui()
        ev = self.viewer.layers.events
        ev.inserted.connect(self._refresh)
        ev.removed.connect(self._refresh)
        self._refresh()

    # ================================================================== UI
    def _build_ui(self) -> None:
        root = scroll_body(self)

        box = QGroupBox("Measured ST data")
        form = QFormLayout(box)
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("The H&E image the spots were measured on")
        form.addRow("Slide", self.slide_combo)
        self.format_combo = QComboBox()
        for label, value in FORMATS:
            self.format_combo.addItem(label, value)
        form.addRow("Format", self.format_combo)
        self.stack = QStackedWidget()
        page = QWidget()
        f = QFormLayout(page)
        f.setContentsMargins(0, 0, 0, 0)
        self.counts_field = _PathField("counts table (.tsv / .tsv.gz)", "Counts (*.tsv *.tsv.gz *.csv *.txt)")
        self.spots_field = _PathField("spot table (*_selection.tsv)", "Spots (*.tsv *.csv *.txt)")
        f.addRow("Counts", self.counts_field)
        f.addRow("Spots", self.spots_field)
        self.stack.addWidget(page)
        page = QWidget()
        f = QFormLayout(page)
        f.setContentsMargins(0, 0, 0, 0)
        self.visium_field = _PathField("Space Ranger 'outs' folder", folder=True)
        f.addRow("Folder", self.visium_field)
        self.stack.addWidget(page)
        page = QWidget()
        f = QFormLayout(page)
        f.setContentsMargins(0, 0, 0, 0)
        self.h5ad_field = _PathField("AnnData file with obsm['spatial']", "AnnData (*.h5ad)")
        f.addRow("File", self.h5ad_field)
        self.stack.addWidget(page)
        self.format_combo.currentIndexChanged.connect(self.stack.setCurrentIndex)
        form.addRow(self.stack)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 50.0)
        self.mpp_spin.setSpecialValueText("from the data")
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setToolTip("Pixel size of the image the spot coordinates refer to (0 = from the data)")
        form.addRow("Pixel size", self.mpp_spin)
        self.load_btn = QPushButton("Load spots")
        self.load_btn.setToolTip("Read the data and show the measured spots over the slide (check the alignment)")
        self.load_btn.clicked.connect(lambda: self.load())
        form.addRow(self.load_btn)
        self.sections_list = QListWidget()
        self.sections_list.setMaximumHeight(80)
        self.sections_list.setToolTip("Sections to train on (ticked); measured ST layers already open appear here too")
        self.sections_list.itemChanged.connect(lambda *_: self._refresh_val_choices())
        form.addRow("Sections", self.sections_list)
        self.region_check = QCheckBox("Only spots inside the regions layer")
        self.region_check.setToolTip("Train on the spots inside the rectangles/polygons of 'M2ORT regions'")
        form.addRow("", self.region_check)
        root.addWidget(box)

        box = QGroupBox("Training")
        form = QFormLayout(box)
        self.model_combo = QComboBox()
        from ..model.weights import BUNDLED_PATH

        if Path(BUNDLED_PATH).is_file():
            self.model_combo.addItem("Bundled M2ORT-S (HER2+ breast)", BUNDLED)
        self.model_browse = QPushButton("Open…")
        self.model_browse.clicked.connect(lambda: self.add_checkpoint(None))
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.model_browse)
        form.addRow("Start from", row)
        self.genes_combo = QComboBox()
        for label, value in GENE_CHOICES:
            self.genes_combo.addItem(label, value)
        self.top_spin = QSpinBox()
        self.top_spin.setRange(1, 5000)
        self.top_spin.setValue(250)
        self.genes_edit = QLineEdit()
        self.genes_edit.setPlaceholderText("ERBB2, GRB7, KRT19, …")
        self.genes_combo.currentIndexChanged.connect(self._on_genes_mode)
        form.addRow("Gene panel", self.genes_combo)
        row = QHBoxLayout()
        row.addWidget(self.top_spin)
        row.addWidget(self.genes_edit, 1)
        form.addRow("", row)
        self._on_genes_mode()
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(10)
        form.addRow("Epochs", self.epochs_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-5)
        self.lr_spin.setValue(1e-4)
        form.addRow("Learning rate", self.lr_spin)
        self.schedule_combo = QComboBox()
        self.schedule_combo.addItem("Constant", "constant")
        self.schedule_combo.addItem("Warmup + cosine decay", "cosine")
        self.schedule_combo.setToolTip("Cosine: one warmup epoch, then the rate falls to 0 at the last epoch "
                                       "(steadier end of training; what the bundled model used)")
        form.addRow("LR schedule", self.schedule_combo)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 1024)
        self.batch_spin.setValue(32)
        form.addRow("Batch size", self.batch_spin)
        self.mode_combo = QComboBox()
        self.mode_combo.addItem("Whole model", "full")
        self.mode_combo.addItem("Head only (fast, few spots)", "head")
        form.addRow("Train", self.mode_combo)
        self.val_combo = QComboBox()
        self.val_combo.setToolTip("Held-out spatial blocks of each section, no validation, or a whole section")
        form.addRow("Validation", self.val_combo)
        self.device_combo = QComboBox()
        from ..devices import available_devices

        self.device_combo.addItems(["auto", *available_devices()])
        form.addRow("Device", self.device_combo)
        row = QHBoxLayout()
        self.train_btn = QPushButton("Train")
        self.train_btn.clicked.connect(self.train)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop after the current step; the best model so far is kept")
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.train_btn, 1)
        row.addWidget(self.cancel_btn)
        form.addRow(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        form.addRow(self.progress_bar)
        self.status = wrap_label("Load measured spots for the open slide, then press Train.", lines=3)
        form.addRow(self.status)
        root.addWidget(box)

        self.plot = LivePlot()
        root.addWidget(self.plot, 1)

        row = QHBoxLayout()
        self.save_btn = QPushButton("Save model…")
        self.save_btn.setToolTip("Write the fine-tuned weights and model card (.safetensors)")
        self.save_btn.clicked.connect(lambda: self.save(None))
        self.use_btn = QPushButton("Use for prediction")
        self.use_btn.setToolTip("Switch the Predict expression widget to this model")
        self.use_btn.clicked.connect(self.use_for_prediction)
        row.addWidget(self.save_btn)
        row.addWidget(self.use_btn)
        root.addLayout(row)
        self._update_buttons()
        _compact_combos(self)
        fit_width(self)

    def _on_genes_mode(self, *_):
        mode = self.genes_combo.currentData()
        self.top_spin.setVisible(mode == "top")
        self.genes_edit.setVisible(mode == "list")

    # ================================================================== viewer state
    def _refresh(self, *_):
        from napari.layers import Image

        current = self.slide_combo.currentText()
        names = [ly.name for ly in self.viewer.layers if isinstance(ly, Image)
                 and (ly.metadata or {}).get("m2ort_kind") is None]
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems(names)
        if current in names:
            self.slide_combo.setCurrentText(current)
        self.slide_combo.blockSignals(False)
        # measured ST layers (from the reader or the sample) are sections too
        present = {self.sections_list.item(i).data(Qt.ItemDataRole.UserRole)
                   for i in range(self.sections_list.count())}
        for ly in self.viewer.layers:
            sec = (ly.metadata or {}).get("st_section")
            if sec is not None and sec.name not in self.sections:
                self.sections[sec.name] = sec
            if sec is not None and sec.name not in present:
                self._add_section_item(sec)
        self._refresh_val_choices()
        self._update_buttons()

    def _add_section_item(self, section) -> None:
        item = QListWidgetItem(f"{section.name} — {section.n_spots} spots, {section.mpp:.3f} µm/px")
        item.setData(Qt.ItemDataRole.UserRole, section.name)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(Qt.CheckState.Checked)
        self.sections_list.blockSignals(True)
        self.sections_list.addItem(item)
        self.sections_list.blockSignals(False)

    def selected_sections(self) -> list:
        out = []
        for i in range(self.sections_list.count()):
            item = self.sections_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                sec = self.sections.get(item.data(Qt.ItemDataRole.UserRole))
                if sec is not None:
                    out.append(sec)
        return out

    def _refresh_val_choices(self) -> None:
        current = self.val_combo.currentData()
        self.val_combo.blockSignals(True)
        self.val_combo.clear()
        self.val_combo.addItem("Spatial blocks (20 % of each section)", "blocks")
        self.val_combo.addItem("None (no validation)", "none")
        selected = self.selected_sections()
        if len(selected) > 1:
            for sec in selected:
                self.val_combo.addItem(f"Section {sec.name}", sec.name)
        idx = self.val_combo.findData(current)
        self.val_combo.setCurrentIndex(max(idx, 0))
        self.val_combo.blockSignals(False)

    def slide_layer(self):
        name = self.slide_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def add_checkpoint(self, path=None) -> Optional[str]:
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Start from checkpoint", "", "M2ORT checkpoint (*.safetensors)")
            if not path:
                return None
        path = str(Path(path).expanduser())
        idx = self.model_combo.findData(path)
        if idx < 0:
            self.model_combo.addItem(Path(path).name, path)
            idx = self.model_combo.count() - 1
        self.model_combo.setCurrentIndex(idx)
        self._update_buttons()
        return path

    # ================================================================== loading
    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.status.setText(f"⚠ {message}")
        _notify("error", message)

    def load(self, fmt: Optional[str] = None, **paths):
        """Read ST data in a worker, then show its spots over the slide.

        ``fmt`` = legacy | visium | h5ad; ``paths`` (counts=, spots=, folder=, h5ad=,
        image=) override the fields (tests and scripts call this directly).
        """
        from ..io import st

        if self.running:
            return None
        self.last_error = None
        fmt = fmt or self.format_combo.currentData()
        mpp = float(self.mpp_spin.value()) or None
        slide = self.slide_layer()
        image = paths.get("image") or ((slide.metadata or {}).get("path") if slide is not None else None)
        try:
            if fmt == "legacy":
                counts = paths.get("counts") or self.counts_field.path()
                spots = paths.get("spots") or self.spots_field.path()
                if not (counts and spots):
                    raise M2ORTError("Legacy ST data needs a counts table and a spot table: choose both files.")
                if not image:
                    raise M2ORTError("Open the H&E image these spots were measured on first (File > Open).")

                def read():
                    return st.read_legacy_st(image, counts, spots, mpp=mpp)
            elif fmt == "visium":
                folder = paths.get("folder") or self.visium_field.path()
                if not folder:
                    raise M2ORTError("Choose the Space Ranger output folder ('outs').")

                def read():
                    return st.read_visium(folder, mpp=mpp, image=image)
            elif fmt == "h5ad":
                h5ad = paths.get("h5ad") or self.h5ad_field.path()
                if not h5ad:
                    raise M2ORTError("Choose an .h5ad file with spot coordinates in obsm['spatial'].")

                def read():
                    return st.read_h5ad(h5ad, image=image, mpp=mpp)
            else:
                raise M2ORTError(f"Unknown ST format {fmt!r}.")
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        self.status.setText("Reading the ST data…")
        self.job = run_in_thread(read, on_done=self._on_loaded, on_failed=self._on_failed,
                                 on_finished=self._update_buttons, desc="Reading ST data")
        self._jobs[:] = [self.job]
        self._update_buttons()
        return self.job

    def _on_loaded(self, section) -> None:
        from ..io.st import points_layer_data

        slide = self.slide_layer()
        name = section.name
        base = name
        k = 2
        while name in self.sections:
            name = f"{base} ({k})"
            k += 1
        if name != section.name:
            section = dataclasses.replace(section, name=name)
        data, kwargs, _ = points_layer_data(section)
        kwargs["metadata"]["m2ort_kind"] = L.MEASURED_KIND
        kwargs.pop("units", None)
        # align with the slide: points in µm of the section's image, shown in the slide's frame
        n_outside = 0
        if slide is not None:
            geom = L.geometry(slide, section.mpp)
            kwargs.update(geom.layer_kwargs)
            h, w = slide.data[0].shape[:2] if slide.multiscale else slide.data.shape[:2]
            px = np.asarray(section.coords_px)
            inside = (px[:, 0] >= 0) & (px[:, 1] >= 0) & (px[:, 0] < w) & (px[:, 1] < h)
            n_outside = int((~inside).sum())
            if not inside.any():
                self._fail(
                    f"{section.name}: none of its {section.n_spots} spots falls on '{slide.name}' "
                    f"({w}×{h} px): the coordinates do not belong to this image. Choose the matching "
                    "slide, or check the pixel size.")
                return
        self.sections[name] = section
        self._add_section_item(section)  # before the layer exists: _refresh must not add it twice
        layer = self.viewer.add_points(data, **kwargs)
        self._refresh_val_choices()
        msg = (f"Loaded {section.name}: {section.n_spots} spots × {section.adata.n_vars} genes at "
               f"{section.mpp:.3f} µm/px. Check that the spots sit on the tissue.")
        if n_outside:
            msg += f" {n_outside} spots fall outside the slide."
            _notify("warning", f"{section.name}: {n_outside} of {section.n_spots} spots fall outside the slide.")
        self.status.setText(msg)
        self.viewer.layers.selection.active = layer

    def _on_failed(self, exc: BaseException) -> None:
        self.last_error = str(exc)
        self.status.setText(f"⚠ {exc}")

    # ================================================================== training
    def _gene_spec(self) -> str:
        mode = self.genes_combo.currentData()
        if mode == "top":
            return f"top:{int(self.top_spin.value())}"
        if mode == "list":
            genes = [g.strip() for g in self.genes_edit.text().replace("\n", ",").split(",") if g.strip()]
            if not genes:
                raise M2ORTError("The gene list is empty: paste gene symbols separated by commas.")
            return ",".join(genes)
        return "model"

    def _sections_in_regions(self, sections: list) -> list:
        from ..spots import Region

        if not self.region_check.isChecked():
            return sections
        if L.REGIONS_NAME not in self.viewer.layers or not len(self.viewer.layers[L.REGIONS_NAME].data):
            raise M2ORTError("'Only spots inside the regions layer' is ticked but there is no 'M2ORT regions' "
                             "layer with shapes: draw a rectangle around the spots to train on.")
        shapes = self.viewer.layers[L.REGIONS_NAME]
        slide = self.slide_layer()
        out = []
        for sec in sections:
            geom = L.geometry(slide, sec.mpp) if slide is not None else L.Geometry(sec.mpp, 1.0, np.zeros(2))
            keep = np.zeros(sec.n_spots, dtype=bool)
            for verts, kind in zip(shapes.data, shapes.shape_type):
                if kind in ("line", "path"):
                    continue
                world = np.asarray([shapes.data_to_world(v) for v in np.asarray(verts)])
                keep |= Region.from_napari_shape(geom.world_to_um(world)).contains(sec.centers_um)
            if keep.sum() == 0:
                continue
            out.append(dataclasses.replace(sec, adata=sec.adata[keep].copy()))
        if not out:
            raise M2ORTError("No measured spot lies inside the regions: draw the rectangle over the spots.")
        return out

    def train(self):
        if self.running:
            return None
        self.last_error = None
        try:
            sections = self.selected_sections()
            if not sections:
                raise M2ORTError("No ST section to train on: load measured spots (or open the sample) and tick it.")
            sections = self._sections_in_regions(sections)
            spec = self.model_combo.currentData()
            if spec is None:
                raise M2ORTError("No starting model: the bundled weights are missing; open a checkpoint.")
            genes = self._gene_spec()
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        from ..training import TrainConfig

        cfg = TrainConfig(epochs=int(self.epochs_spin.value()), lr=float(self.lr_spin.value()),
                          batch_size=int(self.batch_spin.value()), mode=self.mode_combo.currentData(),
                          device=self.device_combo.currentText(), precision="auto",
                          schedule=self.schedule_combo.currentData(),
                          warmup_epochs=1.0 if self.schedule_combo.currentData() == "cosine" else 0.0)
        val = self.val_combo.currentData() or "blocks"
        out_path = self._tmpdir / f"finetuned-{int(time.time())}.safetensors"

        def make_job(should_stop):
            from .. import train_setup
            from ..training import prepare_section, train

            yield Progress("setup", 0, 1, "loading the model")
            args = SimpleNamespace(model=str(spec), genes=genes, train_mpp=None)
            model, card = train_setup.model_and_card(args, sections)
            cached = []
            for sec in sections:
                cached.append((yield from prepare_section(sec, card.genes, card.mpp)))
                if should_stop():
                    from ..errors import Cancelled

                    raise Cancelled()
            train_sets, val_sets = train_setup.split(cached, val, seed=cfg.seed)
            result = yield from train(model, card, train_sets, val_sets, cfg, out_path=out_path,
                                      should_stop=should_stop)
            return result

        def guarded(should_stop):
            from ..errors import Cancelled

            try:
                return (yield from make_job(should_stop))
            except Cancelled:
                return None

        self.plot.clear()
        self.result = None
        self._t0 = time.perf_counter()
        self.progress_bar.setRange(0, 0)
        self.status.setText("Preparing…")
        self.job = start_job(guarded, desc="M2ORT fine-tuning", on_progress=self._on_progress,
                             on_done=self._on_trained, on_failed=self._on_failed, on_finished=self._update_buttons)
        self._jobs[:] = [self.job]
        self._update_buttons()
        return self.job

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()
            self.status.setText("Stopping after the current step (the best model so far is kept)…")
            self._update_buttons()

    def _on_progress(self, ev: Progress) -> None:
        if ev.stage in ("setup",):
            self.status.setText(ev.message)
            return
        if ev.stage == "patches":
            self.progress_bar.setRange(0, max(1, ev.total))
            self.progress_bar.setValue(ev.done)
            self.status.setText(f"Sampling patches: {ev.message}")
            return
        if ev.stage == "train":
            self.progress_bar.setRange(0, max(1, ev.total))
            self.progress_bar.setValue(ev.done)
            self.status.setText(f"Training: {ev.message}")
            d = ev.data or {}
            if "loss" in d:
                self.plot.add_step(int(d["step"]), float(d["loss"]), int(d.get("epoch", 0)))
        elif ev.stage == "epoch":
            d = ev.data or {}
            val = d.get("val") or {}
            pcc = val.get("pcc_gene_mean") if isinstance(val, dict) else None
            self.plot.add_epoch(int(d.get("epoch", ev.done)), float(d.get("train_loss", np.nan)),
                                float(pcc) if pcc is not None else None)
            self.status.setText(ev.message)

    def _on_trained(self, result) -> None:
        seconds = time.perf_counter() - self._t0
        if result is None:
            self.status.setText("Cancelled before training started.")
            return
        self.result = result
        best = result.best_metrics or {}
        pcc = best.get("pcc_gene_mean")
        how = "Stopped" if result.stopped else "Done"
        msg = f"{how}: {result.epochs_done} epoch(s) in {seconds:.0f} s"
        if pcc is not None:
            msg += f"; best epoch {result.best_epoch}, val PCC-gene {pcc:.3f}"
        msg += ". Save it, or use it for prediction."
        self.status.setText(msg)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)

    def _update_buttons(self, *_):
        busy = self.running
        self.train_btn.setEnabled(not busy and self.model_combo.count() > 0)
        self.load_btn.setEnabled(not busy)
        self.cancel_btn.setEnabled(busy and not self.job.cancelled)
        have = self.result is not None and not busy
        self.save_btn.setEnabled(have)
        self.use_btn.setEnabled(have)

    # ================================================================== results
    def save(self, path=None) -> Optional[Path]:
        from ..model.weights import save_checkpoint

        if self.result is None:
            self._fail("There is no fine-tuned model yet: press Train first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save fine-tuned model", "m2ort_finetuned.safetensors",
                                                  "M2ORT checkpoint (*.safetensors)")
            if not path:
                return None
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        try:
            ckpt = self.result.checkpoint
            if ckpt is not None and Path(ckpt).is_file():
                # the best epoch as written by training (atomic copy)
                tmp = path.with_name(f".{path.name}.tmp")
                shutil.copyfile(ckpt, tmp)
                tmp.replace(path)
            else:
                save_checkpoint(self.result.model, self.result.card, path)
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        except OSError as exc:
            self._fail(f"{path}: could not be written ({exc.strerror or exc}); choose another folder.")
            return None
        self.saved_path = path
        self.status.setText(f"Saved the model and its card to {path}")
        _notify("info", f"Saved fine-tuned model to {path}")
        return path

    def use_for_prediction(self):
        if self.result is None:
            self._fail("There is no fine-tuned model yet: press Train first.")
            return None
        widget = predict_widget_for(self.viewer)
        if widget is None:
            # tabbed with this one, so neither dock gets squeezed
            dock, widget = self.viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression",
                                                                     tabify=True)
            try:
                dock.show()
                dock.raise_()
            except Exception:  # pragma: no cover - cosmetic
                pass
        label = f"fine-tuned {self.saved_path.name}" if self.saved_path else "fine-tuned (unsaved)"
        spec = widget.set_model(self.result.model, self.result.card, name=label)
        self.status.setText(f"The Predict expression widget now uses the {label} model.")
        return spec

    def showEvent(self, event) -> None:
        # napari's stylesheet (fonts, paddings) is applied when docked: size again then
        super().showEvent(event)
        fit_width(self)
        QTimer.singleShot(0, lambda: fit_width(self))

    def closeEvent(self, event) -> None:  # pragma: no cover
        if self.running:
            self.job.cancel()
        super().closeEvent(event)
