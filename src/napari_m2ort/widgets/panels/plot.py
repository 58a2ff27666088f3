"""A small live plot for training: loss per step/epoch and validation PCC-gene per epoch."""

from __future__ import annotations

import math

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

_BG = "#262930"  # napari dark theme background
_FG = "#d6d6d6"
_LOSS = "#5fa8d3"
_EPOCH = "#f2f2f2"
_PCC = "#f4a259"


class LivePlot(QWidget):
    """Training loss (left axis, per step and epoch mean) and val PCC-gene (right axis)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.figure = Figure(figsize=(4, 2.4), dpi=90, facecolor=_BG, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        self.ax = self.figure.add_subplot(111)
        self.ax2 = self.ax.twinx()
        self.clear()

    def clear(self) -> None:
        self.steps: list[float] = []
        self.losses: list[float] = []
        self.epochs: list[float] = []
        self.epoch_loss: list[float] = []
        self.val_epochs: list[float] = []
        self.val_pcc: list[float] = []
        self.steps_per_epoch = 1
        self._draw()

    # events --------------------------------------------------------------------------
    def add_step(self, step: int, loss: float, epoch: int) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        if epoch > 0:
            self.steps_per_epoch = max(1, step // max(epoch, 1)) if step >= epoch else 1
        self._draw()

    def add_epoch(self, epoch: int, train_loss: float, val_pcc: float | None, step: int | None = None) -> None:
        x = step if step is not None else (self.steps[-1] if self.steps else epoch)
        self.epochs.append(x)
        self.epoch_loss.append(train_loss)
        if val_pcc is not None and math.isfinite(val_pcc):
            self.val_epochs.append(x)
            self.val_pcc.append(val_pcc)
        self._draw()

    # drawing -------------------------------------------------------------------------
    def _style(self, ax) -> None:
        ax.set_facecolor(_BG)
        ax.tick_params(colors=_FG, labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#5a5f6a")

    def _draw(self) -> None:
        ax, ax2 = self.ax, self.ax2
        ax.clear()
        ax2.clear()
        self._style(ax)
        self._style(ax2)
        ax.set_xlabel("step", color=_FG, fontsize=8)
        ax.set_ylabel("training loss (MSE)", color=_LOSS, fontsize=8)
        ax2.set_ylabel("val PCC-gene", color=_PCC, fontsize=8)
        if self.steps:
            ax.plot(self.steps, self.losses, color=_LOSS, lw=1, alpha=0.8, label="loss / step")
        if self.epochs:
            ax.plot(self.epochs, self.epoch_loss, "o-", color=_EPOCH, ms=3, lw=1, label="loss / epoch")
        if self.val_pcc:
            ax2.plot(self.val_epochs, self.val_pcc, "s-", color=_PCC, ms=4, lw=1.2, label="val PCC-gene")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.yaxis.set_label_position("right")
        ax2.yaxis.tick_right()
        if self.steps or self.val_pcc:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            leg = ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right", frameon=False)
            for t in leg.get_texts():
                t.set_color(_FG)
        else:
            ax.text(
                0.5,
                0.5,
                "training curves appear here",
                color="#8a8f99",
                fontsize=8,
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        self.canvas.draw_idle()
