"""Space Ranger output folders (10x Visium): ``filtered_feature_bc_matrix.h5`` + ``spatial/``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import M2ORTError
from .grid import visium_grid_mpp
from .image import image_size, is_blank_image
from .section import VISIUM_SCALEFACTOR_SPOT_UM, VISIUM_SPOT_UM, STSection, build_section
from .validate import check_most_kept, check_mpp, drop_ambiguous, existing_file, reconcile_mpp, warn

__all__ = ["read_visium", "is_visium_folder"]


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
        x = sp.csr_matrix((g["data"][()].astype(np.float64), g["indices"][()], g["indptr"][()]), shape=(n_bc, n_genes))
        barcodes = _decode(g["barcodes"][()])
    is_gene = np.array([t == "Gene Expression" for t in ftype])
    if not is_gene.all():
        x = x[:, np.flatnonzero(is_gene)]
        names = [n for n, k in zip(names, is_gene) if k]
        ids = [n for n, k in zip(ids, is_gene) if k]
    return x, barcodes, names, ids


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    for fname in ("tissue_positions.csv", "tissue_positions_list.csv"):  # Space Ranger >= 2.0, older
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
    bc_ok = drop_ambiguous(pd.Index(barcodes), "barcodes", h5)
    pos = positions[drop_ambiguous(pd.Index(positions["barcode"]), "barcodes", pos_path)].set_index("barcode")
    idx = np.flatnonzero(bc_ok)
    found = pd.Index([barcodes[i] for i in idx]).isin(pos.index)
    if (~found).any():
        warn(f"{h5}: {int((~found).sum())} barcodes have no row in {pos_path.name} and were skipped.")
    idx = idx[found]
    if len(idx) == 0:
        raise M2ORTError(f"{h5}: none of its barcodes appears in {pos_path}; are they from the same run?")
    check_most_kept(
        int((~found).sum()),
        len(found),
        h5,
        f"barcodes have no row in {pos_path.name}",
        f"{h5.name} and {pos_path.name} come from different Space Ranger runs",
    )
    bcs = [barcodes[i] for i in idx]
    obs = pos.loc[bcs, ["in_tissue", "array_row", "array_col"]].reset_index(drop=True)
    full_xy = pos.loc[bcs, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    diam = sf.get("spot_diameter_fullres")
    if mpp is not None:
        mpp_full, mpp_source = check_mpp(mpp, folder), "user"
    elif diam and np.isfinite(diam) and diam > 0:
        mpp_full, mpp_source = reconcile_mpp(
            VISIUM_SCALEFACTOR_SPOT_UM / float(diam), visium_grid_mpp(positions), sf_path
        )
    else:
        geom = visium_grid_mpp(positions)
        if geom is None:
            raise M2ORTError(f"{sf_path}: no spot_diameter_fullres and no usable spot grid; pass --mpp.")
        mpp_full, mpp_source = geom, "st-geometry"

    # pick the image and its scale relative to full resolution
    img_path, scale, which = None, 1.0, "none"
    if image is not None:
        img_path, which = existing_file(image, "image"), "fullres"
    else:
        for key in ("hires", "lowres"):
            p = spatial / f"tissue_{key}_image.png"
            s = sf.get(f"tissue_{key}_scalef")
            if not p.is_file() or not s:
                continue
            if is_blank_image(p):
                warn(f"{p}: the image is blank (near-constant pixels); trying the next one.")
                continue
            img_path, scale, which = p, float(s), key
            break
        if img_path is None:
            warn(f"{spatial}: no usable tissue image; spots are read without an image.")

    orig_sf = {k: float(v) for k, v in sf.items() if isinstance(v, (int, float))}
    return build_section(
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
        scalefactors={
            "spot_diameter_fullres": (float(diam) if diam else VISIUM_SCALEFACTOR_SPOT_UM / mpp_full) * scale
        },
        metadata={
            "image_choice": which,
            "image_scalef": scale,
            "mpp_fullres": mpp_full,
            "original_scalefactors": orig_sf,
            "spot_diameter_fullres_definition": "pixels spanning a theoretical 65 µm spot (Space Ranger)",
        },
    )
