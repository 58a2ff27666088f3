"""The npe2 reader for slides: a lazy multiscale RGB layer in µm, or None to decline."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_m2ort.io.slides.base import ENV_MPP, sniff
from napari_m2ort.io.slides.dicom import is_dicom
from napari_m2ort.io.slides.openslide_backend import OPENSLIDE_SUFFIXES
from napari_m2ort.io.slides.tiff import is_2d_image
from napari_m2ort.slide import FLAT_SUFFIXES, TIFF_SUFFIXES, validate_mpp

__all__ = ["napari_get_reader"]

_READER_SUFFIXES = TIFF_SUFFIXES | FLAT_SUFFIXES | OPENSLIDE_SUFFIXES | {".dcm"}


def napari_get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]):
    """npe2 reader: whole-slide images as a lazy multiscale RGB layer in µm.

    npe2 readers take no options, so the pixel size can be forced with the environment
    variable ``NAPARI_M2ORT_MPP`` (µm per pixel, e.g. ``NAPARI_M2ORT_MPP=0.69 napari
    slide.jpg``); otherwise the file's metadata or the default µm/px is used.
    Returns None for paths this plugin should leave to others (folders other than DICOM
    slides, several files, z-stacks, multiplexed images).
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = Path(os.fspath(path))
    if p.is_dir():
        return functools.partial(_read_layers, p) if is_dicom(p) else None
    if p.suffix.lower() not in _READER_SUFFIXES:
        return None
    if p.is_file() and _is_tiff(p) and not is_2d_image(p):
        return None
    return functools.partial(_read_layers, p)


def _is_tiff(path: Path) -> bool:
    try:
        return sniff(path) == "tiff"
    except Exception:
        return False  # let open_slide report the problem in its own words


def _read_layers(path: Path, *_: Any, **__: Any) -> list[tuple]:
    """The callable npe2 invokes as read_func(paths, stack=...); our path is bound.

    A damaged file fails here, while napari opens it and says so once, not on every
    redraw: ``verify`` decodes flat images now (the overview napari shows first needs
    that decode anyway, and it is cached).
    """
    from napari_m2ort.io.slides import open_slide

    slide = open_slide(path, mpp=env_mpp())
    try:
        slide.verify()
    except BaseException:
        slide.close()
        raise
    return slide.layer_data()


def env_mpp() -> float | None:
    """The pixel size forced with ``NAPARI_M2ORT_MPP``, or None when it is unset."""
    raw = os.environ.get(ENV_MPP, "").strip()
    if not raw:
        return None
    return validate_mpp(raw, f"{ENV_MPP} (unset it to use the slide's own pixel size)")
