"""HEST-1k samples (issue 15, item 4), on a fixture in HEST's layout built from section C2.

The layout follows HEST's own reader (``mahmoodlab/HEST``, ``hest.readers._read_st``):
``st/<id>.h5ad`` (counts, ``obsm["spatial"]`` in level-0 pixels of the WSI, a downscaled
image under ``uns["spatial"]["ST"]``), ``wsis/<id>.tif`` (pyramidal TIFF) and
``metadata/<id>.json`` (``pixel_size_um_estimated`` / ``pixel_size_um_embedded``,
``spot_diameter``, ``inter_spot_dist``, ``st_technology``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.st import read_her2st, read_hest
from napari_m2ort.io.st.hest import hest_samples

SAMPLE = "SPA_C2"


def _hest_anndata(section):
    """The section as HEST ships it: raw counts in X, HEST's obs columns and uns layout."""
    import anndata as ad
    import pandas as pd

    from napari_m2ort.io.slides import open_slide

    xy = section.coords_px
    array = section.adata.obs
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(section.n_spots, dtype=int),
            "pxl_col_in_fullres": xy[:, 0],
            "pxl_row_in_fullres": xy[:, 1],
        },
        index=pd.Index(section.adata.obs_names.astype(str)),
    )
    for col in ("array_row", "array_col"):
        if col in array:
            obs[col] = array[col].to_numpy()
    a = ad.AnnData(X=sp.csr_matrix(section.adata.X), obs=obs, var=pd.DataFrame(index=section.adata.var_names))
    a.obsm["spatial"] = xy.copy()
    with open_slide(section.image_path, mpp=section.mpp) as slide:
        small, downsample = slide.thumbnail(1000)
    scalef = 1.0 / downsample
    a.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": small},
            "scalefactors": {
                "tissue_downscaled_fullres_scalef": scalef,
                "spot_diameter_fullres": 100.0 / section.mpp,
            },
        }
    }
    return a


@pytest.fixture(scope="module")
def her2st_c2(her2st):
    return read_her2st(her2st, "C2")


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory, her2st_c2):
    from napari_m2ort.io.convert import convert_to_ome_tiff

    root = tmp_path_factory.mktemp("hest")
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir()
    _hest_anndata(her2st_c2).write_h5ad(root / "st" / f"{SAMPLE}.h5ad")
    ome = convert_to_ome_tiff(her2st_c2.image_path, root / f"{SAMPLE}.ome.tif", mpp=her2st_c2.mpp)
    ome.rename(root / "wsis" / f"{SAMPLE}.tif")  # HEST names its pyramids <id>.tif
    meta = {
        "id": SAMPLE,
        "st_technology": "Spatial Transcriptomics",
        "spot_diameter": 100.0,
        "inter_spot_dist": 200.0,
        "pixel_size_um_estimated": her2st_c2.mpp,
        "pixel_size_um_embedded": 0.25,  # a wrong scanner tag: HEST trusts the estimate
        "species": "Homo sapiens",
    }
    (root / "metadata" / f"{SAMPLE}.json").write_text(json.dumps(meta))
    return root


def test_read_hest_matches_read_her2st(hest_root, her2st_c2):
    s = read_hest(hest_root, SAMPLE)
    ref = her2st_c2
    assert s.name == SAMPLE and s.library_id == SAMPLE
    assert s.image_path == hest_root / "wsis" / f"{SAMPLE}.tif"
    assert s.mpp == pytest.approx(ref.mpp) and s.mpp_source == "metadata"
    assert s.platform == "legacy-st" and s.spot_diameter_um == 100.0
    assert list(s.adata.obs_names) == list(ref.adata.obs_names)
    assert s.genes == ref.genes
    assert (s.counts() != ref.counts()).nnz == 0
    np.testing.assert_allclose(s.coords_px, ref.coords_px)
    np.testing.assert_allclose(s.centers_um, ref.centers_um)
    sf = s.adata.uns["spatial"][SAMPLE]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(100.0 / ref.mpp)
    assert json.loads(s.adata.uns["spatial"][SAMPLE]["metadata"]["hest"])["spot_diameter"] == 100.0


def test_wsi_opens_in_the_spots_frame(hest_root, her2st_c2):
    from napari_m2ort.io.slides import open_slide

    s = read_hest(hest_root, SAMPLE)
    with open_slide(s.image_path, mpp=s.mpp) as slide:
        assert len(slide.levels) > 1  # pyramidal, as HEST ships it
        from napari_m2ort.io.st import image_size

        assert slide.shape == image_size(her2st_c2.image_path)[::-1]
        xy = s.coords_px.max(axis=0)
        assert xy[0] < slide.shape[1] and xy[1] < slide.shape[0]


def test_mpp_argument_and_embedded_fallback(hest_root, tmp_path):
    assert read_hest(hest_root, SAMPLE, mpp=0.6).mpp == pytest.approx(0.6)
    assert read_hest(hest_root, SAMPLE, mpp=0.6).mpp_source == "user"
    # a sample without the estimate falls back to the embedded value
    other = tmp_path / "hest"
    for sub in ("st", "wsis"):
        (other / sub).mkdir(parents=True)
        for f in (hest_root / sub).iterdir():
            (other / sub / f.name).symlink_to(f)
    (other / "metadata").mkdir()
    meta = json.loads((hest_root / "metadata" / f"{SAMPLE}.json").read_text())
    meta["pixel_size_um_estimated"] = None
    (other / "metadata" / f"{SAMPLE}.json").write_text(json.dumps(meta))
    assert read_hest(other, SAMPLE).mpp == pytest.approx(0.25)
    del meta["pixel_size_um_embedded"]
    (other / "metadata" / f"{SAMPLE}.json").write_text(json.dumps(meta))
    with pytest.raises(M2ORTError, match="no pixel size.*--mpp"):
        read_hest(other, SAMPLE)


def test_missing_sample_names_what_is_there(hest_root, tmp_path):
    assert hest_samples(hest_root) == [SAMPLE]
    with pytest.raises(M2ORTError, match=rf"'TENX95' lacks st .*samples here: {SAMPLE}"):
        read_hest(hest_root, "TENX95")
    with pytest.raises(M2ORTError, match="not a folder"):
        read_hest(tmp_path / "nothing", SAMPLE)
    bad = tmp_path / "bad"
    for sub in ("st", "wsis", "metadata"):
        (bad / sub).mkdir(parents=True)
    (bad / "st" / "X.h5ad").write_text("")
    (bad / "wsis" / "X.tif").write_text("")
    (bad / "metadata" / "X.json").write_text("{not json")
    with pytest.raises(M2ORTError, match="metadata as JSON"):
        read_hest(bad, "X")


def test_cli_evaluates_hest_samples(hest_root, tmp_path, capsys):
    from napari_m2ort.cli import main

    out = tmp_path / "metrics.json"
    rc = main(["evaluate", "--hest", str(hest_root), "--samples", SAMPLE, "--model", "bundled", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    assert m["n_spots"] > 150 and m["pcc_gene_mean"] is not None and np.isfinite(m["pcc_gene_mean"])
    assert main(["evaluate", "--hest", str(hest_root), "--model", "bundled", "--out", str(tmp_path / "x.json")]) == 2
    assert "--samples" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
