"""Metrics against values computed by hand and by np.corrcoef."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_m2ort.metrics import (
    TOP50_RULE,
    evaluate,
    pcc_gene,
    pcc_spot,
    pcc_spot_values,
    pearson,
    rmse_spot,
    rmse_spot_values,
)


def test_pcc_spot_and_rmse_by_hand():
    pred = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    true = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    np.testing.assert_allclose(pcc_spot_values(pred, true), [1.0, -1.0])
    assert pcc_spot(pred, true) == pytest.approx(0.0)
    np.testing.assert_allclose(rmse_spot_values(pred, true), [0.0, math.sqrt(8 / 3)])
    assert rmse_spot(pred, true) == pytest.approx(math.sqrt(8 / 3) / 2)


def test_pcc_gene_by_hand():
    # gene 0: x = (1, 2, 3), y = (2, 4, 7): means 2 and 13/3
    # cov = (-1)(-7/3) + 0 + (1)(8/3) = 5; var_x = 2; var_y = 49/9 + 1/9 + 64/9 = 114/9
    pred = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    true = np.array([[2.0, 1.0], [4.0, 1.0], [7.0, 1.0]])
    r, n_const = pcc_gene(pred, true)
    assert r[0] == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert math.isnan(r[1]) and n_const == 1  # gene 1 constant in the truth: skipped


def test_pcc_gene_matches_corrcoef_and_constant_prediction_is_zero():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(30, 6))
    pred = true * 0.5 + rng.normal(size=(30, 6))
    pred[:, 5] = 2.0  # constant prediction for a varying gene
    r, n_const = pcc_gene(pred, true)
    for g in range(5):
        assert r[g] == pytest.approx(np.corrcoef(pred[:, g], true[:, g])[0, 1])
    assert r[5] == 0.0 and n_const == 0
    per_spot = pcc_spot_values(pred, true)
    for s in range(30):
        assert per_spot[s] == pytest.approx(np.corrcoef(pred[s], true[s])[0, 1])


def test_nan_pairs_are_skipped():
    rng = np.random.default_rng(2)
    true = rng.normal(size=(10, 4))
    pred = rng.normal(size=(10, 4))
    pred_nan = pred.copy()
    pred_nan[3, 1] = np.nan
    r, _ = pcc_gene(pred_nan, true)
    keep = np.arange(10) != 3
    assert r[1] == pytest.approx(np.corrcoef(pred[keep, 1], true[keep, 1])[0, 1])
    assert r[0] == pytest.approx(np.corrcoef(pred[:, 0], true[:, 0])[0, 1])
    rm = rmse_spot_values(pred_nan, true)
    assert rm[3] == pytest.approx(np.sqrt(np.mean((pred[3, [0, 2, 3]] - true[3, [0, 2, 3]]) ** 2)))
    r_spot = pcc_spot_values(pred_nan, true)
    assert r_spot[3] == pytest.approx(np.corrcoef(pred[3, [0, 2, 3]], true[3, [0, 2, 3]])[0, 1])


def test_pearson_degenerate():
    r, a_c, b_c = pearson(np.array([[1.0], [np.nan]]), np.array([[2.0], [3.0]]))
    assert math.isnan(r[0]) and a_c[0]  # fewer than two pairs


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="one shape"):
        pcc_gene(np.zeros((3, 2)), np.zeros((3, 3)))


def test_evaluate_keys_baseline_and_json():
    rng = np.random.default_rng(3)
    true = rng.normal(size=(20, 8)) + 3.0 * np.arange(8)  # a shared mean profile across genes
    true[:, 7] = 21.0  # constant gene (on the profile)
    pred = true + rng.normal(scale=0.5, size=true.shape)
    genes = [f"g{i}" for i in range(8)]
    train_mean = 3.0 * np.arange(8)
    out = evaluate(pred, true, genes, train_mean=train_mean)
    json.dumps(out, allow_nan=False)  # JSON-safe: NaN became None
    assert out["n_spots"] == 20 and out["n_genes"] == 8 and out["n_genes_constant"] == 1
    r, _ = pcc_gene(pred, true)
    assert out["pcc_gene_mean"] == pytest.approx(np.nanmean(r))
    assert out["pcc_gene_top50"] == pytest.approx(np.nanmean(r))  # fewer than 50 genes: all
    assert "only 7 genes" in out["pcc_gene_top50_rule"]
    assert out["pcc_spot_mean"] == pytest.approx(pcc_spot(pred, true))
    base = np.tile(train_mean, (20, 1))
    assert out["pcc_spot_mean_baseline"] == pytest.approx(pcc_spot(base, true))
    assert out["pcc_spot_mean_baseline"] > 0.8  # the mean profile alone scores high
    assert out["rmse_mean_baseline"] == pytest.approx(rmse_spot(base, true))
    assert out["rmse_mean"] == pytest.approx(rmse_spot(pred, true))
    pg = {d["gene"]: d for d in out["per_gene"]}
    assert pg["g7"]["pcc"] is None and pg["g7"]["mean_true"] == pytest.approx(21.0)
    assert pg["g0"]["mean_pred"] == pytest.approx(pred[:, 0].mean())


def test_evaluate_top50_and_no_baseline():
    rng = np.random.default_rng(4)
    true = rng.normal(size=(40, 60))
    pred = true + rng.normal(scale=np.linspace(0.1, 5, 60), size=true.shape)
    out = evaluate(pred, true, [str(i) for i in range(60)])
    r, _ = pcc_gene(pred, true)
    assert out["pcc_gene_top50"] == pytest.approx(np.sort(r)[::-1][:50].mean())
    assert out["pcc_gene_top50_rule"] == TOP50_RULE
    assert out["pcc_spot_mean_baseline"] is None and out["rmse_mean_baseline"] is None
    assert "train_mean" in out["baseline"]
    with pytest.raises(ValueError, match="gene names"):
        evaluate(pred, true, ["a"])


def test_evaluate_reports_marker_pccs():
    rng = np.random.default_rng(1)
    genes = ["ERBB2", "KRT19", "OTHER"]
    true = rng.normal(size=(30, 3))
    pred = true.copy()
    pred[:, 1] = -true[:, 1]
    res = evaluate(pred, true, genes)
    assert res["pcc_markers"] == {"ERBB2": pytest.approx(1.0), "KRT19": pytest.approx(-1.0)}
    assert res["pcc_markers_mean"] == pytest.approx(0.0, abs=1e-9)
