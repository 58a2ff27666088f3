"""Everything napari sees of this package's files: npe2 readers and writers, LayerData.

Readers return layers in µm (``scale`` = µm/px, ``units`` = µm where napari supports it),
so an H&E image and the spots measured or predicted on it line up whatever their pixel
frames. napari itself is never imported here: LayerData are plain tuples, and whether
layers accept ``units=`` is decided once, from the installed version
(:func:`napari_has_units`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..targets import log1p_cpm
from .export import points_layer_to_anndata, write_csv, write_h5ad
from .st import STSection, is_visium_folder, read_h5ad, read_visium
from .st.validate import warn

__all__ = [
    "napari_has_units",
    "get_slide_reader",
    "get_st_reader",
    "points_layer_data",
    "section_layer_data",
    "write_points_h5ad",
    "write_points_csv",
]

UM_UNITS = ("µm", "µm")


@functools.lru_cache(maxsize=1)
def napari_has_units() -> bool:
    """Layers accept ``units=`` since napari 0.5.0 (#6979); older ones reject it.

    Checked from the installed version so building layer data never imports napari;
    without napari installed nothing will reject the keyword, so it is kept.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(p) for p in re.findall(r"\d+", version("napari"))[:2])
    except (PackageNotFoundError, ValueError):
        return True
    return (major, minor) >= (0, 5)


# -------------------------------------------------------------------------- readers


def get_slide_reader(path):
    """npe2 reader: whole-slide images as a lazy multiscale RGB layer in µm."""
    from .slides import napari_get_reader

    return napari_get_reader(path)


def get_st_reader(path):
    """npe2 reader: Visium folders and .h5ad files; None for anything else."""
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


def points_layer_data(
    section: STSection, genes: Sequence[str] | None = None, max_genes: int = 250, color_by: str | None = None
) -> tuple:
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
            warn(f"{section.name}: {len(missing)} requested genes are not measured (e.g. {', '.join(missing[:3])}).")
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
    prefer_plugin_writers()  # File > Save offers AnnData first for these spots
    return (data, kwargs, "points")


def section_layer_data(section: STSection) -> list[tuple]:
    """Image (if any) + measured spots as napari LayerData, both in µm."""
    layers: list[tuple] = []
    if section.image_path is not None:
        from .slides import open_slide

        layers.extend(open_slide(section.image_path, mpp=section.mpp).layer_data())
    elif section.image is not None:
        kw = {"name": f"{section.name} image", "rgb": True, "scale": (section.mpp, section.mpp)}
        if napari_has_units():
            kw["units"] = UM_UNITS
        layers.append((section.image, kw, "image"))
    points = points_layer_data(section)
    img_units = next((kw.get("units") for _, kw, t in layers if t == "image" and kw.get("units")), None)
    if img_units is not None:  # spots in the same units as the image they sit on
        points[1]["units"] = img_units
    layers.append(points)
    return layers


# -------------------------------------------------------------------------- writers


PLUGIN = "napari-m2ort"


def prefer_plugin_writers() -> bool:
    """Put this plugin's writers (AnnData, spots CSV) first in File > Save's list.

    napari preselects the first compatible writer, and npe2 orders writers of equal
    specificity by registration, so napari's own CSV writer came first for our Points
    layers (and lost their gene names and model card).  npe2 has no public way to
    prefer a writer, so the plugin's entries are moved to the front of its writer table
    (stable otherwise).  False when npe2's internals differ (nothing changed then).
    """
    try:
        from npe2 import PluginManager

        table = PluginManager.instance()._contrib._writers
        ours = [row for row in table if row[-1].command.startswith(PLUGIN + ".")]
        if not ours or table[: len(ours)] == ours:
            return bool(ours)
        table[:] = ours + [row for row in table if not row[-1].command.startswith(PLUGIN + ".")]
        return True
    except Exception:  # pragma: no cover - private npe2 structure changed
        return False


def _with_suffix(path: str, suffix: str) -> str:
    """File > Save offers the layer's name, which has no extension: add the writer's."""
    return path if Path(path).suffix.lower() == suffix else f"{path}{suffix}"


def write_points_h5ad(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a spots Points layer as AnnData (.h5ad), written atomically."""
    return [str(write_h5ad(points_layer_to_anndata(data, meta), _with_suffix(path, ".h5ad")))]


def write_points_csv(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a spots Points layer as CSV (x_um, y_um, one column per gene)."""
    return [str(write_csv(points_layer_to_anndata(data, meta), _with_suffix(path, ".csv")))]
