"""Predicted or measured spots to AnnData / CSV / SpatialData, written atomically.

Every producer (the CLI and cohort runner through ``pipelines``, the widget's export,
the npe2 writer, the demo) builds its AnnData with :func:`spots_anndata`, so a file
opens the same way whoever wrote it: ``sc.pl.spatial(adata, color=gene)`` needs no
extra arguments (hires/lowres thumbnails and their scale factors under
``uns["spatial"][library_id]``, ``obsm["spatial"]`` in level-0 pixels) and
``squidpy.gr.spatial_neighbors`` runs on it. :func:`write_prediction` picks the format
by suffix and :func:`check_output_path` refuses a bad path before any work.

Atomic = write a temporary file next to the target, then ``os.replace``: an interrupted
export never leaves a half-written file where a good one was. The file gets the
permissions the user's umask asks for (the temporary file starts private).
The npe2 writer hooks that call this live in :mod:`napari_m2ort.io.napari`.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import M2ORTError

__all__ = [
    "OUTPUT_SUFFIXES",
    "HIRES_PX",
    "LOWRES_PX",
    "atomic_write_text",
    "check_output_path",
    "points_layer_to_anndata",
    "prediction_to_anndata",
    "spots_anndata",
    "write_csv",
    "write_h5ad",
    "write_prediction",
]

#: What a prediction can be written as; the suffix alone decides the format.
OUTPUT_SUFFIXES = (".h5ad", ".csv", ".zarr")
#: Long side (px) of the thumbnails stored for scanpy: Space Ranger's hires / lowres sizes.
HIRES_PX = 2000
LOWRES_PX = 600
#: Spot diameter assumed when a producer does not say (a Visium capture spot).
DEFAULT_DIAMETER_UM = 55.0


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
    if path.suffix.lower() != ".h5ad":
        raise M2ORTError(f"{path}: predictions are written as AnnData; give a file name ending in .h5ad.")
    # gzip: the stored thumbnails (and a dense X) shrink several-fold; every reader decodes it
    return _atomic(path, lambda p: adata.write_h5ad(p, compression="gzip"))


def write_csv(adata, path) -> Path:
    import pandas as pd

    df = pd.DataFrame(np.asarray(adata.X), index=adata.obs_names, columns=adata.var_names)
    xy = np.asarray(adata.obsm["spatial_um"]) if "spatial_um" in adata.obsm else np.asarray(adata.obsm["spatial"])
    df.insert(0, "y_um", xy[:, 1])
    df.insert(0, "x_um", xy[:, 0])
    return _atomic(path, lambda p: df.to_csv(p, index_label="spot"))


# ------------------------------------------------------------------ output paths


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in OUTPUT_SUFFIXES if name.endswith(s)), "")


def _is_zarr_store(path: Path) -> bool:
    return any((path / marker).is_file() for marker in ("zarr.json", ".zgroup", ".zattrs"))


def check_output_path(path, overwrite: bool = False) -> Path:
    """The output path of a prediction, checked before any work; returns it expanded.

    Refused, with a sentence naming the path: a suffix other than .h5ad/.csv/.zarr, a
    folder (an existing .zarr store is replaced only with ``overwrite``, and only when it
    is a zarr store), an existing file without ``overwrite``, a parent that is a file or
    not writable (a missing parent is fine: it is created when writing).
    """
    if path is None or not str(os.fspath(path)).strip():
        raise M2ORTError("No output file given: name a file ending in .h5ad, .csv or .zarr.")
    p = Path(os.fspath(path)).expanduser()
    kinds = ", ".join(OUTPUT_SUFFIXES[:-1]) + " or " + OUTPUT_SUFFIXES[-1]
    suffix = _suffix(p)
    if not suffix:
        raise M2ORTError(f"{p}: unsupported output type; give a file name ending in {kinds}.")
    if p.is_dir():
        if suffix != ".zarr":
            raise M2ORTError(f"{p} is a folder: give a file name ending in {kinds}.")
        if not _is_zarr_store(p):
            raise M2ORTError(f"{p} is a folder but not a zarr store: it is left alone; choose another name.")
        if not overwrite:
            raise M2ORTError(f"{p} exists already: choose another name, or pass --overwrite to replace it.")
    elif p.exists():
        if suffix == ".zarr":
            raise M2ORTError(f"{p} is a file: a SpatialData store is a folder; choose another name.")
        if not overwrite:
            raise M2ORTError(f"{p} exists already: choose another name, or pass --overwrite to replace it.")
    probe = p.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise M2ORTError(f"Cannot write {p}: {probe} is a file, not a folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise M2ORTError(f"Cannot write {p}: {probe} is not writable (check its permissions).")
    return p


def write_prediction(obj, path, overwrite: bool = True, slide=None) -> Path:
    """Write an AnnData of spots (or anything with ``to_anndata()``, e.g. a
    ``pipelines.SlidePrediction``) as .h5ad, .csv or a SpatialData .zarr store, by suffix.

    ``slide``: for .zarr, write a larger image copy than the AnnData's hires thumbnail
    (see :func:`napari_m2ort.io.spatialdata.write_spatialdata`).
    """
    path = check_output_path(path, overwrite=overwrite)
    adata = obj if hasattr(obj, "obs") else obj.to_anndata()
    suffix = _suffix(path)
    if suffix == ".csv":
        return write_csv(adata, path)
    if suffix == ".zarr":
        from .spatialdata import write_spatialdata

        return write_spatialdata(adata, path, slide=slide, overwrite=overwrite)
    return write_h5ad(adata, path)


# ------------------------------------------------------------------ the one builder


def _thumbnails(slide) -> tuple[dict, dict]:
    """({"hires", "lowres"} uint8 images, their scale factors) from the slide, or empty
    dicts (with a warning) when the slide cannot be read: the expression still gets written."""
    try:
        hires, ds = slide.thumbnail(HIRES_PX)
        hires = np.ascontiguousarray(np.asarray(hires)[..., :3], dtype=np.uint8)
    except Exception as exc:  # a closed or unreadable slide must not lose the prediction
        warnings.warn(
            f"{getattr(slide, 'name', 'slide')}: no thumbnail stored with the spots ({type(exc).__name__}: {exc}); "
            "sc.pl.spatial will need img_key=None.",
            stacklevel=3,
        )
        return {}, {}
    from PIL import Image

    h, w = hires.shape[:2]
    scale = min(1.0, LOWRES_PX / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    lowres = np.asarray(Image.fromarray(hires).resize(size, Image.Resampling.BOX)) if scale < 1.0 else hires.copy()
    hires_scalef = 1.0 / float(ds)
    return (
        {"hires": hires, "lowres": lowres},
        {
            "tissue_hires_scalef": hires_scalef,
            "tissue_lowres_scalef": hires_scalef * lowres.shape[1] / w,
        },
    )


def spots_anndata(
    values,
    genes,
    centers_um,
    *,
    mpp: float,
    library_id: str,
    diameter_um: float = DEFAULT_DIAMETER_UM,
    ids=None,
    obs: Optional[dict] = None,
    slide: Any = None,
    uncertainty=None,
    flags=None,
    metadata: Optional[dict] = None,
    m2ort: Optional[dict] = None,
):
    """AnnData of N spots x G genes in the structure scanpy, squidpy and SpatialData expect.

    ``centers_um``: (N, 2) x, y in µm of the slide; ``mpp``: µm per level-0 pixel.
    ``obsm["spatial"]`` is in level-0 pixels (Space Ranger's frame), ``obsm["spatial_um"]``
    in µm. With a ``slide``, its thumbnails go to ``uns["spatial"][library_id]["images"]``
    (hires 2000 px, lowres 600 px) with ``tissue_{hires,lowres}_scalef``, so
    ``sc.pl.spatial(adata, color=gene)`` draws spots over the tissue. ``uncertainty``
    (N, G) becomes ``layers["uncertainty"]`` and its gene mean ``obs["uncertainty"]``;
    ``flags`` (N,) becomes ``obs["flag"]``; ``m2ort`` goes to ``uns["m2ort"]``.
    """
    import anndata as ad
    import pandas as pd

    centers = np.asarray(centers_um, dtype=float).reshape(-1, 2)
    n = len(centers)
    mpp = float(mpp)
    index = [str(i) for i in ids] if ids is not None and len(ids) == n else [f"spot{i}" for i in range(n)]
    columns = {"x_um": centers[:, 0], "y_um": centers[:, 1]}
    columns.update(obs or {})
    if flags is not None:
        columns["flag"] = np.asarray(flags, dtype=object).astype(str)
    if uncertainty is not None:
        uncertainty = np.asarray(uncertainty, dtype=np.float32).reshape(n, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
            columns["uncertainty"] = np.nanmean(uncertainty, axis=1) if uncertainty.size else np.zeros(n, np.float32)
    adata = ad.AnnData(
        X=np.asarray(values, dtype=np.float32).reshape(n, -1),
        obs=pd.DataFrame(columns, index=pd.Index(index, name="spot")),
        var=pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene")),
    )
    if uncertainty is not None:
        adata.layers["uncertainty"] = uncertainty
    adata.obsm["spatial"] = centers / mpp
    adata.obsm["spatial_um"] = centers
    images, scalefactors = _thumbnails(slide) if slide is not None else ({}, {})
    scalefactors.update({"spot_diameter_fullres": float(diameter_um) / mpp, "microns_per_pixel": mpp})
    scalefactors.setdefault("tissue_hires_scalef", 1.0)  # no image: Space Ranger's frame is level 0
    lib: dict = {"scalefactors": scalefactors, "metadata": {"mpp": mpp, **(metadata or {})}}
    if images:
        lib["images"] = images
    adata.uns["spatial"] = {str(library_id): lib}
    if m2ort:
        adata.uns["m2ort"] = dict(m2ort)
    return adata


def prediction_to_anndata(pred, card, slide=None, spots=None, mpp: Optional[float] = None):
    """AnnData of a prediction's done spots (``inference.Prediction``), via :func:`spots_anndata`.

    The library id is the slide's name; the model card and the inference record ride
    along in ``uns["m2ort"]``; ``pred.uncertainty`` (test-time augmentation) becomes
    ``layers["uncertainty"]``, and ``pred.flags`` (if the producer set it) ``obs["flag"]``.
    """
    done = np.asarray(pred.done, dtype=bool)
    mpp = float(mpp if mpp is not None else (slide.mpp if slide is not None else 1.0))
    if spots is not None and getattr(spots, "ids", None) is not None and len(spots.ids) == len(pred.done):
        ids = [str(i) for i in np.asarray(spots.ids)[done]]
    else:
        ids = [f"spot{i}" for i in np.flatnonzero(done)]
    diameter = float(getattr(spots, "diameter_um", DEFAULT_DIAMETER_UM) if spots is not None else DEFAULT_DIAMETER_UM)
    uncertainty = getattr(pred, "uncertainty", None)
    flags = getattr(pred, "flags", None)
    return spots_anndata(
        np.asarray(pred.values)[done],
        pred.genes,
        np.asarray(pred.centers_um)[done],
        mpp=mpp,
        library_id=slide.name if slide is not None else "prediction",
        diameter_um=diameter,
        ids=ids,
        obs={"outside_slide": np.asarray(pred.outside)[done], "no_tissue": np.asarray(pred.blank)[done]},
        slide=slide,
        uncertainty=None if uncertainty is None else np.asarray(uncertainty)[done],
        flags=None if flags is None else np.asarray(flags)[done],
        metadata={"source_image_path": str(getattr(slide, "path", ""))},
        m2ort={
            "model_card": card.to_json() if hasattr(card, "to_json") else json.dumps(card),
            "target": getattr(card, "target", ""),
            "layout": getattr(spots, "layout", "") if spots is not None else "",
            "spot_diameter_um": diameter,
            "inference": json.dumps({k: v for k, v in getattr(pred, "info", {}).items()}, default=str),
        },
    )


def points_layer_to_anndata(data, meta: dict, slide=None):
    """A napari Points layer (data in (y, x) µm, features per gene) -> AnnData, via
    :func:`spots_anndata`.

    ``slide``: the slide the spots lie on (``SlideLike``, e.g. a ``LayerSlide``), for the
    thumbnails scanpy draws under the spots. ``meta["metadata"]`` may carry ``mpp``,
    ``spot_ids``, ``slide`` (the library id), ``model_card``, ``uncertainty`` (N, G) and
    ``flags`` (N,).
    """
    import pandas as pd

    features = meta.get("features")
    if features is None or len(getattr(features, "columns", [])) == 0:
        raise M2ORTError(
            "This Points layer has no per-gene features: only predicted/measured spot layers can be saved as AnnData."
        )
    features = pd.DataFrame(features)
    numeric = features.select_dtypes(include=[np.number])
    yx = np.asarray(data, dtype=float)[:, -2:]
    md = meta.get("metadata") or {}
    mpp = float(md.get("mpp", slide.mpp if slide is not None else 1.0))
    size = meta.get("size")
    diameter = float(np.median(size)) if size is not None and np.size(size) else DEFAULT_DIAMETER_UM
    library = md.get("slide") or (slide.name if slide is not None else None) or meta.get("name", "spots")

    def per_spot(key):
        v = md.get(key)
        return None if v is None or len(v) != len(yx) else np.asarray(v)

    return spots_anndata(
        numeric.to_numpy(np.float32),
        numeric.columns,
        yx[:, ::-1],
        mpp=mpp,
        library_id=str(library),
        diameter_um=diameter,
        ids=md.get("spot_ids"),
        slide=slide,
        uncertainty=per_spot("uncertainty"),
        flags=per_spot("flags"),
        m2ort=_layer_m2ort(md),
    )


def _layer_m2ort(md: dict) -> Optional[dict]:
    """What a predictions layer says about how its values were made."""
    out = {k: md[k] for k in ("model_card", "tta", "smooth_um") if k in md}
    if isinstance(out.get("smooth_um"), (int, float)) and out["smooth_um"] > 0:
        out["smoothing"] = (
            f"values are smoothed: Gaussian over neighbouring predicted spots, sigma {out['smooth_um']:g} µm"
        )
    return out or None
