"""The one shape every ST reader returns (:class:`STSection`), and how it is assembled.

Counts, gene symbols, spot ids and spot centres are kept in the pixel frame of the image
the section names, together with the µm/px of that image, so downstream code converts
to µm with one multiplication and never needs to know the platform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...targets import as_csr
from .validate import make_unique, valid_rows

__all__ = [
    "STSection",
    "build_section",
    "LEGACY_ST_PITCH_UM",
    "LEGACY_ST_SPOT_UM",
    "VISIUM_PITCH_UM",
    "VISIUM_SPOT_UM",
    "VISIUM_SCALEFACTOR_SPOT_UM",
    "PLATFORM_SPOT_UM",
]

# Physical geometry of the two array platforms.
LEGACY_ST_PITCH_UM = 200.0  # centre-to-centre distance of legacy ST spots
LEGACY_ST_SPOT_UM = 100.0  # legacy ST spot diameter
VISIUM_PITCH_UM = 100.0  # Visium centre-to-centre distance
VISIUM_SPOT_UM = 55.0  # Visium capture spot diameter (the physical spot)
# Space Ranger's ``spot_diameter_fullres`` is the pixel span of a *theoretical 65 µm*
# spot (10x documentation), not of the 55 µm capture spot.  Both test fixtures confirm
# it: 65 / spot_diameter_fullres agrees with the spot pitch to 0.5 %, 55 / ... is 15 % off.
VISIUM_SCALEFACTOR_SPOT_UM = 65.0

#: Physical spot diameter (µm) of each known platform.
PLATFORM_SPOT_UM = {"visium": VISIUM_SPOT_UM, "legacy-st": LEGACY_ST_SPOT_UM}


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
            if self.platform in PLATFORM_SPOT_UM:
                self.spot_diameter_um = PLATFORM_SPOT_UM[self.platform]
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


def build_section(
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
    """Keep the valid rows (see :func:`validate.valid_rows`) and assemble the STSection."""
    import anndata as ad

    x = as_csr(x)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if not (len(spot_ids) == x.shape[0] == len(coords)):
        raise AssertionError("counts, ids and coordinates must have the same rows")
    image_label = image_path.name if image_path else "(embedded)"
    idx = np.flatnonzero(valid_rows(x, coords, img_size, source, image_label))
    genes = make_unique(genes, "gene names", source)
    ids = make_unique([str(spot_ids[i]) for i in idx], "spot ids", source)
    obs_df = obs.iloc[idx].copy() if obs is not None else pd.DataFrame(index=range(len(idx)))
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
