"""Training targets and panel selection, checked against values computed by hand."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from napari_m2ort.targets import PANEL_RULE, normalize_counts, panel_indices, select_panel


def test_normalize_counts_by_hand():
    counts = np.array([[1, 3, 7], [0, 0, 5], [2, 2, 0]], dtype=float)
    y, keep = normalize_counts(counts, [0, 1])  # panel = first two genes; gene 3 ignored
    assert keep.tolist() == [True, False, True]  # spot 2 has panel total 0
    expected = np.log1p(np.array([[250_000.0, 750_000.0], [500_000.0, 500_000.0]]))
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert y.dtype == np.float32


def test_normalize_counts_sparse_and_panel_order():
    counts = sp.csr_matrix(np.array([[1, 3, 0], [4, 0, 4]], dtype=float))
    y, keep = normalize_counts(counts, [2, 0])
    assert keep.all()
    np.testing.assert_allclose(y, np.log1p([[0.0, 1e6], [5e5, 5e5]]), rtol=1e-6)


def test_normalize_counts_drops_invalid_rows():
    counts = np.array([[1, 1], [-1, 3], [np.nan, 2], [2, 0]], dtype=float)
    y, keep = normalize_counts(counts, [0, 1])
    assert keep.tolist() == [True, False, False, True]
    assert np.isfinite(y).all() and y.shape == (2, 2)


def _adata(x, genes):
    a = ad.AnnData(X=sp.csr_matrix(np.asarray(x, dtype=np.float32)))
    a.var_names = genes
    return a


def test_select_panel_by_hand():
    # section 1: spot CPMs -> log1p; gene means computed by hand below
    a = _adata([[2, 2, 0, 4], [0, 0, 0, 0], [1, 0, 1, 2]], ["A", "B", "C", "D"])
    b = _adata([[5, 5, 0], [0, 1, 1]], ["D", "A", "B"])  # C not measured here
    lc = np.log1p
    s1 = {  # spot 2 of section 1 has no counts: skipped
        "A": (lc(0.25e6) + lc(0.25e6)) / 2,
        "B": (lc(0.25e6) + 0) / 2,
        "D": (lc(0.5e6) + lc(0.5e6)) / 2,
    }
    s2 = {"D": (lc(0.5e6) + 0) / 2, "A": (lc(0.5e6) + lc(0.5e6)) / 2, "B": (0 + lc(0.5e6)) / 2}
    score = {g: (s1[g] + s2[g]) / 2 for g in s1}
    expected = sorted(score, key=lambda g: (-score[g], g))
    assert select_panel([a, b], n=3) == expected
    assert select_panel([a, b], n=2) == expected[:2]
    assert "C" not in select_panel([a, b], n=10)


def test_select_panel_ties_by_name_and_errors():
    a = _adata([[1, 1, 1]], ["Z", "M", "A"])
    assert select_panel([a], n=3) == ["A", "M", "Z"]
    with pytest.raises(ValueError, match="unknown panel rule"):
        select_panel([a], rule="variance")
    with pytest.raises(ValueError, match="share no gene"):
        select_panel([a, _adata([[1]], ["Q"])])
    assert "mean_log1p_cpm" in PANEL_RULE and "every section" in PANEL_RULE


def test_panel_indices():
    assert panel_indices(["a", "b", "c"], ["c", "a"]).tolist() == [2, 0]
    with pytest.raises(KeyError, match="1 panel genes"):
        panel_indices(["a"], ["a", "zz"])


def test_panel_and_targets_on_real_sections(her2st):
    from napari_m2ort.io.st import STDataWarning, read_her2st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", STDataWarning)
        c2, b4 = read_her2st(her2st, "C2"), read_her2st(her2st, "B4")
    panel = select_panel([c2, b4], n=250)
    assert len(panel) == len(set(panel)) == 250
    assert set(panel) <= set(c2.genes) & set(b4.genes)
    for s in (c2, b4):
        y, keep = normalize_counts(s.adata.X, panel_indices(s.genes, panel))
        assert y.shape == (keep.sum(), 250) and keep.mean() > 0.95
        assert np.isfinite(y).all() and y.min() >= 0 and y.max() < np.log1p(1e6) + 1e-3


def test_marker_panel_on_real_sections(her2st):
    from napari_m2ort.io.st import STDataWarning, read_her2st
    from napari_m2ort.targets import MARKERS

    with pytest.warns(STDataWarning):
        c2, b4 = read_her2st(her2st, "C2"), read_her2st(her2st, "B4")
    panel = select_panel([c2.adata, b4.adata], n=250, rule="markers+mean_log1p_cpm")
    assert len(panel) == 250 and len(set(panel)) == 250
    assert panel[: len(MARKERS)] == MARKERS  # every marker is measured in both sections
    plain = select_panel([c2.adata, b4.adata], n=250)
    assert [g for g in panel if g not in MARKERS] == [g for g in plain if g not in MARKERS][: 250 - len(MARKERS)]
