"""Predicted or measured spots to AnnData / CSV, written atomically.

Atomic = write a temporary file next to the target, then ``os.replace``: an interrupted
export never leaves a half-written file where a good one was. The file gets the
permissions the user's umask asks for (the temporary file starts private).
The npe2 writer hooks that call this live in :mod:`napari_m2ort.io.napari`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import M2ORTError


def _umask() -> int:
    try:  # Linux states it without changing it
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _atomic(path, write_fn) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary file only
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return _atomic(path, lambda p: p.write_text(text))


def write_h5ad(adata, path) -> Path:
    path = Path(path)
    if path.suffix != ".h5ad":
        raise M2ORTError(f"{path}: predictions are written as AnnData; give a file name ending in .h5ad.")
    return _atomic(path, lambda p: adata.write_h5ad(p))


def write_csv(adata, path) -> Path:
    import pandas as pd

    df = pd.DataFrame(np.asarray(adata.X), index=adata.obs_names, columns=adata.var_names)
    xy = np.asarray(adata.obsm["spatial_um"]) if "spatial_um" in adata.obsm else np.asarray(adata.obsm["spatial"])
    df.insert(0, "y_um", xy[:, 1])
    df.insert(0, "x_um", xy[:, 0])
    return _atomic(path, lambda p: df.to_csv(p, index_label="spot"))


def _set_spatial(adata, xy_um, mpp: float, diameter_um: float, library: str, metadata: dict | None = None):
    """Visium/squidpy-style keys: pixel and µm centres, one library's scalefactors."""
    adata.obsm["spatial"] = xy_um / mpp
    adata.obsm["spatial_um"] = xy_um
    lib = {
        "scalefactors": {
            "spot_diameter_fullres": diameter_um / mpp,
            "tissue_hires_scalef": 1.0,
            "microns_per_pixel": mpp,
        }
    }
    if metadata is not None:
        lib["metadata"] = metadata
    adata.uns["spatial"] = {library: lib}


def prediction_to_anndata(pred, card, slide=None, spots=None, mpp: Optional[float] = None):
    """AnnData of the predicted spots (done ones only), Visium/squidpy-style spatial keys.

    ``obsm["spatial"]`` is in level-0 pixels of the slide (as Space Ranger and squidpy
    expect), ``obsm["spatial_um"]`` in µm; the model card rides along in ``uns``.
    """
    import anndata as ad
    import pandas as pd

    done = np.asarray(pred.done, dtype=bool)
    mpp = float(mpp if mpp is not None else (slide.mpp if slide is not None else 1.0))
    centers = np.asarray(pred.centers_um)[done]
    if spots is not None and getattr(spots, "ids", None) is not None and len(spots.ids) == len(pred.done):
        ids = [str(i) for i in np.asarray(spots.ids)[done]]
    else:
        ids = [f"spot{i}" for i in np.flatnonzero(done)]
    obs = pd.DataFrame(
        {
            "x_um": centers[:, 0],
            "y_um": centers[:, 1],
            "outside_slide": np.asarray(pred.outside)[done],
            "no_tissue": np.asarray(pred.blank)[done],
        },
        index=pd.Index(ids, name="spot"),
    )
    adata = ad.AnnData(
        X=np.asarray(pred.values)[done].astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index([str(g) for g in pred.genes], name="gene")),
    )
    diameter = float(getattr(spots, "diameter_um", 55.0) if spots is not None else 55.0)
    library = slide.name if slide is not None else "prediction"
    _set_spatial(
        adata,
        centers,
        mpp,
        diameter,
        library,
        metadata={"source_image_path": str(getattr(slide, "path", "")), "mpp": mpp},
    )
    adata.uns["m2ort"] = {
        "model_card": card.to_json() if hasattr(card, "to_json") else json.dumps(card),
        "target": getattr(card, "target", ""),
        "layout": getattr(spots, "layout", "") if spots is not None else "",
        "spot_diameter_um": diameter,
        "inference": json.dumps({k: v for k, v in getattr(pred, "info", {}).items()}, default=str),
    }
    return adata


def points_layer_to_anndata(data, meta: dict):
    """A napari Points layer (data in (y, x) µm, features per gene) -> AnnData."""
    import anndata as ad
    import pandas as pd

    features = meta.get("features")
    if features is None or len(getattr(features, "columns", [])) == 0:
        raise M2ORTError(
            "This Points layer has no per-gene features: only predicted/measured spot layers can be saved as AnnData."
        )
    features = pd.DataFrame(features)
    numeric = features.select_dtypes(include=[np.number])
    yx = np.asarray(data, dtype=float)[:, -2:]
    xy = yx[:, ::-1]
    md = meta.get("metadata") or {}
    mpp = float(md.get("mpp", 1.0))
    ids = md.get("spot_ids")
    index = [str(i) for i in ids] if ids is not None and len(ids) == len(xy) else [f"spot{i}" for i in range(len(xy))]
    adata = ad.AnnData(
        X=numeric.to_numpy(np.float32),
        obs=pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1]}, index=pd.Index(index, name="spot")),
        var=pd.DataFrame(index=pd.Index([str(c) for c in numeric.columns], name="gene")),
    )
    size = meta.get("size")
    diameter = float(np.median(size)) if size is not None and np.size(size) else 55.0
    _set_spatial(adata, xy, mpp, diameter, str(meta.get("name", "spots")))
    if "model_card" in md:
        adata.uns["m2ort"] = {"model_card": md["model_card"]}
    return adata
