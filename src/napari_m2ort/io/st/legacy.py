"""Legacy ST sections: an H&E image, an ``XxY``-indexed counts table and a spot-detector
table, as laid out in the public HER2+ data set (``almaan/her2st``).
"""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import M2ORTError
from .grid import legacy_grid_mpp
from .image import IMAGE_SUFFIXES, image_size
from .section import LEGACY_ST_SPOT_UM, STSection, build_section
from .validate import check_most_kept, check_mpp, drop_ambiguous, existing_file, warn

logger = logging.getLogger(__name__)

__all__ = ["read_legacy_st", "read_her2st"]

_XY_ID = re.compile(r"^\s*(-?\d+(?:\.\d+)?)x(-?\d+(?:\.\d+)?)\s*$")


def _parse_xy_ids(ids: Sequence) -> list[tuple[int, int] | None]:
    out = []
    for s in ids:
        m = _XY_ID.match(str(s))
        out.append((int(round(float(m.group(1)))), int(round(float(m.group(2))))) if m else None)
    return out


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


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


def read_legacy_st(image, counts, spots, mpp=None, name=None) -> STSection:
    """Read a legacy ST section: H&E image, ``XxY`` counts table, spot-detector table.

    Spots are matched on array (x, y); only ``selected == 1`` spots are kept. Selected
    spots without a counts row are skipped with a counted warning; when more than half of
    the selected spots, or of the counts rows, find no partner, the two files belong to
    different sections and an M2ORTError stops the read. Without ``mpp`` the
    pixel size is derived from the 200 µm spot grid (``mpp_source="st-geometry"``).
    """
    image = existing_file(image, "image")
    counts = existing_file(counts, "counts")
    spots = existing_file(spots, "spot positions")
    if name is None:
        name = re.sub(r"(\.tsv|\.csv|\.txt)?(\.gz)?$", "", counts.name)
    ids, genes, values = _read_counts_table(counts)
    table = _read_spot_table(spots)

    if mpp is not None:
        mpp_val, mpp_source = check_mpp(mpp, spots), "user"
    else:
        mpp_val, mpp_source = legacy_grid_mpp(table, spots), "st-geometry"
        logger.info("%s: %.4f µm/px derived from the 200 µm ST spot grid", name, mpp_val)

    listed = table[["x", "y"]].round()  # every spot of the array, selected or not
    if "selected" in table.columns:
        table = table[table["selected"] == 1]
    table = table.reset_index(drop=True)
    n_sel = len(table)
    if n_sel == 0:
        raise M2ORTError(f"{spots}: no spot has selected == 1; nothing to read.")

    xy_ok = table[["x", "y"]].notna().all(axis=1).to_numpy()
    keys = pd.Index(
        [
            f"{int(round(a))}x{int(round(b))}" if ok else f"__nan{i}"
            for i, (a, b, ok) in enumerate(zip(table["x"], table["y"], xy_ok))
        ]
    )
    unique = drop_ambiguous(keys, "array positions (x, y)", spots)
    table, keys = table[unique], keys[unique]

    parsed = _parse_xy_ids(ids)
    count_keys = pd.Index([f"{p[0]}x{p[1]}" if p else f"__bad{i}" for i, p in enumerate(parsed)])
    unparsed = sum(p is None for p in parsed)
    if unparsed:
        warn(f"{counts}: {unparsed} rows have ids that are not 'XxY' and were skipped.")
    ok_rows = drop_ambiguous(count_keys, "spot ids", counts)
    row_of = pd.Series(np.arange(len(count_keys))[ok_rows], index=count_keys[ok_rows])
    row_of = row_of[~row_of.index.str.startswith("__bad")]

    has = keys.isin(row_of.index)
    if (~has).any():
        warn(f"{spots}: {int((~has).sum())} of {n_sel} selected spots have no row in {counts.name} and were skipped.")
    table, keys = table[has], keys[has]
    if len(table) == 0:
        raise M2ORTError(
            f"{counts}: none of the selected spots in {spots.name} has a counts row; check that "
            "both files belong to the same section."
        )
    _check_files_match(n_sel, int((~has).sum()), row_of.index, listed, counts, spots)
    rows = row_of.loc[keys].to_numpy()
    obs = table[[c for c in ("x", "y", "new_x", "new_y", "pixel_x", "pixel_y") if c in table.columns]].copy()
    obs = obs.rename(columns={"x": "array_x", "y": "array_y"})
    coords = table[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    return build_section(
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


def _check_files_match(n_sel: int, no_row: int, count_keys: pd.Index, listed: pd.DataFrame, counts: Path, spots: Path):
    """Stop when the counts table and the spot file describe different sections.

    Both sides are checked: selected spots without a counts row, and counts rows whose
    array position is not in the spot file at all (selected or not, so a spot file that
    lists the whole array does not count tissue-free spots against the counts).
    """
    why = (
        f"{counts.name} and {spots.name} belong to different sections (check the file names; "
        "matching sections leave out at most a few spots)"
    )
    check_most_kept(no_row, n_sel, spots, f"selected spots have no row in {counts.name}", why)
    in_file = pd.Index([f"{int(a)}x{int(b)}" for a, b in listed.dropna().itertuples(index=False)])
    check_most_kept(
        int((~count_keys.isin(in_file)).sum()),
        len(count_keys),
        counts,
        f"counts rows have no spot in {spots.name}",
        why,
    )


def _her2st_files(root: Path, section: str) -> tuple[Path, Path, Path]:
    counts = next(
        (
            root / "ST-cnts" / f"{section}{ext}"
            for ext in (".tsv.gz", ".tsv")
            if (root / "ST-cnts" / f"{section}{ext}").is_file()
        ),
        root / "ST-cnts" / f"{section}.tsv.gz",
    )
    spots = root / "ST-spotfiles" / f"{section}_selection.tsv"
    img_dirs = [root / "ST-imgs" / section[:1] / section] + sorted((root / "ST-imgs").glob(f"*/{section}"))
    images: list[Path] = []
    for d in img_dirs:
        if d.is_dir():
            images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
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
