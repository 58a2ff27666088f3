"""Pyramid levels of libraries that only answer "give me this rectangle" (OpenSlide, wsidicom).

tifffile exposes a level's tiles as a zarr array; OpenSlide and wsidicom instead read a
region of a level into an image. ``RegionLevel`` turns such a call into the numpy-style
``__getitem__`` that ``Slide.read_region`` and dask use, and ``lazy_level`` chunks it
along the file's tiles, so napari decodes only the tiles in view and a region read
touches only the tiles it covers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np

from napari_m2ort.io.slides.tiff import _chunks

__all__ = ["RegionLevel", "lazy_level"]

#: Reads (x, y, width, height) of one level, in that level's pixels and inside it, as
#: (height, width, 3) uint8. Must pickle (a bound method of a source that re-opens).
ReadRegion = Callable[[int, int, int, int], np.ndarray]


class RegionLevel:
    """One level as an (H, W, 3) uint8 array-like over a region-reading call."""

    def __init__(self, read: ReadRegion, height: int, width: int) -> None:
        self.read = read
        self.shape = (int(height), int(width), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        if len(key) != 3:
            raise IndexError(f"too many indices for a (H, W, 3) level: {key!r}")
        (y0, y1, ys, squeeze_y) = _axis(key[0], self.shape[0])
        (x0, x1, xs, squeeze_x) = _axis(key[1], self.shape[1])
        if y1 <= y0 or x1 <= x0:
            out = np.empty((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)
        else:
            out = self.read(x0, y0, x1 - x0, y1 - y0)
        out = out[::ys, ::xs]
        if squeeze_x:
            out = out[:, 0]
        if squeeze_y:
            out = out[0]
        return out[..., key[2]]


def _axis(index: Any, n: int) -> tuple[int, int, int, bool]:
    """(start, stop, step, squeeze) of one spatial index, clipped to the level like numpy."""
    if isinstance(index, (int, np.integer)):
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a level side of {n} px")
        i %= n
        return i, i + 1, 1, True
    if not isinstance(index, slice):
        raise TypeError(f"levels take integers and slices, not {type(index).__name__}")
    start, stop, step = index.indices(n)
    if step < 1:
        raise IndexError("levels are read with positive steps only")
    return start, max(start, stop), step, False


def lazy_level(view: RegionLevel, tile: tuple[int, int], name: str) -> da.Array:
    """``view`` as a dask array whose chunks are whole tiles (``tile`` = (height, width)).

    ``name`` must identify the file version and the level, so dask never confuses the
    chunks of two slides or of an edited file.
    """
    th, tw = max(int(tile[0]), 1), max(int(tile[1]), 1)
    return da.from_array(
        view,
        chunks=_chunks(view.shape, th, tw),
        name=name,
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )
