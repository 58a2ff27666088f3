"""Predicted .h5ad files open in scanpy and squidpy as they are (issue 15, item 1).

The prediction is built by hand (no model run): a hexagonal grid of spots in the tissue of
the packaged HER2+ section C2, with values and test-time-augmentation spread, so the test
exercises the export alone, on a real slide through the slide contract.
"""

from __future__ import annotations

import os
import stat
import warnings

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from napari_m2ort.errors import M2ORTError  # noqa: E402
from napari_m2ort.inference import Prediction  # noqa: E402
from napari_m2ort.io import export  # noqa: E402
from napari_m2ort.sample_data import SAMPLE_DIR  # noqa: E402

MPP = 0.5
GENES = ["ERBB2", "GAPDH", "CD74", "KRT19"]


@pytest.fixture(scope="module")
def slide():
    from napari_m2ort.io.slides import open_slide

    s = open_slide(SAMPLE_DIR / "5714_HE_BT_C2.jpg", mpp=MPP)
    yield s
    s.close()


def hex_centers(x0=1500.0, y0=1500.0, x1=3500.0, y1=3200.0, pitch=100.0) -> np.ndarray:
    rows = np.arange(y0, y1, pitch * np.sqrt(3) / 2)
    return np.array([[x + (pitch / 2) * (i % 2), y] for i, y in enumerate(rows) for x in np.arange(x0, x1, pitch)])


def make_prediction(uncertainty: bool = True) -> Prediction:
    xy = hex_centers()
    n = len(xy)
    rng = np.random.default_rng(7)
    done = np.ones(n, bool)
    done[:3] = False  # not yet predicted: left out of the file
    values = rng.gamma(2.0, 1.0, (n, len(GENES))).astype(np.float32)
    values[~done] = np.nan
    return Prediction(
        centers_um=xy,
        values=values,
        done=done,
        genes=list(GENES),
        outside=np.zeros(n, bool),
        blank=np.arange(n) % 11 == 0,
        info={"tta": "d4" if uncertainty else "none"},
        uncertainty=rng.random((n, len(GENES)), dtype=np.float32) if uncertainty else None,
    )


@pytest.fixture(scope="module")
def prediction():
    return make_prediction()


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory, slide, prediction):
    adata = export.prediction_to_anndata(prediction, {"target": "log1p_cpm"}, slide)
    return export.write_prediction(adata, tmp_path_factory.mktemp("pred") / "pred.h5ad")


def test_anndata_structure_for_scanpy(slide, prediction, h5ad):
    import anndata as ad

    a = ad.read_h5ad(h5ad)
    done = prediction.done
    assert a.n_obs == int(done.sum()) and list(a.var_names) == GENES
    assert list(a.uns["spatial"]) == [slide.name]  # the library is named after the slide
    lib = a.uns["spatial"][slide.name]
    sf = lib["scalefactors"]
    hires, lowres = lib["images"]["hires"], lib["images"]["lowres"]
    assert hires.dtype == np.uint8 and hires.shape[2] == 3 and max(hires.shape[:2]) == export.HIRES_PX
    assert lowres.dtype == np.uint8 and max(lowres.shape[:2]) == export.LOWRES_PX
    # scale factors map level-0 pixels onto each thumbnail
    h0, w0 = slide.shape
    assert hires.shape[1] == pytest.approx(w0 * sf["tissue_hires_scalef"], abs=1)
    assert hires.shape[0] == pytest.approx(h0 * sf["tissue_hires_scalef"], abs=1)
    assert lowres.shape[1] == pytest.approx(w0 * sf["tissue_lowres_scalef"], abs=1)
    assert sf["spot_diameter_fullres"] == pytest.approx(55.0 / MPP)
    # obsm["spatial"] in level-0 pixels, obsm["spatial_um"] in µm
    np.testing.assert_allclose(a.obsm["spatial"] * MPP, prediction.centers_um[done])
    np.testing.assert_allclose(a.obsm["spatial_um"], prediction.centers_um[done])
    # test-time-augmentation spread travels with the values
    np.testing.assert_allclose(a.layers["uncertainty"], prediction.uncertainty[done])
    np.testing.assert_allclose(a.obs["uncertainty"], prediction.uncertainty[done].mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(a.X, prediction.values[done])


def test_sc_pl_spatial_plots_without_extra_arguments(h5ad, tmp_path):
    import matplotlib.pyplot as plt
    import scanpy as sc

    a = sc.read_h5ad(h5ad)
    out = tmp_path / "erbb2.png"
    with warnings.catch_warnings():  # scanpy 1.11 points sc.pl.spatial users to squidpy
        warnings.simplefilter("ignore", FutureWarning)
        axes = sc.pl.spatial(a, color="ERBB2", show=False)
    ax = axes[0] if isinstance(axes, list) else axes
    assert ax.images, "the hires thumbnail is drawn under the spots"
    img = ax.images[0].get_array()
    assert max(img.shape[:2]) == export.HIRES_PX
    plt.savefig(out, dpi=50)
    plt.close("all")
    assert out.stat().st_size > 10_000


def test_squidpy_spatial_scatter(h5ad, tmp_path):
    """squidpy's successor of sc.pl.spatial reads the same uns["spatial"] structure."""
    import anndata as ad
    import matplotlib.pyplot as plt
    import squidpy as sq

    a = ad.read_h5ad(h5ad)
    sq.pl.spatial_scatter(a, color="ERBB2", save=None)
    ax = plt.gcf().axes[0]
    assert ax.images and max(ax.images[0].get_array().shape[:2]) == export.HIRES_PX
    plt.savefig(tmp_path / "scatter.png", dpi=40)
    plt.close("all")


def test_squidpy_spatial_neighbors(h5ad):
    import anndata as ad
    import squidpy as sq

    def median_degree(a) -> float:
        conn = a.obsp["spatial_connectivities"]
        assert conn.shape == (a.n_obs, a.n_obs)
        return float(np.median(np.asarray(conn.sum(axis=1)).ravel()))

    a = ad.read_h5ad(h5ad)
    with warnings.catch_warnings():  # squidpy 1.8 deprecates the one-call form for the ones below
        warnings.simplefilter("ignore", FutureWarning)
        sq.gr.spatial_neighbors(a)  # the Visium-style keys make squidpy take the hexagonal grid
    assert median_degree(a) == 6  # inner spots of a hexagonal layout have six neighbours
    if hasattr(sq.gr, "spatial_neighbors_radius"):  # squidpy >= 1.8
        sq.gr.spatial_neighbors_grid(a)
        assert median_degree(a) == 6
        sq.gr.spatial_neighbors_radius(a, radius=120.0 / MPP)  # 120 µm in level-0 px
        assert median_degree(a) == 6


def test_without_uncertainty_no_layer(slide):
    a = export.prediction_to_anndata(make_prediction(uncertainty=False), {"target": "x"}, slide)
    assert "uncertainty" not in a.layers and "uncertainty" not in a.obs


def test_flags_become_obs(slide):
    pred = make_prediction()
    pred.flags = np.where(pred.blank, "blank", "ok")  # a producer may attach per-spot flags
    a = export.prediction_to_anndata(pred, {"target": "x"}, slide)
    assert list(a.obs["flag"]) == list(np.where(pred.blank, "blank", "ok")[pred.done])


def test_points_layer_export_same_structure(slide, prediction):
    import pandas as pd

    done = prediction.done
    yx = prediction.centers_um[done][:, ::-1]
    meta = {
        "features": pd.DataFrame(prediction.values[done], columns=GENES),
        "metadata": {"mpp": MPP, "slide": slide.name, "flags": np.array(["ok"] * int(done.sum()))},
        "size": np.full(int(done.sum()), 55.0),
        "name": "M2ORT predictions",
    }
    layer = export.points_layer_to_anndata(yx, meta, slide=slide)
    direct = export.prediction_to_anndata(prediction, {"target": "x"}, slide)
    assert list(layer.uns["spatial"]) == list(direct.uns["spatial"]) == [slide.name]
    for key in ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres"):
        assert layer.uns["spatial"][slide.name]["scalefactors"][key] == pytest.approx(
            direct.uns["spatial"][slide.name]["scalefactors"][key]
        )
    np.testing.assert_allclose(layer.obsm["spatial"], direct.obsm["spatial"])
    assert set(layer.obs["flag"]) == {"ok"}
    # without a slide: no thumbnails, level-0 frame stated, nothing else lost
    bare = export.points_layer_to_anndata(yx, meta)
    assert "images" not in bare.uns["spatial"][slide.name]
    assert bare.uns["spatial"][slide.name]["scalefactors"]["tissue_hires_scalef"] == 1.0


@pytest.mark.filterwarnings("ignore:.*non-integer values")  # predictions are not counts
def test_prediction_file_reads_back_as_section(slide, prediction, h5ad):
    """The package's own reader places the spots where they were predicted (embedded hires image)."""
    from napari_m2ort.io.st import read_h5ad

    section = read_h5ad(h5ad)
    scalef = section.adata.uns["spatial"][slide.name]["metadata"]["image_scalef"]
    assert section.image is not None and max(section.image.shape[:2]) == export.HIRES_PX
    assert section.mpp == pytest.approx(MPP / scalef)
    np.testing.assert_allclose(section.centers_um, prediction.centers_um[prediction.done], rtol=1e-6)


def test_write_prediction_csv_and_umask(slide, prediction, tmp_path):
    adata = export.prediction_to_anndata(prediction, {"target": "x"}, slide)
    old = os.umask(0o027)
    try:
        out = export.write_prediction(adata, tmp_path / "sub" / "pred.csv")
        h5 = export.write_prediction(adata, tmp_path / "pred.h5ad")
    finally:
        os.umask(old)
    import pandas as pd

    df = pd.read_csv(out, index_col="spot")
    assert list(df.columns[:2]) == ["x_um", "y_um"] and list(df.columns[2:]) == GENES
    for p in (out, h5):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.rglob(".*tmp")]


def test_check_output_path(tmp_path):
    ok = export.check_output_path(tmp_path / "new" / "pred.h5ad")
    assert ok == tmp_path / "new" / "pred.h5ad"
    with pytest.raises(M2ORTError, match=r"pred\.txt.*\.h5ad, \.csv or \.zarr"):
        export.check_output_path(tmp_path / "pred.txt")
    folder = tmp_path / "folder.h5ad"
    folder.mkdir()
    with pytest.raises(M2ORTError, match="is a folder"):
        export.check_output_path(folder, overwrite=True)
    existing = tmp_path / "old.csv"
    existing.write_text("x")
    with pytest.raises(M2ORTError, match="exists already.*--overwrite"):
        export.check_output_path(existing)
    assert export.check_output_path(existing, overwrite=True) == existing
    not_a_store = tmp_path / "plain.zarr"
    not_a_store.mkdir()
    with pytest.raises(M2ORTError, match="not a zarr store"):
        export.check_output_path(not_a_store, overwrite=True)
    store = tmp_path / "store.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    with pytest.raises(M2ORTError, match="exists already"):
        export.check_output_path(store)
    assert export.check_output_path(store, overwrite=True) == store
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(M2ORTError, match="is a file, not a folder"):
        export.check_output_path(a_file / "pred.h5ad")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(M2ORTError, match="not writable"):
            export.check_output_path(locked / "pred.h5ad")
