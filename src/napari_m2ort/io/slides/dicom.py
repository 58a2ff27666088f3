"""DICOM whole-slide images (VL Whole Slide Microscopy) through wsidicom.

Hospital archives are moving slides to DICOM: one pyramid is a folder of instances, one
file per level (plus label, overview and thumbnail instances). The user may pick the
folder or any .dcm file in it; either opens the whole folder. µm/px comes from the base
level's Pixel Spacing (mm), which every WSI instance must carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides.base import Slide, plausible
from napari_m2ort.io.slides.regions import LevelReader, RegionLevel, RegionSource, tiled_slide
from napari_m2ort.slide import MPP_RANGE, to_rgb8

__all__ = ["dicom_folder", "is_dicom", "open_dicom"]

_INSTALL = "pip install wsidicom (or pip install 'napari-m2ort[wsi]')"

# Folders are recognised by their first few files: archives can hold thousands.
_PEEK_FILES = 32


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def is_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM file, or a folder holding DICOM files."""
    if path.is_file():
        return path.suffix.lower() == ".dcm" or _is_dicom_file(path)
    if not path.is_dir():
        return False
    try:
        files = [p for p in sorted(path.iterdir())[: _PEEK_FILES * 4] if p.is_file()]
    except OSError:
        return False
    return any(_is_dicom_file(p) for p in files[:_PEEK_FILES])


def dicom_folder(path: Path) -> Path:
    """The folder a DICOM slide is opened from: the path itself, or the file's folder."""
    return path if path.is_dir() else path.parent


def _import_wsidicom(path: Path) -> Any:
    try:
        import wsidicom
    except ImportError as exc:
        raise M2ORTError(
            f"Reading the DICOM slide '{path}' needs wsidicom, which is not installed. Install it with: {_INSTALL}."
        ) from exc
    return wsidicom


class _DicomSource(RegionSource):
    """The open WsiDicom of a folder (see ``RegionSource``)."""

    def open(self) -> Any:
        return _import_wsidicom(self.path).WsiDicom.open(self.path)

    def read_with(self, handle: Any, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return to_rgb8(np.asarray(handle.read_region((x, y), level, (width, height))))


def open_dicom(path: Path, user_mpp: float | None) -> Slide:
    """Open the DICOM WSI pyramid in ``path`` (a folder, or a .dcm file in it)."""
    folder = dicom_folder(path)
    wsidicom = _import_wsidicom(path)
    try:
        wsi = wsidicom.WsiDicom.open(folder)
    except Exception as exc:
        raise M2ORTError(
            f"'{folder}' holds no readable DICOM whole-slide image ({exc}). A DICOM slide "
            "is a folder of VL Whole Slide Microscopy instances, one per pyramid level, as "
            "exported from the archive (PACS) or written by wsidicomizer."
        ) from exc
    source = _DicomSource(folder, wsi)
    try:
        pyramid = list(wsi.levels)
        if not pyramid:
            raise M2ORTError(f"'{folder}' holds DICOM files but no whole-slide pyramid level.")
        views = [RegionLevel(LevelReader(source, lv.level), lv.size.height, lv.size.width) for lv in pyramid]
        smallest = views[-1]
        smallest[: min(smallest.shape[0], 256), : min(smallest.shape[1], 256)]
        meta_mpp = _dicom_mpp(pyramid[0])
    except Exception:
        source.close()
        raise
    return tiled_slide(
        folder,
        views,
        [(lv.tile_size.height, lv.tile_size.width) for lv in pyramid],
        f"m2ort-dicom-{_folder_token(wsi, folder)}",
        user_mpp=user_mpp,
        meta_mpp=meta_mpp,
        closers=[source.close],
        fmt="dicom",
    )


def _dicom_mpp(level: Any) -> float | None:
    """µm/px from the level's Pixel Spacing (mm/px, row then column spacing)."""
    try:
        spacing = level.pixel_spacing
        values = [float(spacing.width) * 1000.0, float(spacing.height) * 1000.0]
    except Exception:  # WsiDicomNoResolutionError, or a malformed value
        return None
    return plausible(sum(values) / len(values), MPP_RANGE)


def _folder_token(wsi: Any, folder: Path) -> str:
    """Identity of this version of the instances, for dask names (cf. ``file_token``)."""
    from dask.base import tokenize

    files = sorted(str(f) for f in (wsi.files or []))
    stats = []
    for f in files:
        try:
            st = Path(f).stat()
            stats.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((f, 0, 0))
    return tokenize(str(folder.resolve()), stats)
