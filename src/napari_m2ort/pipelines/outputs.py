"""The one structure every front door writes for a prediction, and its file types.

``napari-m2ort predict``, the cohort runner and the demo all go through
``prediction_anndata`` / ``write_prediction``, so their files agree: the library key of
``uns["spatial"]``, ``obs["flag"]`` (see ``domain``), the target and the inference
options in ``uns["m2ort"]`` (``tta``, ``smooth_um``, the output rule), and
``layers["uncertainty"]`` when test-time augmentation ran.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import M2ORTError
from .checks import PREDICTION_SUFFIXES, output_file

SMOOTHED_NOTE = (
    "Values are smoothed: a Gaussian of sigma {s:g} µm over neighbouring predicted spots "
    "(predictions only, no measured value); they are not the model's raw per-spot outputs."
)


def prediction_suffixes() -> tuple[str, ...]:
    """File types a prediction can be written as (.zarr once SpatialData export exists)."""
    return PREDICTION_SUFFIXES + ((".zarr",) if _spatialdata_writer() is not None else ())


def _spatialdata_writer():
    try:
        from ..io import spatialdata
    except ImportError:
        return None
    return getattr(spatialdata, "write_spatialdata", None)


def prediction_anndata(result):
    """AnnData of a ``SlidePrediction`` (done spots only)."""
    from ..io.export import prediction_to_anndata

    pred = result.prediction
    if pred is None:
        raise M2ORTError("Nothing was predicted: every spot of the region was predicted before.")
    adata = prediction_to_anndata(pred, result.card, result.slide, result.spots)
    done = np.asarray(pred.done, dtype=bool)
    info = dict(getattr(pred, "info", {}) or {})
    tta, smooth_um = str(info.get("tta", "none")), float(info.get("smooth_um", 0.0) or 0.0)
    if "flag" not in adata.obs:
        adata.obs["flag"] = np.asarray(result.flags, dtype=object)[done].astype(str)
    if pred.uncertainty is not None and "uncertainty" not in adata.layers:
        unc = np.asarray(pred.uncertainty, dtype=np.float32)[done]
        adata.layers["uncertainty"] = unc
        adata.obs["uncertainty"] = unc.mean(axis=1)
    meta = dict(adata.uns.get("m2ort", {}))
    meta.setdefault("target", getattr(result.card, "target", ""))
    meta.setdefault("library_id", next(iter(adata.uns.get("spatial", {"": None}))))
    meta.setdefault("tta", tta)
    meta.setdefault("smooth_um", smooth_um)
    meta.setdefault("smoothing", SMOOTHED_NOTE.format(s=smooth_um) if smooth_um > 0 else "none")
    meta.setdefault("output_rule", info.get("output") or _output_rule())
    meta.setdefault("flags", "per spot in obs['flag']: " + _flag_rule())
    if pred.uncertainty is not None:
        meta.setdefault(
            "uncertainty",
            f"layers['uncertainty']: standard deviation across the {tta} test-time views; "
            "obs['uncertainty']: its mean over genes",
        )
    adata.uns["m2ort"] = meta
    return adata


def _output_rule() -> str:
    from ..tta import OUTPUT_RULE

    return OUTPUT_RULE


def _flag_rule() -> str:
    return "ok, off-slide (field of view past the slide edge), blank (no tissue), not-HE (colours unlike H&E)"


def check_prediction_output(path, overwrite: bool = False) -> Path:
    """The output path of a prediction, checked before any work."""
    return output_file(path, prediction_suffixes(), overwrite, what="prediction output")


def write_prediction(result, path, overwrite: bool = True) -> Path:
    """Write a ``SlidePrediction`` (or an AnnData of one) by the file's extension."""
    from ..io.export import write_csv, write_h5ad

    path = check_prediction_output(path, overwrite)
    adata = result if hasattr(result, "obs") else prediction_anndata(result)
    name = path.name.lower()
    if name.endswith(".csv"):
        return write_csv(adata, path)
    if name.endswith(".zarr"):
        return _spatialdata_writer()(adata, path)
    return write_h5ad(adata, path)


def write_json(path, data: dict) -> Path:
    """A JSON record (metrics, history), atomically, with the user's umask."""
    from ..io.export import atomic_write_text

    path = Path(os.fspath(path))
    return atomic_write_text(path, json.dumps(data, indent=2, default=_plain))


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
