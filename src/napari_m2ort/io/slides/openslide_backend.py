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

from pathlib import Path
from typing import Any

import numpy as np

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides.base import Slide, file_token, plausible
from napari_m2ort.io.slides.regions import LevelReader, RegionLevel, RegionSource, tiled_slide
from napari_m2ort.slide import MPP_RANGE, RGBSpec, to_rgb8

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


class _OpenSlideSource(RegionSource):
    """The open OpenSlide handle (see ``RegionSource``)."""

    def open(self) -> Any:
        return _import_openslide(self.path).OpenSlide(str(self.path))

    def read_with(self, handle: Any, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        # OpenSlide places regions in level-0 pixels.
        downsample = handle.level_downsamples[level]
        image = handle.read_region((round(x * downsample), round(y * downsample)), level, (width, height))
        return to_rgb8(np.asarray(image), _RGBA)


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
        views = [RegionLevel(LevelReader(source, i), h, w) for i, (w, h) in enumerate(handle.level_dimensions)]
        # Decode now so a damaged file fails at open, not in a viewer thread.
        smallest = views[-1]
        smallest[: min(smallest.shape[0], 256), : min(smallest.shape[1], 256)]
        meta_mpp = _openslide_mpp(props)
        vendor = props.get("openslide.vendor", "") or "unknown"
    except Exception:
        source.close()
        raise
    return tiled_slide(
        path,
        views,
        [_tile(props, i) for i in range(len(views))],
        f"m2ort-openslide-{file_token(path)}",
        user_mpp=user_mpp,
        meta_mpp=meta_mpp,
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
    return plausible(sum(values) / len(values), MPP_RANGE)
