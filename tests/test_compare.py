"""Measured-vs-predicted comparison by nearest spot (no Qt)."""

from pathlib import Path

import numpy as np
import pytest

from napari_m2ort.compare import MIN_PAIRS, Comparison, compare_gene, nearest_pairs


def test_nearest_pairs_respects_distance():
    pred = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0]])
    meas = np.array([[10.0, 0.0], [190.0, 5.0], [1000.0, 0.0]])
    mi, pj = nearest_pairs(pred, meas, max_dist_um=50.0)
    assert list(mi) == [0, 1] and list(pj) == [0, 2]
    mi, pj = nearest_pairs(np.zeros((0, 2)), meas, 50.0)
    assert len(mi) == len(pj) == 0


def test_compare_gene_matches_pearson_on_pairs():
    rng = np.random.default_rng(0)
    pred_xy = np.stack(np.meshgrid(np.arange(10) * 100.0, np.arange(10) * 100.0), -1).reshape(-1, 2)
    pred_v = rng.normal(size=len(pred_xy))
    # measured spots jittered around every second predicted spot, values correlated
    take = np.arange(0, len(pred_xy), 2)
    meas_xy = pred_xy[take] + rng.uniform(-20, 20, size=(len(take), 2))
    meas_v = pred_v[take] * 2.0 + rng.normal(scale=0.1, size=len(take))
    cmp = compare_gene("ERBB2", pred_xy, pred_v, meas_xy, meas_v, max_dist_um=100.0)
    assert cmp.n_pairs == len(take)
    assert cmp.r == pytest.approx(np.corrcoef(pred_v[take], meas_v)[0, 1], abs=1e-9)
    assert cmp.ok and "PCC predicted vs measured" in cmp.sentence("measured")


def test_compare_gene_too_few_or_constant():
    pred_xy = np.array([[0.0, 0.0], [100.0, 0.0]])
    cmp = compare_gene("G", pred_xy, [1.0, 2.0], pred_xy, [3.0, 4.0], max_dist_um=10.0)
    assert cmp.n_pairs == 2 < MIN_PAIRS and cmp.r is None and not cmp.ok
    assert "too few predicted spots" in cmp.sentence("m") and "(2)" in cmp.sentence("m")
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0]])
    cmp = compare_gene("G", xy, [1.0, 2.0, 3.0], xy, [5.0, 5.0, 5.0], max_dist_um=10.0)
    assert cmp.n_pairs == 3 and cmp.r is None and not cmp.ok


def test_comparison_is_a_value():
    assert Comparison("G", 0.5, 10) == Comparison("G", 0.5, 10)


def _section(var_names, var=None, image="/tmp/slide.jpg"):
    import anndata as ad
    import pandas as pd

    from napari_m2ort.io.st import STSection

    x = np.ones((3, len(var_names)), np.float32)
    adata = ad.AnnData(X=x, var=pd.DataFrame(var or {}, index=list(var_names)))
    adata.obsm["spatial"] = np.arange(6, dtype=float).reshape(3, 2)
    return STSection(adata=adata, image_path=Path(image), mpp=1.0, mpp_source="user", name="s")


def test_with_symbols_maps_ensembl_ids_through_var_columns():
    from napari_m2ort.compare import with_symbols

    ids = ["ENSG00000141736", "ENSG00000141738", "ENSG00000171345"]
    sec = _section(ids, {"gene_ids": ids, "feature_name": ["ERBB2", "GRB7", "KRT19"]})
    out, column = with_symbols(sec, ["ERBB2", "KRT19", "CD24"])
    assert column == "feature_name" and list(out.adata.var_names) == ["ERBB2", "GRB7", "KRT19"]
    assert list(sec.adata.var_names) == ids  # the caller's section is left alone
    same, column = with_symbols(_section(["ERBB2", "GRB7"]), ["ERBB2"])
    assert column is None and list(same.adata.var_names) == ["ERBB2", "GRB7"]


def test_same_slide_needs_the_sections_own_image(tmp_path):
    from napari_m2ort.compare import same_slide

    img = tmp_path / "a.jpg"
    img.write_bytes(b"x")
    sec = _section(["G"], image=str(img))
    assert same_slide(str(img), sec)
    assert not same_slide(str(tmp_path / "b.jpg"), sec)
    assert not same_slide(None, sec)


def test_measured_targets_on_the_model_scale_and_missing_genes_listed():
    from napari_m2ort.compare import MeasuredComparison, measured_targets
    from napari_m2ort.targets import normalize_counts

    ids = ["ENSG1000000001", "ENSG1000000002", "ENSG1000000003"]
    sec = _section(ids, {"gene_symbols": ["ERBB2", "GRB7", "ACTB"]})
    sec.adata.X = np.array([[1.0, 3.0, 100.0], [0.0, 0.0, 5.0], [2.0, 2.0, 0.0]], np.float32)
    keep, y, present, missing, column = measured_targets(sec, ["ERBB2", "GRB7", "KRT19"])
    assert column == "gene_symbols" and present == ["ERBB2", "GRB7"] and missing == ["KRT19"]
    # panel-normalised: ACTB's 100 counts do not dilute the panel genes; spot 2 has no panel counts
    assert list(keep) == [True, False, True]
    expected, _ = normalize_counts(sec.adata.X, [0, 1])
    assert np.allclose(y, expected)
    assert np.allclose(y[0], np.log1p(np.array([1.0, 3.0]) * 1e6 / 4.0))
    res = MeasuredComparison("s", {"n_spots": 2, "n_genes": 2, "pcc_gene_mean": 0.5}, ["ERBB2", "GRB7", "KRT19"],
                             ["KRT19"], np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 2)), ["a", "b"], 55.0)  # fmt: skip
    assert "Not measured (1): KRT19" in res.summary() and "PCC-gene 0.500" in res.summary()
