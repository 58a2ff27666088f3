"""The slide contract and the pixel/µm rules every slide implementation shares.

Spots, patches, inference, the tissue mask and the widgets only ever talk to a slide
through ``SlideLike``: a file opened by ``io.slides.open_slide`` and an in-memory napari
layer wrapped by ``io.slides.layer.LayerSlide`` both satisfy it. The rules that must not
differ between them live here once: which pyramid level serves a magnification, how
non-uint8 pixels become uint8 RGB, what an acceptable µm/px is and what is assumed when
none is known, and which file suffixes are TIFF-like.

Nothing here imports napari, Qt, dask or tifffile.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import numpy as np

from napari_m2ort.errors import M2ORTError

__all__ = [
    "DEFAULT_MPP",
    "FLAT_SUFFIXES",
    "LEVEL_TOLERANCE",
    "MPP_RANGE",
    "OME_SUFFIXES",
    "RGBSpec",
    "SlideLike",
    "TIFF_SUFFIXES",
    "bit_ceiling",
    "choose_level",
    "open_image",
    "padded_region",
    "pillow_unlimited",
    "resolve_mpp",
    "thumbnail",
    "to_rgb8",
    "validate_mpp",
]

#: µm per level-0 pixel assumed when neither the user nor the file says (a 20x scan).
DEFAULT_MPP = 0.5

#: A level whose downsample exceeds the wanted one by at most this fraction still serves
#: it: pyramids written with rounded level sizes (e.g. 4.0003) must not fall back to a
#: level 4x finer, and a 1 % upsampling is invisible.
LEVEL_TOLERANCE = 0.01

#: Files read through tifffile (tiled/pyramidal TIFF, OME-TIFF, SVS, NDPI, ...).
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".tf8", ".qptiff"})
#: OME-TIFF names (the whole suffix is the format; the slide's name is what precedes it).
OME_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.btf")
#: Flat images decoded whole by Pillow/libjpeg.
FLAT_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


@runtime_checkable
class SlideLike(Protocol):
    """What the rest of the package may ask of a slide.

    Coordinates of ``read_region`` are pixels of ``level``; everything else downstream is
    in µm, converted with ``mpp`` (µm per level-0 pixel) and ``downsamples``.
    """

    @property
    def path(self) -> Any: ...  # pathlib.Path; a "<layer name>" placeholder for layers

    @property
    def name(self) -> str: ...

    @property
    def mpp(self) -> float: ...

    @property
    def mpp_source(self) -> str: ...  # "user" | "metadata" | "default"

    @property
    def levels(self) -> Sequence[Any]: ...  # (H, W, 3) array-likes, finest first

    @property
    def downsamples(self) -> Sequence[float]: ...  # level-0 px per level px

    @property
    def shape(self) -> tuple[int, int]: ...  # level-0 (H, W) px

    @property
    def size_um(self) -> tuple[float, float]: ...

    def best_level(self, downsample: float) -> int: ...

    def read_region(self, x0: int, y0: int, width: int, height: int, level: int = 0) -> np.ndarray: ...

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------ levels


def choose_level(downsamples: Sequence[float], downsample: float) -> int:
    """Coarsest level that is still at least as fine as ``downsample`` (within tolerance).

    Reading from it and shrinking by the remaining factor never upsamples noticeably.
    """
    limit = float(downsample) * (1.0 + LEVEL_TOLERANCE)
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= limit:
            best = i
    return best


def padded_region(
    level: Any, x0: int, y0: int, width: int, height: int, convert: Callable[[Any], np.ndarray]
) -> np.ndarray:
    """(height, width, 3) uint8 of ``level`` (any array-like) with white outside it.

    ``convert`` turns the in-bounds window into uint8 RGB; spots at the slide's edge get
    the white of empty glass rather than an error.
    """
    x0, y0, width, height = int(x0), int(y0), int(width), int(height)
    if width < 0 or height < 0:
        raise ValueError(f"negative region size {width}x{height}")
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    lh, lw = level.shape[:2]
    xa, ya = max(x0, 0), max(y0, 0)
    xb, yb = min(x0 + width, lw), min(y0 + height, lh)
    if xa < xb and ya < yb:
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = convert(level[ya:yb, xa:xb])
    return out


def thumbnail(slide: SlideLike, max_px: int = 1024) -> tuple[np.ndarray, float]:
    """Whole slide fitting in ``max_px``; returns (image, level-0 px per thumbnail px).

    Reads the coarsest level that is still at least ``max_px`` on its long side and
    box-filters it down, so the result does not depend on the pyramid's step sizes.
    """
    max_px = max(int(max_px), 1)
    levels = slide.levels
    index = len(levels) - 1
    for i in range(len(levels) - 1, -1, -1):
        if max(levels[i].shape[:2]) >= max_px:
            index = i
            break
    h, w = levels[index].shape[:2]
    image = slide.read_region(0, 0, w, h, index)
    scale = max_px / max(h, w)
    if scale < 1.0:
        from PIL import Image

        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    return image, slide.shape[1] / image.shape[1]


# ------------------------------------------------------------------------------ pixels


class RGBSpec:
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
        self.hi = hi  # value mapped to 255 for non-uint8 data (None: from the data)
        self.alpha = alpha  # None | "straight" | "premultiplied"
        self.invert = invert  # MinIsWhite grayscale
        self.cmyk = cmyk
        self.lut = lut  # (N, 3) uint8 palette


def to_rgb8(a: np.ndarray, spec: RGBSpec | None = None) -> np.ndarray:
    """Raw samples (h, w) or (h, w, c) -> (h, w, 3) uint8: the one conversion rule.

    Gray is repeated, alpha is composited over white (glass), non-uint8 data are scaled
    by ``spec.hi`` (see ``bit_ceiling``), never stretched to their own maximum.
    """
    spec = spec or RGBSpec()
    a = np.asarray(a)
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
    hi = float(hi) if hi else bit_ceiling(a)
    scaled = a.astype(np.float32) * np.float32(255.0 / hi) + np.float32(0.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def bit_ceiling(a: np.ndarray) -> float:
    """The full-scale value of the data: 4095 for 12-bit in uint16, 1.0 for [0,1] floats.

    Chosen once per slide (from a small level) so chunks are scaled alike without
    stretching the contrast.
    """
    a = np.asarray(a)
    if a.size == 0:
        return 255.0
    top = float(np.nanmax(a)) if a.dtype.kind == "f" else float(a.max())
    if a.dtype.kind == "f":
        if not math.isfinite(top) or top <= 1.0:
            return 1.0
        return 255.0 if top <= 255.0 else top
    for bits in (8, 10, 12, 14, 16, 24, 32):
        if top <= 2**bits - 1:
            return float(2**bits - 1)
    return top


# ------------------------------------------------------------------------------ µm/px

#: µm/px a slide's metadata may believably state (0.01 to 20): a value outside it is a
#: software default (72 dpi = 352.8 µm/px), not a microscope calibration, and counts as
#: no metadata. Applies to TIFF tags, OpenSlide's and DICOM's pixel spacing alike.
MPP_RANGE = (0.01, 20.0)


def validate_mpp(value: Any, where: str) -> float:
    """``value`` as a positive, finite µm/px, or an M2ORTError naming ``where`` it came from.

    The single check for every pixel size a person gives (function argument, ``--mpp``,
    environment variable, widget field, layer metadata).
    """
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = float("nan")
    if not math.isfinite(mpp) or mpp <= 0:
        raise M2ORTError(
            f"{where}: {value!r} is not a positive number of µm per pixel. Use the "
            "scanner's value, e.g. 0.25 (40x scan), 0.5 (20x) or 1.0 (10x)."
        )
    return mpp


def resolve_mpp(user: float | None, meta: float | None) -> tuple[float, str]:
    """(µm/px, where it came from): the user's value, else the file's, else the default."""
    if user is not None:
        return float(user), "user"
    if meta is not None:
        return float(meta), "metadata"
    return DEFAULT_MPP, "default"


# ------------------------------------------------------------------------------ Pillow

_PIL_LOCK = threading.Lock()


@contextmanager
def pillow_unlimited() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit for the duration of the block, under a lock.

    Slides are big on purpose, but the limit is a process-wide setting protecting other
    code (napari, other plugins) from hostile images, so it is never switched off for
    good. Keep the block short (a header parse): other callers wait on the lock.
    """
    from PIL import Image

    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def open_image(path: Any):
    """``PIL.Image.open`` for slide-sized images (the bomb check happens at open only)."""
    from PIL import Image

    with pillow_unlimited():
        return Image.open(path)
