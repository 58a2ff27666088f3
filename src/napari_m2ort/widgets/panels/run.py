"""Predict panel: the regions to predict, the three ways to start, progress and cancel."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QGroupBox, QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout

from .._bind import bind_text, quiet
from .._qt import wrap_label


class RunPanel(QGroupBox):
    def __init__(self, settings, parent=None):
        super().__init__("Predict", parent)
        self.settings = settings
        v = QVBoxLayout(self)
        row = QHBoxLayout()
        self.regions_combo = QComboBox()
        self.regions_combo.setToolTip("Shapes layer whose rectangles/polygons (in µm) are predicted")
        row.addWidget(QLabel("Regions"))
        row.addWidget(self.regions_combo, 1)
        self.add_regions_btn = QPushButton("Add regions layer")
        self.add_regions_btn.setToolTip("Create an 'M2ORT regions' Shapes layer and start drawing rectangles")
        row.addWidget(self.add_regions_btn)
        v.addLayout(row)
        row = QHBoxLayout()
        self.predict_regions_btn = QPushButton("Predict regions")
        self.predict_view_btn = QPushButton("Predict view")
        self.predict_view_btn.setToolTip("Predict the part of the slide visible in the canvas")
        self.predict_tissue_btn = QPushButton("Predict tissue")
        self.predict_tissue_btn.setToolTip("Predict every spot on tissue over the whole slide")
        self.predict_buttons = (self.predict_regions_btn, self.predict_view_btn, self.predict_tissue_btn)
        for b in self.predict_buttons:
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
        row.addWidget(self.cancel_btn)
        v.addLayout(row)
        self.status = wrap_label("Open a slide, draw a region, then press Predict.", lines=2)
        v.addWidget(self.status)
        bind_text(self.regions_combo, settings, "regions")

    def set_regions_layers(self, names: list, prefer: str) -> None:
        current = self.settings.regions
        with quiet(self.regions_combo):
            self.regions_combo.clear()
            self.regions_combo.addItems(names)
            if current in names:
                self.regions_combo.setCurrentText(current)
            elif prefer in names:
                self.regions_combo.setCurrentText(prefer)
        self.settings.regions = self.regions_combo.currentText()

    # progress ------------------------------------------------------------------------
    def busy(self) -> None:
        """Running, length not known yet."""
        self.progress_bar.setRange(0, 0)

    def progress(self, done: int, total: int) -> None:
        self.progress_bar.setFormat("%v / %m spots")
        self.progress_bar.setRange(0, max(1, total))
        self.progress_bar.setValue(done)

    def complete(self) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
        self.progress_bar.setFormat("")

    def idle(self) -> None:
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)

    def enable(self, can_start: bool, can_cancel: bool) -> None:
        for b in self.predict_buttons:
            b.setEnabled(can_start)
        self.cancel_btn.setEnabled(can_cancel)
