"""Predictions as a SpatialData store that ``spatialdata.read_zarr`` opens (issue 15, item 2)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("spatialdata")

from test_export_scverse import GENES, MPP, make_prediction  # noqa: E402

from napari_m2ort.errors import M2ORTError  # noqa: E402
from napari_m2ort.io import export  # noqa: E402
from napari_m2ort.io import spatialdata as sdio  # noqa: E402
from napari_m2ort.sample_data import SAMPLE_DIR  # noqa: E402


@pytest.fixture(scope="module")
def slide():
    from napari_m2ort.io.slides import open_slide

    s = open_slide(SAMPLE_DIR / "5714_HE_BT_C2.jpg", mpp=MPP)
    yield s
    s.close()


@pytest.fixture(scope="module")
def pred_adata(slide):
    pred = make_prediction()
    pred.flags = np.where(pred.blank, "blank", "ok")
    return pred, export.prediction_to_anndata(pred, {"target": "log1p_cpm"}, slide)


@pytest.fixture(scope="module")
def store(tmp_path_factory, pred_adata):
    return export.write_prediction(pred_adata[1], tmp_path_factory.mktemp("sd") / "pred.zarr")


def yx_scale(t) -> np.ndarray:
    """(y, x) µm per pixel of a Scale (written on y, x; read back with c as well)."""
    assert type(t).__name__ == "Scale"
    axes = list(t.axes)
    return np.array([float(t.scale[axes.index("y")]), float(t.scale[axes.index("x")])])


def test_read_zarr_spots_table_image(store, pred_adata, slide):
    import spatialdata as sd
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    pred, adata = pred_adata
    done = pred.done
    s = sd.read_zarr(store)
    assert set(s.images) == {sdio.IMAGE_KEY} and set(s.shapes) == {sdio.SHAPES_KEY} and set(s.tables) == {"table"}

    # spots: circles in µm
    spots = s.shapes[sdio.SHAPES_KEY]
    np.testing.assert_allclose(np.c_[spots.geometry.x, spots.geometry.y], pred.centers_um[done])
    np.testing.assert_allclose(spots["radius"], 55.0 / 2)
    assert type(get_transformation(spots, sdio.COORDINATE_SYSTEM)).__name__ == "Identity"

    # table annotating them: genes, uncertainty, flags
    table = s.tables["table"]
    region, region_key, instance_key = get_table_keys(table)
    assert region == sdio.SHAPES_KEY
    np.testing.assert_array_equal(table.obs[instance_key].to_numpy(), spots.index.to_numpy())
    assert set(table.obs[region_key]) == {sdio.SHAPES_KEY}
    assert list(table.var_names) == GENES and list(table.obs_names) == list(adata.obs_names)
    np.testing.assert_allclose(np.asarray(table.X), pred.values[done])
    np.testing.assert_allclose(table.layers["uncertainty"], pred.uncertainty[done])
    assert list(table.obs["flag"]) == list(pred.flags[done])
    assert "images" not in table.uns["spatial"][slide.name]  # the image is its own element

    # image: a downscaled copy, scaled to the same µm system, covering the whole slide
    image = s.images[sdio.IMAGE_KEY]
    assert image.dims == ("c", "y", "x") and image.shape[0] == 3
    um_per_px = yx_scale(get_transformation(image, sdio.COORDINATE_SYSTEM))
    extent_um = np.asarray(image.shape[1:]) * um_per_px
    np.testing.assert_allclose(extent_um, slide.size_um, rtol=2e-3)
    assert int(np.asarray(image.values).std()) > 5  # the tissue, not a blank


def test_existing_store_needs_overwrite_and_is_replaced_whole(tmp_path, pred_adata):
    import spatialdata as sd

    _, adata = pred_adata
    out = tmp_path / "pred.zarr"
    sdio.write_spatialdata(adata[:10], out)
    with pytest.raises(M2ORTError, match="exists already"):
        export.write_prediction(adata, out, overwrite=False)
    export.write_prediction(adata[:20], out, overwrite=True)
    assert sd.read_zarr(out).tables["table"].n_obs == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.zarr"]  # no temporary left behind


def test_image_from_slide_is_multiscale(tmp_path, pred_adata, slide):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    _, adata = pred_adata
    out = sdio.write_spatialdata(adata, tmp_path / "big.zarr", slide=slide, image_max_px=2600)
    image = sd.read_zarr(out).images[sdio.IMAGE_KEY]
    assert "scale0" in image  # a DataTree pyramid
    full = image["scale0"]["image"]
    assert max(full.shape[1:]) == 2600
    um_per_px = yx_scale(get_transformation(image, sdio.COORDINATE_SYSTEM))
    np.testing.assert_allclose(np.asarray(full.shape[1:]) * um_per_px, slide.size_um, rtol=2e-3)


def test_wrong_suffix_refused(tmp_path, pred_adata):
    with pytest.raises(M2ORTError, match=r"\.zarr"):
        sdio.write_spatialdata(pred_adata[1], tmp_path / "pred.h5ad")
