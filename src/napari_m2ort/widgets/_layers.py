"""The widgets' adapters between napari layers and slide µm (no Qt, no computation).

- ``Geometry``: how an Image layer's world coordinates relate to slide µm
  (µm = (world - translate) * um_per_world).  The slide reader puts ``scale`` = µm/px, so
  usually ``um_per_world == 1``; for an image opened by another reader (scale 1 px) the
  widget's µm/px field supplies it.  Shapes and the camera's view become ``spots.Region``
  in µm through it.
- ``LayerSlide`` (from ``io.slides.layer``): the slide contract over an Image layer's data.
- predictions / measured Points layers: data (y, x) in µm, ``size`` = spot diameter µm,
  ``features`` one column per gene, coloured by one gene with a colormap and colorbar;
  the colour range is ``raster.value_range``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from ..io.napari import prefer_plugin_writers  # noqa: F401  (File > Save: the plugin's writers first)
from ..io.slides.layer import LayerSlide, layer_mpp  # noqa: F401  (the core's, used by the widgets)
from ..raster import value_range

PREDICTIONS_NAME = "M2ORT predictions"
REGIONS_NAME = "M2ORT regions"
HEATMAP_NAME = "M2ORT heat map"
PRED_KIND = "m2ort-predictions"
MEASURED_KIND = "m2ort-measured"
COLORMAPS = ["viridis", "magma", "inferno", "plasma", "turbo", "cividis", "PiYG", "red", "gray"]


# ------------------------------------------------------------------ geometry


@dataclass
class Geometry:
    mpp: float  # µm per level-0 pixel
    um_per_world: float  # µm per world unit along y and x
    translate: np.ndarray  # (2,) world offset of the image (y, x)
    units: Optional[tuple] = None

    def world_to_um(self, yx_world: np.ndarray) -> np.ndarray:
        yx = np.asarray(yx_world, dtype=float)[..., -2:]
        return (yx - self.translate) * self.um_per_world

    def um_to_world(self, yx_um: np.ndarray) -> np.ndarray:
        return np.asarray(yx_um, dtype=float) / self.um_per_world + self.translate

    @property
    def layer_kwargs(self) -> dict:
        """scale/translate (and units) for a layer whose data are (y, x) in µm."""
        s = 1.0 / self.um_per_world
        kw = {"scale": (s, s), "translate": tuple(float(t) for t in self.translate)}
        if self.units is not None:
            kw["units"] = self.units
        return kw


def _unit_names(layer) -> tuple:
    try:
        return tuple(str(u) for u in layer.units)
    except Exception:
        return ()


def geometry(layer, mpp: float) -> Geometry:
    scale = np.asarray(layer.scale, dtype=float)[-2:]
    translate = np.asarray(layer.translate, dtype=float)[-2:]
    # world = px * scale + translate  →  µm = px * mpp = (world - translate) * mpp / scale
    um_per_world = float(mpp / scale[-1]) if scale[-1] else 1.0
    units = None
    names = _unit_names(layer)
    if names and any(n not in ("pixel", "") for n in names):
        units = tuple(names[-2:])
    return Geometry(float(mpp), um_per_world, translate, units)


def shapes_regions_um(shapes, geom: Geometry) -> list:
    """The rectangles and polygons of a Shapes layer as ``spots.Region`` in slide µm
    (lines and paths enclose nothing and are left out)."""
    from ..spots import Region

    regions = []
    for verts, kind in zip(shapes.data, shapes.shape_type):
        if kind in ("line", "path"):
            continue
        world = np.asarray([shapes.data_to_world(v) for v in np.asarray(verts)])
        regions.append(Region.from_napari_shape(geom.world_to_um(world)))
    return regions


def view_region_um(viewer, geom: Geometry):
    """The part of the slide the canvas shows, as a ``spots.Region`` in µm."""
    from ..spots import Region

    cam = viewer.camera
    center = np.asarray(cam.center, dtype=float)[-2:]
    size = np.asarray(viewer.canvas.size, dtype=float)[-2:]  # (h, w) canvas pixels
    half = size / max(float(cam.zoom), 1e-12) / 2.0
    lo = geom.world_to_um(center - half)
    hi = geom.world_to_um(center + half)
    return Region.rectangle(lo[1], lo[0], hi[1], hi[0])


# ------------------------------------------------------------------ points layers


def predictions_layers(viewer) -> list:
    return [ly for ly in viewer.layers if (ly.metadata or {}).get("m2ort_kind") == PRED_KIND]


def layer_key(model_key: str, spots) -> tuple:
    """Predictions of one model on one spot layout go to one layer (ids are per layout)."""
    return (model_key, str(spots.layout), round(float(spots.pitch_um), 3), round(float(spots.diameter_um), 3))


def _layer_key_md(md: dict) -> tuple:
    return (
        md.get("model_key"),
        str(md.get("layout")),
        round(float(md.get("pitch_um", 0.0)), 3),
        round(float(md.get("spot_diameter_um", 0.0)), 3),
    )


def predicted_ids(viewer, slide_name: str) -> dict:
    """layer key -> ids of the spots already predicted on this slide."""
    out: dict = {}
    for ly in predictions_layers(viewer):
        md = ly.metadata
        if md.get("slide") == slide_name:
            out.setdefault(_layer_key_md(md), set()).update(map(str, md.get("spot_ids", [])))
    return out


def find_predictions_layer(viewer, slide_name: str, key: tuple):
    """The predictions layer of this slide with this layer key, if there is one."""
    for ly in predictions_layers(viewer):
        if ly.metadata.get("slide") == slide_name and _layer_key_md(ly.metadata) == key:
            return ly
    return None


def measured_layers(viewer) -> list:
    """Points layers of measured spots: ours, or any Points layer with numeric gene features."""
    from napari.layers import Points

    out = []
    for ly in viewer.layers:
        if not isinstance(ly, Points):
            continue
        kind = (ly.metadata or {}).get("m2ort_kind")
        if kind == PRED_KIND:
            continue
        if kind == MEASURED_KIND or (len(ly.data) and ly.features.shape[1] > 1):
            out.append(ly)
    return out


def new_predictions_layer(
    viewer,
    geom: Geometry,
    genes: Sequence[str],
    diameter_um: float,
    card_json: str,
    layout: str,
    model_key: str,
    slide_name: str,
    colormap: str = "viridis",
    name: str = PREDICTIONS_NAME,
    pitch_um: float = 0.0,
    grid: str = "",
    model_name: str = "",
):
    features = pd.DataFrame({g: np.zeros(0, np.float32) for g in genes})
    layer = viewer.add_points(
        np.zeros((0, 2)),
        features=features,
        size=diameter_um,
        name=name,
        border_width=0,
        face_colormap=colormap,
        opacity=0.9,
        metadata={
            "m2ort_kind": PRED_KIND,
            "mpp": geom.mpp,
            "spot_ids": [],
            "model_card": card_json,
            "layout": layout,
            "model_key": model_key,
            "slide": slide_name,
            "spot_diameter_um": float(diameter_um),
            "pitch_um": float(pitch_um),
            "grid": grid,
            "model_name": model_name,
            "flags": [],
        },
        **geom.layer_kwargs,
    )
    return layer


def append_spots(
    layer,
    yx_um: np.ndarray,
    values: np.ndarray,
    ids: Sequence[str],
    diameter_um: float,
    gene: Optional[str],
    clim=None,
    flags: Optional[Sequence[str]] = None,
) -> None:
    """Add predicted spots (data in µm, one feature column per gene) and recolour.
    ``flags``: per spot "ok" / "off-slide" / "blank" / "not-HE" (``pipelines.domain``)."""
    if len(yx_um) == 0:
        return
    n_old = len(layer.data)
    md = layer.metadata
    md["spot_ids"] = list(md.get("spot_ids", [])) + [str(i) for i in ids]
    new_flags = ["ok"] * len(ids) if flags is None else [str(f) for f in flags]
    md["flags"] = list(md.get("flags", [])) + new_flags
    if not np.allclose(layer.current_size, float(diameter_um)):
        layer.current_size = float(diameter_um)
    layer.data = np.concatenate([np.asarray(layer.data, dtype=float).reshape(-1, 2), yx_um], axis=0)
    _write_rows(layer, np.arange(n_old, len(layer.data)), values)
    color_by(layer, gene, clim=clim)


def _write_rows(layer, rows: np.ndarray, values: np.ndarray) -> None:
    """Write gene values into rows of the layer's own feature table, in place.

    Assigning ``layer.features`` makes napari rebuild one default per column (a pandas
    Series each: 250 genes cost 0.03 s alone and 0.3 s with the model thread running),
    on the UI thread, for every batch.  The Points ``data`` setter has already sized the
    table; listeners hear ``features`` once the values are in."""
    table = layer.features  # napari's own DataFrame, not a copy
    table.iloc[np.asarray(rows, dtype=int), : values.shape[1]] = np.asarray(values, dtype=np.float32)
    layer.events.features()


def finish_run(layer, ids: Sequence[str], values: np.ndarray, uncertainty, info: dict) -> None:
    """Replace the spots' streamed values with the run's final ones (smoothing happens
    after the last batch), keep the TTA spread per spot, and record the inference
    options, so what is shown and exported is what the core computed."""
    md = layer.metadata
    pos = {str(i): k for k, i in enumerate(md.get("spot_ids", []))}
    rows = np.array([pos.get(str(i), -1) for i in ids])
    ok = rows >= 0
    if not ok.any():
        return
    n, genes = len(layer.data), list(layer.features.columns)
    _write_rows(layer, rows[ok], np.asarray(values, dtype=np.float32)[ok])
    layer.refresh_colors(update_color_mapping=False)
    if uncertainty is not None:
        spread = np.asarray(md.get("uncertainty", np.full((n, len(genes)), np.nan)), dtype=np.float32)
        if spread.shape != (n, len(genes)):
            spread = np.vstack([spread, np.full((n - len(spread), len(genes)), np.nan, np.float32)])
        spread[rows[ok]] = np.asarray(uncertainty, dtype=np.float32)[ok]
        md["uncertainty"] = spread
    for key in ("tta", "smooth_um"):
        if key in info:
            old = md.get(key)
            md[key] = info[key] if old is None or old == info[key] else "mixed"


def on_tissue(layer) -> np.ndarray:
    """Per spot: not flagged as glass, off-slide or unlike H&E (True for unflagged layers)."""
    n = len(layer.data)
    flags = list((layer.metadata or {}).get("flags", []))
    if len(flags) != n:
        return np.ones(n, dtype=bool)
    return np.asarray(flags, dtype=object) == "ok"


def set_flags(layer, ids: Sequence[str], flags: Sequence[str]) -> None:
    """Update the flags of these spots (the prediction knows outside/blank at its end)."""
    md = layer.metadata
    pos = {str(i): k for k, i in enumerate(md.get("spot_ids", []))}
    current = list(md.get("flags", []))
    if len(current) != len(pos):
        current = ["ok"] * len(pos)
    for i, f in zip(ids, flags):
        k = pos.get(str(i))
        if k is not None:
            current[k] = str(f)
    md["flags"] = current


def show_flagged(layer, show: bool) -> None:
    """Flagged spots are hidden unless asked for (their values mean nothing)."""
    if len(layer.data):
        layer.shown = np.ones(len(layer.data), bool) if show else on_tissue(layer)


def color_by(layer, gene: Optional[str], colormap: Optional[str] = None, clim=None, colorbar: bool = True) -> None:
    """Colour a Points layer by one feature column, with the colorbar on."""
    if not len(layer.data) or gene is None or gene not in layer.features.columns:
        return
    # each of these setters recomputes every spot's colour on the UI thread: set only
    # what changed, then recompute once
    if colormap is not None and getattr(layer.face_colormap, "name", None) != colormap:
        layer.face_colormap = colormap
    if clim is None:
        clim = value_range(layer.features[gene].to_numpy(), on_tissue(layer))
    if layer.metadata.get("coloured_by") != gene or layer.face_color_mode != "colormap":
        layer.face_color = gene
        layer.metadata["coloured_by"] = gene
    clim = tuple(float(c) for c in clim)
    if tuple(layer.face_contrast_limits or ()) != clim:
        layer.face_contrast_limits = clim
    layer.refresh_colors(update_color_mapping=False)
    try:
        layer.face_colorbar.visible = colorbar
    except AttributeError:  # older napari: no colorbar overlay on Points
        pass


def _canvas_overlay(viewer, name: str):
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None:
        try:
            return overlays[name]
        except (KeyError, TypeError):
            return getattr(overlays, name, None)
    return getattr(viewer, {"text": "text_overlay", "scale_bar": "scale_bar"}[name], None)


def show_legend(viewer, text: str, position: str = "top_left") -> None:
    """A line of text over the canvas naming what the colours are, plus a µm scale bar."""
    overlay = _canvas_overlay(viewer, "text")
    if overlay is not None:
        overlay.text = text
        overlay.font_size = 12
        try:
            overlay.position = position
        except Exception:  # pragma: no cover - older napari
            pass
        overlay.visible = bool(text)
    bar = _canvas_overlay(viewer, "scale_bar")
    if bar is not None and text and not bar.visible:
        bar.visible = True


# ------------------------------------------------------------------ several slides

SLIDE_GAP = 0.05  # of the widest slide, between slides placed side by side


def slide_layers(viewer) -> list:
    """The H&E Image layers (not the plugin's own heat maps or twins)."""
    from napari.layers import Image

    return [ly for ly in viewer.layers if isinstance(ly, Image) and (ly.metadata or {}).get("m2ort_kind") is None]


def _xy_extent(layer) -> np.ndarray:
    """World (min, max) of the layer along y and x: 2 × 2."""
    return np.asarray(layer.extent.world, dtype=float)[:, -2:]


def place_slide(viewer, layer) -> None:
    """A new slide opens to the right of the slides already there, never on top of them;
    its measured spots (and everything predicted on it, through its translate) follow."""
    others = [ly for ly in slide_layers(viewer) if ly is not layer and ly.unique_id != layer.unique_id]
    if not others:
        return
    mine = _xy_extent(layer)
    boxes = [_xy_extent(ly) for ly in others]
    overlaps = any((mine[0] < b[1]).all() and (b[0] < mine[1]).all() for b in boxes)
    if not overlaps:
        return
    right = max(b[1, 1] for b in boxes)
    width = max(max(b[1, 1] - b[0, 1] for b in boxes), mine[1, 1] - mine[0, 1])
    t = np.asarray(layer.translate, dtype=float).copy()
    t[-1] += right + SLIDE_GAP * width - mine[0, 1]
    layer.translate = t


def slide_path(layer) -> str:
    return str((layer.metadata or {}).get("path") or "")


def tie_measured(viewer, points) -> None:
    """Measured spots read with a slide go where that slide is: the latest slide layer
    opened from the section's image gets them (same translate, recorded in metadata)."""
    section = (points.metadata or {}).get("st_section")
    image = getattr(section, "image_path", None)
    if image is None:
        return
    from pathlib import Path

    def same(p):
        try:
            return bool(p) and Path(p).resolve() == Path(image).resolve()
        except OSError:
            return False

    taken = {(ly.metadata or {}).get("slide_layer") for ly in measured_layers(viewer) if ly is not points}
    slides = [ly for ly in slide_layers(viewer) if same(slide_path(ly))]
    free = [ly for ly in slides if ly.unique_id not in taken] or slides
    if not free:
        return
    slide = free[-1]
    points.metadata["slide_layer"] = slide.unique_id
    t = np.asarray(points.translate, dtype=float).copy()
    t[-2:] = np.asarray(slide.translate, dtype=float)[-2:]
    points.translate = t
