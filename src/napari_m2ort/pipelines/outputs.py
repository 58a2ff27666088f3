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

SMOOTHED_NOTE = (
    "Values are smoothed: a Gaussian of sigma {s:g} µm over neighbouring predicted spots "
    "(predictions only, no measured value); they are not the model's raw per-spot outputs."
)


def prediction_suffixes() -> tuple[str, ...]:
    """File types a prediction can be written as (``io.export.OUTPUT_SUFFIXES``)."""
    from ..io.export import OUTPUT_SUFFIXES

    return tuple(OUTPUT_SUFFIXES)


def prediction_anndata(result):
    """AnnData of a ``SlidePrediction`` (done spots only): ``io.export.prediction_to_anndata``
    with the spot flags, plus the inference options and rules in ``uns["m2ort"]``."""
    from ..io.export import prediction_to_anndata

    pred = result.prediction
    if pred is None:
        raise M2ORTError("Nothing was predicted: every spot of the region was predicted before.")
    pred.flags = result.flags  # read by prediction_to_anndata into obs["flag"]
    adata = prediction_to_anndata(pred, result.card, result.slide, result.spots)
    info = dict(getattr(pred, "info", {}) or {})
    tta, smooth_um = str(info.get("tta", "none")), float(info.get("smooth_um", 0.0) or 0.0)
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
    """The output path of a prediction, checked before any work (``io.export``'s rules:
    .h5ad, .csv or a SpatialData .zarr; not a folder; existing only with ``overwrite``)."""
    from ..io.export import check_output_path

    return check_output_path(path, overwrite=overwrite)


def write_prediction(result, path, overwrite: bool = True) -> Path:
    """Write a ``SlidePrediction`` (or an AnnData of one) by the file's extension."""
    from ..io.export import write_prediction as write

    adata = result if hasattr(result, "obs") else prediction_anndata(result)
    return write(adata, path, overwrite=overwrite, slide=getattr(result, "slide", None))


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
