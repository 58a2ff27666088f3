"""File > Save for the plugin's layers: our writers first, an extension, the umask."""

from __future__ import annotations

import os
import stat

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.gui


def _points(viewer):
    from napari_m2ort.widgets import _layers as L

    features = pd.DataFrame({"ERBB2": [1.0, 2.0, 3.0], "GRB7": [0.5, 0.1, 0.2]})
    md = {"m2ort_kind": L.PRED_KIND, "spot_ids": ["a", "b", "c"], "flags": ["ok"] * 3, "model_card": "{}"}
    return viewer.add_points(
        np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]]), features=features, name="ERBB2 - M2ORT-S bundled",
        metadata=md, size=55.0,
    )  # fmt: skip


def test_plugin_writers_first_extension_added_umask_followed(make_napari_viewer, tmp_path):
    import anndata as ad
    from napari.plugins import _npe2

    viewer = make_napari_viewer()
    layer = _points(viewer)
    viewer.window.add_plugin_dock_widget("napari-m2ort", "Predict expression")
    ext_str, writers = _npe2.file_extensions_string_for_layers([layer])
    assert writers[0].command == "napari-m2ort.write_h5ad", ext_str
    assert ext_str.split(";;")[0].endswith("(*.h5ad)")
    assert {w.command for w in writers[:2]} == {"napari-m2ort.write_h5ad", "napari-m2ort.write_csv"}

    old = os.umask(0o022)
    try:
        # what File > Save does with the name it offers (the layer's, no extension)
        viewer.layers.selection = {layer}
        base = tmp_path / layer.name
        saved = viewer.layers.save(str(base), selected=True, _writer=writers[0])
        assert saved == [str(base) + ".h5ad"]
        adata = ad.read_h5ad(saved[0])
        assert list(adata.var_names) == ["ERBB2", "GRB7"] and adata.n_obs == 3
        assert stat.S_IMODE(os.stat(saved[0]).st_mode) == 0o644
        csv = viewer.layers.save(str(tmp_path / "spots 0.5"), selected=True, _writer=writers[1])
        assert csv == [str(tmp_path / "spots 0.5.csv")]
        assert stat.S_IMODE(os.stat(csv[0]).st_mode) == 0o644
    finally:
        os.umask(old)


def test_measured_spots_offer_anndata_first_without_the_widget(make_napari_viewer):
    from napari.plugins import _npe2
    from npe2 import PluginManager

    table = PluginManager.instance()._contrib._writers
    table.sort(key=lambda row: row[-1].command.startswith("napari-m2ort."))  # as napari registers them
    viewer = make_napari_viewer()
    viewer.open_sample("napari-m2ort", "her2st_c2")
    points = [ly for ly in viewer.layers if ly._type_string == "points"][0]
    ext_str, writers = _npe2.file_extensions_string_for_layers([points])
    assert writers[0].command == "napari-m2ort.write_h5ad", ext_str
