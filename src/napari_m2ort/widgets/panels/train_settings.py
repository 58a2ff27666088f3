"""Training panel of the Fine-tune widget: the starting model, the gene panel and the
optimisation settings, all bound to ``FinetuneSettings``."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLineEdit, QSpinBox

from ...errors import M2ORTError
from .._bind import bind_data, bind_line, bind_text, bind_value, quiet
from .inputs import ModelPicker, device_combo

GENE_CHOICES = [
    ("Keep the model's genes", "model"),
    ("Top N genes of this data", "top"),
    ("Gene list (comma separated)", "list"),
]
SCHEDULES = [("Constant", "constant"), ("Warmup + cosine decay", "cosine")]
MODES = [("Whole model", "full"), ("Head only (fast, few spots)", "head")]


def _combo(items) -> QComboBox:
    combo = QComboBox()
    for label, value in items:
        combo.addItem(label, value)
    return combo


def gene_spec(settings) -> str:
    """The use-case layer's gene-panel spec for these settings ("model", "top:N", "A,B")."""
    if settings.genes_mode == "top":
        return f"top:{int(settings.top_n)}"
    if settings.genes_mode == "list":
        genes = [g.strip() for g in settings.gene_list.replace("\n", ",").split(",") if g.strip()]
        if not genes:
            raise M2ORTError("The gene list is empty: paste gene symbols separated by commas.")
        return ",".join(genes)
    return "model"


class TrainSettingsPanel(QGroupBox):
    def __init__(self, settings, catalogue, parent=None):
        super().__init__("Training", parent)
        self.settings = settings
        form = self.form = QFormLayout(self)
        self.model_picker = ModelPicker(catalogue, settings)
        self.model_combo, self.model_browse = self.model_picker.combo, self.model_picker.browse
        form.addRow("Start from", self.model_picker)
        self.genes_combo = _combo(GENE_CHOICES)
        self.top_spin = QSpinBox()
        self.top_spin.setRange(1, 5000)
        self.genes_edit = QLineEdit()
        self.genes_edit.setPlaceholderText("ERBB2, GRB7, KRT19, …")
        form.addRow("Gene panel", self.genes_combo)
        row = QHBoxLayout()
        row.addWidget(self.top_spin)
        row.addWidget(self.genes_edit, 1)
        form.addRow("", row)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        form.addRow("Epochs", self.epochs_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-5)
        form.addRow("Learning rate", self.lr_spin)
        self.schedule_combo = _combo(SCHEDULES)
        self.schedule_combo.setToolTip(
            "Cosine: one warmup epoch, then the rate falls to 0 at the last epoch "
            "(steadier end of training; what the bundled model used)"
        )
        form.addRow("LR schedule", self.schedule_combo)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 1024)
        form.addRow("Batch size", self.batch_spin)
        self.mode_combo = _combo(MODES)
        form.addRow("Train", self.mode_combo)
        self.val_combo = QComboBox()
        self.val_combo.setToolTip(
            "What the live PCC-gene is measured on (the mean over sections of each one's own PCC-gene): "
            "held-out spatial blocks of each section, or one whole section held out"
        )
        form.addRow("Validation", self.val_combo)
        self.device_combo = device_combo()
        form.addRow("Device", self.device_combo)

        bind_data(self.genes_combo, settings, "genes_mode")
        bind_value(self.top_spin, settings, "top_n", int)
        bind_line(self.genes_edit, settings, "gene_list")
        bind_value(self.epochs_spin, settings, "epochs", int)
        bind_value(self.lr_spin, settings, "lr")
        bind_data(self.schedule_combo, settings, "schedule")
        bind_value(self.batch_spin, settings, "batch_size", int)
        bind_data(self.mode_combo, settings, "mode")
        bind_text(self.device_combo, settings, "device")
        self.set_val_choices([])
        bind_data(self.val_combo, settings, "val")
        settings.events.genes_mode.connect(self._show_genes_mode)
        self._show_genes_mode(settings.genes_mode)

    def _show_genes_mode(self, mode: str) -> None:
        self.top_spin.setVisible(mode == "top")
        self.genes_edit.setVisible(mode == "list")

    def set_val_choices(self, section_names: list) -> None:
        """Held-out blocks of every section, no validation, or one whole section held out
        (offered for each section; usable once another section is left to train on)."""
        current = self.settings.val
        usable = len(section_names) > 1
        with quiet(self.val_combo):
            self.val_combo.clear()
            self.val_combo.addItem("Held-out blocks (20 % of each section)", "blocks")
            for name in section_names:
                self.val_combo.addItem(f"Section {name} (held out)", name)
                item = self.val_combo.model().item(self.val_combo.count() - 1)
                item.setEnabled(usable)
                if not usable:
                    item.setToolTip("Tick a second section to train on first")
            self.val_combo.addItem("None (no validation)", "none")
            index = self.val_combo.findData(current)
            if index < 0 or not self.val_combo.model().item(index).isEnabled():
                index = 0
            self.val_combo.setCurrentIndex(index)
        self.settings.val = self.val_combo.currentData()
