"""Predict at measured spots: the model run at a measured section's own spots and scored.

``MeasuredPanel`` shows the result: the overall PCC-gene / PCC-spot beside the
mean-profile baseline, a sortable per-gene table and a predicted-vs-measured scatter of
the selected gene.  ``AtMeasured`` runs it: the numbers come from
``compare.compare_at_measured``, the same path as ``napari-m2ort evaluate``, so the
widget and the CLI agree to the last digit on the same section.  Only the slide the
measured spots were read with is compared: spots of another section would pair tissue
with counts it never produced.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QGroupBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ...errors import M2ORTError
from .. import _layers as L
from .._qt import wrap_label
from .compare import set_measured_values

COLUMNS = ("Gene", "PCC", "Measured", "Predicted")  # the last two: means over the spots


class _NumberItem(QTableWidgetItem):
    """A cell sorted by its number (missing values last), shown with 3 decimals."""

    def __init__(self, value: Optional[float]):
        super().__init__("n/a" if value is None else f"{value:.3f}")
        self.value = -np.inf if value is None else float(value)
        self.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))

    def __lt__(self, other):
        if isinstance(other, _NumberItem):
            return self.value < other.value
        return super().__lt__(other)


class MeasuredPanel(QGroupBox):
    def __init__(self, parent=None):
        super().__init__("Measured spots", parent)
        v = QVBoxLayout(self)
        self.predict_measured_btn = QPushButton("Predict at measured spots")
        self.predict_measured_btn.setToolTip(
            "Predict at exactly the spot centres and diameter of the measured ST layer of this slide, "
            "and score the model as 'napari-m2ort evaluate' does"
        )
        v.addWidget(self.predict_measured_btn)
        self.summary_label = wrap_label("", lines=3)
        v.addWidget(self.summary_label)
        self.gene_table = QTableWidget(0, len(COLUMNS))
        self.gene_table.setHorizontalHeaderLabels(COLUMNS)
        self.gene_table.horizontalHeaderItem(2).setToolTip("Mean measured value (log1p CPM over the model's panel)")
        self.gene_table.horizontalHeaderItem(3).setToolTip("Mean predicted value")
        self.gene_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.gene_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.gene_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.gene_table.verticalHeader().setVisible(False)
        self.gene_table.setMinimumHeight(150)
        self.gene_table.setSortingEnabled(True)
        v.addWidget(self.gene_table)
        self.canvas = None
        self.result = None
        self._model_name = ""

    # ---------------------------------------------------------------- result
    def show_result(self, result, model_name: str) -> None:
        self.result, self._model_name = result, model_name
        self.summary_label.setText(f"{model_name} on {result.summary()}")
        table = self.gene_table
        table.setSortingEnabled(False)
        rows = result.per_gene()
        table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            table.setItem(i, 0, QTableWidgetItem(str(row["gene"])))
            table.setItem(i, 1, _NumberItem(row["pcc"]))
            table.setItem(i, 2, _NumberItem(row["mean_true"]))
            table.setItem(i, 3, _NumberItem(row["mean_pred"]))
        table.setSortingEnabled(True)
        table.sortItems(1, Qt.SortOrder.DescendingOrder)
        table.resizeColumnsToContents()

    def selected_gene(self) -> Optional[str]:
        items = self.gene_table.selectedItems()
        if not items:
            return None
        return self.gene_table.item(items[0].row(), 0).text()

    def select_gene(self, gene: str) -> None:
        table = self.gene_table
        for i in range(table.rowCount()):
            if table.item(i, 0).text() == gene:
                if self.selected_gene() != gene:
                    table.selectRow(i)
                return

    def table_pcc(self, gene: str) -> Optional[float]:
        for i in range(self.gene_table.rowCount()):
            if self.gene_table.item(i, 0).text() == gene:
                v = self.gene_table.item(i, 1).value
                return None if not np.isfinite(v) else v
        return None

    def plot(self, gene: Optional[str]) -> None:
        """Predicted against measured for one gene, one dot per spot."""
        res = self.result
        if res is None or gene is None or gene not in res.genes:
            return
        if self.canvas is None:
            from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(3.2, 2.8), dpi=90, layout="constrained")
            self.canvas = FigureCanvasQTAgg(fig)
            self.canvas.setMinimumHeight(240)
            self.layout().addWidget(self.canvas)
        fig = self.canvas.figure
        fig.clear()
        ax = fig.add_subplot(111)
        pred, true = res.values(gene)
        ax.scatter(true, pred, s=9, alpha=0.7, color="#3b75af", edgecolors="none")
        lo = float(np.nanmin([true.min(), pred.min()])) if len(true) else 0.0
        hi = float(np.nanmax([true.max(), pred.max()])) if len(true) else 1.0
        ax.plot([lo, hi], [lo, hi], color="#999999", lw=0.8, ls="--")
        r = self.table_pcc(gene)
        ax.set_title(f"{gene}: PCC {'n/a' if r is None else f'{r:.3f}'} (n = {len(true)})", fontsize=9)
        ax.set_xlabel("measured (log1p CPM, panel)", fontsize=8)
        ax.set_ylabel(f"predicted ({self._model_name})", fontsize=8)
        ax.ticklabel_format(useOffset=False)
        ax.tick_params(labelsize=7)
        self.canvas.draw_idle()

    def enable(self, on: bool) -> None:
        self.predict_measured_btn.setEnabled(on)


class AtMeasured:
    """Runs "Predict at measured spots" for a ``PredictWidget`` and shows the result."""

    def __init__(self, widget, panel: MeasuredPanel):
        self.w, self.panel = widget, panel
        self.result = None
        self.layer = None  # the predictions layer at the measured spots
        panel.predict_measured_btn.clicked.connect(self.start)
        panel.gene_table.itemSelectionChanged.connect(self._row_selected)
        widget.display.events.gene.connect(self._gene_changed)

    def _inputs(self):
        """(slide layer, measured layer, section), or M2ORTError saying what is missing."""
        from ...compare import same_slide

        w = self.w
        slide = w.slide_layer()
        if slide is None:
            raise M2ORTError("Open the H&E slide of the measured section first.")
        meas = w.measured_layer()
        if meas is None:  # spots of another slide only: say so rather than "none"
            meas = next((ly for ly in L.measured_layers(w.viewer) if (ly.metadata or {}).get("st_section")), None)
        section = (meas.metadata or {}).get("st_section") if meas is not None else None
        if section is None:
            raise M2ORTError(
                "There is no measured ST layer: open the section's counts with its image "
                "(File > Open, or File > Open Sample > napari M2ORT)."
            )
        path = (slide.metadata or {}).get("path")
        tied = (meas.metadata or {}).get("slide_layer")
        if not same_slide(path, section) or (tied is not None and tied != slide.unique_id):
            raise M2ORTError(
                f"'{meas.name}' was measured on {getattr(section, 'image_path', None) or 'another image'}, "
                f"not on the slide '{slide.name}' ({path or 'no file'}): comparing spots of one section "
                "with the tissue of another means nothing. Choose the slide the spots belong to."
            )
        return slide, meas, section

    def start(self):
        from .._workers import start_job

        w = self.w
        if w.running:
            return None
        w.last_error = None
        try:
            slide, meas, section = self._inputs()
            spec = w.settings.model
            if spec is None:
                raise M2ORTError("No model is selected.")
        except M2ORTError as exc:
            w._fail(str(exc))
            return None
        s, models, model_lock = w.settings, w.models, w._model_lock
        device, tta, smooth = s.device, s.tta, float(s.smooth_um)

        def make_job(should_stop):
            from ...compare import compare_at_measured
            from ...devices import resolve_device
            from ...progress import Progress

            yield Progress("prepare", 0, 1, "loading the model")
            model, card = models.load(spec)
            with model_lock:
                res = yield from compare_at_measured(
                    model, card, section, device=resolve_device(device), tta=tta, smooth_um=smooth
                )
            return res, card

        self._slide, self._meas = slide, meas
        w.run_panel.busy()
        w.status.setText("Predicting at the measured spots…")
        w.job = start_job(
            make_job,
            desc="M2ORT at measured spots",
            on_progress=self._progress,
            on_done=self._done,
            on_failed=w._on_failed,
            on_finished=w._on_finished,
        )
        w._jobs[:] = [w.job]
        w._update_buttons()
        return w.job

    def _progress(self, ev) -> None:
        if ev.total:
            self.w.run_panel.progress(ev.done, ev.total)
        self.w.status.setText(ev.message or ev.stage)

    def _done(self, value) -> None:
        from .._models import model_key, model_name

        res, card = value
        w = self.w
        self.result = res
        name = model_name(card, w.settings.model)
        slide, meas = self._slide, self._meas
        geom = w._geometry(slide)
        layer = self._predictions_layer(res, card, name, geom, slide.name, model_key(card))
        keep = [g for g in res.genes if g not in set(res.genes_missing)]
        cols = [res.genes.index(g) for g in keep]
        set_measured_values(
            meas, res.centers_um, res.true[:, cols], keep, res.genes_missing, res.spot_ids, res.diameter_um
        )
        self.panel.show_result(res, name)
        w.status.setText(f"{len(res.spot_ids)} measured spots predicted and scored.")
        w.display.layer = layer  # (may be set already: it became the active layer when added)
        w.renderer.refresh()
        gene = w.display.gene if w.display.gene in res.genes else None
        self._gene_changed(gene or w.current_gene())

    def _predictions_layer(self, res, card, name, geom, slide_name, key):
        w = self.w
        if self.layer is not None and self.layer in w.viewer.layers:
            w.viewer.layers.remove(self.layer)
        pitch = _pitch(res.centers_um)
        layer = L.new_predictions_layer(
            w.viewer, geom, res.genes, float(res.diameter_um or pitch / 2), card.to_json(), "measured", key,
            slide_name, colormap=w.display.colormap, name=f"{name} at measured spots", pitch_um=pitch,
        )  # fmt: skip
        layer.metadata["model_name"] = name
        layer.metadata["name_suffix"] = " at measured spots"
        L.append_spots(
            layer, res.centers_um[:, ::-1], res.pred, res.spot_ids, float(layer.metadata["spot_diameter_um"]), None
        )
        layer.mouse_move_callbacks.append(w._on_hover)
        self.layer = layer
        return layer

    # ---------------------------------------------------------------- gene
    def _row_selected(self) -> None:
        gene = self.panel.selected_gene()
        if gene is not None and gene != self.w.display.gene:
            self.w.set_gene(gene)
        self.panel.plot(gene)

    def _gene_changed(self, gene=None) -> None:
        if self.result is None:
            return
        gene = gene if isinstance(gene, str) else self.w.display.gene
        if gene:
            self.panel.select_gene(gene)
            self.panel.plot(gene)


def _pitch(xy: np.ndarray) -> float:
    """Median centre-to-centre distance to the nearest neighbour (the layout's pitch)."""
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 100.0
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))
