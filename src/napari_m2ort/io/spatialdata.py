"""Spots as a SpatialData ``.zarr`` store: what napari-spatialdata and the scverse tools open.

The store holds three elements in one coordinate system, ``"global"``, whose unit is µm:

- ``spots``: the spots as circles (centre and radius in µm, ``ShapesModel``);
- ``table``: the AnnData annotating them (genes in X, ``layers["uncertainty"]``,
  ``obs["flag"]`` / ``obs["uncertainty"]`` where present), linked to ``spots`` by
  ``region`` / ``instance_id`` (``TableModel``);
- ``he``: the slide image, or a downscaled copy of it, with the scale that maps its pixels
  to µm (``Image2DModel``).

It is built from the AnnData every producer makes (:func:`napari_m2ort.io.export.spots_anndata`),
so it needs nothing but that AnnData: the image is its hires thumbnail unless a slide is
given. Writing is atomic like the other exports: the store is written next to the target
under a temporary name, then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..errors import M2ORTError

__all__ = ["COORDINATE_SYSTEM", "IMAGE_KEY", "SHAPES_KEY", "TABLE_KEY", "to_spatialdata", "write_spatialdata"]

COORDINATE_SYSTEM = "global"  # µm of the slide, origin at its top-left corner
IMAGE_KEY = "he"
SHAPES_KEY = "spots"
TABLE_KEY = "table"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
#: Long side (px) of the image copied from a slide when one is given.
SLIDE_IMAGE_PX = 4096


def _library(adata) -> tuple[str, dict]:
    libs = {k: v for k, v in (adata.uns.get("spatial") or {}).items() if isinstance(v, dict)}
    if len(libs) != 1:
        raise M2ORTError(
            f"SpatialData export needs one library in uns['spatial'] (found {len(libs)}): write one slide per store."
        )
    return next(iter(libs.items()))


def _mpp(adata, lib: dict) -> float:
    sf, md = lib.get("scalefactors") or {}, lib.get("metadata") or {}
    for v in (sf.get("microns_per_pixel"), md.get("mpp")):
        if v is not None and np.isfinite(float(v)) and float(v) > 0:
            return float(v)
    if "spatial_um" in adata.obsm:  # obsm["spatial"] (px) and obsm["spatial_um"] agree on the scale
        px, um = np.asarray(adata.obsm["spatial"], float), np.asarray(adata.obsm["spatial_um"], float)
        ok = np.abs(px) > 1e-9
        if ok.any():
            return float(np.median(um[ok] / px[ok]))
    raise M2ORTError("SpatialData export: the pixel size is unknown (no microns_per_pixel in uns['spatial']).")


def _image(lib: dict, mpp: float, slide, max_px: int):
    """((3, H, W) uint8 image, µm per image pixel) or (None, None) without any image."""
    if slide is not None:
        img, ds = slide.thumbnail(max_px)
        return np.asarray(img)[..., :3], float(slide.mpp) * float(ds)
    images, sf = lib.get("images") or {}, lib.get("scalefactors") or {}
    for key in ("hires", "lowres"):
        scalef = sf.get(f"tissue_{key}_scalef")
        if images.get(key) is not None and scalef:
            img = np.asarray(images[key])[..., :3]
            if img.dtype != np.uint8:  # scanpy also accepts floats in [0, 1]
                img = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
            return img, mpp / float(scalef)
    return None, None


def to_spatialdata(adata, slide=None, image_max_px: int = SLIDE_IMAGE_PX):
    """A ``SpatialData`` of the spots of ``adata`` (one library; see the module docstring).

    ``slide``: copy the image from it (long side ``image_max_px``) instead of the
    AnnData's hires thumbnail.
    """
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    name, lib = _library(adata)
    mpp = _mpp(adata, lib)
    if "spatial_um" in adata.obsm:
        xy_um = np.asarray(adata.obsm["spatial_um"], dtype=float)
    else:
        xy_um = np.asarray(adata.obsm["spatial"], dtype=float) * mpp
    diameter_px = (lib.get("scalefactors") or {}).get("spot_diameter_fullres")
    if diameter_px is None:
        raise M2ORTError("SpatialData export: no spot_diameter_fullres in uns['spatial'], so circles have no size.")
    n = adata.n_obs
    shapes = ShapesModel.parse(
        xy_um[:, :2].copy(),
        geometry=0,
        radius=np.full(n, float(diameter_px) * mpp / 2.0),
        index=np.arange(n),
        transformations={COORDINATE_SYSTEM: Identity()},
    )

    table = adata.copy()
    spatial = dict(table.uns.get("spatial") or {})
    spatial[name] = {k: v for k, v in lib.items() if k != "images"}  # the image is its own element
    table.uns["spatial"] = spatial
    table.obs[REGION_KEY] = pd.Categorical([SHAPES_KEY] * n)
    table.obs[INSTANCE_KEY] = np.arange(n)
    table = TableModel.parse(table, region=SHAPES_KEY, region_key=REGION_KEY, instance_key=INSTANCE_KEY)

    images = {}
    img, um_per_px = _image(lib, mpp, slide, image_max_px)
    if img is not None:
        multiscale = max(img.shape[:2]) > 2048
        images[IMAGE_KEY] = Image2DModel.parse(
            np.ascontiguousarray(np.moveaxis(img, -1, 0)),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=[2, 2] if multiscale else None,
            transformations={COORDINATE_SYSTEM: Scale([um_per_px, um_per_px], axes=("y", "x"))},
        )
    return SpatialData(images=images, shapes={SHAPES_KEY: shapes}, tables={TABLE_KEY: table})


def _umask() -> int:
    from .export import _umask as umask

    return umask()


def write_spatialdata(adata, path, slide=None, overwrite: bool = False, image_max_px: int = SLIDE_IMAGE_PX) -> Path:
    """Write the spots of ``adata`` as a SpatialData store at ``path`` (ending in .zarr).

    An existing store is replaced only with ``overwrite`` (and only if it is a zarr store);
    the new one is complete before the old one goes. Opens with ``spatialdata.read_zarr``.
    """
    from .export import check_output_path

    path = check_output_path(path, overwrite=overwrite)
    if not path.name.lower().endswith(".zarr"):
        raise M2ORTError(f"{path}: a SpatialData store is written as a folder ending in .zarr.")
    sdata = to_spatialdata(adata, slide=slide, image_max_px=image_max_px)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        store = work / path.name
        with warnings.catch_warnings():  # zarr announcing its next default, not about this store
            warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
            sdata.write(store)
        os.chmod(store, 0o777 & ~_umask())
        if path.exists():
            old = work / "replaced"
            os.rename(path, old)
            os.rename(store, path)
        else:
            os.rename(store, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
