"""Read spatial transcriptomics (ST) sections into one shape: :class:`STSection`.

Three layouts are supported because that is what people have on disk: the legacy ST
layout of the public HER2+ data set (``almaan/her2st``), Space Ranger output folders
(10x Visium), and AnnData ``.h5ad`` files with ``obsm["spatial"]``.  Each reader returns
counts, gene symbols, spot ids and spot centres in the pixel frame of the image it names
(``image_path``), together with the µm/px of that image.  Downstream code therefore
converts to µm with one multiplication and never needs to know the platform.

Alignment between spots and pixels is the one thing that must never go silently wrong,
so every reader validates what it reads: spots without coordinates, outside the image,
with ambiguous (duplicated) ids or with negative / non-finite counts are skipped with a
counted :class:`STDataWarning`, and a reader raises :class:`~napari_m2ort.errors.M2ORTError`
(naming the file and what to do) when nothing valid remains.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import M2ORTError

logger = logging.getLogger(__name__)

__all__ = [
    "STSection",
    "STDataWarning",
    "read_her2st",
    "read_legacy_st",
    "read_visium",
    "read_h5ad",
    "read_section",
    "image_size",
    "log1p_cpm",
    "points_layer_data",
    "section_layer_data",
    "is_visium_folder",
    "napari_get_reader",
    "LEGACY_ST_PITCH_UM",
    "LEGACY_ST_SPOT_UM",
    "VISIUM_PITCH_UM",
    "VISIUM_SPOT_UM",
    "VISIUM_SCALEFACTOR_SPOT_UM",
]

# Physical geometry of the two array platforms.
LEGACY_ST_PITCH_UM = 200.0   # centre-to-centre distance of legacy ST spots
LEGACY_ST_SPOT_UM = 100.0    # legacy ST spot diameter
VISIUM_PITCH_UM = 100.0      # Visium centre-to-centre distance
VISIUM_SPOT_UM = 55.0        # Visium capture spot diameter (the physical spot)
# Space Ranger's ``spot_diameter_fullres`` is the pixel span of a *theoretical 65 µm*
# spot (10x documentation), not of the 55 µm capture spot.  Both test fixtures confirm
# it: 65 / spot_diameter_fullres agrees with the spot pitch to 0.5 %, 55 / ... is 15 % off.
VISIUM_SCALEFACTOR_SPOT_UM = 65.0

# Two independent estimates of µm/px that differ by more than this are reported.
_MPP_AGREEMENT = 0.10

_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".qptiff"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"} | _TIFF_SUFFIXES


class STDataWarning(UserWarning):
    """Spots, genes or images were skipped or adjusted while reading ST data."""


def _warn(message: str) -> None:
    warnings.warn(message, STDataWarning, stacklevel=3)


# --------------------------------------------------------------------------------------
# The section container
# --------------------------------------------------------------------------------------


@dataclass
class STSection:
    """One tissue section: counts + spot centres in the pixel frame of one image.

    ``adata.X`` holds raw counts (float32 CSR), ``var_names`` gene symbols (unique),
    ``obs_names`` spot ids, ``obsm["spatial"]`` (x, y) spot centres in pixels of
    ``image_path`` (or of ``image`` when the picture only exists inside an .h5ad), and
    ``uns["spatial"][name]`` the scanpy-style ``scalefactors`` / ``metadata``.
    ``mpp`` is µm per pixel of that same image, so ``centers_um = spatial * mpp``.
    """

    adata: Any
    image_path: Path | None
    mpp: float
    mpp_source: str  # "metadata" | "st-geometry" | "user"
    name: str
    spot_diameter_um: float | None = None  # physical spot diameter (100 ST, 55 Visium)
    platform: str = "unknown"  # "legacy-st" | "visium" | "unknown"
    image: np.ndarray | None = None  # (H, W, 3) uint8 when the image has no file

    def __post_init__(self) -> None:
        if self.spot_diameter_um is None:
            sf = self.scalefactors
            if self.platform == "visium":
                self.spot_diameter_um = VISIUM_SPOT_UM
            elif self.platform == "legacy-st":
                self.spot_diameter_um = LEGACY_ST_SPOT_UM
            elif "spot_diameter_fullres" in sf:
                self.spot_diameter_um = float(sf["spot_diameter_fullres"]) * self.mpp

    @property
    def library_id(self) -> str:
        return self.name

    @property
    def scalefactors(self) -> dict:
        lib = self.adata.uns.get("spatial", {}).get(self.name, {})
        return dict(lib.get("scalefactors", {}))

    @property
    def genes(self) -> list[str]:
        return list(map(str, self.adata.var_names))

    @property
    def coords_px(self) -> np.ndarray:
        """(N, 2) spot centres (x, y) in pixels of the section's image."""
        return np.asarray(self.adata.obsm["spatial"], dtype=np.float64)

    @property
    def centers_um(self) -> np.ndarray:
        """(N, 2) spot centres (x, y) in µm, origin at the image's top-left corner."""
        return self.coords_px * self.mpp

    @property
    def n_spots(self) -> int:
        return int(self.adata.n_obs)

    def counts(self) -> sp.csr_matrix:
        """Raw counts as CSR (spots × genes)."""
        return sp.csr_matrix(self.adata.X)

    def __repr__(self) -> str:  # the AnnData repr is long; keep this one line
        where = self.image_path.name if self.image_path else ("embedded" if self.image is not None else "none")
        return (
            f"STSection(name={self.name!r}, spots={self.adata.n_obs}, genes={self.adata.n_vars}, "
            f"image={where}, mpp={self.mpp:.4f} ({self.mpp_source}), platform={self.platform})"
        )


# --------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------


def _existing_file(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise M2ORTError(f"{p}: the {what} file does not exist; check the path.")
    return p


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image file from its header only (no pixel decoding).

    Needed to check that spot coordinates fall inside the picture without decoding a
    100-megapixel JPEG or a gigapixel slide.
    """
    p = _existing_file(path, "image")
    if p.suffix.lower() in _TIFF_SUFFIXES:
        try:
            import tifffile

            with tifffile.TiffFile(p) as tf:
                series = tf.series[0]
                axes = series.axes.upper()
                shape = series.shape
                if "Y" in axes and "X" in axes:
                    return int(shape[axes.index("X")]), int(shape[axes.index("Y")])
                page = tf.pages[0]
                return int(page.imagewidth), int(page.imagelength)
        except Exception:  # fall through to Pillow (some TIFF-like files are not TIFF)
            pass
    try:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs exceed Pillow's bomb guard
        with Image.open(p) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception as exc:
        raise M2ORTError(
            f"{p}: cannot read the image size ({type(exc).__name__}: {exc}); "
            "check that the file is a complete image (JPEG, PNG or TIFF)."
        ) from exc


def _is_blank_image(path: Path) -> bool:
    """True when an image is (nearly) constant, e.g. the black hires PNG of a fixture."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            im.draft("RGB", (512, 512))
            im = im.convert("RGB")
            im.thumbnail((256, 256))
            arr = np.asarray(im, dtype=np.float32)
    except Exception:
        return True
    return bool(arr.size == 0 or arr.std() < 3.0)


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


def _make_unique(names: Sequence[str], what: str, source) -> list[str]:
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
    _warn(
        f"{source}: {int(dups.sum() - len(dups))} repeated {what} made unique with a "
        f"-1, -2 suffix (e.g. {', '.join(map(str, dups.index[:3]))})."
    )
    return out


def _drop_ambiguous(keys: pd.Index, what: str, source) -> np.ndarray:
    """Mask of rows whose key occurs once; repeated keys are dropped with a warning.

    A repeated spot id cannot be matched to one position (or one counts row) without
    guessing, and guessing is how spots end up on the wrong tissue.
    """
    dup = keys.duplicated(keep=False)
    if dup.any():
        _warn(
            f"{source}: {int(dup.sum())} rows share {int(pd.Index(keys[dup]).nunique())} "
            f"repeated {what}; they cannot be matched unambiguously and were skipped."
        )
    return ~np.asarray(dup)


def _to_csr(x) -> sp.csr_matrix:
    if sp.issparse(x):
        return sp.csr_matrix(x, dtype=np.float64)
    return sp.csr_matrix(np.asarray(x, dtype=np.float64))


def _bad_count_rows(x: sp.csr_matrix) -> np.ndarray:
    """Rows holding a negative or non-finite value."""
    bad_data = ~np.isfinite(x.data) | (x.data < 0)
    rows = np.zeros(x.shape[0], dtype=bool)
    if bad_data.any():
        row_of = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        rows[row_of[bad_data]] = True
    return rows


def _build_section(
    *,
    x,
    genes: Sequence[str],
    spot_ids: Sequence[str],
    coords: np.ndarray,
    source,
    name: str,
    image_path: Path | None,
    img_size: tuple[int, int] | None,
    mpp: float,
    mpp_source: str,
    platform: str,
    spot_diameter_um: float | None,
    obs: pd.DataFrame | None = None,
    scalefactors: dict | None = None,
    metadata: dict | None = None,
    var: pd.DataFrame | None = None,
    image: np.ndarray | None = None,
) -> STSection:
    """Validate rows (coordinates, bounds, counts) and assemble the STSection."""
    import anndata as ad

    x = _to_csr(x)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    n = x.shape[0]
    if not (len(spot_ids) == n == len(coords)):
        raise AssertionError("counts, ids and coordinates must have the same rows")
    keep = np.ones(n, dtype=bool)

    nan_xy = ~np.isfinite(coords).all(1)
    if nan_xy.any():
        _warn(f"{source}: {int(nan_xy.sum())} of {n} spots have no (finite) coordinates and were skipped.")
    keep &= ~nan_xy

    if img_size is not None:
        w, h = img_size
        with np.errstate(invalid="ignore"):
            outside = keep & ~(
                (coords[:, 0] >= 0) & (coords[:, 0] <= w) & (coords[:, 1] >= 0) & (coords[:, 1] <= h)
            )
        if outside.any():
            _warn(
                f"{source}: {int(outside.sum())} of {n} spots lie outside the {w} × {h} px image "
                f"{image_path.name if image_path else '(embedded)'} and were skipped; if many spots "
                "are affected the coordinates probably belong to another image or scale."
            )
        keep &= ~outside

    bad = keep & _bad_count_rows(x)
    if bad.any():
        _warn(f"{source}: {int(bad.sum())} of {n} spots have negative or non-finite counts and were skipped.")
    keep &= ~bad

    if not keep.any():
        raise M2ORTError(
            f"{source}: no valid spots remain after removing spots without coordinates, outside "
            "the image or with invalid counts; check that the counts, spot positions and image "
            "belong to the same section."
        )

    idx = np.flatnonzero(keep)
    genes = _make_unique(genes, "gene names", source)
    ids = _make_unique([str(spot_ids[i]) for i in idx], "spot ids", source)
    obs_df = (obs.iloc[idx].copy() if obs is not None else pd.DataFrame(index=range(len(idx))))
    obs_df.index = pd.Index(ids, dtype=object)
    var_df = var.copy() if var is not None else pd.DataFrame(index=range(len(genes)))
    var_df.index = pd.Index(genes, dtype=object)

    xs = x[idx].astype(np.float32)
    xs.sort_indices()
    adata = ad.AnnData(X=xs, obs=obs_df, var=var_df)
    adata.obsm["spatial"] = coords[idx].copy()
    sf = {"tissue_hires_scalef": 1.0}
    if spot_diameter_um is not None:
        sf["spot_diameter_fullres"] = float(spot_diameter_um / mpp)
    sf.update(scalefactors or {})
    meta = {
        "mpp": float(mpp),
        "mpp_source": mpp_source,
        "platform": platform,
        "image": str(image_path) if image_path else "",
        "source": str(source),
    }
    meta.update({k: v for k, v in (metadata or {}).items() if v is not None})
    adata.uns["spatial"] = {name: {"scalefactors": sf, "metadata": meta}}
    return STSection(
        adata=adata,
        image_path=image_path,
        mpp=float(mpp),
        mpp_source=mpp_source,
        name=name,
        spot_diameter_um=spot_diameter_um,
        platform=platform,
        image=image,
    )


def _check_user_mpp(mpp, source) -> float:
    try:
        val = float(mpp)
    except (TypeError, ValueError):
        val = float("nan")
    if not np.isfinite(val) or val <= 0:
        raise M2ORTError(f"{source}: mpp must be a positive number of µm per pixel, got {mpp!r}.")
    return val


# --------------------------------------------------------------------------------------
# Legacy ST (almaan/her2st layout)
# --------------------------------------------------------------------------------------

_XY_ID = re.compile(r"^\s*(-?\d+(?:\.\d+)?)x(-?\d+(?:\.\d+)?)\s*$")


def _parse_xy_ids(ids: Sequence) -> list[tuple[int, int] | None]:
    out = []
    for s in ids:
        m = _XY_ID.match(str(s))
        out.append((int(round(float(m.group(1)))), int(round(float(m.group(2))))) if m else None)
    return out


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path, "rt")


def _read_counts_table(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(spot ids, gene names, dense counts) from a legacy ST ``XxY``-indexed table.

    The header is read by hand because pandas renames repeated column names
    (``GENE.1``), which would hide duplicated genes instead of reporting them.
    Tables stored genes × spots are transposed.
    """
    try:
        with _open_text(path) as fh:
            header_line = fh.readline().rstrip("\r\n")
        sep = "\t" if "\t" in header_line else ","
        header = header_line.split(sep)
        df = pd.read_csv(path, sep=sep, header=None, skiprows=1, index_col=0, low_memory=False)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise M2ORTError(
            f"{path}: cannot read the counts table ({type(exc).__name__}: {exc}); expected a "
            "tab-separated (optionally gzipped) table with one row per spot."
        ) from exc
    ncol = df.shape[1]
    if len(header) == ncol + 1:
        columns = header[1:]
    elif len(header) == ncol:
        columns = header
    else:
        raise M2ORTError(
            f"{path}: the header has {len(header)} names but the rows have {ncol} values; "
            "the counts table is malformed."
        )
    columns = [c.strip().strip('"') for c in columns]
    index = [str(i).strip().strip('"') for i in df.index]
    try:
        values = df.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise M2ORTError(f"{path}: the counts table holds non-numeric values ({exc}); fix or re-export it.") from exc

    row_ok = sum(p is not None for p in _parse_xy_ids(index))
    col_ok = sum(p is not None for p in _parse_xy_ids(columns))
    if row_ok >= max(1, len(index) // 2):
        return index, columns, values
    if col_ok >= max(1, len(columns) // 2):  # genes × spots: transpose
        return columns, index, values.T
    raise M2ORTError(
        f"{path}: spot ids must look like 'XxY' (array x and y, e.g. '10x21') in the first "
        "column or the header; none were found, so counts cannot be matched to spot positions."
    )


def _read_spot_table(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep=None, engine="python")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise M2ORTError(f"{path}: cannot read the spot table ({exc}).") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = {"x", "y", "pixel_x", "pixel_y"} - set(df.columns)
    if missing:
        raise M2ORTError(
            f"{path}: the spot table lacks column(s) {', '.join(sorted(missing))}; expected "
            "'x y new_x new_y pixel_x pixel_y selected' (ST spot detector output)."
        )
    for c in ("x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"):
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _legacy_mpp_from_geometry(spots: pd.DataFrame, source) -> float:
    """µm/px from the spot grid: array positions are 200 µm apart.

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


def read_legacy_st(image, counts, spots, mpp=None, name=None) -> STSection:
    """Read a legacy ST section: H&E image, ``XxY`` counts table, spot-detector table.

    Spots are matched on array (x, y); only ``selected == 1`` spots are kept. Selected
    spots without a counts row are skipped with a counted warning. Without ``mpp`` the
    pixel size is derived from the 200 µm spot grid (``mpp_source="st-geometry"``).
    """
    image = _existing_file(image, "image")
    counts = _existing_file(counts, "counts")
    spots = _existing_file(spots, "spot positions")
    if name is None:
        name = re.sub(r"(\.tsv|\.csv|\.txt)?(\.gz)?$", "", counts.name)
    ids, genes, values = _read_counts_table(counts)
    table = _read_spot_table(spots)

    if mpp is not None:
        mpp_val, mpp_source = _check_user_mpp(mpp, spots), "user"
    else:
        mpp_val, mpp_source = _legacy_mpp_from_geometry(table, spots), "st-geometry"
        logger.info("%s: %.4f µm/px derived from the 200 µm ST spot grid", name, mpp_val)

    if "selected" in table.columns:
        table = table[table["selected"] == 1]
    table = table.reset_index(drop=True)
    n_sel = len(table)
    if n_sel == 0:
        raise M2ORTError(f"{spots}: no spot has selected == 1; nothing to read.")

    xy_ok = table[["x", "y"]].notna().all(axis=1).to_numpy()
    keys = pd.Index(
        [f"{int(round(a))}x{int(round(b))}" if ok else f"__nan{i}" for i, (a, b, ok) in
         enumerate(zip(table["x"], table["y"], xy_ok))]
    )
    unique = _drop_ambiguous(keys, "array positions (x, y)", spots)
    table, keys = table[unique], keys[unique]

    parsed = _parse_xy_ids(ids)
    count_keys = pd.Index([f"{p[0]}x{p[1]}" if p else f"__bad{i}" for i, p in enumerate(parsed)])
    unparsed = sum(p is None for p in parsed)
    if unparsed:
        _warn(f"{counts}: {unparsed} rows have ids that are not 'XxY' and were skipped.")
    ok_rows = _drop_ambiguous(count_keys, "spot ids", counts)
    row_of = pd.Series(np.arange(len(count_keys))[ok_rows], index=count_keys[ok_rows])
    row_of = row_of[~row_of.index.str.startswith("__bad")]

    has = keys.isin(row_of.index)
    if (~has).any():
        _warn(f"{spots}: {int((~has).sum())} of {n_sel} selected spots have no row in {counts.name} and were skipped.")
    table, keys = table[has], keys[has]
    if len(table) == 0:
        raise M2ORTError(
            f"{counts}: none of the selected spots in {spots.name} has a counts row; check that "
            "both files belong to the same section."
        )
    rows = row_of.loc[keys].to_numpy()
    obs = table[[c for c in ("x", "y", "new_x", "new_y", "pixel_x", "pixel_y") if c in table.columns]].copy()
    obs = obs.rename(columns={"x": "array_x", "y": "array_y"})
    coords = table[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    return _build_section(
        x=values[rows],
        genes=genes,
        spot_ids=[ids[r] for r in rows],
        coords=coords,
        source=counts,
        name=str(name),
        image_path=image,
        img_size=image_size(image),
        mpp=mpp_val,
        mpp_source=mpp_source,
        platform="legacy-st",
        spot_diameter_um=LEGACY_ST_SPOT_UM,
        obs=obs.reset_index(drop=True),
        metadata={"counts_file": str(counts), "spots_file": str(spots)},
    )


def _her2st_files(root: Path, section: str) -> tuple[Path, Path, Path]:
    counts = next((root / "ST-cnts" / f"{section}{ext}" for ext in (".tsv.gz", ".tsv")
                   if (root / "ST-cnts" / f"{section}{ext}").is_file()), root / "ST-cnts" / f"{section}.tsv.gz")
    spots = root / "ST-spotfiles" / f"{section}_selection.tsv"
    img_dirs = [root / "ST-imgs" / section[:1] / section] + sorted((root / "ST-imgs").glob(f"*/{section}"))
    images: list[Path] = []
    for d in img_dirs:
        if d.is_dir():
            images = sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            if images:
                break
    for p, what in ((counts, "counts"), (spots, "spot selection")):
        if not p.is_file():
            raise M2ORTError(
                f"{p}: the {what} file for section {section} is missing; expected the "
                "almaan/her2st layout (ST-cnts/, ST-spotfiles/, ST-imgs/<patient>/<section>/)."
            )
    if not images:
        raise M2ORTError(
            f"{img_dirs[0]}: no H&E image (.jpg/.tif/.png) found for section {section}; "
            "expected ST-imgs/<patient>/<section>/<image>.jpg."
        )
    if len(images) > 1:
        raise M2ORTError(
            f"{images[0].parent}: {len(images)} images found for section {section}; keep one, "
            "or call read_legacy_st with the image path."
        )
    return images[0], counts, spots


def read_her2st(root, section: str, mpp=None) -> STSection:
    """Read one section (e.g. ``"C2"``) of a folder in the ``almaan/her2st`` layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise M2ORTError(f"{root}: not a folder; point to the her2st data folder (with ST-cnts/).")
    image, counts, spots = _her2st_files(root, str(section))
    return read_legacy_st(image, counts, spots, mpp=mpp, name=str(section))


# --------------------------------------------------------------------------------------
# Visium (Space Ranger output)
# --------------------------------------------------------------------------------------


def _decode(a) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(a).tolist()]


def _read_10x_h5(path: Path) -> tuple[sp.csr_matrix, list[str], list[str], list[str]]:
    """(counts spots × genes, barcodes, gene symbols, gene ids) from a 10x HDF5 matrix.

    Uses h5py directly (no scanpy). Handles the v3 layout (``matrix/features``) and the
    older v2 layout (``<genome>/genes``). Non-gene features (antibody capture, ...) are
    dropped: the model predicts gene expression only.
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise M2ORTError(f"{path}: not a readable 10x HDF5 matrix ({exc}).") from exc
    with f:
        if "matrix" in f:
            g = f["matrix"]
            feats = g["features"]
            names = _decode(feats["name"][()])
            ids = _decode(feats["id"][()])
            ftype = _decode(feats["feature_type"][()]) if "feature_type" in feats else ["Gene Expression"] * len(ids)
        else:
            groups = [k for k in f.keys() if isinstance(f[k], h5py.Group) and "genes" in f[k]]
            if not groups:
                raise M2ORTError(f"{path}: no 'matrix' group; this is not a 10x feature-barcode matrix.")
            g = f[groups[0]]
            ids = _decode(g["genes"][()])
            names = _decode(g["gene_names"][()]) if "gene_names" in g else ids
            ftype = ["Gene Expression"] * len(ids)
        n_genes, n_bc = (int(v) for v in g["shape"][()])
        # 10x stores genes × barcodes column-compressed == barcodes × genes row-compressed
        x = sp.csr_matrix(
            (g["data"][()].astype(np.float64), g["indices"][()], g["indptr"][()]), shape=(n_bc, n_genes)
        )
        barcodes = _decode(g["barcodes"][()])
    is_gene = np.array([t == "Gene Expression" for t in ftype])
    if not is_gene.all():
        x = x[:, np.flatnonzero(is_gene)]
        names = [n for n, k in zip(names, is_gene) if k]
        ids = [n for n, k in zip(ids, is_gene) if k]
    return x, barcodes, names, ids


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    for fname, has_header in (("tissue_positions.csv", True), ("tissue_positions_list.csv", False)):
        p = spatial / fname
        if p.is_file():
            break
    else:
        raise M2ORTError(
            f"{spatial}: no tissue_positions.csv or tissue_positions_list.csv; point to a Space "
            "Ranger 'outs' folder that contains spatial/."
        )
    with open(p) as fh:
        first = fh.readline()
    has_header = first.lower().startswith("barcode")
    df = pd.read_csv(p, header=0 if has_header else None)
    if df.shape[1] < 6:
        raise M2ORTError(f"{p}: expected 6 columns ({', '.join(cols)}), found {df.shape[1]}.")
    df = df.iloc[:, :6]
    df.columns = cols
    df["barcode"] = df["barcode"].astype(str)
    for c in cols[1:]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df, p


def _visium_geometry_mpp(positions: pd.DataFrame) -> float | None:
    """µm/px from the array grid: one array column is 50 µm, one array row 50·√3 µm."""
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


def _nn_geometry_mpp(coords: np.ndarray, pitch_um: float) -> float | None:
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


def _reconcile_mpp(meta_mpp: float, geom_mpp: float | None, source) -> tuple[float, str]:
    """Prefer the metadata value; fall back to geometry when they clearly disagree."""
    if geom_mpp is None or abs(geom_mpp / meta_mpp - 1) <= _MPP_AGREEMENT:
        return meta_mpp, "metadata"
    _warn(
        f"{source}: spot_diameter_fullres implies {meta_mpp:.4f} µm/px but the spot spacing "
        f"implies {geom_mpp:.4f} µm/px; using the spacing (it is measured in the same frame as "
        "the coordinates). Pass mpp explicitly if you know the true value."
    )
    return geom_mpp, "st-geometry"


def _find_visium_matrix(folder: Path) -> Path | None:
    p = folder / "filtered_feature_bc_matrix.h5"
    if p.is_file():
        return p
    found = sorted(folder.glob("*filtered_feature_bc_matrix.h5"))
    return found[0] if found else None


def _visium_root(folder: Path) -> Path:
    if _find_visium_matrix(folder) is None and (folder / "outs").is_dir():
        return folder / "outs"
    return folder


def is_visium_folder(path) -> bool:
    """True for a Space Ranger output folder (matrix .h5 plus spatial/)."""
    p = Path(path)
    if not p.is_dir():
        return False
    root = _visium_root(p)
    return _find_visium_matrix(root) is not None and (root / "spatial").is_dir()


def read_visium(folder, mpp=None, image=None) -> STSection:
    """Read a Space Ranger output folder (``filtered_feature_bc_matrix.h5`` + ``spatial/``).

    The full-resolution image is usually not shipped, so unless ``image`` (the
    full-resolution H&E the pixel coordinates refer to) is given, the hires PNG is used
    when it is not blank, else the lowres PNG; spot coordinates are scaled to that image
    and its µm/px is ``mpp_fullres / scalef``. ``mpp`` (if given) is the µm/px of the
    full-resolution image. Without it, µm/px = 65 / ``spot_diameter_fullres`` (Space
    Ranger's definition), cross-checked against the 100 µm spot pitch.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise M2ORTError(f"{folder}: not a folder; point to a Space Ranger 'outs' folder.")
    root = _visium_root(folder)
    h5 = _find_visium_matrix(root)
    if h5 is None:
        raise M2ORTError(
            f"{folder}: no filtered_feature_bc_matrix.h5 found; point to the Space Ranger "
            "'outs' folder (the one containing the matrix and spatial/)."
        )
    spatial = root / "spatial"
    positions, pos_path = _read_positions(spatial)
    sf_path = spatial / "scalefactors_json.json"
    if not sf_path.is_file():
        raise M2ORTError(f"{sf_path}: missing; the Space Ranger spatial/ folder is incomplete.")
    try:
        sf = json.loads(sf_path.read_text())
    except (ValueError, OSError) as exc:
        raise M2ORTError(f"{sf_path}: not valid JSON ({exc}).") from exc

    x, barcodes, names, gene_ids = _read_10x_h5(h5)

    # match barcodes to positions, never guessing on repeated barcodes
    bc_ok = _drop_ambiguous(pd.Index(barcodes), "barcodes", h5)
    pos = positions[_drop_ambiguous(pd.Index(positions["barcode"]), "barcodes", pos_path)].set_index("barcode")
    idx = np.flatnonzero(bc_ok)
    found = pd.Index([barcodes[i] for i in idx]).isin(pos.index)
    if (~found).any():
        _warn(f"{h5}: {int((~found).sum())} barcodes have no row in {pos_path.name} and were skipped.")
    idx = idx[found]
    if len(idx) == 0:
        raise M2ORTError(f"{h5}: none of its barcodes appears in {pos_path}; are they from the same run?")
    bcs = [barcodes[i] for i in idx]
    obs = pos.loc[bcs, ["in_tissue", "array_row", "array_col"]].reset_index(drop=True)
    full_xy = pos.loc[bcs, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    diam = sf.get("spot_diameter_fullres")
    if mpp is not None:
        mpp_full, mpp_source = _check_user_mpp(mpp, folder), "user"
    elif diam and np.isfinite(diam) and diam > 0:
        mpp_full, mpp_source = _reconcile_mpp(
            VISIUM_SCALEFACTOR_SPOT_UM / float(diam), _visium_geometry_mpp(positions), sf_path
        )
    else:
        geom = _visium_geometry_mpp(positions)
        if geom is None:
            raise M2ORTError(f"{sf_path}: no spot_diameter_fullres and no usable spot grid; pass --mpp.")
        mpp_full, mpp_source = geom, "st-geometry"

    # pick the image and its scale relative to full resolution
    img_path, scale, which = None, 1.0, "none"
    if image is not None:
        img_path, which = _existing_file(image, "image"), "fullres"
    else:
        for key in ("hires", "lowres"):
            p = spatial / f"tissue_{key}_image.png"
            s = sf.get(f"tissue_{key}_scalef")
            if not p.is_file() or not s:
                continue
            if _is_blank_image(p):
                _warn(f"{p}: the image is blank (near-constant pixels); trying the next one.")
                continue
            img_path, scale, which = p, float(s), key
            break
        if img_path is None:
            _warn(f"{spatial}: no usable tissue image; spots are read without an image.")

    orig_sf = {k: float(v) for k, v in sf.items() if isinstance(v, (int, float))}
    return _build_section(
        x=x[idx],
        genes=names,
        spot_ids=bcs,
        coords=full_xy * scale,
        source=h5,
        name=root.name if root.name != "outs" else root.parent.name,
        image_path=img_path,
        img_size=image_size(img_path) if img_path else None,
        mpp=mpp_full / scale,
        mpp_source=mpp_source,
        platform="visium",
        spot_diameter_um=VISIUM_SPOT_UM,
        obs=obs,
        var=pd.DataFrame({"gene_ids": gene_ids}),
        scalefactors={"spot_diameter_fullres": (float(diam) if diam else VISIUM_SCALEFACTOR_SPOT_UM / mpp_full) * scale},
        metadata={
            "image_choice": which,
            "image_scalef": scale,
            "mpp_fullres": mpp_full,
            "original_scalefactors": orig_sf,
            "spot_diameter_fullres_definition": "pixels spanning a theoretical 65 µm spot (Space Ranger)",
        },
    )


# --------------------------------------------------------------------------------------
# AnnData (.h5ad)
# --------------------------------------------------------------------------------------

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")


def _counts_matrix(adata, source):
    """Pick raw counts: layers['counts'], else .raw (same genes kept), else X."""
    if "counts" in adata.layers:
        return adata.layers["counts"], list(adata.var_names), adata.var, "layers['counts']"
    if adata.raw is not None:
        rx = adata.raw.X
        data = rx.data if sp.issparse(rx) else np.asarray(rx).ravel()
        if data.size and np.all(np.isfinite(data)) and np.allclose(data[: 10000], np.round(data[: 10000])):
            return rx, list(adata.raw.var_names), adata.raw.var, "raw.X"
    return adata.X, list(adata.var_names), adata.var, "X"


def _embedded_image(arr, key, source) -> np.ndarray | None:
    a = np.asarray(arr)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        _warn(f"{source}: embedded {key} image has shape {a.shape}; not an RGB image, ignored.")
        return None
    a = a[..., :3]
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1.0 + 1e-6:
            _warn(f"{source}: embedded {key} image has values outside [0, 1]; not an image, ignored.")
            return None
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.std() < 3.0:
        _warn(f"{source}: embedded {key} image is blank (near-constant pixels); ignored.")
        return None
    return a


def read_h5ad(path, image=None, mpp=None, library_id=None) -> STSection:
    """Read an AnnData file with spot coordinates in ``obsm["spatial"]``.

    ``obsm["spatial"]`` must be (x, y) in pixels of the full-resolution image. The image
    is ``image`` if given (coordinates used as they are), else the best embedded image in
    ``uns["spatial"][lib]["images"]`` (coordinates scaled by its ``tissue_*_scalef``).
    µm/px: ``mpp`` (of the full-resolution image) if given; else, for Visium data
    (``spot_diameter_fullres`` present), 65 / spot_diameter_fullres cross-checked
    against the 100 µm spot pitch; otherwise an M2ORTError asks for ``--mpp``.
    """
    import anndata as ad

    path = _existing_file(path, ".h5ad")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise M2ORTError(f"{path}: cannot read it as AnnData ({type(exc).__name__}: {exc}).") from exc
    if "spatial" not in adata.obsm:
        raise M2ORTError(
            f"{path}: has no obsm['spatial'] (spot coordinates), so spots cannot be placed on "
            "the image; add the (x, y) pixel coordinates as obsm['spatial']."
        )
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise M2ORTError(f"{path}: obsm['spatial'] has shape {coords.shape}; expected (n_spots, 2).")
    coords = coords[:, :2]

    libs = adata.uns.get("spatial", {}) or {}
    libs = {k: v for k, v in libs.items() if isinstance(v, dict)}
    if library_id is not None:
        if library_id not in libs:
            raise M2ORTError(f"{path}: library {library_id!r} not in uns['spatial'] ({', '.join(libs) or 'none'}).")
        lib_name, lib = library_id, libs[library_id]
    elif len(libs) == 1:
        lib_name, lib = next(iter(libs.items()))
    elif len(libs) > 1:
        raise M2ORTError(
            f"{path}: uns['spatial'] holds {len(libs)} libraries ({', '.join(libs)}); one section "
            "per file is supported: pass library_id or split the file by library."
        )
    else:
        lib_name, lib = None, {}
    sf = dict(lib.get("scalefactors", {}) or {})
    diam = sf.get("spot_diameter_fullres")
    diam = float(diam) if diam is not None and np.isfinite(diam) and diam > 0 else None
    # files written from an STSection (by this package) carry their own pixel size,
    # platform and image path; they take precedence over the Visium conventions
    meta = dict(lib.get("metadata", {}) or {})
    own_mpp = meta.get("mpp")
    own_mpp = float(own_mpp) if isinstance(own_mpp, (int, float)) and np.isfinite(own_mpp) and own_mpp > 0 else None
    platform = str(meta.get("platform") or ("visium" if diam is not None else "unknown"))
    is_visium = platform == "visium"

    x, genes, var, which_counts = _counts_matrix(adata, path)
    x = _to_csr(x)
    sample = x.data[:10000]
    if sample.size and not np.allclose(sample[np.isfinite(sample)], np.round(sample[np.isfinite(sample)])):
        _warn(
            f"{path}: {which_counts} holds non-integer values, so it is probably normalised, not raw "
            "counts; training targets assume raw counts (store them in layers['counts'])."
        )
    if _ENSEMBL.match(str(genes[0]) if genes else ""):
        for col in ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "symbol"):
            if col in var.columns:
                genes = [str(g) for g in var[col]]
                break

    # µm/px of the full-resolution frame
    name = str(lib_name or path.stem)
    if mpp is not None:
        mpp_full, mpp_source = _check_user_mpp(mpp, path), "user"
    elif own_mpp is not None:
        mpp_full, mpp_source = own_mpp, str(meta.get("mpp_source") or "metadata")
    elif is_visium and diam is not None:
        if {"array_row", "array_col"} <= set(adata.obs.columns):
            geo = _visium_geometry_mpp(pd.DataFrame({
                "array_row": adata.obs["array_row"].to_numpy(float), "array_col": adata.obs["array_col"].to_numpy(float),
                "pxl_col_in_fullres": coords[:, 0], "pxl_row_in_fullres": coords[:, 1]}))
        else:
            geo = _nn_geometry_mpp(coords, VISIUM_PITCH_UM)
        mpp_full, mpp_source = _reconcile_mpp(VISIUM_SCALEFACTOR_SPOT_UM / diam, geo, path)
    else:
        raise M2ORTError(
            f"{path}: the pixel size is unknown (no uns['spatial'][...]['scalefactors']"
            "['spot_diameter_fullres']); pass the image's µm per pixel with --mpp."
        )

    img_path, emb, scale, which = None, None, 1.0, "none"
    if image is None and own_mpp is not None and meta.get("image") and Path(str(meta["image"])).is_file():
        image = Path(str(meta["image"]))  # the image this package read the section with
    if image is not None:
        img_path, which = _existing_file(image, "image"), "argument"
    else:
        for key in ("hires", "lowres"):
            arr = (lib.get("images") or {}).get(key)
            s = sf.get(f"tissue_{key}_scalef")
            if arr is None:
                continue
            if not s:
                _warn(f"{path}: embedded {key} image has no tissue_{key}_scalef; ignored.")
                continue
            emb = _embedded_image(arr, key, path)
            if emb is not None:
                scale, which = float(s), f"embedded-{key}"
                break
    size = image_size(img_path) if img_path else ((emb.shape[1], emb.shape[0]) if emb is not None else None)

    obs = adata.obs.reset_index(drop=True)  # annotations travel with their spots
    return _build_section(
        x=x,
        genes=genes,
        spot_ids=list(map(str, adata.obs_names)),
        coords=coords * scale,
        source=path,
        name=name,
        image_path=img_path,
        img_size=size,
        mpp=mpp_full / scale,
        mpp_source=mpp_source,
        platform=platform,
        spot_diameter_um={"visium": VISIUM_SPOT_UM, "legacy-st": LEGACY_ST_SPOT_UM}.get(platform),
        obs=obs,
        scalefactors={"spot_diameter_fullres": diam * scale} if diam else None,
        metadata={"image_choice": which, "image_scalef": scale, "mpp_fullres": mpp_full,
                  "counts_from": which_counts,
                  "original_scalefactors": {k: float(v) for k, v in sf.items() if isinstance(v, (int, float))}},
        image=emb,
    )


def read_section(path, image=None, mpp=None) -> STSection:
    """Dispatch on what ``path`` is: a Visium folder, an .h5ad file or a her2st-layout folder.

    For a her2st-layout root use :func:`read_her2st` (it needs a section name).
    """
    p = Path(path).expanduser()
    if p.is_dir() and is_visium_folder(p):
        return read_visium(p, mpp=mpp, image=image)
    if p.is_file() and p.suffix.lower() == ".h5ad":
        return read_h5ad(p, image=image, mpp=mpp)
    raise M2ORTError(
        f"{p}: not a recognised ST input; give a Space Ranger 'outs' folder, an .h5ad file, or a "
        "her2st-layout folder with a section name."
    )


# --------------------------------------------------------------------------------------
# Expression for display and the napari reader
# --------------------------------------------------------------------------------------


def log1p_cpm(counts) -> sp.csr_matrix:
    """log1p(counts per million) per spot over all genes; spots with no counts stay 0."""
    x = _to_csr(counts)
    total = np.asarray(x.sum(axis=1)).ravel()
    inv = np.divide(1e6, total, out=np.zeros_like(total), where=total > 0)
    y = sp.csr_matrix(sp.diags(inv) @ x)
    y.data = np.log1p(y.data)
    return y


def points_layer_data(section: STSection, genes: Sequence[str] | None = None, max_genes: int = 250,
                      color_by: str | None = None) -> tuple:
    """napari Points LayerData of the measured spots, in µm, coloured by one gene.

    ``features`` holds log1p(CPM) of ``genes`` (the ones present), or of the
    ``max_genes`` genes with highest mean log1p(CPM). The colour gene is ``color_by``,
    else ERBB2 when present (the HER2 gene), else the most variable feature.
    """
    expr = log1p_cpm(section.adata.X)
    all_genes = section.genes
    if genes is None:
        mean = np.asarray(expr.mean(axis=0)).ravel()
        order = np.lexsort((np.array(all_genes, dtype=object).astype(str), -mean))
        cols = order[: max(0, int(max_genes))]
    else:
        pos = {g: i for i, g in enumerate(all_genes)}
        missing = [g for g in genes if g not in pos]
        if missing:
            _warn(f"{section.name}: {len(missing)} requested genes are not measured (e.g. {', '.join(missing[:3])}).")
        cols = np.array([pos[g] for g in genes if g in pos], dtype=int)
    names = [all_genes[i] for i in cols]
    dense = expr[:, cols].toarray().astype(np.float32) if len(cols) else np.zeros((section.n_spots, 0), np.float32)
    features = pd.DataFrame(dense, columns=names)

    if color_by is None:
        if "ERBB2" in features.columns:
            color_by = "ERBB2"
        elif len(names):
            color_by = names[int(np.argmax(dense.var(axis=0)))]
    xy_um = section.centers_um
    diameter = section.spot_diameter_um
    if diameter is None:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(xy_um).query(xy_um, k=2) if len(xy_um) > 1 else (np.array([[0, 50.0]]), None)
        diameter = float(np.median(d[:, 1])) / 2
    kwargs = {
        "name": f"{section.name} measured ST",
        "size": float(diameter),
        "features": features,
        "border_width": 0,
        "opacity": 0.8,
        "metadata": {"st_section": section, "mpp": section.mpp, "genes": names, "color_by": color_by},
    }
    if color_by is not None:
        kwargs["face_color"] = color_by
        kwargs["face_colormap"] = "viridis"
    data = np.ascontiguousarray(xy_um[:, ::-1])  # napari order: (row=y, col=x)
    return (data, kwargs, "points")


def _napari_has_units() -> bool:
    """napari >= 0.6 takes ``units=``; older versions reject the keyword."""
    try:
        import inspect

        from napari.layers import Image
    except ImportError:
        return False
    return "units" in inspect.signature(Image.__init__).parameters


def section_layer_data(section: STSection) -> list[tuple]:
    """Image (if any) + measured spots as napari LayerData, both in µm."""
    layers: list[tuple] = []
    if section.image_path is not None:
        from .slides import open_slide

        layers.extend(open_slide(section.image_path, mpp=section.mpp).layer_data())
    elif section.image is not None:
        kw = {"name": f"{section.name} image", "rgb": True, "scale": (section.mpp, section.mpp)}
        if _napari_has_units():
            kw["units"] = ("µm", "µm")
        layers.append((section.image, kw, "image"))
    points = points_layer_data(section)
    img_units = next((kw.get("units") for _, kw, t in layers if t == "image" and kw.get("units")), None)
    if img_units is not None:  # spots in the same units as the image they sit on
        points[1]["units"] = img_units
    layers.append(points)
    return layers


def napari_get_reader(path):
    """npe2 reader hook: Visium folders and .h5ad files; None for anything else."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(str(path))
    if p.suffix.lower() == ".h5ad" and p.is_file():
        return lambda _path: section_layer_data(read_h5ad(p))
    if p.is_dir() and is_visium_folder(p):
        return lambda _path: section_layer_data(read_visium(p))
    return None
