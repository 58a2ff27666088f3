"""Spot layouts in µm and a fast tissue mask.

Spots sit on a *global* grid anchored at the slide origin, so the same spot gets the
same centre and id whichever region it is drawn in: predicting a second, overlapping
region adds only the spots not predicted yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from .errors import M2ORTError

# name -> (grid, pitch µm, spot diameter µm)
LAYOUTS = {
    "visium": ("hex", 100.0, 55.0),
    "st": ("square", 200.0, 100.0),
}

RegionLike = Union["Region", Sequence[float], np.ndarray]


@dataclass
class Region:
    """A rectangle or polygon in level-0 µm, vertices as (x, y)."""

    vertices: np.ndarray  # (K, 2) x, y in µm

    def __post_init__(self) -> None:
        v = np.asarray(self.vertices, dtype=float).reshape(-1, 2)
        # One winding for every region: matplotlib's edge tolerance below has a sign that
        # depends on it, and spots exactly on an edge must be kept whoever drew the region.
        x, y = v[:, 0], v[:, 1]
        if float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) < 0:
            v = v[::-1]
        self.vertices = np.ascontiguousarray(v)

    @classmethod
    def rectangle(cls, x0: float, y0: float, x1: float, y1: float) -> Region:
        xa, xb = sorted((float(x0), float(x1)))
        ya, yb = sorted((float(y0), float(y1)))
        return cls(np.array([[xa, ya], [xb, ya], [xb, yb], [xa, yb]], dtype=float))

    @classmethod
    def from_napari_shape(cls, data: np.ndarray) -> Region:
        """napari Shapes data are (row, col) = (y, x) in world units (µm here)."""
        data = np.asarray(data, dtype=float)[:, -2:]
        return cls(data[:, ::-1].copy())

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        x0, y0 = self.vertices.min(0)
        x1, y1 = self.vertices.max(0)
        return float(x0), float(y0), float(x1), float(y1)

    @property
    def area_um2(self) -> float:
        x, y = self.vertices[:, 0], self.vertices[:, 1]
        return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))

    def contains(self, points_xy: np.ndarray) -> np.ndarray:
        from matplotlib.path import Path as MplPath

        if len(points_xy) == 0:
            return np.zeros(0, dtype=bool)
        return MplPath(self.vertices).contains_points(points_xy, radius=1e-6)  # edges included


def as_region(region: RegionLike) -> Region:
    if isinstance(region, Region):
        return region
    arr = np.asarray(region, dtype=float)
    if arr.shape == (4,):
        return Region.rectangle(*arr)
    if arr.ndim == 2 and arr.shape[1] == 2 and len(arr) >= 3:
        return Region(arr)
    raise M2ORTError(
        "A region must be a rectangle (x0, y0, x1, y1) in µm or a polygon of at least "
        f"three (x, y) vertices in µm; got an array of shape {arr.shape}."
    )


@dataclass
class SpotLayout:
    centers_um: np.ndarray  # (N, 2) x, y
    ids: np.ndarray  # (N,) str, stable grid ids "r<row>_c<col>"
    diameter_um: float
    pitch_um: float
    layout: str
    grid: str
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.centers_um)

    def subset(self, mask: np.ndarray) -> SpotLayout:
        return SpotLayout(
            self.centers_um[mask],
            self.ids[mask],
            self.diameter_um,
            self.pitch_um,
            self.layout,
            self.grid,
            dict(self.info),
        )


def layout_params(
    layout: str,
    pitch_um: Optional[float] = None,
    diameter_um: Optional[float] = None,
    grid: Optional[str] = None,
) -> tuple[str, float, float]:
    layout = layout.lower()
    if layout in LAYOUTS:
        g, p, d = LAYOUTS[layout]
        return grid or g, float(pitch_um or p), float(diameter_um or d)
    if layout != "custom":
        raise M2ORTError(
            f"Unknown spot layout {layout!r}: use 'visium' (55 µm spots, 100 µm pitch), "
            "'st' (legacy ST, 100 µm spots, 200 µm pitch) or 'custom' with a pitch and diameter."
        )
    if not pitch_um or pitch_um <= 0:
        raise M2ORTError("A custom spot layout needs a positive pitch in µm.")
    diameter = float(diameter_um) if diameter_um else float(pitch_um) / 2.0
    if diameter <= 0:
        raise M2ORTError("A custom spot layout needs a positive spot diameter in µm.")
    return grid or "square", float(pitch_um), diameter


def layout_spots(
    region: RegionLike,
    layout: str = "visium",
    pitch_um: Optional[float] = None,
    diameter_um: Optional[float] = None,
    grid: Optional[str] = None,
    slide_size_um: Optional[tuple[float, float]] = None,
) -> SpotLayout:
    """Spot centres of a layout inside a region (µm).

    ``slide_size_um`` (height, width) clips the region to the slide; a region that lies
    entirely outside it is an error rather than an empty result.
    """
    region = as_region(region)
    grid, pitch, diameter = layout_params(layout, pitch_um, diameter_um, grid)
    if region.area_um2 <= 0:
        raise M2ORTError("The region is empty (zero area): draw a rectangle or polygon with some extent.")
    x0, y0, x1, y1 = region.bounds
    if slide_size_um is not None:
        h, w = slide_size_um
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            raise M2ORTError(
                f"The region ({x0:.0f}, {y0:.0f})–({x1:.0f}, {y1:.0f}) µm lies entirely outside "
                f"the slide (0–{w:.0f} × 0–{h:.0f} µm): draw it over the tissue."
            )
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, w), min(y1, h)
    if grid == "hex":
        dy = pitch * math.sqrt(3) / 2
        r0, r1 = math.ceil(y0 / dy), math.floor(y1 / dy)
        rows = np.arange(r0, r1 + 1)
        cols_list, rows_list = [], []
        for r in rows:
            off = pitch / 2 if r % 2 else 0.0
            c0, c1 = math.ceil((x0 - off) / pitch), math.floor((x1 - off) / pitch)
            cs = np.arange(c0, c1 + 1)
            cols_list.append(cs)
            rows_list.append(np.full(len(cs), r))
        cols = np.concatenate(cols_list) if cols_list else np.zeros(0, int)
        rws = np.concatenate(rows_list) if rows_list else np.zeros(0, int)
        xs = cols * pitch + np.where(rws % 2 == 1, pitch / 2, 0.0)
        ys = rws * dy
    elif grid == "square":
        cs = np.arange(math.ceil(x0 / pitch), math.floor(x1 / pitch) + 1)
        rs = np.arange(math.ceil(y0 / pitch), math.floor(y1 / pitch) + 1)
        cols, rws = np.meshgrid(cs, rs)
        cols, rws = cols.ravel(), rws.ravel()
        xs, ys = cols * pitch, rws * pitch
    else:
        raise M2ORTError(f"Unknown grid {grid!r}: use 'hex' or 'square'.")
    centers = np.stack([xs, ys], axis=1).astype(float) if len(xs) else np.zeros((0, 2))
    inside = region.contains(centers)
    if slide_size_um is not None and len(centers):
        h, w = slide_size_um
        inside &= (centers[:, 0] >= 0) & (centers[:, 0] < w) & (centers[:, 1] >= 0) & (centers[:, 1] < h)
    ids = np.array([f"{layout}{int(pitch)}_r{r}_c{c}" for r, c in zip(rws[inside], cols[inside])], dtype=object)
    return SpotLayout(centers[inside], ids, diameter, pitch, layout, grid)


@dataclass
class TissueMask:
    """Boolean mask of tissue on a low-resolution copy of the slide."""

    mask: np.ndarray  # (h, w) bool
    um_per_px: float  # size of one mask pixel in µm

    def contains(self, centers_um: np.ndarray) -> np.ndarray:
        if len(centers_um) == 0:
            return np.zeros(0, dtype=bool)
        cols = np.floor(centers_um[:, 0] / self.um_per_px).astype(int)
        rows = np.floor(centers_um[:, 1] / self.um_per_px).astype(int)
        ok = (rows >= 0) & (rows < self.mask.shape[0]) & (cols >= 0) & (cols < self.mask.shape[1])
        out = np.zeros(len(centers_um), dtype=bool)
        out[ok] = self.mask[rows[ok], cols[ok]]
        return out

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def tissue_mask_from_rgb(rgb: np.ndarray, um_per_px: float) -> TissueMask:
    """Tissue = stained (saturated or dark) pixels, cleaned morphologically.

    H&E background is bright and grey; stained tissue is pink/purple. Saturation with an
    Otsu threshold (floored, so a slide of pure tissue still works) separates the two.
    """
    from scipy import ndimage

    rgb = np.asarray(rgb)[..., :3].astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    gray = rgb.mean(-1)
    thr = max(_otsu(sat), 0.05)
    mask = (sat > thr) & (gray > 20) & (gray < 235)
    # close small gaps, drop specks smaller than ~1 spot-area at this scale
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    mask = ndimage.binary_opening(mask, iterations=1)
    return TissueMask(mask, um_per_px)


def tissue_mask(slide, max_px: int = 2048) -> TissueMask:
    """Tissue mask from a low pyramid level of the slide (one small read)."""
    thumb, downsample = slide.thumbnail(max_px)
    return tissue_mask_from_rgb(thumb, slide.mpp * downsample)


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    v = values.ravel()
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(float)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def restrict_to_tissue(spots: SpotLayout, mask: TissueMask) -> SpotLayout:
    keep = mask.contains(spots.centers_um)
    if len(spots) and not keep.any():
        raise M2ORTError(
            f"None of the {len(spots)} spots in this region lies on tissue: draw the region "
            "over the tissue, or switch off 'tissue only'."
        )
    return spots.subset(keep)
