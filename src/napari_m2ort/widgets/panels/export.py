"""Export panel: the predictions layer shown, as .h5ad, CSV or a SpatialData .zarr store
(one builder and writer, ``io.export``, as the CLI and the demo use)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qtpy.QtWidgets import QFileDialog, QGroupBox, QHBoxLayout, QPushButton

from ...errors import M2ORTError

FORMATS = (".h5ad", ".csv", ".zarr")


def write_layer(layer, path, suffix: str, slide=None) -> Path:
    """Write a predictions Points layer; raises ``M2ORTError`` with a sentence to act on.

    ``slide`` (the slide the spots lie on) gives the images scanpy and SpatialData show
    under the spots."""
    from ...io import export

    path = Path(path)
    if path.suffix.lower() != suffix:
        path = path.with_name(path.name + suffix)  # "x 0.5" keeps its ".5"
    meta = {"features": layer.features, "metadata": layer.metadata, "size": layer.size, "name": layer.name}
    try:
        adata = export.points_layer_to_anndata(layer.data, meta, slide=slide)
        return Path(export.write_prediction(adata, path, overwrite=True, slide=slide))
    except OSError as exc:
        raise M2ORTError(f"{path}: could not be written ({exc.strerror or exc}); choose another folder.") from exc


class ExportPanel(QGroupBox):
    def __init__(self, parent=None):
        super().__init__("Export", parent)
        row = QHBoxLayout(self)
        self.export_h5ad_btn = QPushButton("Export .h5ad")
        self.export_csv_btn = QPushButton("Export CSV")
        self.export_zarr_btn = QPushButton("Export SpatialData")
        self.export_zarr_btn.setToolTip("A SpatialData .zarr store: spots as circles in µm, the table and the image")
        self.clear_btn = QPushButton("Clear")
        self.clear_btn.setToolTip("Remove the predictions layer shown")
        for b in (self.export_h5ad_btn, self.export_csv_btn, self.export_zarr_btn, self.clear_btn):
            row.addWidget(b)

    def ask_path(self, suffix: str, name: str = "predictions") -> Optional[str]:
        stem = "".join(c if c.isalnum() or c in "-_ ()" else "_" for c in name).strip() or "predictions"
        path, _ = QFileDialog.getSaveFileName(
            self, "Export predictions", f"{stem}{suffix}", f"{suffix} files (*{suffix})"
        )
        return path or None

    def enable(self, on: bool) -> None:
        for b in (self.export_h5ad_btn, self.export_csv_btn, self.export_zarr_btn, self.clear_btn):
            b.setEnabled(on)
