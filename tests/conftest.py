"""Fixtures: real data committed under tests/data (plus the packaged C2 section)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

import napari_m2ort  # (imports torch before Qt starts; makes timm importable)

DATA = Path(__file__).resolve().parent / "data"
# Section C2 ships in the package for the napari sample; the tests reuse it rather than keep a copy.
PACKAGED_C2 = Path(napari_m2ort.__file__).resolve().parent / "data" / "her2st_C2"
C2_FILES = {
    "5714_HE_BT_C2.jpg": "ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    "C2.tsv.gz": "ST-cnts/C2.tsv.gz",
    "C2_selection.tsv": "ST-spotfiles/C2_selection.tsv",
}


def _override() -> Path | None:
    """A full data folder named by $M2ORT_TEST_DATA (opt-in, for developers who have one)."""
    value = os.environ.get("M2ORT_TEST_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        warnings.warn(f"M2ORT_TEST_DATA={value} is not a folder; using {DATA}", stacklevel=2)
        return None
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data folder: tests/data, in the same layout as the full one (see tests/data/README.md)."""
    return _override() or DATA


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:  # no symlinks (e.g. Windows without developer mode)
        shutil.copyfile(src, dst)


@pytest.fixture(scope="session")
def her2st(tmp_path_factory) -> Path:
    """A folder in the almaan/her2st layout: sections B4 and C3 from tests/data, C2 from the package."""
    full = _override()
    if full is not None:
        return full / "her2st"
    root = tmp_path_factory.mktemp("her2st")
    for f in sorted((DATA / "her2st").rglob("*")):
        if f.is_file():
            _link(f, root / f.relative_to(DATA / "her2st"))
    for name, rel in C2_FILES.items():
        _link(PACKAGED_C2 / name, root / rel)
    return root


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
