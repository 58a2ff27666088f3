"""Two-way bindings between Qt controls and fields of an evented state record.

A control writes its field when the user changes it; a field change (from code, a
script or another panel) updates the control with its signals blocked.  psygnal emits
only on a real change, so the two directions cannot ping-pong.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet(widget):
    """Change a control without re-entering its own handlers."""
    old = widget.blockSignals(True)
    try:
        yield widget
    finally:
        widget.blockSignals(old)


def _signal(state, name: str):
    return getattr(state.events, name)


def bind_value(spin, state, name: str, cast=float) -> None:
    """QSpinBox / QDoubleSpinBox ↔ a number."""
    with quiet(spin):
        spin.setValue(cast(getattr(state, name)))
    spin.valueChanged.connect(lambda v: setattr(state, name, cast(v)))

    def show(value):
        with quiet(spin):
            spin.setValue(cast(value))

    _signal(state, name).connect(show)


def bind_check(check, state, name: str) -> None:
    """QCheckBox ↔ a bool."""
    with quiet(check):
        check.setChecked(bool(getattr(state, name)))
    check.toggled.connect(lambda on: setattr(state, name, bool(on)))

    def show(value):
        with quiet(check):
            check.setChecked(bool(value))

    _signal(state, name).connect(show)


def bind_data(combo, state, name: str) -> None:
    """QComboBox (item data) ↔ a value; a value the combo lacks leaves it as it is."""
    i = combo.findData(getattr(state, name))
    if i >= 0:
        with quiet(combo):
            combo.setCurrentIndex(i)
    else:
        setattr(state, name, combo.currentData())
    combo.currentIndexChanged.connect(lambda *_: setattr(state, name, combo.currentData()))

    def show(value):
        i = combo.findData(value)
        if i >= 0 and i != combo.currentIndex():
            with quiet(combo):
                combo.setCurrentIndex(i)

    _signal(state, name).connect(show)


def bind_text(combo, state, name: str) -> None:
    """QComboBox (item text) ↔ a string."""
    if combo.findText(str(getattr(state, name))) >= 0:
        with quiet(combo):
            combo.setCurrentText(str(getattr(state, name)))
    else:
        setattr(state, name, combo.currentText())
    combo.currentIndexChanged.connect(lambda *_: setattr(state, name, combo.currentText()))

    def show(value):
        if value is not None and combo.findText(str(value)) >= 0 and combo.currentText() != value:
            with quiet(combo):
                combo.setCurrentText(str(value))

    _signal(state, name).connect(show)


def bind_line(edit, state, name: str) -> None:
    """QLineEdit ↔ a string."""
    with quiet(edit):
        edit.setText(str(getattr(state, name)))
    edit.textChanged.connect(lambda text: setattr(state, name, str(text)))

    def show(value):
        if edit.text() != value:
            with quiet(edit):
                edit.setText(str(value))

    _signal(state, name).connect(show)
