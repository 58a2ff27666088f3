"""Vendor slide formats through OpenSlide: MIRAX (.mrxs), Hamamatsu (.vms/.vmu/.ndpi),
Leica (.scn), Ventana (.bif), Philips TIFF, Sakura (.svslide) and friends.

Scanner vendors store pyramids in their own containers (MIRAX: an index file plus a
folder of data files; VMS: a text file listing JPEGs) or bend TIFF in ways tifffile does
not undo (NDPI's >4 GB offsets, BIF's overlapping tiles, SCN's several images).
OpenSlide, maintained for exactly these, reads them; the ``openslide-bin`` wheel brings
the C library, so no system package is needed. tifffile still reads SVS, generic and
OME-TIFF first (it is faster and always installed); OpenSlide takes those only when
asked for by name (``open_slide(path, backend="openslide")``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides.base import Slide, decode_error, file_token, plausible
from napari_m2ort.io.slides.pyramid import extend_pyramid
from napari_m2ort.io.slides.regions import RegionLevel, lazy_level
from napari_m2ort.io.slides.tiff import _TIFF_MPP_RANGE
from napari_m2ort.slide import RGBSpec, resolve_mpp, to_rgb8

__all__ = ["OPENSLIDE_SUFFIXES", "handles", "open_openslide"]

#: Containers only OpenSlide reads: always sent to it (with an install hint if missing).
OWN_CONTAINERS = frozenset({".mrxs", ".vms", ".vmu", ".svslide"})
#: TIFF variants OpenSlide reads better than tifffile, with the vendor OpenSlide must
#: recognise: OpenSlide first when it is installed and does, tifffile otherwise (a file
#: that is only a generic TIFF under a vendor's name stays with tifffile).
VENDOR_TIFFS = {".ndpi": "hamamatsu", ".scn": "leica", ".bif": "ventana"}
OPENSLIDE_SUFFIXES = OWN_CONTAINERS | frozenset(VENDOR_TIFFS)

_INSTALL = "pip install openslide-python openslide-bin (or pip install 'napari-m2ort[wsi]')"

# OpenSlide returns RGBA, not premultiplied; transparent = outside the scanned area.
_RGBA = RGBSpec(alpha="straight")


def handles(path: Path) -> bool:
    """Whether ``open_slide`` should give ``path`` to OpenSlide rather than sniff it."""
    suffix = path.suffix.lower()
    if suffix in OWN_CONTAINERS:
        return True
    if suffix not in VENDOR_TIFFS or not path.is_file():
        return False
    try:
        import openslide
    except (ImportError, OSError):  # not installed, or openslide-bin missing
        return False
    try:
        return openslide.OpenSlide.detect_format(str(path)) == VENDOR_TIFFS[suffix]
    except Exception:
        return False


def _import_openslide(path: Path) -> Any:
    try:
        import openslide
    except (ImportError, OSError) as exc:
        raise M2ORTError(
            f"Reading '{path.name}' ({path.suffix or 'this format'}) needs OpenSlide, which is not "
            f"installed ({exc}). Install it with: {_INSTALL}. Or export the slide as OME-TIFF "
            "from the scanner software."
        ) from exc
    return openslide


class _OpenSlideSource:
    """The open OpenSlide handle; re-opens after ``close`` and pickles as its path, so
    dask graphs built on it survive ``Slide.close`` and can travel to other processes."""

    def __init__(self, path: Path, handle: Any = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._handle = handle

    def handle(self) -> Any:
        handle = self._handle
        if handle is not None:
            return handle
        with self._lock:
            if self._handle is None:
                self._handle = _import_openslide(self.path).OpenSlide(str(self.path))
            return self._handle

    def read(self, level: int, downsample: float, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 of ``level`` at level pixel (x, y)."""
        try:
            # OpenSlide places regions in level-0 pixels.
            image = self.handle().read_region((round(x * downsample), round(y * downsample)), level, (width, height))
            return to_rgb8(np.asarray(image), _RGBA)
        except M2ORTError:
            raise
        except Exception as exc:
            raise decode_error(self.path, f"level {level}", exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def __reduce__(self):
        return (_OpenSlideSource, (self.path,))


class _LevelReader:
    """A picklable ``ReadRegion`` for one level (a lambda would not pickle)."""

    def __init__(self, source: _OpenSlideSource, level: int, downsample: float) -> None:
        self.source, self.level, self.downsample = source, level, downsample

    def __call__(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self.source.read(self.level, self.downsample, x, y, width, height)


def open_openslide(path: Path, user_mpp: float | None) -> Slide:
    """Open ``path`` with OpenSlide: lazy levels in tile-sized dask chunks, µm/px from
    ``openslide.mpp-x``/``mpp-y``."""
    openslide = _import_openslide(path)
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise M2ORTError(
            f"OpenSlide does not recognise '{path}' as a slide (it reads MIRAX .mrxs, "
            "Hamamatsu .vms/.vmu/.ndpi, Leica .scn, Ventana .bif, Philips TIFF, Aperio "
            "SVS and tiled TIFF). For MIRAX and VMS, keep the file next to its data "
            "folder or image files, as the scanner wrote them."
        ) from exc
    except Exception as exc:
        raise M2ORTError(
            f"OpenSlide could not open '{path}': {exc}. The slide may be incomplete (MIRAX "
            "and VMS slides need their data files beside them) or damaged; copy it again."
        ) from exc
    source = _OpenSlideSource(path, handle)
    try:
        props = handle.properties
        downsamples = handle.level_downsamples
        views = [
            RegionLevel(_LevelReader(source, i, ds), h, w)
            for i, ((w, h), ds) in enumerate(zip(handle.level_dimensions, downsamples))
        ]
        # Decode now so a damaged file fails at open, not in a viewer thread.
        smallest = views[-1]
        smallest[: min(smallest.shape[0], 256), : min(smallest.shape[1], 256)]
        meta_mpp = _openslide_mpp(props)
        vendor = props.get("openslide.vendor", "") or "unknown"
    except Exception:
        source.close()
        raise
    token = file_token(path)
    levels = [lazy_level(v, _tile(props, i), f"m2ort-openslide-{token}-{i}") for i, v in enumerate(views)]
    readers: list[Any] = list(views)
    native = len(levels)
    extend_pyramid(levels, readers)
    mpp, mpp_source = resolve_mpp(user_mpp, meta_mpp)
    return Slide(
        path,
        levels,
        readers,
        mpp,
        mpp_source,
        mpp_override=user_mpp,
        native_levels=native,
        closers=[source.close],
        fmt=f"openslide-{vendor}",
    )


def _tile(props: Any, level: int) -> tuple[int, int]:
    """The level's tile (height, width) as OpenSlide reports it; 512 when it does not."""
    size = []
    for key in ("tile-height", "tile-width"):
        try:
            size.append(int(props[f"openslide.level[{level}].{key}"]))
        except (KeyError, ValueError):
            size.append(512)
    return size[0], size[1]


def _openslide_mpp(props: Any) -> float | None:
    """µm/px from OpenSlide's normalised ``openslide.mpp-x``/``mpp-y`` (their mean)."""
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            values.append(float(props[key]))
        except (KeyError, ValueError):
            continue
    if not values:
        return None
    return plausible(sum(values) / len(values), _TIFF_MPP_RANGE)
