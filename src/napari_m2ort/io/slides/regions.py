"""Pyramid levels of libraries that only answer "give me this rectangle" (OpenSlide, wsidicom),
and the tile-aligned dask chunking every tiled backend (tifffile too) shares.

tifffile exposes a level's tiles as a zarr array; OpenSlide and wsidicom instead read a
region of a level into an image. ``RegionSource`` holds such a library's open handle the
way dask needs it (opened once across threads, re-opened after ``Slide.close``, pickled
as its path), ``RegionLevel`` turns its region call into the numpy-style ``__getitem__``
that ``Slide.read_region`` and dask use, and ``lazy_level`` chunks a level along the
file's tiles, so napari decodes only the tiles in view and a region read touches only
the tiles it covers. ``tiled_slide`` makes the Slide of such levels, for all three.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides.base import Slide, decode_error
from napari_m2ort.io.slides.pyramid import CHUNK, extend_pyramid
from napari_m2ort.slide import resolve_mpp

__all__ = ["LevelReader", "RegionLevel", "RegionSource", "lazy_level", "tile_chunks", "tiled_slide"]

#: Reads (x, y, width, height) of one level, in that level's pixels and inside it, as
#: (height, width, 3) uint8. Must pickle (a bound method of a source that re-opens).
ReadRegion = Callable[[int, int, int, int], np.ndarray]


class RegionSource:
    """A slide library's open handle, shared by the reads of every level.

    Subclasses say how to open the handle (``open``) and read a region with it
    (``read_with``). The handle opens once however many threads ask, re-opens lazily
    after ``close``, and the source pickles as its path, so dask graphs built on it
    survive ``Slide.close`` and can travel to other processes.
    """

    def __init__(self, path: Path, handle: Any = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._handle = handle

    def open(self) -> Any:
        raise NotImplementedError

    def read_with(self, handle: Any, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError

    def handle(self) -> Any:
        handle = self._handle
        if handle is not None:
            return handle
        with self._lock:
            if self._handle is None:
                self._handle = self.open()
            return self._handle

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 at pixel (x, y) of pyramid level number ``level``;
        a codec's exception becomes an M2ORTError saying what the user can do."""
        try:
            return self.read_with(self.handle(), level, x, y, width, height)
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
        return (type(self), (self.path,))


class LevelReader:
    """A picklable ``ReadRegion`` for one level of a ``RegionSource`` (a lambda would not pickle)."""

    def __init__(self, source: RegionSource, level: int) -> None:
        self.source, self.level = source, level

    def __call__(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self.source.read(self.level, x, y, width, height)


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


def tile_chunks(shape: Sequence[int], th: int, tw: int) -> tuple[int, int, int]:
    """Dask chunks aligned to whole tiles, about CHUNK² px each (strips: by area)."""
    h, w = shape[0], shape[1]
    cw = min(w, tw * max(1, CHUNK // max(tw, 1)))
    rows = max(1, (CHUNK * CHUNK) // max(cw, 1) // max(th, 1))
    ch = min(h, th * rows)
    return (max(ch, 1), max(cw, 1), 3)


def lazy_level(view: Any, tile: tuple[int, int], name: str) -> da.Array:
    """``view`` (an (H, W, 3) uint8 array-like) as a dask array whose chunks are whole
    tiles (``tile`` = (height, width)).

    ``name`` must identify the file version and the level, so dask never confuses the
    chunks of two slides or of an edited file.
    """
    th, tw = max(int(tile[0]), 1), max(int(tile[1]), 1)
    return da.from_array(
        view,
        chunks=tile_chunks(view.shape, th, tw),
        name=name,
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )


def tiled_slide(
    path: Path,
    views: Sequence[Any],
    tiles: Sequence[tuple[int, int]],
    name: str,
    *,
    user_mpp: float | None,
    meta_mpp: float | None,
    closers: Sequence[Callable[[], None]],
    fmt: str,
) -> Slide:
    """The Slide over the levels a tiled file stores (finest first; ``views`` are their
    (H, W, 3) readers, ``tiles`` their tile (height, width)): lazy levels chunked along
    the tiles and named ``{name}-{level}``, levels computed below them down to
    ``MIN_LEVEL_SIDE``, and µm/px from the user, else the file, else the default."""
    levels = [lazy_level(v, tile, f"{name}-{i}") for i, (v, tile) in enumerate(zip(views, tiles))]
    readers = list(views)
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
        closers=closers,
        fmt=fmt,
    )
