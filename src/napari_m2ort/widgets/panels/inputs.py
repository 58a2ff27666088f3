"""Slide and model panel of the Predict widget: which slide, at what pixel size, which
model on which device, and where the spots go (layout, tissue only, batch, compile)."""

from __future__ import annotations

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)

from .._bind import bind_check, bind_data, bind_text, bind_value, quiet
from .._models import describe_card
from .._qt import wrap_label

LAYOUT_CHOICES = [
    ("Visium (55 µm spots, 100 µm pitch)", "visium"),
    ("Legacy ST (100 µm spots, 200 µm pitch)", "st"),
    ("Custom pitch and diameter", "custom"),
]
MPP_SOURCES = {
    "metadata": "read from the file's metadata",
    "st-geometry": "derived from the ST spot grid",
    "user": "given when the slide was opened",
    "default": "the file has no pixel size: set the right value before predicting",
}
_MUTED, _WARN = "color: #9a9a9a", "color: #e0a040"


def device_combo() -> QComboBox:
    from ...devices import available_devices

    combo = QComboBox()
    combo.addItems(["auto", *available_devices()])
    return combo


class ModelPicker(QWidget):
    """A model combo box over a ``ModelCatalogue`` with an "Open…" button."""

    def __init__(self, catalogue, state, field: str = "model", tooltip: str = "", parent=None):
        super().__init__(parent)
        self.catalogue = catalogue
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.combo = QComboBox()
        self.combo.setToolTip(tooltip)
        for spec, label in catalogue.labels.items():
            self.combo.addItem(label, spec)
        catalogue.added.connect(self._added)
        self.browse = QPushButton("Open…")
        self.browse.setToolTip("Load a .safetensors checkpoint with its model card")
        row.addWidget(self.combo, 1)
        row.addWidget(self.browse)
        bind_data(self.combo, state, field)

    def _added(self, spec: str) -> None:
        if self.combo.findData(spec) < 0:
            self.combo.addItem(self.catalogue.labels[spec], spec)  # the first item selects itself


class InputsPanel(QGroupBox):
    def __init__(self, settings, catalogue, parent=None):
        super().__init__("Slide and model", parent)
        self.settings = settings
        self.catalogue = catalogue
        form = QFormLayout(self)

        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("H&E image layer to predict on")
        form.addRow("Slide", self.slide_combo)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.01, 50.0)
        self.mpp_spin.setSingleStep(0.01)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setToolTip(
            "Pixel size of the slide's full resolution (from the file; change it if the file has none)"
        )
        self.mpp_src = QLabel("")
        self.mpp_src.setStyleSheet(_MUTED)
        row = QHBoxLayout()
        row.addWidget(self.mpp_spin, 1)
        row.addWidget(self.mpp_src)
        form.addRow("Pixel size", row)

        self.model_picker = ModelPicker(
            catalogue, settings, tooltip="Bundled M2ORT model, a checkpoint file, or a fine-tuned model"
        )
        self.model_combo, self.model_browse = self.model_picker.combo, self.model_picker.browse
        form.addRow("Model", self.model_picker)
        self.model_info = wrap_label("", lines=2, muted=True)
        form.addRow("", self.model_info)
        self.device_combo = device_combo()
        form.addRow("Device", self.device_combo)

        self.layout_combo = QComboBox()
        for label, value in LAYOUT_CHOICES:
            self.layout_combo.addItem(label, value)
        form.addRow("Spot layout", self.layout_combo)
        self.pitch_spin = QDoubleSpinBox()
        self.pitch_spin.setRange(5.0, 5000.0)
        self.pitch_spin.setSuffix(" µm pitch")
        self.diam_spin = QDoubleSpinBox()
        self.diam_spin.setRange(1.0, 5000.0)
        self.diam_spin.setSuffix(" µm spots")
        row = QHBoxLayout()
        row.addWidget(self.pitch_spin)
        row.addWidget(self.diam_spin)
        form.addRow("", row)
        self.tissue_check = QCheckBox("Tissue only (skip background spots)")
        form.addRow("", self.tissue_check)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 1024)
        self.batch_spin.setToolTip("Spots per model batch; the display updates after each batch")
        form.addRow("Batch size", self.batch_spin)
        self.compile_check = QCheckBox("Compile the model (large jobs)")
        self.compile_check.setToolTip(
            "torch.compile: the first prediction waits 20-40 s while the model compiles, "
            "then bf16 on CPU runs ~1.3x faster (GPU: not measured yet). Worth it from a "
            "few thousand spots. Unticked, jobs of 10,000+ spots on a bf16 CPU are "
            "compiled anyway; float32 on CPU never is (no faster there)."
        )
        form.addRow("", self.compile_check)
        from ...tta import TTA_MODES

        self.tta_combo = QComboBox()
        self.tta_combo.addItems(list(TTA_MODES))
        self.tta_combo.setToolTip("Test-time augmentation, as the CLI's --tta (more views: slower, steadier)")
        self.smooth_spin = QDoubleSpinBox()
        self.smooth_spin.setRange(0.0, 2000.0)
        self.smooth_spin.setDecimals(0)
        self.smooth_spin.setSuffix(" µm")  # a longer suffix is cut off in a docked widget
        self.smooth_spin.setToolTip("Gaussian smoothing over neighbouring spots (sigma), as --smooth-um; 0 = off")
        row = QHBoxLayout()
        row.addWidget(self.tta_combo)
        row.addWidget(self.smooth_spin)
        form.addRow("TTA, smooth σ", row)
        self.force_check = QCheckBox("Predict anyway on a far coarser slide")
        self.force_check.setToolTip(
            "A slide more than 4x coarser than the model's µm/px is refused: the model cannot see the cells "
            "it learned from. Tick to predict anyway (the values will mean little)."
        )
        form.addRow("", self.force_check)

        bind_text(self.slide_combo, settings, "slide")
        bind_value(self.mpp_spin, settings, "mpp")
        bind_text(self.device_combo, settings, "device")
        bind_data(self.layout_combo, settings, "layout")
        bind_value(self.pitch_spin, settings, "pitch_um")
        bind_value(self.diam_spin, settings, "diameter_um")
        bind_check(self.tissue_check, settings, "tissue_only")
        bind_value(self.batch_spin, settings, "batch_size", int)
        bind_check(self.compile_check, settings, "compile")
        bind_text(self.tta_combo, settings, "tta")
        bind_value(self.smooth_spin, settings, "smooth_um")
        bind_check(self.force_check, settings, "force")
        ev = settings.events
        ev.layout.connect(self._show_layout)
        ev.mpp_source.connect(self._show_mpp_source)
        ev.model.connect(self.show_model)
        self._show_layout(settings.layout)
        self.show_model()

    def set_slides(self, names: list) -> bool:
        """Offer these Image layers; True when the chosen slide changed."""
        before = self.settings.slide
        with quiet(self.slide_combo):
            self.slide_combo.clear()
            self.slide_combo.addItems(names)
            if before in names:
                self.slide_combo.setCurrentText(before)
        self.settings.slide = self.slide_combo.currentText()
        return self.settings.slide != before

    def _show_layout(self, layout: str) -> None:
        custom = layout == "custom"
        self.pitch_spin.setEnabled(custom)
        self.diam_spin.setEnabled(custom)
        if not custom:
            from ...spots import LAYOUTS

            _, pitch, diam = LAYOUTS[layout]
            self.settings.pitch_um, self.settings.diameter_um = pitch, diam

    def _show_mpp_source(self, source: str) -> None:
        if not source:
            self.mpp_src.setText("")
            return
        self.mpp_src.setText("assumed – check!" if source == "default" else "from layer")
        self.mpp_src.setToolTip(MPP_SOURCES.get(source, source))
        self.mpp_src.setStyleSheet(_WARN if source == "default" else _MUTED)

    def show_model(self, *_) -> None:
        spec = self.settings.model
        card = self.catalogue.card(spec)
        if spec is None:
            self.model_info.setText("No model: the bundled weights are not installed. Open a checkpoint.")
        elif card is None:
            self.model_info.setText("(model card unreadable)")
        else:
            self.model_info.setText(describe_card(card))
