"""Shared fixtures: the real data in ../shared/data and small synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import napari_m2ort  # noqa: F401  (imports torch before Qt starts; makes timm importable)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("M2ORT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def her2st(shared_data) -> Path:
    return shared_data / "her2st"


@pytest.fixture
def errors(monkeypatch):
    """Messages of the error notifications the widgets show."""
    import napari.utils.notifications as notifications

    from napari_m2ort.widgets import _workers

    seen: list[str] = []
    real = notifications.show_error

    def record(message, *a, **k):
        seen.append(str(message))
        return real(message, *a, **k)

    monkeypatch.setattr(notifications, "show_error", record)
    monkeypatch.setattr(_workers, "show_error", record)
    return seen
