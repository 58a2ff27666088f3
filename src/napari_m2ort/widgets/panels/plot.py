"""A small live plot for training: loss per step/epoch and validation PCC-gene per epoch.

The axes read plainly: no offset notation (a change of 0.00001 must not look like a
climb), a minimum span on each axis so noise stays flat, and the legend above the axes
where it cannot cover a curve.
"""

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
#: smallest PCC range shown: differences below a few hundredths are noise on a few spots
PCC_MIN_SPAN = 0.1
#: smallest loss range, as a fraction of the loss
LOSS_MIN_REL_SPAN = 0.2


def padded_limits(values, min_span: float, pad: float = 0.08) -> tuple[float, float] | None:
    """(low, high) around finite ``values``, at least ``min_span`` wide, centred on them."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    span = hi - lo
    if span < min_span:
        mid = (lo + hi) / 2
        return mid - min_span / 2, mid + min_span / 2
    return lo - pad * span, hi + pad * span


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
        self.legend = None
        self.clear()

    def clear(self) -> None:
        self.steps: list[float] = []
        self.losses: list[float] = []
        self.epochs: list[float] = []
        self.epoch_loss: list[float] = []
        self.val_epochs: list[float] = []
        self.val_pcc: list[float] = []
        self.steps_per_epoch = 1
        self.total_steps = 0  # the whole run's steps, once known: the x axis spans them
        self._draw()

    # events --------------------------------------------------------------------------
    def add_step(self, step: int, loss: float, epoch: int, total: int = 0) -> None:
        self.total_steps = max(self.total_steps, int(total or 0))
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
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        for spine in ax.spines.values():
            spine.set_color("#5a5f6a")

    def _draw(self) -> None:
        ax, ax2 = self.ax, self.ax2
        ax.clear()
        ax2.clear()
        if self.legend is not None:
            self.legend.remove()
            self.legend = None
        self._style(ax)
        self._style(ax2)
        ax.set_xlabel("step", color=_FG, fontsize=8)
        ax.set_ylabel("training loss (MSE)", color=_LOSS, fontsize=8)
        ax2.set_ylabel("val PCC-gene\n(mean over sections)", color=_PCC, fontsize=8)
        if self.steps:
            ax.plot(self.steps, self.losses, color=_LOSS, lw=1, alpha=0.8, label="loss / step")
        if self.epochs:
            ax.plot(self.epochs, self.epoch_loss, "o-", color=_EPOCH, ms=3, lw=1, label="loss / epoch")
        if self.val_pcc:
            ax2.plot(self.val_epochs, self.val_pcc, "s-", color=_PCC, ms=4, lw=1.2, label="val PCC-gene")
        losses = self.losses + self.epoch_loss
        lim = padded_limits(losses, LOSS_MIN_REL_SPAN * max((abs(v) for v in losses), default=1.0) or 1e-3)
        if lim is not None:
            ax.set_ylim(*lim)
        lim = padded_limits(self.val_pcc, PCC_MIN_SPAN)
        if lim is not None:
            ax2.set_ylim(max(-1.0, lim[0]), min(1.0, lim[1]))
        right = max(2, self.total_steps, *(self.steps or [0]))
        ax.set_xlim(0, right + max(0.3, 0.03 * right))  # markers at the last step stay whole
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax2.yaxis.set_major_locator(MaxNLocator(5))
        ax2.yaxis.set_label_position("right")
        ax2.yaxis.tick_right()
        if self.steps or self.val_pcc:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            # above the axes (constrained layout makes room): never over a curve
            self.legend = self.figure.legend(
                h1 + h2, l1 + l2, fontsize=7, loc="outside upper center", ncols=3, frameon=False
            )
            for t in self.legend.get_texts():
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
