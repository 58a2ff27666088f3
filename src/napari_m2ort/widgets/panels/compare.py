"""Predictions against measured spots: the comparison line and the side-by-side grid.

The numbers come from ``napari_m2ort.compare`` (nearest measured↔predicted spot, PCC);
this module finds the layers, converts their coordinates to slide µm and arranges the
1×2 grid (predictions left, measured right, over the same lazy pixels).
"""

from __future__ import annotations

import numpy as np

from ...compare import compare_gene
from .. import _layers as L

MODEL_SCALE = "panel-normalised log1p CPM (the model's target)"
MEASURED_SUFFIX = "model scale"


def set_measured_values(meas, xy_um, values, genes, missing, ids, diameter_um=None) -> None:
    """The measured layer keeps the compared spots, valued on the model's target scale."""
    import pandas as pd

    meas.data = np.ascontiguousarray(np.asarray(xy_um, float)[:, ::-1])
    meas.features = pd.DataFrame(np.asarray(values, np.float32), columns=list(genes))
    meas.size = np.full(len(meas.data), float(diameter_um or np.asarray(meas.size).reshape(-1)[0]))
    md = meas.metadata
    md.update(value_scale=MODEL_SCALE, genes_missing=list(missing), spot_ids=[str(i) for i in ids])
    md["scale_genes"] = list(genes) + list(missing)
    if not meas.name.endswith(f"({MEASURED_SUFFIX})"):
        meas.name = f"{meas.name} ({MEASURED_SUFFIX})"


def to_model_scale(meas, panel) -> None:
    """Put a measured layer read from an ST section on the model's scale (once per panel)."""
    from ...compare import measured_targets

    md = meas.metadata or {}
    section = md.get("st_section")
    if section is None or md.get("scale_genes") == list(panel):
        return
    keep, y, present, missing, _ = measured_targets(section, list(panel))
    ids = [str(i) for i, k in zip(section.adata.obs_names, keep) if k]
    set_measured_values(meas, section.centers_um[keep], y, present, missing, ids, section.spot_diameter_um)


class Comparison:
    """Follows ``DisplayState.side_by_side`` and writes the comparison line."""

    def __init__(self, viewer, state, panel, slide_layer, geometry, fail):
        self.viewer, self.state, self.panel = viewer, state, panel
        self.slide_layer = slide_layer  # () -> the slide Image layer or None
        self.geometry = geometry  # (layer) -> _layers.Geometry of that slide layer
        self.fail = fail  # (message) -> None
        self._order_before_grid: list = []
        state.events.side_by_side.connect(self._toggled)

    def measured_layer(self):
        """The measured spots of the slide shown: those tied to this slide layer, else
        read with its image file; a Points layer of unknown origin only when it is alone."""
        layers = L.measured_layers(self.viewer)
        slide = self.slide_layer()
        if slide is None:
            return None
        tied = [ly for ly in layers if (ly.metadata or {}).get("slide_layer") == slide.unique_id]
        if tied:
            return tied[0]
        path = L.slide_path(slide)
        for ly in layers:
            sec = (ly.metadata or {}).get("st_section")
            if sec is not None and path and str(getattr(sec, "image_path", "")) == path:
                return ly
        foreign = [ly for ly in layers if (ly.metadata or {}).get("st_section") is None]
        return foreign[0] if len(foreign) == 1 and len(L.slide_layers(self.viewer)) == 1 else None

    def update(self) -> None:
        layer, gene = self.state.layer, self.state.gene
        meas = self.measured_layer()
        label = self.panel.compare_label
        if meas is None or layer is None or gene is None:
            label.setText("" if meas is None else f"'{meas.name}' loaded")
            return
        to_model_scale(meas, list(layer.features.columns))
        missing = list((meas.metadata or {}).get("genes_missing", []))
        if gene not in meas.features.columns:
            label.setText(
                f"{gene} is not among the measured genes of '{meas.name}'"
                + (f" ({len(missing)} panel genes are not: {', '.join(missing[:6])})." if missing else ".")
            )
            return
        # one scale, one colour range: the predictions' colorbar stands for both layers
        L.color_by(meas, gene, colormap=self.state.colormap, clim=self.state.clim, colorbar=False)
        text = self.compare(gene).sentence(meas.name)
        if missing:
            text += f" Not measured: {len(missing)} panel genes ({', '.join(missing[:6])})."
        label.setText(text)

    def compare(self, gene: str):
        """``compare.Comparison`` of the shown predictions with the measured spots."""
        layer, meas = self.state.layer, self.measured_layer()
        slide = self.slide_layer()
        geom = self.geometry(slide) if slide is not None else None
        pred_xy, meas_xy = self._xy_um(layer, geom), self._xy_um(meas, geom)
        pitch = float(layer.metadata.get("pitch_um", 100.0))
        return compare_gene(
            gene, pred_xy, layer.features[gene].to_numpy(), meas_xy, meas.features[gene].to_numpy(), pitch
        )

    @staticmethod
    def _xy_um(layer, geom) -> np.ndarray:
        """Spot centres (x, y) in slide µm (world units when there is no slide)."""
        if not len(layer.data):
            return np.zeros((0, 2))
        world = np.asarray([layer.data_to_world(p) for p in layer.data])[:, -2:]
        yx = geom.world_to_um(world) if geom is not None else world
        return yx[:, ::-1]

    # ---------------------------------------------------------------- grid
    def _toggled(self, on: bool) -> None:
        """Side by side: a 1×2 grid, predictions left, measured spots right (same slide)."""
        grid = self.viewer.grid
        slide = self.slide_layer()
        meas = self.measured_layer()
        twin_name = f"{slide.name} (measured view)" if slide is not None else None
        if not on:
            grid.enabled = False
            if twin_name and twin_name in self.viewer.layers:
                self.viewer.layers.remove(twin_name)
            self._restore_order(self._order_before_grid)
            self._order_before_grid = []
            return
        layer = self.state.layer
        if slide is None or meas is None or layer is None:
            self.state.side_by_side = False
            self.fail(
                "Side by side needs a slide, predictions and a measured ST layer (e.g. File > Open "
                "Sample > napari M2ORT)."
            )
            return
        self.state.heatmap = False  # one layer per cell reads better
        if twin_name not in self.viewer.layers:
            # a second view of the same (lazy) pixels, so each grid cell shows the tissue
            twin = self.viewer.add_image(
                slide.data,
                name=twin_name,
                rgb=slide.rgb,
                multiscale=slide.multiscale,
                scale=slide.scale,
                translate=slide.translate,
                units=slide.units,
                contrast_limits=slide.contrast_limits,
                metadata={"m2ort_kind": "m2ort-twin"},
            )
        else:
            twin = self.viewer.layers[twin_name]
        # Grid cells take `stride` consecutive layers from the bottom of the list, and the
        # groups after the last cell wrap around: [slide, predictions] left, [slide copy,
        # measured] right, anything else on top (wrapping onto the cells).
        self._order_before_grid = [ly.unique_id for ly in self.viewer.layers if ly.name != twin_name]
        cells = [slide, layer, twin, meas]
        self._reorder(cells + [ly for ly in self.viewer.layers if ly not in cells])
        grid.stride = 2
        grid.shape = (1, 2)
        grid.spacing = 10
        grid.enabled = True
        self.update()
        self.viewer.reset_view()

    def _reorder(self, order) -> None:
        for i, ly in enumerate(order):
            j = self.viewer.layers.index(ly)
            if j != i:
                self.viewer.layers.move(j, i)

    def _restore_order(self, ids) -> None:
        if not ids:
            return
        by_id = {ly.unique_id: ly for ly in self.viewer.layers}
        order = [by_id[i] for i in ids if i in by_id]
        self._reorder(order + [ly for ly in self.viewer.layers if ly.unique_id not in ids])
