"""Measured ST data panel of the Fine-tune widget: which slide, which files in which
format, at what pixel size, and which loaded sections to train on."""

from __future__ import annotations

from typing import Optional

from qtpy.QtCore import Qt
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
    QPushButton,
    QStackedWidget,
    QWidget,
)

from .._bind import bind_check, bind_data, bind_text, bind_value, quiet

FORMATS = [
    ("Legacy ST (counts + spot table)", "legacy"),
    ("Visium (Space Ranger folder)", "visium"),
    ("AnnData (.h5ad)", "h5ad"),
]


class PathField(QWidget):
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


def _page(*rows) -> QWidget:
    page = QWidget()
    form = QFormLayout(page)
    form.setContentsMargins(0, 0, 0, 0)
    for label, field in rows:
        form.addRow(label, field)
    return page


class DataPanel(QGroupBox):
    def __init__(self, settings, parent=None):
        super().__init__("Measured ST data", parent)
        self.settings = settings
        form = QFormLayout(self)
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("The H&E image the spots were measured on")
        form.addRow("Slide", self.slide_combo)
        self.format_combo = QComboBox()
        for label, value in FORMATS:
            self.format_combo.addItem(label, value)
        form.addRow("Format", self.format_combo)
        self.counts_field = PathField("counts table (.tsv / .tsv.gz)", "Counts (*.tsv *.tsv.gz *.csv *.txt)")
        self.spots_field = PathField("spot table (*_selection.tsv)", "Spots (*.tsv *.csv *.txt)")
        self.visium_field = PathField("Space Ranger 'outs' folder", folder=True)
        self.h5ad_field = PathField("AnnData file with obsm['spatial']", "AnnData (*.h5ad)")
        self.stack = QStackedWidget()
        self.stack.addWidget(_page(("Counts", self.counts_field), ("Spots", self.spots_field)))
        self.stack.addWidget(_page(("Folder", self.visium_field)))
        self.stack.addWidget(_page(("File", self.h5ad_field)))
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
        form.addRow(self.load_btn)
        self.sections_list = QListWidget()
        self.sections_list.setMaximumHeight(80)
        self.sections_list.setToolTip("Sections to train on (ticked); measured ST layers already open appear here too")
        form.addRow("Sections", self.sections_list)
        self.region_check = QCheckBox("Only spots inside the regions layer")
        self.region_check.setToolTip("Train on the spots inside the rectangles/polygons of 'M2ORT regions'")
        form.addRow("", self.region_check)

        bind_text(self.slide_combo, settings, "slide")
        bind_data(self.format_combo, settings, "st_format")
        bind_value(self.mpp_spin, settings, "st_mpp")
        bind_check(self.region_check, settings, "only_in_regions")
        self.sections_list.itemChanged.connect(lambda *_: self._publish_sections())
        settings.events.st_format.connect(self._show_format)
        self._show_format(settings.st_format)

    def _show_format(self, fmt: str) -> None:
        self.stack.setCurrentIndex(max(0, self.format_combo.findData(fmt)))

    def set_slides(self, names: list) -> None:
        before = self.settings.slide
        with quiet(self.slide_combo):
            self.slide_combo.clear()
            self.slide_combo.addItems(names)
            if before in names:
                self.slide_combo.setCurrentText(before)
        self.settings.slide = self.slide_combo.currentText()

    def paths(self, fmt: str) -> dict:
        """The files the fields name for a format."""
        if fmt == "legacy":
            return {"counts": self.counts_field.path(), "spots": self.spots_field.path()}
        if fmt == "visium":
            return {"folder": self.visium_field.path()}
        return {"h5ad": self.h5ad_field.path()}

    # sections ------------------------------------------------------------------------
    def section_names(self) -> set:
        return {self.sections_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.sections_list.count())}

    def add_section(self, section) -> None:
        item = QListWidgetItem(f"{section.name} — {section.n_spots} spots, {section.mpp:.3f} µm/px")
        item.setData(Qt.ItemDataRole.UserRole, section.name)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(Qt.CheckState.Checked)
        with quiet(self.sections_list):
            self.sections_list.addItem(item)
        self._publish_sections()

    def _publish_sections(self) -> None:
        self.settings.sections = tuple(self.ticked())

    def ticked(self) -> list:
        """Names of the sections ticked for training, in list order."""
        out = []
        for i in range(self.sections_list.count()):
            item = self.sections_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(item.data(Qt.ItemDataRole.UserRole))
        return out
