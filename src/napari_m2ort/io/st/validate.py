"""Every check an ST reader applies before a spot is trusted, in one place.

Alignment between spots and pixels is the one thing that must never go silently wrong.
Spots without coordinates, outside the image, with ambiguous (repeated) ids or with
negative / non-finite counts are skipped with a counted :class:`STDataWarning`; when
nothing valid remains, or a pixel size cannot be trusted, an
:class:`~napari_m2ort.errors.M2ORTError` names the file and what to do.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import M2ORTError
from ...slide import validate_mpp

__all__ = [
    "STDataWarning",
    "warn",
    "existing_file",
    "check_mpp",
    "reconcile_mpp",
    "make_unique",
    "drop_ambiguous",
    "bad_count_rows",
    "valid_rows",
]

#: Two independent estimates of µm/px that differ by more than this are reported.
MPP_AGREEMENT = 0.10


class STDataWarning(UserWarning):
    """Spots, genes or images were skipped or adjusted while reading ST data."""


def warn(message: str) -> None:
    warnings.warn(message, STDataWarning, stacklevel=3)


def existing_file(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise M2ORTError(f"{p}: the {what} file does not exist; check the path.")
    return p


def check_mpp(mpp, source) -> float:
    """A µm/px given by the user, validated by the package-wide rule."""
    return validate_mpp(mpp, f"{source}: mpp")


def reconcile_mpp(meta_mpp: float, geom_mpp: float | None, source) -> tuple[float, str]:
    """Prefer the metadata value; fall back to geometry when they clearly disagree."""
    if geom_mpp is None or abs(geom_mpp / meta_mpp - 1) <= MPP_AGREEMENT:
        return meta_mpp, "metadata"
    warn(
        f"{source}: spot_diameter_fullres implies {meta_mpp:.4f} µm/px but the spot spacing "
        f"implies {geom_mpp:.4f} µm/px; using the spacing (it is measured in the same frame as "
        "the coordinates). Pass mpp explicitly if you know the true value."
    )
    return geom_mpp, "st-geometry"


def make_unique(names: Sequence[str], what: str, source) -> list[str]:
    """Suffix repeated names with -1, -2 (AnnData's convention), warning with a count."""
    names = [str(n) for n in names]
    seen: dict[str, int] = {}
    counts = pd.Series(names).value_counts()
    dups = counts[counts > 1]
    if dups.empty:
        return names
    taken = set(names)
    out = []
    for n in names:
        if n in dups.index:
            k = seen.get(n, 0)
            seen[n] = k + 1
            if k:
                new = f"{n}-{k}"
                while new in taken:
                    k += 1
                    new = f"{n}-{k}"
                taken.add(new)
                out.append(new)
                continue
        out.append(n)
    warn(
        f"{source}: {int(dups.sum() - len(dups))} repeated {what} made unique with a "
        f"-1, -2 suffix (e.g. {', '.join(map(str, dups.index[:3]))})."
    )
    return out


def drop_ambiguous(keys: pd.Index, what: str, source) -> np.ndarray:
    """Mask of rows whose key occurs once; repeated keys are dropped with a warning.

    A repeated spot id (or barcode) cannot be matched to one position (or one counts
    row) without guessing, and guessing is how spots end up on the wrong tissue.
    """
    dup = keys.duplicated(keep=False)
    if dup.any():
        warn(
            f"{source}: {int(dup.sum())} rows share {int(pd.Index(keys[dup]).nunique())} "
            f"repeated {what}; they cannot be matched unambiguously and were skipped."
        )
    return ~np.asarray(dup)


def bad_count_rows(x: sp.csr_matrix) -> np.ndarray:
    """Rows holding a negative or non-finite value."""
    bad_data = ~np.isfinite(x.data) | (x.data < 0)
    rows = np.zeros(x.shape[0], dtype=bool)
    if bad_data.any():
        row_of = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        rows[row_of[bad_data]] = True
    return rows


def valid_rows(
    x: sp.csr_matrix,
    coords: np.ndarray,
    img_size: tuple[int, int] | None,
    source,
    image_label: str,
) -> np.ndarray:
    """Mask of spots with finite coordinates inside the image and valid counts.

    Raises when none remain: then the counts, positions and image do not belong together.
    """
    n = x.shape[0]
    keep = np.ones(n, dtype=bool)

    nan_xy = ~np.isfinite(coords).all(1)
    if nan_xy.any():
        warn(f"{source}: {int(nan_xy.sum())} of {n} spots have no (finite) coordinates and were skipped.")
    keep &= ~nan_xy

    if img_size is not None:
        w, h = img_size
        with np.errstate(invalid="ignore"):
            outside = keep & ~((coords[:, 0] >= 0) & (coords[:, 0] <= w) & (coords[:, 1] >= 0) & (coords[:, 1] <= h))
        if outside.any():
            warn(
                f"{source}: {int(outside.sum())} of {n} spots lie outside the {w} × {h} px image "
                f"{image_label} and were skipped; if many spots "
                "are affected the coordinates probably belong to another image or scale."
            )
        keep &= ~outside

    bad = keep & bad_count_rows(x)
    if bad.any():
        warn(f"{source}: {int(bad.sum())} of {n} spots have negative or non-finite counts and were skipped.")
    keep &= ~bad

    if not keep.any():
        raise M2ORTError(
            f"{source}: no valid spots remain after removing spots without coordinates, outside "
            "the image or with invalid counts; check that the counts, spot positions and image "
            "belong to the same section."
        )
    return keep
