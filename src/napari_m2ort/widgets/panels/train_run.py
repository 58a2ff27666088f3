"""Run panel of the Fine-tune widget: train and cancel, progress, the status line, and
what to do with the result (save it, use it for prediction)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QProgressBar, QPushButton, QVBoxLayout, QWidget

from .._qt import wrap_label


class TrainRunPanel(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        v = QVBoxLayout(self)
        v.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.train_btn = QPushButton("Train")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip(
            "Stop after the current step: the best finished epoch is kept (inside the first epoch, nothing: "
            "the starting model stays as it was)"
        )
        row.addWidget(self.train_btn, 1)
        row.addWidget(self.cancel_btn)
        v.addLayout(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        v.addWidget(self.progress_bar)
        self.status = wrap_label("Load measured spots for the open slide, then press Train.", lines=4)
        v.addWidget(self.status)

    def busy(self) -> None:
        self.progress_bar.setRange(0, 0)

    def progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, max(1, total))
        self.progress_bar.setValue(done)

    def halt(self) -> None:
        """Stopped early: the bar keeps what was done (no busy animation left running)."""
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(0)

    def complete(self) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)


class ResultPanel(QWidget):
    """Save the fine-tuned model, or hand it to the Predict widget."""

    def __init__(self, parent=None):
        super().__init__(parent)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.save_btn = QPushButton("Save model…")
        self.save_btn.setToolTip("Write the fine-tuned weights and model card (.safetensors)")
        self.use_btn = QPushButton("Use for prediction")
        self.use_btn.setToolTip("Switch the Predict expression widget to this model")
        row.addWidget(self.save_btn)
        row.addWidget(self.use_btn)

    def ask_path(self) -> Optional[Path]:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save fine-tuned model", "m2ort_finetuned.safetensors", "M2ORT checkpoint (*.safetensors)"
        )
        return Path(path) if path else None
