"""AnnData ``.h5ad`` files with spot coordinates in ``obsm["spatial"]`` (scanpy/squidpy style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import M2ORTError
from ...targets import as_csr
from .grid import nn_grid_mpp, visium_grid_mpp
from .image import image_size
from .section import PLATFORM_SPOT_UM, VISIUM_PITCH_UM, VISIUM_SCALEFACTOR_SPOT_UM, STSection, build_section
from .validate import ENSEMBL_ID, GENE_ID_COLUMNS, check_mpp, existing_file, reconcile_mpp, warn

__all__ = ["read_h5ad"]


def _counts_matrix(adata, source):
    """Pick raw counts: layers['counts'], else .raw (same genes kept), else X."""
    if "counts" in adata.layers:
        return adata.layers["counts"], list(adata.var_names), adata.var, "layers['counts']"
    if adata.raw is not None:
        rx = adata.raw.X
        data = rx.data if sp.issparse(rx) else np.asarray(rx).ravel()
        if data.size and np.all(np.isfinite(data)) and np.allclose(data[:10000], np.round(data[:10000])):
            return rx, list(adata.raw.var_names), adata.raw.var, "raw.X"
    return adata.X, list(adata.var_names), adata.var, "X"


def _embedded_image(arr, key, source) -> np.ndarray | None:
    a = np.asarray(arr)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        warn(f"{source}: embedded {key} image has shape {a.shape}; not an RGB image, ignored.")
        return None
    a = a[..., :3]
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1.0 + 1e-6:
            warn(f"{source}: embedded {key} image has values outside [0, 1]; not an image, ignored.")
            return None
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.std() < 3.0:
        warn(f"{source}: embedded {key} image is blank (near-constant pixels); ignored.")
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

    path = existing_file(path, ".h5ad")
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
    x = as_csr(x)
    sample = x.data[:10000]
    if sample.size and not np.allclose(sample[np.isfinite(sample)], np.round(sample[np.isfinite(sample)])):
        warn(
            f"{path}: {which_counts} holds non-integer values, so it is probably normalised, not raw "
            "counts; training targets assume raw counts (store them in layers['counts'])."
        )
    sample = [str(g) for g in genes[:1000]]
    if sample and sum(bool(ENSEMBL_ID.match(g)) for g in sample) > len(sample) / 2:
        for col in ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "symbol"):
            if col in var.columns:
                genes = [str(g) for g in var[col]]
                break
    # the other gene naming travels along, so a panel that does not match can say where it is
    id_columns = pd.DataFrame(
        {c: var[c].astype(str).to_numpy() for c in GENE_ID_COLUMNS if c in var.columns}, index=range(len(genes))
    )

    # µm/px of the full-resolution frame
    name = str(lib_name or path.stem)
    if mpp is not None:
        mpp_full, mpp_source = check_mpp(mpp, path), "user"
    elif own_mpp is not None:
        mpp_full, mpp_source = own_mpp, str(meta.get("mpp_source") or "metadata")
    elif is_visium and diam is not None:
        if {"array_row", "array_col"} <= set(adata.obs.columns):
            geo = visium_grid_mpp(
                pd.DataFrame(
                    {
                        "array_row": adata.obs["array_row"].to_numpy(float),
                        "array_col": adata.obs["array_col"].to_numpy(float),
                        "pxl_col_in_fullres": coords[:, 0],
                        "pxl_row_in_fullres": coords[:, 1],
                    }
                )
            )
        else:
            geo = nn_grid_mpp(coords, VISIUM_PITCH_UM)
        mpp_full, mpp_source = reconcile_mpp(VISIUM_SCALEFACTOR_SPOT_UM / diam, geo, path)
    else:
        raise M2ORTError(
            f"{path}: the pixel size is unknown (no uns['spatial'][...]['scalefactors']"
            "['spot_diameter_fullres']); pass the image's µm per pixel with --mpp."
        )

    img_path, emb, scale, which = None, None, 1.0, "none"
    if image is None and own_mpp is not None and meta.get("image") and Path(str(meta["image"])).is_file():
        image = Path(str(meta["image"]))  # the image this package read the section with
    if image is not None:
        img_path, which = existing_file(image, "image"), "argument"
    else:
        for key in ("hires", "lowres"):
            arr = (lib.get("images") or {}).get(key)
            s = sf.get(f"tissue_{key}_scalef")
            if arr is None:
                continue
            if not s:
                warn(f"{path}: embedded {key} image has no tissue_{key}_scalef; ignored.")
                continue
            emb = _embedded_image(arr, key, path)
            if emb is not None:
                scale, which = float(s), f"embedded-{key}"
                break
    size = image_size(img_path) if img_path else ((emb.shape[1], emb.shape[0]) if emb is not None else None)

    obs = adata.obs.reset_index(drop=True)  # annotations travel with their spots
    return build_section(
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
        spot_diameter_um=PLATFORM_SPOT_UM.get(platform),
        obs=obs,
        var=id_columns,
        scalefactors={"spot_diameter_fullres": diam * scale} if diam else None,
        metadata={
            "image_choice": which,
            "image_scalef": scale,
            "mpp_fullres": mpp_full,
            "counts_from": which_counts,
            "original_scalefactors": {k: float(v) for k, v in sf.items() if isinstance(v, (int, float))},
        },
        image=emb,
    )
