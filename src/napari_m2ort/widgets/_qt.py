"""Qt layout helpers shared by the dock widgets and their panels."""

from __future__ import annotations


def scroll_body(widget):
    """Give ``widget`` a scrollable body and return the body's QVBoxLayout.

    napari docks do not scroll; without this a tall widget in a short dock gets its
    rows squeezed and its labels clipped.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = QScrollArea(widget)
    area.setWidgetResizable(True)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setFrameShape(QFrame.Shape.NoFrame)
    body = QWidget()
    area.setWidget(body)
    outer.addWidget(area)
    layout = QVBoxLayout(body)
    layout.setContentsMargins(6, 6, 6, 6)
    widget._scroll_area = area
    return layout


def compact_combos(widget, chars: int = 14) -> None:
    """Combo boxes whose items are names (layers, files) must not widen the dock."""
    from qtpy.QtWidgets import QComboBox

    for combo in widget.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(chars)


def fit_width(widget) -> None:
    """Make the dock as wide as the scrolled body needs (no horizontal clipping)."""
    area = getattr(widget, "_scroll_area", None)
    if area is None:
        return
    try:
        body = area.widget()
        bar = area.verticalScrollBar().sizeHint().width()
        widget.setMinimumWidth(body.minimumSizeHint().width() + bar + 4)
    except RuntimeError:  # the widget was deleted before a deferred call
        pass


def wrap_label(text: str = "", lines: int = 2, muted: bool = False):
    """A word-wrapped QLabel that keeps room for ``lines`` lines."""
    from qtpy.QtWidgets import QLabel, QSizePolicy

    label = QLabel(text)
    label.setWordWrap(True)
    label.setMinimumHeight(label.fontMetrics().lineSpacing() * lines + 4)
    label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.MinimumExpanding)
    label.setTextInteractionFlags(label.textInteractionFlags())
    if muted:
        label.setStyleSheet("color: #9a9a9a")
    return label
