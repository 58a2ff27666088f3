"""The slide contract over a napari Image layer's data (numpy, dask, zarr; one or many scales).

For images that were not opened from a file by our reader (pasted from the console, made
by another plugin, a crop). The same rules as the file readers apply, from
``napari_m2ort.slide``: level choice, uint8 conversion, white outside the image, the
default µm/px. The layer is only read (``data``, ``multiscale``, ``rgb``, ``name``,
``metadata``, ``scale``, ``units``, ``source``), so this needs neither Qt nor napari.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_m2ort.errors import M2ORTError
from napari_m2ort.slide import (
    DEFAULT_MPP,
    RGBSpec,
    bit_ceiling,
    choose_level,
    padded_region,
    thumbnail,
    to_rgb8,
    validate_mpp,
)

__all__ = ["LayerSlide", "layer_mpp"]

_MICRON_NAMES = ("micrometer", "micron", "um", "µm", "μm")


def layer_mpp(layer: Any, override: float | None = None) -> tuple[float, str]:
    """µm/px of an Image layer's level 0 and where that number came from.

    The user's value, else our reader's metadata, else the layer's scale when its units
    are µm, else ``DEFAULT_MPP``.
    """
    if override:
        return validate_mpp(override, f"Pixel size for layer {layer.name!r}"), "user"
    md = getattr(layer, "metadata", {}) or {}
    if md.get("mpp"):
        mpp = validate_mpp(md["mpp"], f"The metadata 'mpp' of layer {layer.name!r}")
        return mpp, str(md.get("mpp_source", "metadata"))
    try:
        units = tuple(str(u) for u in layer.units)
    except Exception:
        units = ()
    if units and units[-1] in _MICRON_NAMES:
        return float(np.asarray(layer.scale)[-1]), "metadata"
    return DEFAULT_MPP, "default"


class LayerSlide:
    """An Image layer (single or multiscale, RGB(A) or grey) as a ``SlideLike``.

    ``mpp`` None takes ``layer_mpp``'s answer. Non-uint8 data are scaled by the full-scale
    value of the coarsest level (``bit_ceiling``), as files are, so every region of a
    layer is scaled alike.
    """

    def __init__(self, layer: Any, mpp: float | None = None, mpp_source: str = "user"):
        self.name = str(layer.name)
        if mpp is None:
            mpp, mpp_source = layer_mpp(layer)
        self.mpp = validate_mpp(mpp, f"Pixel size for layer {self.name!r}")
        self.mpp_source = mpp_source
        data = layer.data
        levels = list(data) if getattr(layer, "multiscale", False) else [data]
        self._levels = [_check_level(a, layer) for a in levels]
        md = getattr(layer, "metadata", {}) or {}
        path = md.get("path") or getattr(getattr(layer, "source", None), "path", None)
        self.path = Path(path) if path else Path(f"<layer {self.name}>")
        w0 = self._levels[0].shape[1]
        self.downsamples = [float(w0) / float(a.shape[1]) for a in self._levels]
        channels = self._levels[0].shape[2] if len(self._levels[0].shape) == 3 else 1
        self._spec = RGBSpec(alpha="straight" if channels in (2, 4) else None)
        self._spec_ready = self._levels[0].dtype == np.uint8

    @property
    def levels(self) -> list:
        return self._levels

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self._levels[0].shape[:2])  # type: ignore[return-value]

    @property
    def size_um(self) -> tuple[float, float]:
        h, w = self.shape
        return h * self.mpp, w * self.mpp

    def best_level(self, downsample: float) -> int:
        return choose_level(self.downsamples, downsample)

    def read_region(self, x0: int, y0: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """(height, width, 3) uint8 in ``level`` pixel coordinates; outside = white."""
        if not 0 <= level < len(self._levels):
            raise IndexError(f"level {level} out of range (layer has {len(self._levels)})")
        return padded_region(self._levels[level], x0, y0, width, height, self._convert)

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        return thumbnail(self, max_px)

    def close(self) -> None:
        pass

    def _convert(self, block: Any) -> np.ndarray:
        if not self._spec_ready:
            smallest = self._levels[-1]
            step = max(1, int(np.ceil(max(smallest.shape[:2]) / 2048)))
            self._spec.hi = bit_ceiling(np.asarray(smallest[::step, ::step]))
            self._spec_ready = True
        return to_rgb8(np.asarray(block), self._spec)

    def __repr__(self) -> str:
        h, w = self.shape
        return f"LayerSlide({self.name!r}, {w}x{h} px, {len(self._levels)} levels, {self.mpp:g} µm/px)"


def _check_level(arr: Any, layer: Any) -> Any:
    shape = arr.shape
    if getattr(layer, "rgb", False) or (len(shape) >= 3 and shape[-1] in (3, 4)):
        if len(shape) != 3:
            raise M2ORTError(f"Layer {layer.name!r} has shape {shape}: prediction needs a 2D RGB image (H, W, 3).")
    elif len(shape) != 2:
        raise M2ORTError(f"Layer {layer.name!r} has shape {shape}: prediction needs a 2D H&E image.")
    return arr
