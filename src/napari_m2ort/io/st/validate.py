"""Every check an ST reader applies before a spot is trusted, in one place.

Alignment between spots and pixels is the one thing that must never go silently wrong.
Spots without coordinates, outside the image, with ambiguous (repeated) ids or with
negative / non-finite counts are skipped with a counted :class:`STDataWarning`. When more
than half of a section's spots would be skipped (:data:`MAX_SKIPPED_FRACTION`), the files
do not belong together (counts of one section with the spot file of another, coordinates
of another image or scale), so an :class:`~napari_m2ort.errors.M2ORTError` stops the work
there, saying how many and why, rather than letting metrics be computed on the few left.
The same error names the file and what to do when a pixel size cannot be trusted, and
:func:`panel_gene_hint` says why a gene panel does not match the data's gene names.
"""

from __future__ import annotations

import re
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
    "MAX_SKIPPED_FRACTION",
    "check_most_kept",
    "ENSEMBL_ID",
    "GENE_ID_COLUMNS",
    "panel_gene_hint",
    "check_panel_genes",
]

#: Two independent estimates of µm/px that differ by more than this are reported.
MPP_AGREEMENT = 0.10

#: A section loses at most this fraction of its spots (or counts rows) to one check.
#: Matched files lose a few per cent (HER2+: 0-2 %); files of two different sections of
#: the same array lose 35-84 %; consecutive sections of one patient can lose as little as
#: 16 %, which no count-based rule can tell from damage, so the line is drawn at half.
MAX_SKIPPED_FRACTION = 0.5

#: Ensembl gene ids (ENSG00000141736, ENSMUSG00000...), not symbols.
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}")

#: ``var`` columns that commonly hold the other gene naming (symbols or ids).
GENE_ID_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "gene_name",
    "gene_names",
    "symbol",
    "gene_ids",
    "gene_id",
    "feature_id",
    "ensembl_id",
)


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

    Raises when more than half are skipped for one reason or in all (none remaining is
    the extreme case): then the counts, positions and image do not belong together.
    """
    n = x.shape[0]
    keep = np.ones(n, dtype=bool)

    nan_xy = ~np.isfinite(coords).all(1)
    if nan_xy.any():
        warn(f"{source}: {int(nan_xy.sum())} of {n} spots have no (finite) coordinates and were skipped.")
    keep &= ~nan_xy

    outside = np.zeros(n, dtype=bool)
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

    for skipped, what, cause in (
        (nan_xy, "spots have no (finite) coordinates", "the coordinate columns were not read as numbers"),
        (
            outside,
            f"spots lie outside the {img_size[0]} × {img_size[1]} px image {image_label}" if img_size else "",
            "the spot coordinates belong to another image or another scale (e.g. full-resolution "
            "pixels on a downscaled image, or the image of another section); give the image the "
            "coordinates were measured on",
        ),
        (bad, "spots have negative or non-finite counts", "the matrix holds transformed values, not raw counts"),
        (
            ~keep,
            "spots were skipped (no coordinates, outside the image or invalid counts)",
            "the counts, spot positions and image do not belong to the same section",
        ),
    ):
        check_most_kept(int(np.sum(skipped)), n, source, what, cause)
    return keep


def check_most_kept(skipped: int, total: int, source, what: str, cause: str) -> None:
    """Stop when more than :data:`MAX_SKIPPED_FRACTION` of ``total`` was skipped.

    ``what`` completes "<skipped> of <total> ..."; ``cause`` completes "most likely ...".
    """
    if total <= 0 or skipped <= MAX_SKIPPED_FRACTION * total:
        return
    left = total - skipped
    tail = "no valid spots remain." if left == 0 else f"stopped rather than computing results on the {left} left."
    raise M2ORTError(
        f"{source}: {skipped} of {total} {what} ({100 * skipped / total:.0f} %). More than half "
        f"skipped means the data do not match: most likely {cause}; {tail}"
    )


def _casefold_index(names) -> dict[str, str]:
    out: dict[str, str] = {}
    for n in names:
        out.setdefault(str(n).casefold(), str(n))
    return out


def panel_gene_hint(var_names: Sequence[str], var: pd.DataFrame | None, missing: Sequence[str]) -> str:
    """Why ``missing`` panel genes are not in ``var_names``, and what to do; "" if unknown.

    Says, when they apply: that the data and the panel use different namings (Ensembl
    ids vs symbols), which ``var`` column holds the panel's naming (e.g. ``gene_ids`` or
    ``feature_name`` beside var_names), and how many would match if case were ignored.
    """
    missing = [str(g) for g in missing]
    if not missing:
        return ""
    hints = []
    sample = [str(v) for v in list(var_names)[:1000]]
    data_ids = sum(bool(ENSEMBL_ID.match(v)) for v in sample) > len(sample) / 2
    panel_ids = sum(bool(ENSEMBL_ID.match(g)) for g in missing) > len(missing) / 2
    if data_ids != panel_ids:
        data_kind, panel_kind = ("Ensembl ids", "symbols") if data_ids else ("symbols", "Ensembl ids")
        hints.append(
            f"this data names genes by {data_kind} (e.g. {sample[0] if sample else '?'}) but the panel "
            f"uses {panel_kind} (e.g. {missing[0]})"
        )
    column = None
    for col in var.columns if var is not None else ():
        values = var[col]
        if not (
            values.dtype == object
            or isinstance(values.dtype, pd.CategoricalDtype)
            or pd.api.types.is_string_dtype(values.dtype)
        ):
            continue
        names = set(map(str, values.astype(str)))
        folded = _casefold_index(names)
        exact = sum(g in names for g in missing)
        loose = sum(g.casefold() in folded for g in missing)
        if exact or loose:
            column = col
            case = "" if exact >= loose else " (ignoring case)"
            hints.append(
                f"var['{col}'] holds {max(exact, loose)} of them{case}: use it as the gene names "
                f"(e.g. adata.var_names = adata.var['{col}'])"
            )
            break
    index = _casefold_index(var_names)
    loose = [g for g in missing if g.casefold() in index]
    if loose:
        g = loose[0]
        hints.append(
            f"{len(loose)} match if case is ignored (e.g. '{index[g.casefold()]}' vs '{g}'): rename the "
            "genes to the panel's spelling"
        )
    if data_ids != panel_ids and column is None and not loose:
        hints[0] += ": map one naming to the other first"
    return "; ".join(hints)


def check_panel_genes(
    where: str,
    var_names: Sequence[str],
    var: pd.DataFrame | None,
    genes: Sequence[str],
    missing: Sequence[str],
    allow_missing: bool,
) -> None:
    """Stop when the data do not carry a model's gene panel, saying how the names differ.

    No panel gene found always stops; some missing stops unless ``allow_missing`` (then
    they are predicted but not scored), and more than half missing stops even then:
    the metrics would describe another panel.
    """
    missing = list(missing)
    if not missing:
        return
    hint = panel_gene_hint(var_names, var, missing)
    hint = f"; {hint}" if hint else ""
    n, k = len(genes), len(missing)
    if k == n:
        raise M2ORTError(f"{where}: none of the {n} panel genes is in this data{hint}.")
    examples = ", ".join(missing[:5])
    if not allow_missing:
        raise M2ORTError(
            f"{where}: {k} of {n} panel genes are not in this data (e.g. {examples}){hint}. Choose a "
            "panel from this data (e.g. top:250) or fine-tune with a new head."
        )
    if k > MAX_SKIPPED_FRACTION * n:
        raise M2ORTError(
            f"{where}: {k} of {n} panel genes are not in this data (e.g. {examples}){hint}. With more "
            "than half of the panel missing the metrics would describe another panel; use a model "
            "whose genes this data measures."
        )
