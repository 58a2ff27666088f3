"""Display panel of the Predict widget and what it drives on the canvas.

``DisplayPanel`` holds the controls (gene, colormap, contrast, heat map, side by side);
``Display`` keeps the predictions layer, its colours, the heat-map layer and the legend in
step with ``DisplayState``.  Numbers (colour ranges, the heat-map image) come from
``napari_m2ort.raster``.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QCompleter,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
)

from ...errors import M2ORTError
from ...raster import heatmap_grid, ordered_limits, range_step, shared_range, value_range
from .. import _layers as L
from .._bind import bind_check, bind_text, quiet
from .._qt import wrap_label
from ..state import DEFAULT_GENES

HEATMAP_KIND = "m2ort-heatmap"
HEATMAP_OPACITY = 0.6
UNIT = "log1p CPM over the model's gene panel"


def default_gene(genes) -> Optional[str]:
    for g in DEFAULT_GENES:
        if g in genes:
            return g
    return genes[0] if len(genes) else None


class DisplayPanel(QGroupBox):
    def __init__(self, display, parent=None):
        super().__init__("Display", parent)
        self.display = display
        form = QFormLayout(self)
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
        form.addRow("Gene", self.gene_combo)
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(L.COLORMAPS)
        form.addRow("Colormap", self.cmap_combo)
        self.clim_min = QDoubleSpinBox()
        self.clim_max = QDoubleSpinBox()
        for sp in (self.clim_min, self.clim_max):
            sp.setDecimals(3)
            sp.setRange(-1e6, 1e6)
            sp.setSingleStep(0.05)
            sp.setKeyboardTracking(False)
            sp.valueChanged.connect(self._clim_edited)
        self.clim_min.setToolTip("Value shown with the lowest colour")
        self.clim_max.setToolTip("Value shown with the highest colour")
        self.clim_auto = QPushButton("Auto")
        self.clim_auto.setToolTip(
            "Contrast limits = 1st-99th percentile of the gene over the spots on tissue (flagged spots left out)"
        )
        row = QHBoxLayout()
        row.addWidget(self.clim_min, 1)
        row.addWidget(QLabel("–"))
        row.addWidget(self.clim_max, 1)
        row.addWidget(self.clim_auto)
        form.addRow("Contrast", row)
        self.heatmap_check = QCheckBox("Smooth heat map")
        self.heatmap_check.setToolTip("Interpolated expression image under the spots (opacity 0.6)")
        self.compare_check = QCheckBox("Side by side with measured")
        self.compare_check.setToolTip(
            "Show the measured ST spots (if loaded) next to the predictions in a 1×2 grid, coloured by the same gene"
        )
        row = QHBoxLayout()
        row.addWidget(self.heatmap_check)
        row.addWidget(self.compare_check)
        form.addRow("", row)
        self.flagged_check = QCheckBox("Show flagged spots (glass, off-slide, not H&E)")
        self.flagged_check.setToolTip(
            "Spots the out-of-domain check flagged are hidden and kept out of the colour range; tick to see them"
        )
        form.addRow("", self.flagged_check)
        self.hover_label = QLabel("")
        self.hover_label.setStyleSheet("color: #9a9a9a")
        form.addRow("Hover", self.hover_label)
        self.compare_label = wrap_label("", lines=2)
        form.addRow("Measured", self.compare_label)

        bind_text(self.gene_combo, display, "gene")
        bind_text(self.cmap_combo, display, "colormap")
        bind_check(self.heatmap_check, display, "heatmap")
        bind_check(self.compare_check, display, "side_by_side")
        bind_check(self.flagged_check, display, "show_flagged")
        display.events.clim.connect(self._show_clim)

    def set_genes(self, genes, gene: Optional[str]) -> None:
        with quiet(self.gene_combo):
            self.gene_combo.clear()
            self.gene_combo.addItems(sorted(genes, key=str.upper))
            if gene is not None:
                self.gene_combo.setCurrentText(gene)

    def find_gene(self, gene: str) -> str:
        """The panel's spelling of ``gene`` (case-insensitive)."""
        idx = self.gene_combo.findText(gene, Qt.MatchFlag.MatchFixedString)
        if idx < 0:
            raise M2ORTError(f"Gene {gene!r} is not in the model's panel.")
        with quiet(self.gene_combo):
            self.gene_combo.setCurrentIndex(idx)
        return self.gene_combo.itemText(idx)

    def _clim_edited(self, *_) -> None:
        self.display.clim = (float(self.clim_min.value()), float(self.clim_max.value()))

    def _show_clim(self, clim) -> None:
        lo, hi = clim
        step = range_step(lo, hi)
        for sp, v in ((self.clim_min, lo), (self.clim_max, hi)):
            with quiet(sp):
                sp.setSingleStep(step)
                sp.setValue(v)


class Display:
    """Keeps the canvas in step with ``DisplayState`` (colours, heat map, legend, hover)."""

    def __init__(self, viewer, state, panel: DisplayPanel, on_changed=None, measured=None):
        self.viewer, self.state, self.panel = viewer, state, panel
        self.measured = measured  # () -> the measured layer compared, or None
        self.on_changed = on_changed  # called after every redraw (the comparison follows)
        ev = state.events
        ev.layer.connect(self._layer_changed)
        ev.gene.connect(self.refresh)
        ev.colormap.connect(self.refresh)
        ev.clim.connect(self._apply_clim)
        ev.heatmap.connect(self.update_heatmap)
        ev.show_flagged.connect(self.refresh)
        ev.side_by_side.connect(self.refresh)
        panel.clim_auto.clicked.connect(self.refresh)

    # ---------------------------------------------------------------- state
    @property
    def layer(self):
        layer = self.state.layer
        return layer if layer is not None and layer in self.viewer.layers else None

    def _has_gene(self, layer, gene) -> bool:
        return layer is not None and gene in layer.features.columns

    def _layer_changed(self, *_) -> None:
        layer = self.state.layer
        genes = list(layer.features.columns) if layer is not None else []
        current = self.state.gene
        gene = current if current in genes else default_gene(genes)
        self.panel.set_genes(genes, gene)
        with self.state.events.gene.blocked():
            self.state.gene = gene
        self.refresh()

    def set_gene(self, gene: str) -> None:
        name = self.panel.find_gene(gene)
        with self.state.events.gene.blocked():
            self.state.gene = name
        self.refresh()

    # ---------------------------------------------------------------- drawing
    def refresh(self, *_) -> None:
        """Recolour the shown layer by the gene over its full range; heat map and legend follow."""
        layer, gene = self.layer, self.state.gene
        if not self._has_gene(layer, gene) or not len(layer.data):
            return
        tissue = L.on_tissue(layer)
        lo, hi = value_range(layer.features[gene].to_numpy(), tissue)
        measured = self.measured_range(gene)
        if measured is not None:  # side by side on one scale: one colour range for both
            lo, hi = shared_range((lo, hi), measured)
        self.panel.hover_label.setText("")
        L.show_flagged(layer, self.state.show_flagged)
        L.color_by(layer, gene, colormap=self.state.colormap, clim=(lo, hi))
        self.state.clim = (lo, hi)
        name = layer.metadata.get("model_name") or "M2ORT"
        if layer.metadata.get("model_name"):
            layer.name = f"{gene} - {name}{layer.metadata.get('name_suffix', '')}"
        legend = [f"{gene} - {name}", self._unit(layer).strip(" ()")]
        if measured is not None:
            legend.append("left: predicted, right: measured; one colour range")
        n_flagged = int((~tissue).sum())
        if n_flagged:
            shown = "shown" if self.state.show_flagged else "hidden"
            legend.append(f"{n_flagged} flagged spots (glass, off-slide) {shown}, not in the range")
        # side by side the grid puts the colorbar top left of the first cell: keep clear of it
        where = "bottom_left" if self.state.side_by_side else "top_left"
        L.show_legend(self.viewer, "\n".join(line for line in legend if line), where)
        self.update_heatmap()
        if self.on_changed is not None:
            self.on_changed()

    @staticmethod
    def _unit(layer) -> str:
        try:
            target = json.loads(layer.metadata.get("model_card", "{}")).get("target", "")
        except ValueError:
            target = ""
        return f" ({UNIT})" if target.startswith("log1p") else ""

    def measured_range(self, gene):
        """The measured layer's range when it is compared on the model's scale, side by side."""
        meas = self.measured() if self.measured is not None else None
        if meas is None or not self.state.side_by_side or gene not in meas.features.columns:
            return None
        from .compare import to_model_scale

        to_model_scale(meas, list(self.layer.features.columns))
        if gene not in meas.features.columns:
            return None
        if "model's target" not in str((meas.metadata or {}).get("value_scale", "")):
            return None
        return value_range(meas.features[gene].to_numpy())

    def contrast_limits(self) -> tuple[float, float]:
        return ordered_limits(*self.state.clim)

    def _apply_clim(self, *_) -> None:
        layer = self.layer
        if not self._has_gene(layer, self.state.gene):
            return
        lo, hi = self.contrast_limits()
        if tuple(np.round(layer.face_contrast_limits, 9)) != (round(lo, 9), round(hi, 9)):
            layer.face_contrast_limits = (lo, hi)
            layer.refresh_colors(update_color_mapping=False)
        hm = self.heatmap_layer()
        if hm is not None:
            hm.contrast_limits = (lo, hi)

    # ---------------------------------------------------------------- heat map
    def heatmap_layer(self):
        layer = self.state.layer
        if layer is None:
            return None
        for ly in self.viewer.layers:
            md = ly.metadata or {}
            if md.get("m2ort_kind") == HEATMAP_KIND and md.get("source") == layer.unique_id:
                return ly
        return None

    def remove_heatmap(self) -> None:
        hm = self.heatmap_layer()
        if hm is not None:
            self.viewer.layers.remove(hm)

    def update_heatmap(self, *_) -> None:
        layer, gene = self.layer, self.state.gene
        hm = self.heatmap_layer()
        if not self.state.heatmap or layer is None:
            if hm is not None:
                self.viewer.layers.remove(hm)
            return
        if not self._has_gene(layer, gene) or len(layer.data) < 1:
            return
        yx = np.asarray(layer.data, float)
        pitch = float(layer.metadata.get("pitch_um", 100.0))
        img, origin_yx, res = heatmap_grid(yx[:, ::-1], layer.features[gene].to_numpy(), pitch)
        s = np.asarray(layer.scale, float)[-2:]
        t = np.asarray(layer.translate, float)[-2:]
        kw = dict(
            scale=tuple(res * s),
            translate=tuple(origin_yx * s + t),
            colormap=self.state.colormap,
            contrast_limits=self.contrast_limits(),
            opacity=HEATMAP_OPACITY,
        )
        if layer.units is not None:
            kw["units"] = layer.units
        if hm is None:
            md = {"m2ort_kind": HEATMAP_KIND, "source": layer.unique_id}
            hm = self.viewer.add_image(img, name=L.HEATMAP_NAME, blending="translucent", metadata=md, **kw)
            # keep the spots above the heat map
            i_hm, i_pts = self.viewer.layers.index(hm), self.viewer.layers.index(layer)
            if i_hm > i_pts:
                self.viewer.layers.move(i_hm, i_pts)
        else:
            hm.data = img
            for k, v in kw.items():
                setattr(hm, k, v)
        hm.name = f"{L.HEATMAP_NAME}: {gene}"

    # ---------------------------------------------------------------- hover
    def on_hover(self, layer, event) -> None:
        try:
            idx = layer.get_value(event.position, world=True)
        except Exception:  # pragma: no cover - hover is best effort
            idx = None
        gene = self.state.gene
        if idx is None or gene not in layer.features.columns or idx >= len(layer.data):
            self.panel.hover_label.setText("")
            return
        ids = layer.metadata.get("spot_ids", [])
        sid = ids[idx] if idx < len(ids) else str(idx)
        flags = layer.metadata.get("flags", [])
        flag = str(flags[idx]) if idx < len(flags) else "ok"
        note = "" if flag == "ok" else f" — flagged {flag}: not a tissue value"
        self.panel.hover_label.setText(f"{sid}: {gene} = {float(layer.features[gene].iloc[idx]):.3f}{note}")
