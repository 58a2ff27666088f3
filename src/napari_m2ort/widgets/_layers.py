"""Rendering helpers and layer adapters for the widgets (no computation of their own).

- ``Geometry``: how an Image layer's world coordinates relate to slide µm
  (µm = (world - translate) * um_per_world).  The slide reader puts ``scale`` = µm/px, so
  usually ``um_per_world == 1``; for an image opened by another reader (scale 1 px) the
  widget's µm/px field supplies it.
- ``LayerSlide``: the Slide contract over an Image layer's in-memory (or dask) data, for
  images that were not opened from a file by our reader.
- predictions / measured Points layers: data (y, x) in µm, ``size`` = spot diameter µm,
  ``features`` one column per gene, coloured by one gene with a colormap and colorbar.
- ``heatmap_grid``: a smooth expression image from spot values (Gaussian splatting on a
  coarse grid), NaN (transparent) away from the spots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..io.slides.layer import LayerSlide  # noqa: F401

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


def layer_mpp(layer, override: Optional[float] = None) -> tuple[float, str]:
    """µm/px of an Image layer's level 0 and where that number came from."""
    if override:
        return float(override), "user"
    md = getattr(layer, "metadata", {}) or {}
    if md.get("mpp"):
        return float(md["mpp"]), str(md.get("mpp_source", "metadata"))
    scale = float(np.asarray(layer.scale)[-1])
    units = _unit_names(layer)
    if units and units[-1] in ("micrometer", "micron", "um", "µm"):
        return scale, "metadata"
    return 0.5, "default"


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


# ------------------------------------------------------------------ slide adapter

# LayerSlide lives in the core (io/slides/layer.py); re-exported here for the widgets.


# ------------------------------------------------------------------ points layers

def predictions_layers(viewer) -> list:
    return [ly for ly in viewer.layers if (ly.metadata or {}).get("m2ort_kind") == PRED_KIND]


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


def new_predictions_layer(viewer, geom: Geometry, genes: Sequence[str], diameter_um: float,
                          card_json: str, layout: str, model_key: str, slide_name: str,
                          colormap: str = "viridis", name: str = PREDICTIONS_NAME, pitch_um: float = 0.0,
                          grid: str = ""):
    features = pd.DataFrame({g: np.zeros(0, np.float32) for g in genes})
    layer = viewer.add_points(
        np.zeros((0, 2)), features=features, size=diameter_um, name=name,
        border_width=0, face_colormap=colormap, opacity=0.9,
        metadata={
            "m2ort_kind": PRED_KIND, "mpp": geom.mpp, "spot_ids": [], "model_card": card_json,
            "layout": layout, "model_key": model_key, "slide": slide_name,
            "spot_diameter_um": float(diameter_um), "pitch_um": float(pitch_um), "grid": grid,
        },
        **geom.layer_kwargs,
    )
    return layer


def append_spots(layer, yx_um: np.ndarray, values: np.ndarray, ids: Sequence[str],
                 diameter_um: float, gene: Optional[str], clim=None) -> None:
    """Add predicted spots (data in µm, one feature column per gene) and recolour."""
    if len(yx_um) == 0:
        return
    genes = list(layer.features.columns)
    old = layer.features
    new = pd.DataFrame(np.asarray(values, dtype=np.float32), columns=genes)
    features = pd.concat([old, new], ignore_index=True) if len(old) else new
    data = np.concatenate([np.asarray(layer.data, dtype=float).reshape(-1, 2), yx_um], axis=0)
    md = layer.metadata
    md["spot_ids"] = list(md.get("spot_ids", [])) + [str(i) for i in ids]
    layer.data = data
    layer.features = features
    layer.size = np.full(len(data), float(diameter_um))
    color_by(layer, gene, clim=clim)


def gene_range(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-6:
        hi = lo + 1e-3
    return lo, hi


def color_by(layer, gene: Optional[str], colormap: Optional[str] = None, clim=None,
             colorbar: bool = True) -> None:
    """Colour a Points layer by one feature column, with the colorbar on."""
    if not len(layer.data) or gene is None or gene not in layer.features.columns:
        return
    if colormap is not None:
        layer.face_colormap = colormap
    if clim is None:
        clim = gene_range(layer.features[gene].to_numpy())
    layer.face_color = gene
    layer.face_contrast_limits = tuple(float(c) for c in clim)
    layer.refresh_colors(update_color_mapping=False)
    try:
        layer.face_colorbar.visible = colorbar
    except AttributeError:  # older napari: no colorbar overlay on Points
        pass


# ------------------------------------------------------------------ heat map

def heatmap_grid(centers_um: np.ndarray, values: np.ndarray, pitch_um: float,
                 res_um: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Smooth image of spot values: (image, origin (y, x) µm of pixel 0, µm per pixel).

    Gaussian splatting: sum(w·v)/sum(w) with σ = pitch/2 on a grid of ``res_um`` (default
    pitch/10, at most 10 µm); pixels farther than ¾ pitch from every spot are NaN.
    """
    from scipy import ndimage

    c = np.asarray(centers_um, dtype=float).reshape(-1, 2)  # (x, y)
    v = np.asarray(values, dtype=float).reshape(-1)
    ok = np.isfinite(v)
    c, v = c[ok], v[ok]
    if len(c) == 0:
        return np.full((1, 1), np.nan, np.float32), np.zeros(2), 1.0
    res = float(res_um or min(10.0, pitch_um / 10.0))
    pad = pitch_um
    x0, y0 = c.min(0) - pad
    x1, y1 = c.max(0) + pad
    w = int(np.ceil((x1 - x0) / res)) + 1
    h = int(np.ceil((y1 - y0) / res)) + 1
    if h * w > 16_000_000:  # keep the image small: coarsen the grid
        f = np.sqrt(h * w / 16_000_000)
        res *= f
        w = int(np.ceil((x1 - x0) / res)) + 1
        h = int(np.ceil((y1 - y0) / res)) + 1
    cols = np.clip(np.round((c[:, 0] - x0) / res).astype(int), 0, w - 1)
    rows = np.clip(np.round((c[:, 1] - y0) / res).astype(int), 0, h - 1)
    num = np.zeros((h, w), np.float64)
    den = np.zeros((h, w), np.float64)
    np.add.at(num, (rows, cols), v)
    np.add.at(den, (rows, cols), 1.0)
    occupied = den > 0
    sigma = max(1.0, pitch_um / 2.0 / res)
    num = ndimage.gaussian_filter(num, sigma, mode="constant", truncate=3.0)
    den = ndimage.gaussian_filter(den, sigma, mode="constant", truncate=3.0)
    img = np.full((h, w), np.nan, np.float32)
    dist = ndimage.distance_transform_edt(~occupied) * res
    keep = (dist <= 0.75 * pitch_um) & (den > 1e-12)
    img[keep] = (num[keep] / den[keep]).astype(np.float32)
    return img, np.array([y0, x0]), res


def model_key(card) -> str:
    """A short identity of a model card (genes + provenance) to keep layers apart."""
    import hashlib

    text = card.to_json() if hasattr(card, "to_json") else json.dumps(card, default=str, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _canvas_overlay(viewer, name: str):
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None:
        try:
            return overlays[name]
        except (KeyError, TypeError):
            return getattr(overlays, name, None)
    return getattr(viewer, {"text": "text_overlay", "scale_bar": "scale_bar"}[name], None)


def show_legend(viewer, text: str) -> None:
    """A line of text over the canvas naming what the colours are, plus a µm scale bar."""
    overlay = _canvas_overlay(viewer, "text")
    if overlay is not None:
        overlay.text = text
        overlay.font_size = 12
        try:
            overlay.position = "top_left"
        except Exception:  # pragma: no cover - older napari
            pass
        overlay.visible = bool(text)
    bar = _canvas_overlay(viewer, "scale_bar")
    if bar is not None and text and not bar.visible:
        bar.visible = True


# ------------------------------------------------------------------ Qt layout helpers

def scroll_body(widget):
    """Give ``widget`` a scrollable body and return the body's QVBoxLayout.

    napari docks do not scroll; without this a tall widget in a short dock gets its
    rows squeezed and its labels clipped.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = QScrollArea(widget)
    area.setWidgetResizable(True)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setFrameShape(QFrame.Shape.NoFrame)
    body = QWidget()
    area.setWidget(body)
    outer.addWidget(area)
    layout = QVBoxLayout(body)
    layout.setContentsMargins(6, 6, 6, 6)
    widget._scroll_area = area
    return layout


def compact_combos(widget, chars: int = 14) -> None:
    """Combo boxes whose items are names (layers, files) must not widen the dock."""
    from qtpy.QtWidgets import QComboBox

    for combo in widget.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(chars)


def fit_width(widget) -> None:
    """Make the dock as wide as the scrolled body needs (no horizontal clipping)."""
    area = getattr(widget, "_scroll_area", None)
    if area is None:
        return
    try:
        body = area.widget()
        bar = area.verticalScrollBar().sizeHint().width()
        widget.setMinimumWidth(body.minimumSizeHint().width() + bar + 4)
    except RuntimeError:  # the widget was deleted before a deferred call
        pass


def wrap_label(text: str = "", lines: int = 2, muted: bool = False):
    """A word-wrapped QLabel that keeps room for ``lines`` lines."""
    from qtpy.QtWidgets import QLabel, QSizePolicy

    label = QLabel(text)
    label.setWordWrap(True)
    label.setMinimumHeight(label.fontMetrics().lineSpacing() * lines + 4)
    label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.MinimumExpanding)
    label.setTextInteractionFlags(label.textInteractionFlags())
    if muted:
        label.setStyleSheet("color: #9a9a9a")
    return label
