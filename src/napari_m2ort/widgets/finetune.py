"""Fine-tune dock widget: load local ST data, check it on the slide, train, save, use.

A composer of panels (``panels/st_data``, ``train_settings``, ``train_run``, ``plot``)
over ``FinetuneSettings``.  Reading goes through ``io.st``; the training itself is the
use-case layer's ``pipelines.fine_tune`` job (the same one the CLI's ``train`` runs),
in a napari thread worker with a live plot.

A fine-tune offered for saving is always a whole epoch: cancelling keeps the best
completed epoch, and inside the first epoch nothing is kept (the starting model is
untouched; the training worked on a copy).  The saved card describes this training
only (``_tuned_card``), never the starting model's own evaluation.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QTabWidget, QWidget

from ..errors import Cancelled, M2ORTError
from ..progress import Progress
from . import _layers as L
from ._models import ModelCatalogue
from ._qt import compact_combos, fit_width, scroll_body
from ._tuned_card import describe_training, kept_epoch_words, per_section_words
from ._workers import cancel_on_destroy, notify, predict_widget_for, run_in_thread, start_job, tab_with_siblings
from .panels.plot import LivePlot
from .panels.st_data import FORMATS, DataPanel
from .panels.train_run import ResultPanel, TrainRunPanel
from .panels.train_settings import GENE_CHOICES, TrainSettingsPanel, gene_spec
from .state import FinetuneSettings

__all__ = ["FORMATS", "GENE_CHOICES", "FinetuneWidget"]


class FinetuneWidget(QWidget):
    """Plugins → napari-m2ort → Fine-tune."""

    def __init__(self, napari_viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.job = None
        self._jobs = cancel_on_destroy(self)
        self.result = None  # training.TrainResult of the last run
        self.last_error: Optional[str] = None
        self.sections: dict = {}  # name -> io.st.STSection known to this widget
        self.saved_path: Optional[Path] = None
        self.settings = FinetuneSettings()
        self.models = ModelCatalogue()
        self.settings.model = self.models.add_bundled()
        self._tmpdir = Path(tempfile.mkdtemp(prefix="m2ort-finetune-"))
        weakref.finalize(self, shutil.rmtree, str(self._tmpdir), True)
        self._t0 = 0.0
        self._run = None  # (request, starting-model label) of the training in flight
        self._epoch = 0  # the epoch the training is in (from its progress)
        self._last_epoch = ""  # the last finished epoch's words (loss, validation per section)
        self._handed = None  # (weak Predict widget, its spec) after "Use for prediction"
        self._tabbed = False
        self._build()
        ev = self.viewer.layers.events
        ev.inserted.connect(self._refresh)
        ev.removed.connect(self._refresh)
        self._refresh()

    # ================================================================== composition
    def _build(self) -> None:
        root = scroll_body(self)
        self.data_panel = DataPanel(self.settings)
        self.settings_panel = TrainSettingsPanel(self.settings, self.models)
        # the two forms as tabs: the run controls and the plot stay on screen below them
        self.tabs = QTabWidget()
        self.tabs.addTab(self.data_panel, "Data")
        self.tabs.addTab(self.settings_panel, "Training")
        self.run_panel = TrainRunPanel()
        self.plot = LivePlot()
        self.result_panel = ResultPanel()
        root.addWidget(self.tabs)
        root.addWidget(self.run_panel)
        root.addWidget(self.plot, 1)
        root.addWidget(self.result_panel)
        # the widget's public face (scripts and the tests drive these)
        for panel, names in (
            (
                self.data_panel,
                "slide_combo format_combo stack counts_field spots_field visium_field h5ad_field "
                "mpp_spin load_btn sections_list region_check",
            ),
            (
                self.settings_panel,
                "model_combo model_browse genes_combo top_spin genes_edit epochs_spin lr_spin "
                "schedule_combo batch_spin mode_combo val_combo device_combo",
            ),
            (self.run_panel, "train_btn cancel_btn progress_bar status"),
            (self.result_panel, "save_btn use_btn"),
        ):
            for name in names.split():
                setattr(self, name, getattr(panel, name))
        self.load_btn.clicked.connect(lambda: self.load())
        self.settings.events.sections.connect(self._sections_changed)
        self.model_browse.clicked.connect(lambda: self.add_checkpoint(None))
        self.train_btn.clicked.connect(self.train)
        self.cancel_btn.clicked.connect(self.cancel)
        self.save_btn.clicked.connect(lambda: self.save(None))
        self.use_btn.clicked.connect(self.use_for_prediction)
        self.settings.events.model.connect(self._update_buttons)
        self._update_buttons()
        compact_combos(self)
        fit_width(self)

    # ================================================================== viewer state
    def _refresh(self, *_) -> None:
        from napari.layers import Image

        names = [
            ly.name
            for ly in self.viewer.layers
            if isinstance(ly, Image) and (ly.metadata or {}).get("m2ort_kind") is None
        ]
        self.data_panel.set_slides(names)
        # measured ST layers (from the reader or the sample) are sections too
        listed = self.data_panel.section_names()
        for ly in self.viewer.layers:
            sec = (ly.metadata or {}).get("st_section")
            if sec is None:
                continue
            self.sections.setdefault(sec.name, sec)
            if sec.name not in listed:
                self.data_panel.add_section(sec)
        self._refresh_val_choices()
        self._update_buttons()

    def selected_sections(self) -> list:
        return [self.sections[n] for n in self.settings.sections if n in self.sections]

    def _sections_changed(self, *_) -> None:
        self._refresh_val_choices()
        self._update_buttons()

    def _refresh_val_choices(self) -> None:
        self.settings_panel.set_val_choices([s.name for s in self.selected_sections()])

    def slide_layer(self):
        name = self.settings.slide
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def add_checkpoint(self, path=None) -> Optional[str]:
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Start from checkpoint", "", "M2ORT checkpoint (*.safetensors)")
            if not path:
                return None
        try:
            self.settings.model = self.models.add_checkpoint(path)
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        self._update_buttons()
        return self.settings.model

    # ================================================================== loading
    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.status.setText(f"⚠ {message}")
        notify("error", message)

    def _reader(self, fmt: str, paths: dict):
        """A function reading the ST data these choices name (run in a worker)."""
        from ..io import st

        mpp = float(self.settings.st_mpp) or None
        slide = self.slide_layer()
        image = paths.get("image") or ((slide.metadata or {}).get("path") if slide is not None else None)
        given = {k: v for k, v in paths.items() if v}
        fields = {**self.data_panel.paths(fmt), **given} if fmt in ("legacy", "visium", "h5ad") else {}
        if fmt == "legacy":
            counts, spots = fields.get("counts"), fields.get("spots")
            if not (counts and spots):
                raise M2ORTError("Legacy ST data needs a counts table and a spot table: choose both files.")
            if not image:
                raise M2ORTError("Open the H&E image these spots were measured on first (File > Open).")
            return lambda: st.read_legacy_st(image, counts, spots, mpp=mpp)
        if fmt == "visium":
            folder = fields.get("folder")
            if not folder:
                raise M2ORTError("Choose the Space Ranger output folder ('outs').")
            return lambda: st.read_visium(folder, mpp=mpp, image=image)
        if fmt == "h5ad":
            h5ad = fields.get("h5ad")
            if not h5ad:
                raise M2ORTError("Choose an .h5ad file with spot coordinates in obsm['spatial'].")
            return lambda: st.read_h5ad(h5ad, image=image, mpp=mpp)
        raise M2ORTError(f"Unknown ST format {fmt!r}.")

    def load(self, fmt: Optional[str] = None, **paths):
        """Read ST data in a worker, then show its spots over the slide.

        ``fmt`` = legacy | visium | h5ad; ``paths`` (counts=, spots=, folder=, h5ad=,
        image=) override the fields (tests and scripts call this directly).
        """
        if self.running:
            return None
        self.last_error = None
        try:
            read = self._reader(fmt or self.settings.st_format, paths)
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        self.status.setText("Reading the ST data…")
        self.job = run_in_thread(
            read, on_done=self._on_loaded, on_failed=self._on_failed, on_finished=self._update_buttons,
            desc="Reading ST data",
        )  # fmt: skip
        self._jobs[:] = [self.job]
        self._update_buttons()
        return self.job

    def _on_loaded(self, section) -> None:
        from ..io.napari import points_layer_data

        slide = self.slide_layer()
        name, k = section.name, 2
        while name in self.sections:
            name = f"{section.name} ({k})"
            k += 1
        if name != section.name:
            section = dataclasses.replace(section, name=name)
        data, kwargs, _ = points_layer_data(section)
        kwargs["metadata"]["m2ort_kind"] = L.MEASURED_KIND
        kwargs.pop("units", None)
        # align with the slide: points in µm of the section's image, shown in the slide's frame
        n_outside = 0
        if slide is not None:
            kwargs.update(L.geometry(slide, section.mpp).layer_kwargs)
            h, w = slide.data[0].shape[:2] if slide.multiscale else slide.data.shape[:2]
            px = np.asarray(section.coords_px)
            inside = (px[:, 0] >= 0) & (px[:, 1] >= 0) & (px[:, 0] < w) & (px[:, 1] < h)
            n_outside = int((~inside).sum())
            if not inside.any():
                self._fail(
                    f"{section.name}: none of its {section.n_spots} spots falls on '{slide.name}' "
                    f"({w}×{h} px): the coordinates do not belong to this image. Choose the matching "
                    "slide, or check the pixel size."
                )
                return
        self.sections[name] = section
        self.data_panel.add_section(section)  # before the layer exists: _refresh must not add it twice
        layer = self.viewer.add_points(data, **kwargs)
        self._refresh_val_choices()
        msg = (
            f"Loaded {section.name}: {section.n_spots} spots × {section.adata.n_vars} genes at "
            f"{section.mpp:.3f} µm/px. Check that the spots sit on the tissue."
        )
        if n_outside:
            msg += f" {n_outside} spots fall outside the slide."
            notify("warning", f"{section.name}: {n_outside} of {section.n_spots} spots fall outside the slide.")
        self.status.setText(msg)
        self.viewer.layers.selection.active = layer

    def _on_failed(self, exc: BaseException) -> None:
        self.last_error = str(exc)
        self.status.setText(f"⚠ {exc}")
        self.run_panel.halt()

    # ================================================================== training
    def _sections_in_regions(self, sections: list) -> list:
        """The sections cut to their spots inside the regions layer, if that is asked for."""
        if not self.settings.only_in_regions:
            return sections
        shapes = self.viewer.layers[L.REGIONS_NAME] if L.REGIONS_NAME in self.viewer.layers else None
        if shapes is None or not len(shapes.data):
            raise M2ORTError(
                "'Only spots inside the regions layer' is ticked but there is no 'M2ORT regions' "
                "layer with shapes: draw a rectangle around the spots to train on."
            )
        slide = self.slide_layer()
        out = []
        for sec in sections:
            geom = L.geometry(slide, sec.mpp) if slide is not None else L.Geometry(sec.mpp, 1.0, np.zeros(2))
            keep = np.zeros(sec.n_spots, dtype=bool)
            for region in L.shapes_regions_um(shapes, geom):
                keep |= region.contains(sec.centers_um)
            if keep.any():
                out.append(dataclasses.replace(sec, adata=sec.adata[keep].copy()))
        if not out:
            raise M2ORTError("No measured spot lies inside the regions: draw the rectangle over the spots.")
        return out

    def _request(self):
        """The use-case layer's FineTuneRequest for the current choices."""
        from ..pipelines import FineTuneRequest
        from ..training import TrainConfig

        s = self.settings
        sections = self.selected_sections()
        if not sections:
            raise M2ORTError("No ST section to train on: load measured spots (or open the sample) and tick it.")
        sections = self._sections_in_regions(sections)
        if s.model is None:
            raise M2ORTError("No starting model: the bundled weights are missing; open a checkpoint.")
        cfg = TrainConfig(
            epochs=int(s.epochs), lr=float(s.lr), batch_size=int(s.batch_size), mode=s.mode, device=s.device,
            precision="auto", schedule=s.schedule, warmup_epochs=1.0 if s.schedule == "cosine" else 0.0,
        )  # fmt: skip
        return FineTuneRequest(
            sections=sections, model=s.model.removeprefix("file:"), genes=gene_spec(s), val=s.val or "blocks", config=cfg,
            out_path=self._tmpdir / f"finetuned-{int(time.time())}.safetensors",
        )  # fmt: skip

    def train(self):
        if self.running:
            return None
        self.last_error = None
        try:
            request = self._request()
        except M2ORTError as exc:
            self._fail(str(exc))
            return None

        def make_job(should_stop):
            from ..pipelines import fine_tune

            try:
                return (yield from fine_tune(request, should_stop))
            except Cancelled:
                return None

        self.plot.clear()
        self.result = None
        self.saved_path = None
        self._handed = None
        self._run = (request, self.model_combo.currentText() or str(request.model))
        self._epoch = 0
        self._last_epoch = ""
        self._t0 = time.perf_counter()
        self.run_panel.busy()
        self.status.setText("Preparing…")
        self.job = start_job(
            make_job, desc="M2ORT fine-tuning", on_progress=self._on_progress, on_done=self._on_trained,
            on_failed=self._on_failed, on_finished=self._update_buttons,
        )  # fmt: skip
        self._jobs[:] = [self.job]
        self._update_buttons()
        return self.job

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()
            self.status.setText(
                "Stopping after the current step: the best finished epoch is kept (none yet: the starting model)…"
                if self._epoch <= 1 and not self.plot.epochs
                else "Stopping after the current step: the best finished epoch is kept…"
            )
            self._update_buttons()

    def _on_progress(self, ev: Progress) -> None:
        d = ev.data or {}
        if ev.stage == "setup":
            self.status.setText(ev.message)
        elif ev.stage in ("patches", "train"):
            self.run_panel.progress(ev.done, ev.total)
            text = f"{'Sampling patches' if ev.stage == 'patches' else 'Training'}: {ev.message}"
            self.status.setText(text + (f"\nLast: {self._last_epoch}" if self._last_epoch else ""))
            if ev.stage == "train" and "loss" in d:
                self._epoch = int(d.get("epoch", self._epoch))
                self.plot.add_step(int(d["step"]), float(d["loss"]), int(d.get("epoch", 0)), int(ev.total or 0))
        elif ev.stage == "epoch":
            val = d.get("val") or {}
            pcc = val.get("pcc_gene_mean") if isinstance(val, dict) else None
            epoch = int(d.get("epoch", ev.done))
            self.plot.add_epoch(epoch, float(d.get("train_loss", np.nan)), float(pcc) if pcc is not None else None)
            self._last_epoch = self._epoch_words(epoch, ev.total, d)
            self.status.setText(self._last_epoch)

    @staticmethod
    def _epoch_words(epoch: int, total: int, record: dict) -> str:
        """'Epoch 2/5: loss 0.512; validation PCC-gene 0.310 (mean over sections: …)'."""
        msg = f"Epoch {epoch}/{total}: loss {float(record.get('train_loss', np.nan)):.4f}"
        val = record.get("val")
        if isinstance(val, dict):
            pcc = val.get("pcc_gene_mean")
            msg += "; validation PCC-gene " + (f"{pcc:.3f}" if isinstance(pcc, (int, float)) else "n/a")
            per = per_section_words(val)
            if per:
                msg += f" (mean over sections: {per})"
        return msg

    def _on_trained(self, result) -> None:
        seconds = time.perf_counter() - self._t0
        if result is not None and not result.stopped:
            self.run_panel.complete()
        else:
            self.run_panel.halt()  # a cancelled run's bar stays where it stopped
        request, started_from = self._run or (None, "the starting model")
        if result is None:
            self.status.setText("Cancelled while sampling patches: the starting model is unchanged; nothing to save.")
            return
        if result.stopped and (result.best_epoch is None or result.best_epoch < 1):
            # the model is half-updated: drop it (the starting model was never touched)
            why = "no epoch finished" if result.epochs_done < 1 else "no finished epoch had a validation score"
            self.status.setText(
                f"Cancelled in epoch {result.epochs_done + 1}: {why}, the starting weights are kept; nothing to save."
            )
            return
        result.card = describe_training(
            result, started_from=started_from, sections=request.sections if request else [],
            val=request.val if request else "blocks", epochs_planned=request.config.epochs if request else 0,
        )  # fmt: skip
        self.result = result
        kept = kept_epoch_words(result)
        if result.stopped:
            msg = f"Cancelled in epoch {result.epochs_done + 1}: {kept}"
        else:
            msg = f"Done: {result.epochs_done} epoch(s) in {seconds:.0f} s" + (f"; {kept}" if kept else "")
        self.status.setText(msg + ". Save it, or use it for prediction.")

    def _update_buttons(self, *_) -> None:
        busy = self.running
        has_data = bool(self.selected_sections())
        self.train_btn.setEnabled(not busy and has_data and self.model_combo.count() > 0)
        self.train_btn.setToolTip(
            "Train on the ticked sections"
            if has_data
            else "Load measured spots (or open the sample) and tick a section first"
        )
        self.load_btn.setEnabled(not busy)
        self.cancel_btn.setEnabled(busy and not self.job.cancelled)
        have = self.result is not None and not busy
        self.save_btn.setEnabled(have)
        self.use_btn.setEnabled(have)

    # ================================================================== results
    def model_label(self) -> str:
        """How the Predict widget lists this model: its file once saved, else "(unsaved)"."""
        names = ", ".join(str(n) for n in (self.result.card.metrics.get("fine_tune") or {}).get("sections", {}))
        what = f"fine-tuned on {names}" if names else "fine-tuned"
        if self.saved_path is not None:
            return f"{self.saved_path.name} — {what}"
        return f"{what} — unsaved, {self.result.card.created[:16].replace('T', ' ')}"

    def save(self, path=None) -> Optional[Path]:
        from ..model.weights import save_checkpoint

        if self.result is None:
            self._fail("There is no fine-tuned model to save: train (at least one whole epoch) first.")
            return None
        path = Path(path) if path is not None else self.result_panel.ask_path()
        if path is None:
            return None
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        try:
            # the kept epoch's weights (training reloads them) with this training's card
            save_checkpoint(self.result.model, self.result.card, path)
        except M2ORTError as exc:
            self._fail(str(exc))
            return None
        except OSError as exc:
            self._fail(f"{path}: could not be written ({exc.strerror or exc}); choose another folder.")
            return None
        self.saved_path = path
        self._relabel_handed()
        self.status.setText(f"Saved the model and its card to {path}")
        notify("info", f"Saved fine-tuned model to {path}")
        return path

    def _relabel_handed(self) -> None:
        """The Predict widget's list names the saved file, no longer "(unsaved)"."""
        widget, spec = (self._handed[0](), self._handed[1]) if self._handed else (None, None)
        if widget is None:
            return
        label = f"{self.model_label()} ({len(self.result.card.genes)} genes)"
        try:
            widget.models.labels[spec] = label
            index = widget.model_combo.findData(spec)
            if index >= 0:
                widget.model_combo.setItemText(index, label)
        except RuntimeError:  # the Predict widget is gone
            self._handed = None

    def use_for_prediction(self):
        if self.result is None:
            self._fail("There is no fine-tuned model yet: press Train first.")
            return None
        widget = predict_widget_for(self.viewer)
        if widget is None:
            # tabbed with this one, so neither dock gets squeezed
            dock, widget = self.viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression", tabify=True)
            try:
                dock.show()
                dock.raise_()
            except Exception:  # pragma: no cover - cosmetic
                pass
        label = self.model_label()
        spec = widget.set_model(self.result.model, self.result.card, name=label)
        self._handed = (weakref.ref(widget), spec)
        self._relabel_handed()
        self.status.setText(f"The Predict expression widget now uses the model {label}.")
        return spec

    # ================================================================== Qt events
    def showEvent(self, event) -> None:
        # napari's stylesheet (fonts, paddings) is applied when docked: size again then
        super().showEvent(event)
        fit_width(self)
        QTimer.singleShot(0, lambda: fit_width(self))
        if not self._tabbed:  # once: a user who drags the docks apart keeps them apart
            self._tabbed = True
            QTimer.singleShot(0, lambda: tab_with_siblings(self))

    def closeEvent(self, event) -> None:  # pragma: no cover
        if self.running:
            self.job.cancel()
        super().closeEvent(event)
