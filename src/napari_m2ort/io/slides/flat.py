"""Flat JPEG/PNG images: no tiles, so the image is decoded once and shared.

Opening reads the header and checks the file's bytes (``flat_checks``: size claim, PNG
CRCs, JPEG marker structure) without decoding. The first pixel request verifies the
JPEG data with a 1/8-scale decode, then decodes the image once into a cache shared by
every chunk and level; the lower levels are built from it (the 1/4 and 1/8 JPEG levels
come straight from libjpeg's DCT scaling, much cheaper than decoding everything), so the
first view in napari does not pay for the full-resolution decode. A file found damaged
raises the same M2ORTError on every later read, without decoding again.
EXIF orientation is ignored on purpose: spot coordinates in ST data refer to the stored
pixels.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides.base import Slide, decode_error, file_token, plausible
from napari_m2ort.io.slides.budget import check_claim
from napari_m2ort.io.slides.flat_checks import JpegInfo, check_jpeg, check_png, verify_jpeg
from napari_m2ort.io.slides.pyramid import CHUNK, half_np, level_shapes
from napari_m2ort.slide import RGBSpec, bit_ceiling, open_image, resolve_mpp, to_rgb8

__all__ = ["open_flat"]

# JPEG/PNG DPI is trusted even less than TIFF resolution tags: most are software defaults.
_FLAT_MPP_RANGE = (0.01, 10.0)


def _pil_to_array(im) -> tuple[np.ndarray, RGBSpec]:
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
    hi = bit_ceiling(a) if a.dtype != np.uint8 else None
    return a, RGBSpec(hi=hi, alpha=alpha)


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

    def __init__(self, path: Path, fmt: str, shapes: list[tuple[int, int]], token: str, jpeg: JpegInfo | None):
        self.path = path
        self.fmt = fmt
        self.shapes = shapes
        self.token = token
        self.jpeg = jpeg
        self._cache: dict[int, np.ndarray] = {}
        self._locks = [threading.Lock() for _ in shapes]
        self._verify_lock = threading.Lock()
        self._verified = jpeg is None  # PNG CRCs were checked at open; zlib errors raise
        self._failure: M2ORTError | None = None

    def verify(self) -> None:
        """Check the JPEG data with a 1/8-scale decode (kept as that level), once."""
        if self._verified:
            return
        with self._verify_lock:
            if self._failure is not None:
                raise self._failure
            if self._verified:
                return
            try:
                small, mode = verify_jpeg(self.path, self.jpeg)
            except Exception as exc:
                error = exc if isinstance(exc, M2ORTError) else decode_error(self.path, "1/8-scale check", exc)
                # Kept without its traceback, whose frames would keep decoded pixels alive.
                self._failure = M2ORTError(str(error))
                raise error from None
            if len(self.shapes) > 3 and small.shape[:2] == self.shapes[3] and mode in ("RGB", "L"):
                arr = to_rgb8(small, RGBSpec())
                arr.setflags(write=False)
                self._cache[3] = arr
            self._verified = True

    def level(self, k: int) -> np.ndarray:
        arr = self._cache.get(k)
        if arr is not None:
            return arr
        self.verify()
        with self._locks[k]:
            arr = self._cache.get(k)
            if arr is None:
                try:
                    arr = self._compute(k)
                except M2ORTError:
                    raise
                except Exception as exc:
                    raise decode_error(self.path, "full image", exc) from exc
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
        return half_np(self.level(k - 1))

    def _decode_full(self) -> np.ndarray:
        h, w = self.shapes[0]
        with open_image(self.path) as im:
            if self.fmt == "JPEG" and im.mode in ("RGB", "L"):
                fast = _imagecodecs_jpeg(self.path, (h, w))
                if fast is not None:
                    return to_rgb8(fast, RGBSpec())
            im.load()  # raises on truncated / corrupt data
            a, spec = _pil_to_array(im)
        return to_rgb8(a, spec)

    def _decode_scaled(self, scale: int) -> np.ndarray | None:
        h, w = self.shapes[0]
        with open_image(self.path) as im:
            target = "L" if im.mode == "L" else "RGB"
            im.draft(target, (w // scale, h // scale))
            a, spec = _pil_to_array(im)
        return to_rgb8(a, spec)

    def clear(self) -> None:
        self._cache.clear()

    def __reduce__(self):
        return (_flat_source_for, (str(self.path), self.fmt, self.shapes, self.token, self.jpeg))


_FLAT_SOURCES: weakref.WeakValueDictionary[tuple, _FlatSource] = weakref.WeakValueDictionary()


def _flat_source_for(
    path: str, fmt: str, shapes: list[tuple[int, int]], token: str, jpeg: JpegInfo | None = None
) -> _FlatSource:
    """Slides and unpickled graphs in one process share one decode cache per file
    version (``token`` covers path, size and mtime)."""
    key = (path, token)
    source = _FLAT_SOURCES.get(key)
    if source is None:
        source = _FlatSource(Path(path), fmt, [tuple(s) for s in shapes], token, jpeg)
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


def _check_bytes(path: Path, fmt: str, shape: tuple[int, int]) -> JpegInfo | None:
    """The checks from the file's bytes (see flat_checks); the JPEG's markers for later."""
    if fmt == "JPEG":
        return check_jpeg(path)
    if fmt == "PNG":
        check_png(path)
        return None
    # Other formats Pillow reads (BMP, WebP, ...): only the memory budget.
    px = shape[0] * shape[1]
    check_claim(
        path, fmt, shape, stored_bytes=path.stat().st_size, raw_bytes=px * 3, max_ratio=None, peak_bytes=px * 11
    )
    return None


def open_flat(path: Path, user_mpp: float | None) -> Slide:
    try:
        with open_image(path) as im:
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
    jpeg = _check_bytes(path, fmt, (h, w))
    meta_mpp = None
    if dpi:
        try:
            d = [float(v) for v in dpi if float(v) > 0]
            meta_mpp = plausible(25400.0 / (sum(d) / len(d)), _FLAT_MPP_RANGE) if d else None
        except (TypeError, ValueError, ZeroDivisionError):
            meta_mpp = None
    shapes = level_shapes(h, w)
    token = file_token(path)
    source = _flat_source_for(str(path), fmt, shapes, token, jpeg)
    views = [_FlatLevel(source, k) for k in range(len(shapes))]
    levels = [
        da.from_array(
            v,
            chunks=(CHUNK, CHUNK, 3),
            name=f"m2ort-flat-{token}-{k}",
            asarray=False,
            fancy=False,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
        )
        for k, v in enumerate(views)
    ]
    mpp, mpp_source = resolve_mpp(user_mpp, meta_mpp)
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
        verify=source.verify if jpeg is not None else lambda: source.level(len(shapes) - 1),
    )
    return slide
