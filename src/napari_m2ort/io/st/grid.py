"""µm per pixel measured from the spot grid itself.

Array platforms place spots at a known pitch (legacy ST 200 µm, Visium 100 µm), so the
spots' pixel positions measure the image's pixel size in the very frame the coordinates
live in. That is the fallback when no metadata states it, and the cross-check when some does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...errors import M2ORTError
from .section import LEGACY_ST_PITCH_UM, VISIUM_PITCH_UM

__all__ = ["legacy_grid_mpp", "visium_grid_mpp", "nn_grid_mpp"]


def _lstsq_steps(array_xy: np.ndarray, pixel_xy: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Fit pixel = [ax, ay, 1] @ M; return (|px per array x step|, |per y step|), rms."""
    ok = np.isfinite(array_xy).all(1) & np.isfinite(pixel_xy).all(1)
    a, p = array_xy[ok], pixel_xy[ok]
    if len(a) < 3 or np.ptp(a[:, 0]) == 0 or np.ptp(a[:, 1]) == 0:
        return None
    design = np.c_[a, np.ones(len(a))]
    m, *_ = np.linalg.lstsq(design, p, rcond=None)
    rms = float(np.sqrt(np.mean(np.sum((p - design @ m) ** 2, axis=1))))
    return np.linalg.norm(m[:2], axis=1), rms


def legacy_grid_mpp(spots: pd.DataFrame, source) -> float:
    """µm/px of a legacy ST image: array positions are 200 µm apart.

    Fits pixel_x/pixel_y against the array positions by least squares (the detector's
    sub-grid corrected ``new_x``/``new_y`` when present, else ``x``/``y``) and divides
    the pitch by the mean pixel length of one array step.
    """
    cols = ("new_x", "new_y") if {"new_x", "new_y"} <= set(spots.columns) else ("x", "y")
    fit = _lstsq_steps(spots[list(cols)].to_numpy(float), spots[["pixel_x", "pixel_y"]].to_numpy(float))
    if fit is None or not np.all(fit[0] > 0):
        raise M2ORTError(
            f"{source}: too few spots to derive the pixel size from the spot grid; "
            "pass the image's µm per pixel explicitly (--mpp)."
        )
    steps, rms = fit
    px_per_step = float(np.mean(steps))
    if rms > 0.25 * px_per_step or abs(steps[0] - steps[1]) > 0.1 * px_per_step:
        raise M2ORTError(
            f"{source}: the spot pixel positions do not follow a regular grid (fit error "
            f"{rms:.0f} px for a {px_per_step:.0f} px step); pass the image's µm per pixel (--mpp)."
        )
    return LEGACY_ST_PITCH_UM / px_per_step


def visium_grid_mpp(positions: pd.DataFrame) -> float | None:
    """µm/px from the Visium array grid: one array column is 50 µm, one array row 50·√3 µm."""
    fit = _lstsq_steps(
        positions[["array_col", "array_row"]].to_numpy(float),
        positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
    )
    if fit is None or not np.all(fit[0] > 0):
        return None
    (sx, sy), rms = fit
    if rms > 0.25 * sx * 2:
        return None
    return float(np.mean([VISIUM_PITCH_UM / 2 / sx, VISIUM_PITCH_UM / 2 * np.sqrt(3) / sy]))


def nn_grid_mpp(coords: np.ndarray, pitch_um: float) -> float | None:
    """µm/px from the nearest-neighbour spacing when the spots form a regular grid."""
    ok = np.isfinite(coords).all(1)
    c = coords[ok]
    if len(c) < 6:
        return None
    from scipy.spatial import cKDTree

    d, _ = cKDTree(c).query(c, k=2)
    nn = d[:, 1]
    med = float(np.median(nn))
    if med <= 0 or np.mean(np.abs(nn - med) < 0.05 * med) < 0.6:
        return None  # not a regular grid (e.g. a random subset of spots)
    return pitch_um / med
