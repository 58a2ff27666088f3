"""The file-backed slide every format family returns, and what the families share.

A format module (tiff.py, flat.py, openslide_backend.py, dicom.py) turns a file into a list of
pyramid levels (dask arrays for napari) plus one direct reader per level (numpy-style
``__getitem__`` returning (h, w, 3) uint8), and hands them to ``Slide``. Everything about
geometry, region reads, thumbnails, napari layer data and pickling is here, so a new
backend only has to produce levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_m2ort.errors import M2ORTError
from napari_m2ort.slide import FLAT_SUFFIXES, OME_SUFFIXES, choose_level, padded_region, thumbnail

#: Environment variable read by the napari reader (npe2 readers take no options).
ENV_MPP = "NAPARI_M2ORT_MPP"


class NotASlide(M2ORTError):
    """The file is a valid image but not a 2-D RGB/gray one (z-stack, multiplex, ...).

    The napari reader declines such files so another plugin can open them.
    """


class Slide:
    """A lazily read image pyramid with a physical pixel size.

    Attributes follow ARCHITECTURE.md. ``levels`` are dask arrays for napari and dask
    pipelines; ``read_region`` bypasses dask and reads the file directly.
    Pickling stores only how it was opened (path, the user's mpp, the backend asked
    for by name, the memory budget) and re-opens on unpickling, so a Slide can be
    shipped to dask.distributed workers.
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
        verify: Callable[[], Any] | None = None,
    ) -> None:
        self.path = path
        self.name = display_name(path)
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
        self.native_levels = native_levels
        self._mpp_override = mpp_override
        self._closers = list(closers)
        self._verify = verify
        # The memory budget open_slide was given, so a re-opened (unpickled) slide gets it too.
        self.decode_budget: int | None = None
        # The backend open_slide was told to use (None: detected), so a re-opened slide
        # is read by the same library, not whichever detection would pick.
        self.backend: str | None = None

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
        """Coarsest level that is still at least as fine as ``downsample`` (see choose_level)."""
        return choose_level(self.downsamples, downsample)

    # -- pixels -----------------------------------------------------------------------
    def read_region(self, x0: int, y0: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """(height, width, 3) uint8 in ``level`` pixel coordinates; outside = white."""
        if not 0 <= level < len(self.levels):
            raise IndexError(f"level {level} out of range (slide has {len(self.levels)})")
        return padded_region(self._readers[level], x0, y0, width, height, _rgb_only)

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """Whole slide fitting in ``max_px``; returns (image, level-0 px per thumbnail px)."""
        return thumbnail(self, max_px)

    def verify(self) -> None:
        """Decode as much as it takes to know the pixels are sound; M2ORTError if not.

        Flat images are decoded whole anyway, so the napari reader calls this to fail
        when the file is opened rather than on each redraw. Tiled files check their tile
        table and sample tiles when opened, so this does nothing for them.
        """
        if self._verify is not None:
            self._verify()

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
        from napari_m2ort.io.napari import UM_UNITS, napari_has_units  # the one units check

        if napari_has_units():
            kwargs["units"] = UM_UNITS
        data = list(self.levels) if multiscale else self.levels[0]
        return [(data, kwargs, "image")]

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Release file handles and decode caches (a later read re-opens the file)."""
        for close in self._closers:
            close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {
            "path": str(self.path),
            "mpp": self._mpp_override,
            "budget": self.decode_budget,
            "backend": self.backend,
        }

    def __setstate__(self, state: dict) -> None:
        from napari_m2ort.io.slides import open_slide

        fresh = open_slide(
            state["path"],
            state["mpp"],
            quiet=True,
            backend=state.get("backend"),
            memory_budget=state.get("budget"),
        )
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        h, w = self.shape
        return (
            f"Slide({str(self.path)!r}, {w}x{h} px, {len(self.levels)} levels, {self.mpp:g} µm/px [{self.mpp_source}])"
        )


def sniff(path: Path) -> str:
    """The format family from the file's first bytes: "tiff", "flat" or "unknown"."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise M2ORTError(f"Cannot read '{path}': {exc.strerror or exc}. Check the file's permissions.") from exc
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n":
        return "flat"
    if path.suffix.lower() in FLAT_SUFFIXES | {".bmp", ".webp"}:
        return "flat"  # let Pillow give its own error
    return "unknown"


def display_name(path: Path) -> str:
    """The slide's name: the file name without its image suffix (``.ome.tif`` counts as one)."""
    name = path.name
    for suffix in OME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def plausible(mpp: float | None, limits: tuple[float, float]) -> float | None:
    """A pixel size read from metadata, or None when it is outside ``limits``: such values
    are software defaults (72 dpi = 352.8 µm/px), not microscope calibrations."""
    if mpp is None or not math.isfinite(mpp):
        return None
    return mpp if limits[0] <= mpp <= limits[1] else None


def decode_error(path: Path, where: str, exc: BaseException) -> M2ORTError:
    """What a biologist can do about a codec's exception, raised from a lazy read."""
    detail = str(exc).strip() or type(exc).__name__
    return M2ORTError(
        f"Could not decode the image data in '{path}' ({where}): {detail}. The file is "
        "damaged or incomplete, or uses a compression napari-m2ort cannot read; copy it "
        "again, or re-export it from the scanner software as OME-TIFF or SVS."
    )


def file_token(path: Path) -> str:
    """Identity of one version of a file: dask names and decode caches key on it, so an
    edited file is never served from a stale cache."""
    from dask.base import tokenize

    st = path.stat()
    return tokenize(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _rgb_only(data: Any) -> np.ndarray:
    return np.asarray(data)[..., :3]
