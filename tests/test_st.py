"""ST readers on real data committed in tests/data (unchanged copies of the development
data; see tests/data/README.md), and on corrupted copies of it."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io import st
from napari_m2ort.io.st import STDataWarning
from napari_m2ort.slide import open_image


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", STDataWarning)
        return fn(*args, **kwargs)


def _brightness(image, max_px=1400) -> tuple[np.ndarray, float]:
    """Grey image decoded at reduced size (JPEG draft mode), and its downsample factor."""
    im = open_image(image)  # the bomb guard lifted for this open only
    w = im.size[0]
    im.draft("RGB", (max_px, max_px))
    im = im.convert("RGB")
    im.thumbnail((max_px, max_px))
    return np.asarray(im, dtype=np.float32).mean(axis=2), w / im.size[0]


def assert_spots_on_tissue(section, radius_um=25.0, margin=15.0, frac=0.8):
    """Spots sit on tissue: patches around them are darker than the slide's corners."""
    img, f = (
        _brightness(section.image_path) if section.image_path else (section.image.astype(np.float32).mean(axis=2), 1.0)
    )
    h, w = img.shape
    c = 10
    corners = np.array([img[:c, :c].mean(), img[:c, -c:].mean(), img[-c:, :c].mean(), img[-c:, -c:].mean()])
    r = max(1, int(round(radius_um / section.mpp / f)))
    vals = []
    for x, y in section.coords_px / f:
        x, y = int(round(x)), int(round(y))
        vals.append(img[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].mean())
    vals = np.array(vals)
    background = np.median(corners)
    assert np.median(vals) < background - margin, (np.median(vals), background)
    assert np.mean(vals < background - 5) >= frac, (np.mean(vals < background - 5), background)
    return vals, corners


def assert_in_bounds(section):
    w, h = st.image_size(section.image_path) if section.image_path else section.image.shape[1::-1]
    xy = section.coords_px
    assert np.isfinite(xy).all()
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] <= w).all()
    assert (xy[:, 1] >= 0).all() and (xy[:, 1] <= h).all()


# --------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def c2(her2st):
    return _quiet(st.read_her2st, her2st, "C2")


@pytest.fixture(scope="module")
def b4(her2st):
    with pytest.warns(STDataWarning, match=r"1 of 284 selected spots have no row"):
        return st.read_her2st(her2st, "B4")


def test_her2st_c2_counts_and_genes(c2):
    a = c2.adata
    assert a.shape == (187, 15706)
    assert sp.issparse(a.X) and a.X.dtype == np.float32
    assert a.X.min() >= 0
    assert "ERBB2" in a.var_names and a.var_names.is_unique and a.obs_names.is_unique
    assert a.obs_names[0].count("x") == 1
    assert np.median(np.asarray(a.X.sum(axis=1)).ravel()) == pytest.approx(8500, rel=0.05)
    assert c2.platform == "legacy-st" and c2.spot_diameter_um == 100.0


def test_her2st_mpp_from_geometry(c2, b4):
    for s in (c2, b4):
        assert s.mpp_source == "st-geometry"
        assert s.mpp == pytest.approx(0.69, abs=0.03)
        sf = s.adata.uns["spatial"][s.name]["scalefactors"]
        assert sf["spot_diameter_fullres"] == pytest.approx(100 / s.mpp)
        assert sf["tissue_hires_scalef"] == 1.0
        assert s.adata.uns["spatial"][s.name]["metadata"]["mpp_source"] == "st-geometry"


def test_her2st_spots_in_bounds_and_on_tissue(c2, b4):
    for s in (c2, b4):
        assert_in_bounds(s)
        vals, corners = assert_spots_on_tissue(s)
        assert corners.min() > 200  # slide background is near white


def test_her2st_b4_skips_spot_without_counts(b4):
    assert b4.adata.n_obs == 283
    assert b4.adata.n_vars == 15289


def test_her2st_user_mpp(her2st):
    s = _quiet(st.read_her2st, her2st, "C2", mpp=0.5)
    assert s.mpp == 0.5 and s.mpp_source == "user"
    with pytest.raises(M2ORTError, match="positive"):
        _quiet(st.read_her2st, her2st, "C2", mpp=-1)


def test_visium_reader(data_dir):
    folder = data_dir / "visium_spaceranger"
    with pytest.warns(STDataWarning, match="blank"):
        s = st.read_visium(folder)
    assert s.adata.shape == (100, 100)
    assert s.image_path.name == "tissue_lowres_image.png"
    meta = s.adata.uns["spatial"][s.name]["metadata"]
    assert meta["image_choice"] == "lowres"
    scalef = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())["tissue_lowres_scalef"]
    assert meta["image_scalef"] == pytest.approx(scalef)
    # 65 µm / spot_diameter_fullres (Space Ranger's convention) agrees with the 100 µm pitch
    assert meta["mpp_fullres"] == pytest.approx(65 / 89.42751063343188)
    assert s.mpp == pytest.approx(meta["mpp_fullres"] / scalef)
    assert s.mpp_source == "metadata" and s.spot_diameter_um == 55.0
    assert set(s.adata.obs.columns) >= {"in_tissue", "array_row", "array_col"}
    # coordinates are the fullres ones scaled into the lowres image
    pos = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    bc = s.adata.obs_names[0]
    assert s.coords_px[0] == pytest.approx(pos.loc[bc, [5, 4]].to_numpy(float) * scalef)
    assert s.adata.X.sum() > 0 and s.adata.X.min() >= 0
    assert_in_bounds(s)
    assert_spots_on_tissue(s, radius_um=30)


def test_h5ad_with_image(data_dir):
    d = data_dir / "squidpy_mouse_brain"
    with pytest.warns(STDataWarning, match="non-integer"):
        s = st.read_h5ad(d / "test_data.h5ad", image=d / "test_img.jpg")
    assert s.adata.shape == (49, 1999)
    assert s.image_path == d / "test_img.jpg"
    assert s.mpp == pytest.approx(65 / 89.44476048022638) and s.mpp_source == "metadata"
    # the spot pitch (137 px) agrees with 100 µm at this mpp
    assert 100 / s.mpp == pytest.approx(137, rel=0.02)
    assert_in_bounds(s)
    assert_spots_on_tissue(s, radius_um=15)


def test_h5ad_embedded_image(data_dir):
    d = data_dir / "squidpy_mouse_brain"
    with pytest.warns(STDataWarning, match="outside \\[0, 1\\]"):  # the fixture's hires is noise
        s = st.read_h5ad(d / "test_data.h5ad")
    assert s.image_path is None and s.image.shape == (88, 49, 3) and s.image.dtype == np.uint8
    meta = s.adata.uns["spatial"][s.name]["metadata"]
    assert meta["image_choice"] == "embedded-lowres"
    assert s.mpp == pytest.approx(meta["mpp_fullres"] / meta["image_scalef"])
    assert_in_bounds(s)


def test_image_size_tiff_and_jpeg(data_dir, her2st):
    assert st.image_size(data_dir / "squidpy_mouse_brain" / "test_img.jpg") == (950, 1717)
    w, h = st.image_size(data_dir / "slide_fixtures" / "boxes.tiff")
    assert w > 0 and h > 0
    with pytest.raises(M2ORTError, match="does not exist"):
        st.image_size(her2st / "nope.jpg")


def test_points_layer_data(c2):
    data, kw, kind = st.points_layer_data(c2)
    assert kind == "points" and data.shape == (187, 2)
    np.testing.assert_allclose(data[:, 0], c2.coords_px[:, 1] * c2.mpp)  # row = y, in µm
    np.testing.assert_allclose(data[:, 1], c2.coords_px[:, 0] * c2.mpp)
    assert kw["size"] == 100.0
    assert kw["features"].shape == (187, 250) and "ERBB2" in kw["features"]
    assert kw["face_color"] == "ERBB2"
    assert kw["name"] == "C2 measured ST" and kw["metadata"]["st_section"] is c2
    expected = np.log1p(
        np.asarray(c2.adata[:, "ERBB2"].X.todense()).ravel() * 1e6 / np.asarray(c2.adata.X.sum(axis=1)).ravel()
    )
    np.testing.assert_allclose(kw["features"]["ERBB2"], expected, rtol=1e-5)
    data, kw, _ = st.points_layer_data(c2, genes=["ERBB2", "GRB7"])
    assert list(kw["features"].columns) == ["ERBB2", "GRB7"]
    import napari.layers

    layer = napari.layers.Points(data, **kw)
    assert layer.features.shape == (187, 2)


def test_pillow_guard_stays_on(c2, monkeypatch):
    """Reading a slide-sized JPEG lifts Pillow's bomb guard for that header parse only."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # other test modules may lift it
    w, h = st.image_size(c2.image_path)
    assert w * h > 2 * 1000  # would raise DecompressionBombError under the guard
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_napari_get_reader_dispatch(data_dir, tmp_path):
    assert st.napari_get_reader(str(tmp_path)) is None  # a folder that is not Visium
    assert st.napari_get_reader(str(data_dir / "squidpy_mouse_brain" / "test_img.jpg")) is None
    assert callable(st.napari_get_reader(str(data_dir / "visium_spaceranger")))
    reader = st.napari_get_reader([str(data_dir / "squidpy_mouse_brain" / "test_data.h5ad")])
    layers = _quiet(reader, "x")
    (img, ikw, ikind), (pts, pkw, pkind) = layers
    assert ikind == "image" and pkind == "points"
    h_um, w_um = img.shape[0] * ikw["scale"][0], img.shape[1] * ikw["scale"][1]
    assert (pts[:, 0] <= h_um).all() and (pts[:, 1] <= w_um).all() and (pts >= 0).all()
    assert pkw["size"] == 55.0


def test_napari_reader_visium_with_slides(data_dir):
    pytest.importorskip("napari_m2ort.io.slides")
    layers = _quiet(st.napari_get_reader(str(data_dir / "visium_spaceranger")), "x")
    assert [t for _, _, t in layers] == ["image", "points"]


# --------------------------------------------------------------------------------------
# bad input: small synthetic legacy-ST sections and corrupted copies of the fixtures
# --------------------------------------------------------------------------------------

_GENES = ["ERBB2", "GRB7", "ACTB", "KRT19"]


def make_legacy(tmp_path: Path, counts_rows=None, spots=None, genes=None, image_size=(1200, 1000)) -> tuple:
    """A 4 × 3 spot grid, 100 px per array step (mpp = 2 µm/px), grey tissue on white."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    img = np.full((image_size[1], image_size[0], 3), 245, np.uint8)
    img[250:800, 350:950] = (150, 90, 160)
    Image.fromarray(img).save(tmp_path / "he.jpg")
    if spots is None:
        spots = pd.DataFrame(
            [(x, y, x + 0.01, y - 0.01, 100.0 * x, 100.0 * y, 1) for y in range(3, 6) for x in range(4, 8)],
            columns=["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"],
        )
    spots.to_csv(tmp_path / "sel.tsv", sep="\t", index=False)
    genes = genes or _GENES
    if counts_rows is None:
        rng = np.random.default_rng(0)
        counts_rows = {f"{int(x)}x{int(y)}": rng.integers(0, 20, len(genes)) for x, y in zip(spots.x, spots.y)}
    lines = ["\t" + "\t".join(genes)]
    for k, v in counts_rows.items() if isinstance(counts_rows, dict) else counts_rows:
        lines.append(k + "\t" + "\t".join(str(a) for a in v))
    with gzip.open(tmp_path / "cnt.tsv.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return tmp_path / "he.jpg", tmp_path / "cnt.tsv.gz", tmp_path / "sel.tsv"


def test_synthetic_legacy_reads(tmp_path):
    s = st.read_legacy_st(*make_legacy(tmp_path), name="syn")
    assert s.adata.shape == (12, 4)
    assert s.mpp == pytest.approx(2.0, rel=1e-3) and s.mpp_source == "st-geometry"
    np.testing.assert_allclose(s.coords_px[0], [400, 300])


def test_missing_counts_file(tmp_path, her2st):
    root = tmp_path / "her2st"
    (root / "ST-imgs" / "C" / "C2").mkdir(parents=True)
    (root / "ST-spotfiles").mkdir()
    shutil.copy(her2st / "ST-spotfiles" / "C2_selection.tsv", root / "ST-spotfiles")
    with pytest.raises(M2ORTError, match=r"C2\.tsv\.gz: the counts file for section C2 is missing"):
        st.read_her2st(root, "C2")
    with pytest.raises(M2ORTError, match="does not exist"):
        st.read_legacy_st(tmp_path / "x.jpg", tmp_path / "c.tsv.gz", tmp_path / "s.tsv")


def test_duplicated_spot_ids_are_dropped(tmp_path):
    rows = [(f"{x}x{y}", [1, 2, 3, 4]) for y in range(3, 6) for x in range(4, 8)]
    rows.append(("4x3", [9, 9, 9, 9]))  # same spot twice: ambiguous
    with pytest.warns(STDataWarning, match="2 rows share 1 repeated spot ids"):
        s = st.read_legacy_st(*make_legacy(tmp_path, counts_rows=rows))
    assert s.adata.n_obs == 11 and "4x3" not in s.adata.obs_names


def test_duplicated_genes_made_unique(tmp_path):
    with pytest.warns(STDataWarning, match="1 repeated gene names made unique"):
        s = st.read_legacy_st(*make_legacy(tmp_path, genes=["A", "B", "A", "C"]))
    assert list(s.adata.var_names) == ["A", "B", "A-1", "C"]


def test_negative_and_nonfinite_counts_skipped(tmp_path):
    rows = {f"{x}x{y}": [1, 2, 3, 4] for y in range(3, 6) for x in range(4, 8)}
    rows["5x3"] = [1, -2, 3, 4]
    rows["6x3"] = [1, "nan", 3, 4]
    with pytest.warns(STDataWarning, match="2 of 12 spots have negative or non-finite counts"):
        s = st.read_legacy_st(*make_legacy(tmp_path, counts_rows=rows))
    assert s.adata.n_obs == 10 and s.adata.X.min() >= 0


def test_nan_and_outside_coordinates_skipped(tmp_path):
    img, cnt, sel = make_legacy(tmp_path)
    spots = pd.read_csv(sel, sep="\t")
    spots.loc[0, "pixel_x"] = np.nan
    spots.loc[1, "pixel_y"] = 5000.0  # below the 1000 px high image
    spots.to_csv(sel, sep="\t", index=False)
    with pytest.warns(STDataWarning) as rec:
        s = st.read_legacy_st(img, cnt, sel, mpp=2.0)
    msgs = " ".join(str(w.message) for w in rec)
    assert "1 of 12 spots have no (finite) coordinates" in msgs
    assert "1 of 12 spots lie outside the 1200 × 1000 px image" in msgs
    assert s.adata.n_obs == 10


def test_all_spots_outside_image_fails(tmp_path):
    img, cnt, sel = make_legacy(tmp_path / "a", image_size=(200, 200))
    with pytest.raises(M2ORTError, match="no valid spots remain"):
        _quiet(st.read_legacy_st, img, cnt, sel)


def test_counts_for_other_section_fails(tmp_path):
    rows = {f"{x}x{y}": [1, 2, 3, 4] for y in range(30, 33) for x in range(40, 44)}
    with pytest.raises(M2ORTError, match="none of the selected spots"):
        _quiet(st.read_legacy_st, *make_legacy(tmp_path, counts_rows=rows))


def test_transposed_counts_table(tmp_path):
    img, cnt, sel = make_legacy(tmp_path)
    df = pd.read_csv(cnt, sep="\t", index_col=0).T
    df.to_csv(cnt, sep="\t", compression="gzip")
    s = st.read_legacy_st(img, cnt, sel)
    assert s.adata.shape == (12, 4)


def _copy_visium(data_dir, tmp_path) -> Path:
    dst = tmp_path / "vis"
    shutil.copytree(data_dir / "visium_spaceranger", dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def test_visium_duplicated_barcodes(data_dir, tmp_path):
    dst = _copy_visium(data_dir, tmp_path)
    pos_file = dst / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(pos_file, header=None)
    import h5py

    with h5py.File(dst / "filtered_feature_bc_matrix.h5", "r") as f:
        bc = f["matrix/barcodes"][0].decode()
    extra = pos[pos[0] == bc].copy()
    extra[4] += 500  # a second, different position for the same barcode
    pd.concat([pos, extra]).to_csv(pos_file, header=False, index=False)
    with pytest.warns(STDataWarning, match="repeated barcodes"):
        s = st.read_visium(dst)
    assert bc not in s.adata.obs_names and s.adata.n_obs == 99


def test_visium_missing_matrix(tmp_path):
    (tmp_path / "spatial").mkdir()
    with pytest.raises(M2ORTError, match="no filtered_feature_bc_matrix.h5"):
        st.read_visium(tmp_path)


def test_h5ad_without_spatial(data_dir, tmp_path):
    import anndata as ad

    a = ad.read_h5ad(data_dir / "squidpy_mouse_brain" / "test_data.h5ad")
    del a.obsm["spatial"]
    a.write_h5ad(tmp_path / "nospatial.h5ad")
    with pytest.raises(M2ORTError, match=r"no obsm\['spatial'\]"):
        st.read_h5ad(tmp_path / "nospatial.h5ad")


def test_h5ad_without_mpp_needs_mpp(data_dir, tmp_path):
    import anndata as ad

    a = ad.AnnData(X=sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(3, 4)))
    a.var_names = _GENES
    a.obsm["spatial"] = np.array([[10.0, 20.0], [30.0, 40.0], [np.nan, 5.0]])
    a.write_h5ad(tmp_path / "plain.h5ad")
    img = tmp_path / "img.png"
    Image.fromarray(np.full((100, 100, 3), 128, np.uint8)).save(img)
    with pytest.raises(M2ORTError, match="--mpp"):
        st.read_h5ad(tmp_path / "plain.h5ad", image=img)
    with pytest.warns(STDataWarning, match="1 of 3 spots have no"):
        s = st.read_h5ad(tmp_path / "plain.h5ad", image=img, mpp=0.5)
    assert s.adata.n_obs == 2 and s.mpp_source == "user" and s.platform == "unknown"


def test_h5ad_duplicated_obs_names_made_unique(tmp_path):
    import anndata as ad

    a = ad.AnnData(X=np.ones((3, 2), np.float32))
    a.obs_names = ["s", "s", "t"]
    a.obsm["spatial"] = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.warns(STDataWarning, match="repeated spot ids made unique"):
        s = st.read_h5ad(tmp_path / "dup.h5ad", mpp=1.0)
    assert list(s.adata.obs_names) == ["s", "s-1", "t"]


def test_h5ad_round_trip_keeps_frame_and_mpp(c2, tmp_path):
    c2.adata.write_h5ad(tmp_path / "c2.h5ad")
    s = st.read_h5ad(tmp_path / "c2.h5ad")
    assert s.mpp == pytest.approx(c2.mpp) and s.mpp_source == "st-geometry"
    assert s.platform == "legacy-st" and s.spot_diameter_um == 100.0
    assert s.image_path == c2.image_path
    np.testing.assert_allclose(s.coords_px, c2.coords_px)
    assert (s.adata.X != c2.adata.X).nnz == 0
