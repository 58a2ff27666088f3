"""Open a whole-slide image lazily: pyramid levels as dask arrays, µm/px, region reads.

Everything downstream (spots, patches, the napari layer) asks a ``Slide`` for pixels, so
this module is the only place that knows about file formats. Two families:

* TIFF-like files (tiled/pyramidal TIFF, OME-TIFF with SubIFD or per-series levels,
  Aperio SVS, NDPI, ...) are read through tifffile's zarr store, so a read touches only
  the tiles it needs and opening a 100,000 px slide costs milliseconds.
* Flat JPEG/PNG images have no tiles: opening reads only the header; the first pixel
  request decodes the image once into a cache shared by every chunk and level, and the
  lower levels are built from it (the 1/4 and 1/8 JPEG levels come straight from
  libjpeg's DCT scaling, much cheaper than decoding everything), so the first view in
  napari does not pay for the full-resolution decode.

Every level is presented as (H, W, 3) uint8 RGB; grayscale, alpha, palette, CMYK and
16-bit data are converted per chunk as they are read. EXIF orientation is ignored on
purpose: spot coordinates in ST data refer to the stored pixels.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
import warnings
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np

from napari_m2ort.errors import M2ORTError

__all__ = [
    "DEFAULT_MPP",
    "ENV_MPP",
    "MIN_LEVEL_SIDE",
    "Slide",
    "napari_get_reader",
    "open_slide",
]

DEFAULT_MPP = 0.5
#: Environment variable read by the napari reader (npe2 readers take no options).
ENV_MPP = "NAPARI_M2ORT_MPP"
#: Synthesised pyramids stop once the largest side of a level is below this.
MIN_LEVEL_SIDE = 1024

# Dask chunk edge (px). Region reads bypass dask and slicing a level fuses into a read of
# only the tiles needed, so this only sets the graph size (2,401 chunks for 100k px).
_CHUNK = 2048
# Resolution tags outside these µm/px ranges are software defaults (72 dpi = 352.8 µm/px),
# not microscope calibrations. JPEG/PNG DPI is trusted even less.
_TIFF_MPP_RANGE = (0.01, 20.0)
_FLAT_MPP_RANGE = (0.01, 10.0)
_LEVEL_TOLERANCE = 0.01

_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".tf8", ".qptiff"}
_FLAT_SUFFIXES = {".jpg", ".jpeg", ".png"}
_READER_SUFFIXES = _TIFF_SUFFIXES | _FLAT_SUFFIXES

_UNIT_TO_UM = {
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6,
    "in": 25400.0, "inch": 25400.0,
}


class _NotASlide(M2ORTError):
    """The file is a valid image but not a 2-D RGB/gray one (z-stack, multiplex, ...).

    The napari reader declines such files so another plugin can open them.
    """


# --------------------------------------------------------------------------------------
# The Slide object
# --------------------------------------------------------------------------------------


class Slide:
    """A lazily read image pyramid with a physical pixel size.

    Attributes follow ARCHITECTURE.md. ``levels`` are dask arrays for napari and dask
    pipelines; ``read_region`` bypasses dask and reads the file directly.
    Pickling stores only the path and the user's mpp and re-opens on unpickling, so a
    Slide can be shipped to dask.distributed workers.
    """

    def __init__(
        self,
        path: Path,
        levels: list[da.Array],
        readers: list[Any],
        mpp: float,
        mpp_source: str,
        *,
        mpp_override: float | None,
        native_levels: int,
        closers: Sequence[Callable[[], None]] = (),
        fmt: str = "",
    ) -> None:
        self.path = path
        self.name = _display_name(path)
        self.mpp = float(mpp)
        self.mpp_source = mpp_source
        self.levels = levels
        self.downsamples = [levels[0].shape[1] / lv.shape[1] for lv in levels]
        self.format = fmt
        # Objects with numpy-style __getitem__ returning ndarrays, one per level; the
        # direct path for read_region.
        self._readers = readers
        # Levels [0, native_levels) exist in the file (or its decode cache); the rest
        # are computed from them with dask and are expensive to read in bulk.
        self._native_levels = native_levels
        self._mpp_override = mpp_override
        self._closers = list(closers)

    # -- geometry ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.levels[0].shape[:2])  # type: ignore[return-value]

    @property
    def size_um(self) -> tuple[float, float]:
        h, w = self.shape
        return (h * self.mpp, w * self.mpp)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [tuple(lv.shape[:2]) for lv in self.levels]  # type: ignore[misc]

    def best_level(self, downsample: float) -> int:
        """Coarsest level that is still at least as fine as ``downsample``.

        Reading from it and shrinking by the remaining factor never upsamples.
        """
        limit = float(downsample) * (1.0 + _LEVEL_TOLERANCE)
        best = 0
        for i, ds in enumerate(self.downsamples):
            if ds <= limit:
                best = i
        return best

    # -- pixels -----------------------------------------------------------------------
    def read_region(
        self, x0: int, y0: int, width: int, height: int, level: int = 0
    ) -> np.ndarray:
        """(height, width, 3) uint8 in ``level`` pixel coordinates; outside = white."""
        if not 0 <= level < len(self.levels):
            raise IndexError(f"level {level} out of range (slide has {len(self.levels)})")
        x0, y0, width, height = int(x0), int(y0), int(width), int(height)
        if width < 0 or height < 0:
            raise ValueError(f"negative region size {width}x{height}")
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        lh, lw = self.levels[level].shape[:2]
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + width, lw), min(y0 + height, lh)
        if xa < xb and ya < yb:
            data = np.asarray(self._readers[level][ya:yb, xa:xb])
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = data[..., :3]
        return out

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """Whole slide fitting in ``max_px``; returns (image, level-0 px per thumbnail px)."""
        max_px = max(int(max_px), 1)
        index = len(self.levels) - 1
        for i in range(len(self.levels) - 1, -1, -1):
            if max(self.levels[i].shape[:2]) >= max_px:
                index = i
                break
        h, w = self.levels[index].shape[:2]
        image = self.read_region(0, 0, w, h, index)
        scale = max_px / max(h, w)
        if scale < 1.0:
            from PIL import Image

            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
        return image, self.shape[1] / image.shape[1]

    # -- napari -----------------------------------------------------------------------
    def layer_data(self) -> list[tuple]:
        """napari LayerData: the pyramid in µm (scale = mpp), no contrast computation."""
        multiscale = len(self.levels) > 1
        kwargs: dict[str, Any] = {
            "name": self.name,
            "rgb": True,
            "multiscale": multiscale,
            "scale": (self.mpp, self.mpp),
            "contrast_limits": (0, 255),
            "metadata": {
                "mpp": self.mpp,
                "mpp_source": self.mpp_source,
                "path": str(self.path),
            },
        }
        if _napari_has_units():
            kwargs["units"] = ("µm", "µm")
        data = list(self.levels) if multiscale else self.levels[0]
        return [(data, kwargs, "image")]

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Release file handles and decode caches (a later read re-opens the file)."""
        for close in self._closers:
            close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "mpp": self._mpp_override}

    def __setstate__(self, state: dict) -> None:
        fresh = _open(Path(state["path"]), state["mpp"], quiet=True)
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        h, w = self.shape
        return (
            f"Slide({str(self.path)!r}, {w}x{h} px, {len(self.levels)} levels, "
            f"{self.mpp:g} µm/px [{self.mpp_source}])"
        )


# --------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a slide lazily; raise M2ORTError with an actionable message if we can't.

    ``mpp`` (µm per level-0 pixel) overrides the file's metadata. Without either, the
    slide gets ``DEFAULT_MPP`` and one warning saying how to set it.
    """
    return _open(Path(os.fspath(path)).expanduser(), mpp)


def _open(path: Path, mpp: float | None, *, quiet: bool = False) -> Slide:
    mpp = _check_user_mpp(mpp, path)
    if not path.exists():
        raise M2ORTError(
            f"Slide file '{path}' does not exist. Check the path for typos, or that the "
            "drive holding it is mounted."
        )
    if path.is_dir():
        raise M2ORTError(
            f"'{path}' is a folder, not an image file. Choose the slide file itself "
            "(.svs, .tif, .ome.tif, .jpg, .png)."
        )
    kind = _sniff(path)
    if kind == "tiff":
        slide = _open_tiff(path, mpp)
    elif kind == "flat":
        slide = _open_flat(path, mpp)
    else:
        raise M2ORTError(
            f"'{path}' is not a TIFF, JPEG or PNG image (unrecognised file header). "
            "Export the slide as OME-TIFF, TIFF, JPEG or PNG and open that."
        )
    if slide.mpp_source == "default" and not quiet:
        warnings.warn(
            f"'{path}' has no pixel-size metadata; assuming {DEFAULT_MPP} µm/px. If that "
            f"is wrong, pass mpp= to open_slide (--mpp on the command line, or set "
            f"{ENV_MPP} before opening it in napari).",
            UserWarning,
            stacklevel=3,
        )
    return slide


def _check_user_mpp(mpp: float | None, path: Path) -> float | None:
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise M2ORTError(
            f"Pixel size {mpp!r} given for '{path}' is not a positive number of µm per "
            "pixel. Use a value like 0.5 (40x scan) or 0.25 (also 40x) / 1.0 (10x)."
        )
    return value


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise M2ORTError(
            f"Cannot read '{path}': {exc.strerror or exc}. Check the file's permissions."
        ) from exc
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n":
        return "flat"
    if path.suffix.lower() in _FLAT_SUFFIXES | {".bmp", ".webp"}:
        return "flat"  # let Pillow give its own error below
    return "unknown"


def _display_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.btf"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def _resolve_mpp(
    user: float | None, meta: float | None
) -> tuple[float, str]:
    if user is not None:
        return user, "user"
    if meta is not None:
        return meta, "metadata"
    return DEFAULT_MPP, "default"


def _plausible(mpp: float | None, limits: tuple[float, float]) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    return mpp if limits[0] <= mpp <= limits[1] else None


@functools.lru_cache(maxsize=1)
def _napari_has_units() -> bool:
    """Layers accept ``units=`` since napari 0.5.0 (#6979); older ones reject it.

    Checked from the installed version so building layer data never imports napari.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(p) for p in re.findall(r"\d+", version("napari"))[:2])
    except (PackageNotFoundError, ValueError):
        return True
    return (major, minor) >= (0, 5)


# --------------------------------------------------------------------------------------
# Pixel conversion (shared by TIFF and flat images)
# --------------------------------------------------------------------------------------


class _RGBSpec:
    """How to turn raw samples (h, w, c) into RGB uint8; plain data so it pickles."""

    def __init__(
        self,
        *,
        hi: float | None = None,
        alpha: str | None = None,
        invert: bool = False,
        cmyk: bool = False,
        lut: np.ndarray | None = None,
    ) -> None:
        self.hi = hi  # value mapped to 255 for non-uint8 data
        self.alpha = alpha  # None | "straight" | "premultiplied"
        self.invert = invert  # MinIsWhite grayscale
        self.cmyk = cmyk
        self.lut = lut  # (N, 3) uint8 palette


def _to_rgb8(a: np.ndarray, spec: _RGBSpec) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    if spec.lut is not None:
        index = np.clip(a[:, :, 0], 0, len(spec.lut) - 1)
        return spec.lut[index]
    if a.dtype != np.uint8:
        a = _scale_to_uint8(a, spec.hi)
    if spec.cmyk and a.shape[2] >= 4:
        white = 255 - a[:, :, 3:4].astype(np.uint16)
        rgb = (255 - a[:, :, :3].astype(np.uint16)) * white
        return ((rgb + 127) // 255).astype(np.uint8)
    channels = a.shape[2]
    if spec.alpha and channels in (2, 4):
        color = a[:, :, : channels - 1].astype(np.uint16)
        alpha = a[:, :, channels - 1 :].astype(np.uint16)
        if spec.alpha == "premultiplied":
            mixed = np.minimum(color + (255 - alpha), 255)
        else:
            mixed = (color * alpha + 255 * (255 - alpha) + 127) // 255
        a = mixed.astype(np.uint8)
        channels -= 1
    if spec.invert:
        a = 255 - a
    if channels < 3:
        return np.repeat(a[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def _scale_to_uint8(a: np.ndarray, hi: float | None) -> np.ndarray:
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    hi = float(hi) if hi else _bit_ceiling(a)
    scaled = a.astype(np.float32) * np.float32(255.0 / hi) + np.float32(0.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _bit_ceiling(a: np.ndarray) -> float:
    """The full-scale value of the data: 4095 for 12-bit in uint16, 1.0 for [0,1] floats.

    Chosen once per slide (from its smallest level) so chunks are scaled alike without
    stretching the contrast.
    """
    if a.size == 0:
        return 255.0
    top = float(np.nanmax(a)) if a.dtype.kind == "f" else float(a.max())
    if a.dtype.kind == "f":
        if top <= 1.0:
            return 1.0
        return 255.0 if top <= 255.0 else top
    for bits in (8, 10, 12, 14, 16, 24, 32):
        if top <= 2**bits - 1:
            return float(2**bits - 1)
    return top


def _half_np(a: np.ndarray) -> np.ndarray:
    """2x area downsample, rounding half up, edge-padded to even size.

    Works in bands of rows with strided adds into a reused uint16 buffer: a 92 MP
    image takes a fraction of a second and little extra memory.
    """
    h, w, c = a.shape
    oh, ow = (h + 1) // 2, (w + 1) // 2
    out = np.empty((oh, ow, c), dtype=np.uint8)
    band = 256
    acc = np.empty((min(band, oh), ow, c), dtype=np.uint16)
    for r0 in range(0, oh, band):
        r1 = min(oh, r0 + band)
        n = r1 - r0
        src = a[2 * r0 : 2 * r1]
        if src.shape[0] < 2 * n or w % 2:
            src = np.pad(src, ((0, 2 * n - src.shape[0]), (0, w % 2), (0, 0)), mode="edge")
        s = acc[:n]
        np.add(src[0::2, 0::2], src[1::2, 0::2], out=s, dtype=np.uint16)
        s += src[0::2, 1::2]
        s += src[1::2, 1::2]
        s += 2
        s >>= 2
        out[r0:r1] = s
    return out


def _half_dask(d: da.Array) -> da.Array:
    """``_half_np`` per chunk, lazily, for files without (enough of) a pyramid.

    Each output chunk depends on exactly one input chunk, so the graph stays one
    blockwise layer per level (fast to build, culls to what a view needs) and chunk
    sizes halve level by level. Interior chunks must be even for chunk-wise halving to
    equal whole-image halving, hence the occasional rechunk.
    """
    ys, xs = d.chunks[0], d.chunks[1]
    if any(c % 2 for c in ys[:-1] + xs[:-1]) or len(d.chunks[2]) != 1:
        d = d.rechunk((_even(ys[0]), _even(xs[0]), 3))
    chunks = (
        tuple((c + 1) // 2 for c in d.chunks[0]),
        tuple((c + 1) // 2 for c in d.chunks[1]),
        d.chunks[2],
    )
    meta = np.empty((0, 0, 0), np.uint8)
    return d.map_blocks(_half_np, chunks=chunks, dtype=np.uint8, meta=meta)


def _even(n: int) -> int:
    return max(2, n + (n % 2))


def _decode_error(path: Path, where: str, exc: BaseException) -> M2ORTError:
    detail = str(exc).strip() or type(exc).__name__
    return M2ORTError(
        f"Could not decode the image data in '{path}' ({where}): {detail}. The file is "
        "damaged or incomplete, or uses a compression napari-m2ort cannot read; copy it "
        "again, or re-export it from the scanner software as OME-TIFF or SVS."
    )


# --------------------------------------------------------------------------------------
# TIFF family
# --------------------------------------------------------------------------------------


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
        return z  # _open_tiff reports the odd layout
    if z.chunks[axes.index("Y")] * z.chunks[axes.index("X")] <= _BIG_CHUNK_PX:
        return z
    try:
        import tifffile

        mm = tifffile.memmap(path, series=s, level=lv, mode="r")
        if tuple(mm.shape) == tuple(z.shape):
            return _Blocked(mm, z.chunks)
    except Exception:  # compressed or scattered data: not mappable
        pass
    return _Blocked(_WholeLevel(z), z.chunks)


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

    def __init__(self, path: Path, selection: list[tuple[int, int]], tif: Any = None):
        self.path = path
        self.selection = selection
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
                self._arrays = [
                    _level_array(self.path, series[s], s, lv) for s, lv in self.selection
                ]
            return self._arrays

    def close(self) -> None:
        with self._lock:
            self._arrays = None
            if self._tif is not None:
                self._tif.close()
                self._tif = None

    def __reduce__(self):
        return (_TiffSource, (self.path, self.selection))


class _TiffLevel:
    """One level as an (H, W, 3) uint8 array-like; the channel order is fixed up per read."""

    def __init__(
        self,
        source: _TiffSource,
        index: int,
        axes: str,
        shape: tuple[int, ...],
        spec: _RGBSpec,
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
        for ax, n in zip(self.axes, self.raw_shape):
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
            raise _decode_error(self.source.path, f"level {self.index}", exc) from exc
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
        rgb = _to_rgb8(self.raw(ys, xs), self.spec)
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
        raise _NotASlide(
            f"'{path}' does not hold a 2-D image (axes {axes!r}); napari-m2ort reads "
            "2-D RGB or grayscale slides."
        )
    extra = [
        f"{n} {ax}"
        for ax, n in zip(axes, shape)
        if ax not in "YXSC" and n > 1
    ]
    channels = [n for ax, n in zip(axes, shape) if ax in "SC" and n > 1]
    if extra or len(channels) > 1 or (channels and channels[0] > 4):
        what = ", ".join(extra + [f"{n} channels" for n in channels])
        raise _NotASlide(
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


def _open_tiff(path: Path, user_mpp: float | None) -> Slide:
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
        source = _TiffSource(path, selection, tif)
        arrays = source.arrays()
        axes = series.axes
        for (s, lv), z in zip(selection, arrays):
            level = tif.series[s].levels[lv]
            if len(level.axes) != len(z.shape) or level.axes != axes:
                raise _NotASlide(
                    f"'{path}' has pyramid levels with different layouts "
                    f"({axes!r} vs {level.axes!r}); re-export it as OME-TIFF."
                )
        _check_layout(path, axes, arrays[0].shape)
        spec = _tiff_spec(keyframe, axes, arrays[0].shape)
        views = [
            _TiffLevel(source, i, axes, tuple(z.shape), spec) for i, z in enumerate(arrays)
        ]
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
            spec.hi = _bit_ceiling(sample)
        meta_mpp = _tiff_mpp(tif, si, keyframe)
    except M2ORTError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise M2ORTError(
            f"'{path}' could not be read as a slide: {exc}. It may be damaged or in an "
            "unsupported TIFF variant; re-export it as OME-TIFF."
        ) from exc

    token = _file_token(path)
    levels = []
    for i, (view, z) in enumerate(zip(views, arrays)):
        th, tw = _tile_yx(z, axes)
        levels.append(
            da.from_array(
                view,
                chunks=_chunks(view.shape, th, tw),
                name=f"m2ort-tiff-{token}-{i}",
                asarray=False,
                fancy=False,
                meta=np.empty((0, 0, 0), dtype=np.uint8),
            )
        )
    readers: list[Any] = list(views)
    native = len(levels)
    _extend_pyramid(levels, readers)
    mpp, mpp_source = _resolve_mpp(user_mpp, meta_mpp)
    return Slide(
        path,
        levels,
        readers,
        mpp,
        mpp_source,
        mpp_override=user_mpp,
        native_levels=native,
        closers=[source.close],
        fmt="svs" if getattr(tif, "is_svs", False) else ("ome-tiff" if tif.is_ome else "tiff"),
    )


def _extend_pyramid(levels: list[da.Array], readers: list[Any]) -> None:
    """Add lazily averaged levels below the file's smallest one (napari's overview).

    Chunks halve with each level (16 px at 1/128 of a 2048-chunked level): many small
    tasks, but each depends on one chunk above, so any view reads only what it covers.
    Still, the overview of a big file without a pyramid needs every level-0 pixel once:
    such files should be converted (napari-m2ort convert).
    """
    while max(levels[-1].shape[:2]) >= MIN_LEVEL_SIDE:
        half = _half_dask(levels[-1])
        levels.append(half)
        readers.append(half)


def _tile_yx(z: Any, axes: str) -> tuple[int, int]:
    chunks = z.chunks
    return int(chunks[axes.index("Y")]), int(chunks[axes.index("X")])


def _chunks(shape: Sequence[int], th: int, tw: int) -> tuple[int, int, int]:
    """Dask chunks aligned to whole tiles, about _CHUNK² px each (strips: by area)."""
    h, w = shape[0], shape[1]
    cw = min(w, tw * max(1, _CHUNK // max(tw, 1)))
    rows = max(1, (_CHUNK * _CHUNK) // max(cw, 1) // max(th, 1))
    ch = min(h, th * rows)
    return (max(ch, 1), max(cw, 1), 3)


def _tiff_spec(keyframe: Any, axes: str, shape: Sequence[int]) -> _RGBSpec:
    channel = _channel_axis(axes, shape)
    n = shape[axes.index(channel)] if channel else 1
    photometric = int(getattr(keyframe, "photometric", 2))
    if photometric == 3 and getattr(keyframe, "colormap", None) is not None:
        cmap = np.asarray(keyframe.colormap)
        if cmap.ndim == 2 and cmap.shape[0] == 3:
            cmap = cmap.T
        if cmap.max() > 255:
            cmap = cmap >> 8
        return _RGBSpec(lut=np.ascontiguousarray(cmap[:, :3]).astype(np.uint8))
    if photometric == 5 and n >= 4:
        return _RGBSpec(cmyk=True)
    alpha = None
    if n in (2, 4):
        extras = tuple(getattr(keyframe, "extrasamples", ()) or ())
        alpha = "premultiplied" if extras[:1] == (1,) else "straight"
    return _RGBSpec(alpha=alpha, invert=photometric == 0 and n < 3)


def _tiff_mpp(tif: Any, si: int, keyframe: Any) -> float | None:
    """µm/px from OME, Aperio, ImageJ or resolution tags, in that order of trust."""
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata, si)
        if mpp is not None:
            return mpp
    description = getattr(tif.pages[0], "description", "") or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.]+(?:[eE][-+]?\d+)?)", description)
    if match:
        mpp = _plausible(float(match.group(1)), _TIFF_MPP_RANGE)
        if mpp is not None:
            return mpp
    tags = keyframe.tags
    xres = tags.get("XResolution")
    yres = tags.get("YResolution")
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 1
    per_px: list[float] = []
    for tag in (xres, yres):
        if tag is None:
            continue
        value = tag.value
        ppu = value[0] / value[1] if isinstance(value, tuple) and value[1] else float(value)
        if ppu > 0:
            per_px.append(1.0 / ppu)
    if not per_px:
        return None
    upp = sum(per_px) / len(per_px)  # units per pixel
    if unit == 3:
        return _plausible(upp * 1e4, _TIFF_MPP_RANGE)
    if unit == 2:
        return _plausible(upp * 25400.0, _TIFF_MPP_RANGE)
    imagej = getattr(tif, "imagej_metadata", None) or {}
    scale = _UNIT_TO_UM.get(str(imagej.get("unit", "")).replace("\\u00B5", "µ"))
    if scale is not None:
        return _plausible(upp * scale, _TIFF_MPP_RANGE)
    return None


def _ome_mpp(xml: str, si: int) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = [el for el in root if el.tag.endswith("Image")]
    if not images:
        return None
    image = images[si] if si < len(images) else images[0]
    pixels = next((el for el in image if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    values = []
    for axis in ("X", "Y"):
        raw = pixels.get(f"PhysicalSize{axis}")
        if raw is None:
            continue
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        scale = _UNIT_TO_UM.get(unit)
        try:
            if scale is not None:
                values.append(float(raw) * scale)
        except ValueError:
            continue
    if not values:
        return None
    return _plausible(sum(values) / len(values), _TIFF_MPP_RANGE)


def _file_token(path: Path) -> str:
    from dask.base import tokenize

    st = path.stat()
    return tokenize(str(path.resolve()), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------
# Flat JPEG / PNG
# --------------------------------------------------------------------------------------

_PIL_LOCK = threading.Lock()


def _pil_open(path: Path):
    """Image.open without Pillow's decompression-bomb limit (slides are big on purpose).

    The limit is a process-wide setting, so it is lifted only around the header parse.
    """
    from PIL import Image

    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _pil_to_array(im) -> tuple[np.ndarray, _RGBSpec]:
    mode = im.mode
    if mode == "1":
        im, mode = im.convert("L"), "L"
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        mode = "RGBA" if has_alpha else "RGB"
        im = im.convert(mode)
    elif mode in ("La", "RGBa"):
        mode = mode.replace("a", "A")
        im = im.convert(mode)
    elif mode not in ("L", "LA", "RGB", "RGBA", "I", "F") and not mode.startswith("I;16"):
        im, mode = im.convert("RGB"), "RGB"
    a = np.asarray(im)
    alpha = "straight" if mode in ("LA", "RGBA") else None
    hi = _bit_ceiling(a) if a.dtype != np.uint8 else None
    return a, _RGBSpec(hi=hi, alpha=alpha)


class _FlatSource:
    """Decode-once cache of a flat image's levels, shared by all dask chunks.

    Each level is computed at most once (per-level locks; coarser levels wait on finer
    ones, never the reverse, so no deadlock). Level 0 is the full decode; JPEG levels
    2-3 (1/4, 1/8) use libjpeg's DCT scaling, so the overview napari shows first costs
    ~0.2 s and a few MB instead of a full decode; the rest are 2x averages of the level
    above (level 1 too: a 1/2-scale DCT decode is slower than decode + average). Which
    method makes a level depends only on the file, so pixels never depend on the order
    in which levels were first viewed.
    """

    def __init__(self, path: Path, fmt: str, shapes: list[tuple[int, int]], token: str):
        self.path = path
        self.fmt = fmt
        self.shapes = shapes
        self.token = token
        self._cache: dict[int, np.ndarray] = {}
        self._locks = [threading.Lock() for _ in shapes]

    def level(self, k: int) -> np.ndarray:
        arr = self._cache.get(k)
        if arr is not None:
            return arr
        with self._locks[k]:
            arr = self._cache.get(k)
            if arr is None:
                try:
                    arr = self._compute(k)
                except M2ORTError:
                    raise
                except Exception as exc:
                    raise _decode_error(self.path, "full image", exc) from exc
                arr.setflags(write=False)
                self._cache[k] = arr
            return arr

    def _compute(self, k: int) -> np.ndarray:
        if k == 0:
            return self._decode_full()
        if self.fmt == "JPEG" and k in (2, 3):
            arr = self._decode_scaled(2**k)
            if arr is not None and arr.shape[:2] == self.shapes[k]:
                return arr
        return _half_np(self.level(k - 1))

    def _decode_full(self) -> np.ndarray:
        h, w = self.shapes[0]
        with _pil_open(self.path) as im:
            if self.fmt == "JPEG" and im.mode in ("RGB", "L"):
                fast = _imagecodecs_jpeg(self.path, (h, w))
                if fast is not None:
                    return _to_rgb8(fast, _RGBSpec())
            im.load()  # raises on truncated / corrupt data
            a, spec = _pil_to_array(im)
        return _to_rgb8(a, spec)

    def _decode_scaled(self, scale: int) -> np.ndarray | None:
        h, w = self.shapes[0]
        with _pil_open(self.path) as im:
            target = "L" if im.mode == "L" else "RGB"
            im.draft(target, (w // scale, h // scale))
            a, spec = _pil_to_array(im)
        return _to_rgb8(a, spec)

    def clear(self) -> None:
        self._cache.clear()

    def __reduce__(self):
        return (_flat_source_for, (str(self.path), self.fmt, self.shapes, self.token))


_FLAT_SOURCES: "weakref.WeakValueDictionary[tuple, _FlatSource]" = weakref.WeakValueDictionary()


def _flat_source_for(
    path: str, fmt: str, shapes: list[tuple[int, int]], token: str
) -> _FlatSource:
    """Slides and unpickled graphs in one process share one decode cache per file
    version (``token`` covers path, size and mtime)."""
    key = (path, token)
    source = _FLAT_SOURCES.get(key)
    if source is None:
        source = _FlatSource(Path(path), fmt, [tuple(s) for s in shapes], token)
        _FLAT_SOURCES[key] = source
    return source


def _imagecodecs_jpeg(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """libjpeg-turbo via imagecodecs: several times faster than Pillow's decode+copy."""
    try:
        import imagecodecs

        arr = imagecodecs.jpeg8_decode(path.read_bytes())
    except Exception:
        return None
    return arr if arr.shape[:2] == shape else None


class _FlatLevel:
    def __init__(self, source: _FlatSource, k: int):
        self.source = source
        self.k = k
        self.shape = (*source.shapes[k], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        # a copy: the cache is shared and read-only, callers may write to what they get
        return np.array(self.source.level(self.k)[key])


def _check_complete(path: Path, fmt: str) -> None:
    """Catch the common damage (a cut-off download) without decoding anything."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 65536))
        tail = fh.read()
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        missing = "its end-of-image marker"
    elif fmt == "PNG" and b"IEND" not in tail[-64:]:
        missing = "its IEND chunk"
    else:
        return
    raise M2ORTError(
        f"'{path}' is truncated: the {fmt} data ends without {missing} (the file is "
        f"{size:,} bytes). Copy or download it again."
    )


def _flat_shapes(h: int, w: int) -> list[tuple[int, int]]:
    shapes = [(h, w)]
    while max(shapes[-1]) >= MIN_LEVEL_SIDE:
        ph, pw = shapes[-1]
        shapes.append(((ph + 1) // 2, (pw + 1) // 2))
    return shapes


def _open_flat(path: Path, user_mpp: float | None) -> Slide:
    try:
        with _pil_open(path) as im:
            fmt = im.format or path.suffix.lstrip(".").upper()
            w, h = im.size
            dpi = im.info.get("dpi")
    except Exception as exc:
        raise M2ORTError(
            f"'{path}' could not be opened as an image: {exc}. It may be damaged or not "
            "an image; copy it again or re-save it as PNG/JPEG/TIFF."
        ) from exc
    if w < 1 or h < 1:
        raise M2ORTError(f"'{path}' is an empty image ({w}x{h} px).")
    _check_complete(path, fmt)
    meta_mpp = None
    if dpi:
        try:
            d = [float(v) for v in dpi if float(v) > 0]
            meta_mpp = _plausible(25400.0 / (sum(d) / len(d)), _FLAT_MPP_RANGE) if d else None
        except (TypeError, ValueError, ZeroDivisionError):
            meta_mpp = None
    shapes = _flat_shapes(h, w)
    token = _file_token(path)
    source = _flat_source_for(str(path), fmt, shapes, token)
    views = [_FlatLevel(source, k) for k in range(len(shapes))]
    levels = [
        da.from_array(
            v,
            chunks=(_CHUNK, _CHUNK, 3),
            name=f"m2ort-flat-{token}-{k}",
            asarray=False,
            fancy=False,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
        )
        for k, v in enumerate(views)
    ]
    mpp, mpp_source = _resolve_mpp(user_mpp, meta_mpp)
    slide = Slide(
        path,
        levels,
        list(views),
        mpp,
        mpp_source,
        mpp_override=user_mpp,
        native_levels=len(levels),
        closers=[source.clear],
        fmt=fmt.lower(),
    )
    return slide


# --------------------------------------------------------------------------------------
# napari reader
# --------------------------------------------------------------------------------------


def napari_get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]):
    """npe2 reader: whole-slide images as a lazy multiscale RGB layer in µm.

    npe2 readers take no options, so the pixel size can be forced with the environment
    variable ``NAPARI_M2ORT_MPP`` (µm per pixel, e.g. ``NAPARI_M2ORT_MPP=0.69 napari
    slide.jpg``); otherwise the file's metadata or the 0.5 µm/px default is used.
    Returns None for paths this plugin should leave to others (folders, several files,
    z-stacks, multiplexed images).
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = Path(os.fspath(path))
    if p.suffix.lower() not in _READER_SUFFIXES or p.is_dir():
        return None
    if p.is_file() and not _tiff_is_2d_image(p):
        return None
    return functools.partial(_read_layers, p)


def _read_layers(path: Path, *_: Any, **__: Any) -> list[tuple]:
    """The callable npe2 invokes as read_func(paths, stack=...); our path is bound."""
    return open_slide(path, mpp=_env_mpp()).layer_data()


def _env_mpp() -> float | None:
    raw = os.environ.get(ENV_MPP, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise M2ORTError(
            f"{ENV_MPP}={raw!r} is not a positive number of µm per pixel; set it to e.g. "
            f"0.5, or unset it to use the slide's own pixel size."
        )
    return value


def _tiff_is_2d_image(path: Path) -> bool:
    """False only for valid TIFFs that are not 2-D RGB/gray (leave them to other readers)."""
    try:
        if _sniff(path) != "tiff":
            return True
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                return True
            s = tif.series[_pick_series(tif)]
            _check_layout(path, s.axes, s.shape)
    except _NotASlide:
        return False
    except Exception:
        return True  # let open_slide report the problem in its own words
    return True
