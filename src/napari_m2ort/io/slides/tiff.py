"""TIFF family: tiled/pyramidal TIFF, OME-TIFF (SubIFD or per-series levels), Aperio SVS,
NDPI and other TIFF variants, all through tifffile's zarr store.

A read touches only the tiles it needs, so opening a 100,000 px slide costs
milliseconds. Files stored as one huge strip are memory-mapped (uncompressed) or decoded
once. Channel layout, palette, CMYK, alpha and bit depth are fixed per read by
``napari_m2ort.slide.to_rgb8``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides.base import NotASlide, Slide, decode_error, file_token
from napari_m2ort.io.slides.budget import budget_scope, check_claim, decode_budget
from napari_m2ort.io.slides.regions import tiled_slide
from napari_m2ort.io.slides.tiff_mpp import tiff_mpp
from napari_m2ort.slide import RGBSpec, bit_ceiling, to_rgb8

__all__ = ["is_2d_image", "open_tiff"]


def _zarr_store(series: Any, level: int) -> Any:
    """A zarr store over one level's tiles, across tifffile API generations."""
    if hasattr(series, "aszarr"):
        return series.aszarr(level=level)
    import inspect

    import tifffile

    parent = series.parent
    index = parent.series.index(series)
    if "return_as" in inspect.signature(tifffile.imread).parameters:  # newer API
        return tifffile.imread(parent.filehandle.path, series=index, level=level, return_as="zarr")
    return tifffile.imread(parent.filehandle.path, series=index, level=level, aszarr=True)


def _zarr_open(store: Any) -> Any:
    import zarr

    z = zarr.open(store, mode="r")
    if hasattr(z, "shape"):
        return z
    return z["0"]  # a group: tifffile exposes a single level as its first dataset


# A chunk (tile/strip) bigger than this is not worth reading through zarr chunk by chunk:
# every dask chunk would decode all of it. Typical of uncompressed single-strip exports.
_BIG_CHUNK_PX = 4096 * 4096


def _level_array(path: Path, series: Any, s: int, lv: int) -> Any:
    """The array a level is read from: a zarr array over its tiles, or for files stored
    as one huge strip, a memory map (uncompressed) or a decode-once cache."""
    z = _zarr_open(_zarr_store(series, lv))
    axes = series.levels[lv].axes
    if "Y" not in axes or "X" not in axes or len(axes) != len(z.chunks):
        return z  # open_tiff reports the odd layout
    if z.chunks[axes.index("Y")] * z.chunks[axes.index("X")] <= _BIG_CHUNK_PX:
        return z
    try:
        import tifffile

        mm = tifffile.memmap(path, series=s, level=lv, mode="r")
        if tuple(mm.shape) == tuple(z.shape):
            return _Blocked(mm, z.chunks)
    except Exception:  # compressed or scattered data: not mappable
        pass
    _check_whole_decode(path, series.levels[lv], z.shape)
    return _Blocked(_WholeLevel(z), z.chunks)


# Best compression each TIFF codec can reach (raw bytes per stored byte); codecs not
# listed (zstd, LZMA, ...) have no useful bound and only meet the memory budget.
_MAX_RATIO = {1: 1.0, 32773: 64.0, 5: 1500.0, 8: 1100.0, 32946: 1100.0, 6: 1200.0, 7: 1200.0}


def _check_whole_decode(path: Path, level: Any, shape: Sequence[int]) -> None:
    """Before a level stored as one huge strip is decoded whole: is its size believable?"""
    page = level.pages[0] if getattr(level, "pages", None) else level.keyframe
    raw = int(np.prod(shape)) * np.dtype(level.dtype).itemsize
    stored = int(sum(getattr(page, "databytecounts", ()) or ()))
    axes = level.axes
    h, w = shape[axes.index("Y")], shape[axes.index("X")]
    check_claim(
        path,
        f"a TIFF level stored as one {_codec_name(page)} strip",
        (h, w),
        stored_bytes=stored,
        raw_bytes=raw,
        max_ratio=_MAX_RATIO.get(int(getattr(page, "compression", 0))),
        peak_bytes=2 * raw,  # the decoded strip and the array it is copied into
    )


def _codec_name(page: Any) -> str:
    codec = getattr(page, "compression", 1)
    return "uncompressed" if int(codec) == 1 else f"{getattr(codec, 'name', codec)}-compressed".lower()


def _check_in_file(path: Path, tif: Any, selection: list[tuple[int, int]]) -> None:
    """A cut-off copy keeps its tile table: tiles past the end of the file fail at open,
    not one by one in the viewer."""
    size = path.stat().st_size
    for k, (s, lv) in enumerate(selection):
        level = tif.series[s].levels[lv]
        page = level.pages[0] if getattr(level, "pages", None) else level.keyframe
        offsets = np.asarray(getattr(page, "dataoffsets", ()) or (), dtype=np.int64)
        counts = np.asarray(getattr(page, "databytecounts", ()) or (), dtype=np.int64)
        if len(offsets) != len(counts) or not len(counts):
            continue
        beyond = int(((offsets + counts > size) & (counts > 0)).sum())
        if beyond:
            raise M2ORTError(
                f"'{path}' is truncated: {beyond:,} of {len(counts):,} tiles of pyramid level {k} "
                f"({beyond / len(counts):.0%} of it) lie beyond the end of the file ({size:,} bytes). "
                "Copy or download it again."
            )


class _Blocked:
    """An array with a nominal tile size, so dask chunking works as for tiled files."""

    def __init__(self, array: Any, chunks: Sequence[int]) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.chunks = tuple(min(c, 512) for c in chunks)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.array[key])


class _WholeLevel:
    """Decodes a one-chunk level once and serves slices of it."""

    def __init__(self, z: Any) -> None:
        self.z = z
        self.shape = tuple(z.shape)
        self._lock = threading.Lock()
        self._data: np.ndarray | None = None

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._data is None:
            with self._lock:
                if self._data is None:
                    self._data = np.asarray(self.z[...])
        return self._data[key]


class _TiffSource:
    """Holds the open TiffFile and one zarr array per selected level.

    Re-opens lazily after ``close`` and pickles as (path, selection), so dask graphs
    built on it survive ``Slide.close`` and can travel to other processes.
    """

    def __init__(
        self, path: Path, selection: list[tuple[int, int]], tif: Any = None, budget: int | None = None
    ) -> None:
        self.path = path
        self.selection = selection
        # The budget in force when the slide was opened, for re-opening after close.
        self.budget = decode_budget() if budget is None else budget
        self._lock = threading.Lock()
        self._tif = tif
        self._arrays: list[Any] | None = None

    def arrays(self) -> list[Any]:
        arrays = self._arrays
        if arrays is not None:
            return arrays
        with self._lock:
            if self._arrays is None:
                if self._tif is None:
                    import tifffile

                    self._tif = tifffile.TiffFile(self.path)
                series = self._tif.series
                with budget_scope(self.budget):
                    self._arrays = [_level_array(self.path, series[s], s, lv) for s, lv in self.selection]
            return self._arrays

    def close(self) -> None:
        with self._lock:
            self._arrays = None
            if self._tif is not None:
                self._tif.close()
                self._tif = None

    def __reduce__(self):
        return (_TiffSource, (self.path, self.selection, None, self.budget))


class _TiffLevel:
    """One level as an (H, W, 3) uint8 array-like; the channel order is fixed up per read."""

    def __init__(
        self,
        source: _TiffSource,
        index: int,
        axes: str,
        shape: tuple[int, ...],
        spec: RGBSpec,
    ) -> None:
        self.source = source
        self.index = index
        self.axes = axes
        self.raw_shape = shape
        self.spec = spec
        self.shape = (shape[axes.index("Y")], shape[axes.index("X")], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.channel_axis = _channel_axis(axes, shape)

    def raw(self, ys: slice, xs: slice) -> np.ndarray:
        """Raw samples (h, w, c) of a Y/X window, before RGB conversion."""
        index: list[Any] = []
        for ax in self.axes:
            if ax == "Y":
                index.append(ys)
            elif ax == "X":
                index.append(xs)
            elif ax == self.channel_axis:
                index.append(slice(None))
            else:
                index.append(0)
        try:
            data = np.asarray(self.source.arrays()[self.index][tuple(index)])
        except M2ORTError:
            raise
        except Exception as exc:
            raise decode_error(self.source.path, f"level {self.index}", exc) from exc
        kept = [ax for ax, i in zip(self.axes, index) if not isinstance(i, int)]
        order = [kept.index("Y"), kept.index("X")]
        if self.channel_axis is not None:
            order.append(kept.index(self.channel_axis))
        return np.transpose(data, order) if order != sorted(order) else data

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key[:3]
        squeeze = [isinstance(k, (int, np.integer)) for k in (ys, xs)]
        ys = slice(int(ys), int(ys) + 1) if squeeze[0] else ys
        xs = slice(int(xs), int(xs) + 1) if squeeze[1] else xs
        rgb = to_rgb8(self.raw(ys, xs), self.spec)
        if squeeze[1]:
            rgb = rgb[:, 0]
        if squeeze[0]:
            rgb = rgb[0]
        return rgb[..., cs]


def _channel_axis(axes: str, shape: Sequence[int]) -> str | None:
    for ax in ("S", "C"):
        if ax in axes and shape[axes.index(ax)] > 1:
            return ax
    return None


def _check_layout(path: Path, axes: str, shape: Sequence[int]) -> None:
    if "Y" not in axes or "X" not in axes:
        raise NotASlide(
            f"'{path}' does not hold a 2-D image (axes {axes!r}); napari-m2ort reads 2-D RGB or grayscale slides."
        )
    extra = [f"{n} {ax}" for ax, n in zip(axes, shape) if ax not in "YXSC" and n > 1]
    channels = [n for ax, n in zip(axes, shape) if ax in "SC" and n > 1]
    if extra or len(channels) > 1 or (channels and channels[0] > 4):
        what = ", ".join(extra + [f"{n} channels" for n in channels])
        raise NotASlide(
            f"'{path}' is a multi-dimensional image ({what}; axes {axes!r}), not a 2-D "
            "RGB or grayscale slide. Export a single RGB plane (e.g. with Fiji or QuPath) "
            "and open that."
        )


def _pick_series(tif: Any) -> int:
    """The main image: the largest series (SVS and OME put it first anyway)."""
    best, best_px = 0, -1
    for i, s in enumerate(tif.series):
        try:
            axes, shape = s.axes, s.shape
            px = shape[axes.index("Y")] * shape[axes.index("X")]
        except (ValueError, IndexError):
            continue
        if px > best_px:
            best, best_px = i, px
    return best


def _select_levels(tif: Any, si: int) -> list[tuple[int, int]]:
    """(series, level) pairs, finest first.

    Pyramids come as ``series.levels`` (SubIFDs, SVS, NDPI, generic reduced pages) or,
    in older OME writers, as one OME Image per resolution: accept other series that are
    strictly smaller copies with the same layout.
    """
    series = tif.series[si]
    selection = [(si, i) for i in range(len(series.levels))]
    if len(selection) > 1 or getattr(tif, "is_svs", False):
        return selection
    axes, dtype = series.axes, series.dtype
    y, x = axes.index("Y"), axes.index("X")
    h0, w0 = series.shape[y], series.shape[x]
    candidates = []
    for j, other in enumerate(tif.series):
        if j == si or other.axes != axes or other.dtype != dtype:
            continue
        h, w = other.shape[y], other.shape[x]
        if h < h0 and w < w0 and abs((w / h) - (w0 / h0)) <= 0.02 * (w0 / h0):
            candidates.append((-(h * w), j))
    last = (h0, w0)
    for _, j in sorted(candidates):
        h, w = tif.series[j].shape[y], tif.series[j].shape[x]
        if h < last[0] and w < last[1]:
            selection.append((j, 0))
            last = (h, w)
    return selection


def open_tiff(path: Path, user_mpp: float | None) -> Slide:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise M2ORTError(
            f"'{path}' could not be opened as a TIFF file: {exc}. It may be truncated or "
            "damaged; copy it again or re-export it from the scanner software."
        ) from exc
    try:
        if not tif.series:
            raise M2ORTError(f"'{path}' contains no images. Check that it is a slide scan.")
        si = _pick_series(tif)
        selection = _select_levels(tif, si)
        series = tif.series[si]
        keyframe = series.keyframe
        _check_in_file(path, tif, selection)
        source = _TiffSource(path, selection, tif)
        arrays = source.arrays()
        axes = series.axes
        for (s, lv), z in zip(selection, arrays):
            level = tif.series[s].levels[lv]
            if len(level.axes) != len(z.shape) or level.axes != axes:
                raise NotASlide(
                    f"'{path}' has pyramid levels with different layouts "
                    f"({axes!r} vs {level.axes!r}); re-export it as OME-TIFF."
                )
        _check_layout(path, axes, arrays[0].shape)
        spec = _tiff_spec(keyframe, axes, arrays[0].shape)
        views = [_TiffLevel(source, i, axes, tuple(z.shape), spec) for i, z in enumerate(arrays)]
        # Decode real tiles now so a damaged file fails at open, not in a viewer thread.
        smallest = views[-1]
        sh, sw = smallest.shape[:2]
        if sh * sw <= 2048 * 2048:
            sample = smallest.raw(slice(0, sh), slice(0, sw))
        else:
            sample = smallest.raw(slice(0, min(sh, 1024)), slice(0, min(sw, 1024)))
        th, tw = _tile_yx(arrays[0], axes)
        views[0].raw(slice(0, min(th, views[0].shape[0])), slice(0, min(tw, views[0].shape[1])))
        if sample.dtype != np.uint8 and spec.lut is None:
            spec.hi = bit_ceiling(sample)
        meta_mpp = tiff_mpp(path, tif, si, keyframe) if user_mpp is None else None
    except M2ORTError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise M2ORTError(
            f"'{path}' could not be read as a slide: {exc}. It may be damaged or in an "
            "unsupported TIFF variant; re-export it as OME-TIFF."
        ) from exc
    return tiled_slide(
        path,
        views,
        [_tile_yx(z, axes) for z in arrays],
        f"m2ort-tiff-{file_token(path)}",
        user_mpp=user_mpp,
        meta_mpp=meta_mpp,
        closers=[source.close],
        fmt="svs" if getattr(tif, "is_svs", False) else ("ome-tiff" if tif.is_ome else "tiff"),
    )


def _tile_yx(z: Any, axes: str) -> tuple[int, int]:
    chunks = z.chunks
    return int(chunks[axes.index("Y")]), int(chunks[axes.index("X")])


def _tiff_spec(keyframe: Any, axes: str, shape: Sequence[int]) -> RGBSpec:
    channel = _channel_axis(axes, shape)
    n = shape[axes.index(channel)] if channel else 1
    photometric = int(getattr(keyframe, "photometric", 2))
    if photometric == 3 and getattr(keyframe, "colormap", None) is not None:
        cmap = np.asarray(keyframe.colormap)
        if cmap.ndim == 2 and cmap.shape[0] == 3:
            cmap = cmap.T
        if cmap.max() > 255:
            cmap = cmap >> 8
        return RGBSpec(lut=np.ascontiguousarray(cmap[:, :3]).astype(np.uint8))
    if photometric == 5 and n >= 4:
        return RGBSpec(cmyk=True)
    alpha = None
    if n in (2, 4):
        extras = tuple(getattr(keyframe, "extrasamples", ()) or ())
        alpha = "premultiplied" if extras[:1] == (1,) else "straight"
    return RGBSpec(alpha=alpha, invert=photometric == 0 and n < 3)


def is_2d_image(path: Path) -> bool:
    """False only for valid TIFFs that are not 2-D RGB/gray (leave them to other readers)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                return True
            s = tif.series[_pick_series(tif)]
            _check_layout(path, s.axes, s.shape)
    except NotASlide:
        return False
    except Exception:
        return True  # let open_slide report the problem in its own words
    return True
