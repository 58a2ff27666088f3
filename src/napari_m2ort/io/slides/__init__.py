"""Open a whole-slide image lazily: pyramid levels as dask arrays, µm/px, region reads.

Everything downstream (spots, patches, the napari layer) asks a slide for pixels through
the ``napari_m2ort.slide.SlideLike`` contract, so this package is the only place that
knows about file formats. ``open_slide`` sniffs the file's first bytes and hands it to
one module per format family:

* ``tiff``: tiled/pyramidal TIFF, OME-TIFF, Aperio SVS, NDPI, ... via tifffile's zarr store;
* ``flat``: JPEG/PNG, decoded once on first use, lower levels built from the decode;
* ``openslide_backend``: vendor formats (MRXS, VMS/VMU, NDPI, SCN, BIF, ...) via OpenSlide;
* ``dicom``: DICOM WSI (a folder of instances, or one .dcm in it) via wsidicom;
* ``layer`` (not a file format): a napari Image layer's data as a slide.

Every level is presented as (H, W, 3) uint8 RGB. A new backend is a
module with an ``open_*(path, mpp) -> Slide`` function and a line in ``_BACKENDS``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides.base import ENV_MPP, Slide, display_name, sniff
from napari_m2ort.io.slides.budget import ENV_DECODE_BUDGET, budget_scope
from napari_m2ort.io.slides.dicom import is_dicom, open_dicom
from napari_m2ort.io.slides.flat import open_flat
from napari_m2ort.io.slides.openslide_backend import handles as openslide_handles
from napari_m2ort.io.slides.openslide_backend import open_openslide
from napari_m2ort.io.slides.pyramid import MIN_LEVEL_SIDE
from napari_m2ort.io.slides.reader import napari_get_reader
from napari_m2ort.io.slides.tiff import open_tiff
from napari_m2ort.slide import DEFAULT_MPP, SlideLike, validate_mpp

__all__ = [
    "DEFAULT_MPP",
    "ENV_DECODE_BUDGET",
    "ENV_MPP",
    "MIN_LEVEL_SIDE",
    "Slide",
    "SlideLike",
    "display_name",
    "napari_get_reader",
    "open_slide",
]

_BACKENDS: dict[str, Callable[[Path, float | None], Slide]] = {
    "tiff": open_tiff,
    "flat": open_flat,
    "openslide": open_openslide,
    "dicom": open_dicom,
}


def open_slide(
    path: str | os.PathLike,
    mpp: float | None = None,
    *,
    quiet: bool = False,
    backend: str | None = None,
    memory_budget: int | None = None,
) -> Slide:
    """Open a slide lazily; raise M2ORTError with an actionable message if we can't.

    ``mpp`` (µm per level-0 pixel) overrides the file's metadata. Without either, the
    slide gets ``DEFAULT_MPP`` and, unless ``quiet``, one warning saying how to set it.
    ``backend`` (a key of ``_BACKENDS``, e.g. "openslide") skips format detection.
    ``memory_budget`` (bytes) caps what decoding a flat image or a one-strip TIFF whole
    may take (default: ``NAPARI_M2ORT_MAX_DECODE_GB``, else 8 GB or half the RAM); a file
    over it, or whose header claims more pixels than its data can hold, is refused.
    """
    path = Path(os.fspath(path)).expanduser()
    if mpp is not None:
        mpp = validate_mpp(mpp, f"Pixel size given for '{path}'")
    if not path.exists():
        raise M2ORTError(
            f"Slide file '{path}' does not exist. Check the path for typos, or that the drive holding it is mounted."
        )
    if backend is not None and backend not in _BACKENDS:
        raise M2ORTError(f"Unknown slide backend {backend!r}; choose one of {', '.join(_BACKENDS)}.")
    if path.is_dir() and backend is None and not is_dicom(path):
        raise M2ORTError(
            f"'{path}' is a folder, not an image file. Choose the slide file itself "
            "(.svs, .tif, .ome.tif, .mrxs, .jpg, .png), or a folder of DICOM instances."
        )
    opener = _BACKENDS.get(backend or _family(path))
    if opener is None:
        raise M2ORTError(
            f"'{path}' is not a TIFF, JPEG, PNG, DICOM or OpenSlide slide (unrecognised file header). "
            "Export the slide as OME-TIFF, TIFF, JPEG or PNG and open that."
        )
    with budget_scope(memory_budget):
        slide = opener(path, mpp)
    slide.decode_budget = memory_budget
    slide.backend = backend
    if slide.mpp_source == "default" and not quiet:
        warnings.warn(
            f"'{path}' has no pixel-size metadata; assuming {DEFAULT_MPP} µm/px. If that "
            f"is wrong, pass mpp= to open_slide (--mpp on the command line, or set "
            f"{ENV_MPP} before opening it in napari).",
            UserWarning,
            stacklevel=2,
        )
    return slide


def _family(path: Path) -> str:
    """DICOM and OpenSlide's vendor formats by name, then the TIFF/flat families by first bytes."""
    if is_dicom(path):
        return "dicom"
    if openslide_handles(path):
        return "openslide"
    return sniff(path)
