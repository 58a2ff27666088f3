"""Spot values as pictures: colour ranges and a smooth heat-map image.

Plain numpy/scipy in slide µm, so the widgets only hand the result to a layer and the
rules (what the colours span, where the heat map is transparent) are tested without Qt.
"""

from __future__ import annotations

import numpy as np

MAX_HEATMAP_PIXELS = 16_000_000


#: Colour limits span the 1st-99th percentile: a few extreme spots (glass, folds, a
#: saturated gland) then no longer push every other spot to one end of the colormap.
PERCENTILES = (1.0, 99.0)
#: The smallest span the colours cover (log1p units, about a 1.6-fold change): a gene
#: that barely varies must look flat, not have its noise stretched over the colormap.
MIN_SPAN = 0.5


def value_range(values, keep=None, percentiles=PERCENTILES, min_span: float = MIN_SPAN) -> tuple[float, float]:
    """Robust colour limits: the percentiles of the finite values of the spots in ``keep``
    (e.g. those on tissue; all when None), widened about their middle to ``min_span``."""
    v = np.asarray(values, dtype=float).reshape(-1)
    if keep is not None:
        v = v[np.asarray(keep, dtype=bool).reshape(-1)]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(v, percentiles))
    if hi - lo < min_span:
        mid = (lo + hi) / 2.0
        lo, hi = mid - min_span / 2.0, mid + min_span / 2.0
    return lo, hi


def shared_range(*ranges) -> tuple[float, float]:
    """One range covering several (side by side: both panels on one colour scale)."""
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def range_step(lo: float, hi: float) -> float:
    """A spin-box step of a twentieth of the range, so a few clicks move the limits visibly."""
    return max((hi - lo) / 20.0, 1e-3)


def ordered_limits(lo: float, hi: float) -> tuple[float, float]:
    """Limits a colormap accepts: the top strictly above the bottom."""
    lo, hi = float(lo), float(hi)
    return lo, max(hi, lo + 1e-6)


def heatmap_grid(
    centers_um: np.ndarray, values: np.ndarray, pitch_um: float, res_um: float | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Smooth image of spot values: (image, origin (y, x) µm of pixel 0, µm per pixel).

    Gaussian splatting: sum(w·v)/sum(w) with σ = pitch/2 on a grid of ``res_um`` (default
    pitch/10, at most 10 µm); pixels farther than ¾ pitch from every spot are NaN, so the
    tissue between distant regions stays visible.  ``centers_um`` are (x, y).
    """
    from scipy import ndimage

    c = np.asarray(centers_um, dtype=float).reshape(-1, 2)
    v = np.asarray(values, dtype=float).reshape(-1)
    ok = np.isfinite(v)
    c, v = c[ok], v[ok]
    if len(c) == 0:
        return np.full((1, 1), np.nan, np.float32), np.zeros(2), 1.0
    res = float(res_um or min(10.0, pitch_um / 10.0))
    pad = pitch_um
    x0, y0 = c.min(0) - pad
    x1, y1 = c.max(0) + pad
    w = int(np.ceil((x1 - x0) / res)) + 1
    h = int(np.ceil((y1 - y0) / res)) + 1
    if h * w > MAX_HEATMAP_PIXELS:  # keep the image small: coarsen the grid
        res *= np.sqrt(h * w / MAX_HEATMAP_PIXELS)
        w = int(np.ceil((x1 - x0) / res)) + 1
        h = int(np.ceil((y1 - y0) / res)) + 1
    cols = np.clip(np.round((c[:, 0] - x0) / res).astype(int), 0, w - 1)
    rows = np.clip(np.round((c[:, 1] - y0) / res).astype(int), 0, h - 1)
    num = np.zeros((h, w), np.float64)
    den = np.zeros((h, w), np.float64)
    np.add.at(num, (rows, cols), v)
    np.add.at(den, (rows, cols), 1.0)
    occupied = den > 0
    sigma = max(1.0, pitch_um / 2.0 / res)
    num = ndimage.gaussian_filter(num, sigma, mode="constant", truncate=3.0)
    den = ndimage.gaussian_filter(den, sigma, mode="constant", truncate=3.0)
    img = np.full((h, w), np.nan, np.float32)
    dist = ndimage.distance_transform_edt(~occupied) * res
    keep = (dist <= 0.75 * pitch_um) & (den > 1e-12)
    img[keep] = (num[keep] / den[keep]).astype(np.float32)
    return img, np.array([y0, x0]), res
