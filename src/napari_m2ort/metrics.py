"""Evaluation metrics from the M2ORT specification: PCC-gene, PCC-spot (+ baseline), RMSE.

All functions take ``pred`` and ``true`` as (spots × genes) arrays in the target space
(log1p CPM).  They are vectorised and NaN-aware: a NaN in either array removes that
(spot, gene) pair only, so a few missing values never sink a whole gene or spot.

Conventions (stated because they change the numbers):

- PCC-gene: Pearson r across spots for each gene. Genes constant in the measured data
  have no defined correlation: NaN, skipped in means and counted (``n_genes_constant``).
  Genes the model predicts as constant while the truth varies get r = 0 (the prediction
  carries no information about them), counted in ``n_genes_pred_constant``; skipping
  them instead would reward a collapsed model.
- PCC-spot: Pearson r across genes for each spot, mean over spots.  It is inflated by
  the shared mean profile, so :func:`evaluate` reports the same metric for a baseline
  that predicts the *training* mean profile for every spot.  The baseline needs
  ``train_mean`` explicitly: the test mean would leak the answer and flatter it.
- RMSE: per spot, root of the mean squared error over genes; mean over spots.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "pearson",
    "pcc_gene",
    "pcc_spot",
    "pcc_spot_values",
    "rmse_spot",
    "rmse_spot_values",
    "evaluate",
    "TOP50_RULE",
]

TOP50_RULE = "mean of the 50 highest per-gene PCCs (genes constant in the truth excluded)"


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"pred and true must be (spots, genes) arrays of one shape, got {p.shape} and {t.shape}")
    return p, t


def pearson(a, b, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pearson r of ``a`` and ``b`` along ``axis`` over pairs where both are finite.

    Returns ``(r, a_constant, b_constant)``; r is NaN where fewer than two pairs remain
    or either side is constant (there is no correlation to report).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    valid = np.isfinite(a) & np.isfinite(b)
    n = valid.sum(axis=axis)
    a0 = np.where(valid, a, 0.0)
    b0 = np.where(valid, b, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma = a0.sum(axis=axis, keepdims=True) / np.expand_dims(n, axis)
        mb = b0.sum(axis=axis, keepdims=True) / np.expand_dims(n, axis)
        da = np.where(valid, a - ma, 0.0)
        db = np.where(valid, b - mb, 0.0)
        sab = (da * db).sum(axis=axis)
        saa = (da * da).sum(axis=axis)
        sbb = (db * db).sum(axis=axis)
        # "constant" relative to the values' magnitude, so float round-off is not signal
        scale_a = np.abs(np.where(valid, a, 0.0)).max(axis=axis) + 1e-300
        scale_b = np.abs(np.where(valid, b, 0.0)).max(axis=axis) + 1e-300
        a_const = (n < 2) | (np.sqrt(saa / np.maximum(n, 1)) <= 1e-12 * scale_a)
        b_const = (n < 2) | (np.sqrt(sbb / np.maximum(n, 1)) <= 1e-12 * scale_b)
        r = sab / np.sqrt(saa * sbb)
    r = np.where(a_const | b_const, np.nan, np.clip(r, -1.0, 1.0))
    return r, a_const, b_const


def pcc_gene(pred, true) -> tuple[np.ndarray, int]:
    """Per-gene PCC across spots and the number of genes constant in ``true``.

    Genes constant in ``true`` are NaN (skipped); genes constant only in ``pred`` are 0.
    """
    p, t = _pair(pred, true)
    r, p_const, t_const = pearson(p, t, axis=0)
    r = np.where(p_const & ~t_const, 0.0, r)
    return r, int(t_const.sum())


def pcc_spot_values(pred, true) -> np.ndarray:
    """Per-spot PCC across genes (NaN for spots where either side is constant)."""
    p, t = _pair(pred, true)
    return pearson(p, t, axis=1)[0]


def pcc_spot(pred, true) -> float:
    """PCC-spot: mean over spots of the per-spot PCC across genes (undefined spots skipped)."""
    return _nanmean(pcc_spot_values(pred, true))


def rmse_spot_values(pred, true) -> np.ndarray:
    """Per spot: sqrt(mean over genes of the squared error), over finite pairs."""
    p, t = _pair(pred, true)
    sq = (p - t) ** 2
    valid = np.isfinite(sq)
    n = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(np.where(valid, sq, 0.0).sum(axis=1) / n)


def rmse_spot(pred, true) -> float:
    """RMSE: mean over spots of the per-spot RMSE."""
    return _nanmean(rmse_spot_values(pred, true))


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _num(x) -> float | None:
    """JSON-safe float: NaN becomes None."""
    x = float(x)
    return x if np.isfinite(x) else None


def evaluate(pred, true, genes: Sequence[str], train_mean=None) -> dict:
    """All metrics of the specification for one held-out set, as a JSON-safe dict.

    ``train_mean`` (per gene, the mean training target) gives the PCC-spot and RMSE of
    predicting the training mean profile for every spot; without it those baseline
    keys are None. NaN results are reported as None.
    """
    p, t = _pair(pred, true)
    genes = [str(g) for g in genes]
    if len(genes) != t.shape[1]:
        raise ValueError(f"{len(genes)} gene names for {t.shape[1]} columns")
    per_gene, n_const = pcc_gene(p, t)
    _, p_const, t_const = pearson(p, t, axis=0)
    finite = per_gene[np.isfinite(per_gene)]
    top = np.sort(finite)[::-1][:50]

    base_pcc = base_rmse = None
    if train_mean is not None:
        m = np.asarray(train_mean, dtype=np.float64).ravel()
        if m.shape[0] != t.shape[1]:
            raise ValueError(f"train_mean has {m.shape[0]} values for {t.shape[1]} genes")
        base = np.broadcast_to(m, t.shape)
        base_pcc = _num(pcc_spot(base, t))
        base_rmse = _num(rmse_spot(base, t))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN -> None
        mean_true = np.nanmean(np.where(np.isfinite(t), t, np.nan), axis=0)
        mean_pred = np.nanmean(np.where(np.isfinite(p), p, np.nan), axis=0)

    from .targets import MARKERS

    gene_pcc = dict(zip(genes, per_gene))
    markers = {g: _num(gene_pcc[g]) for g in MARKERS if g in gene_pcc}
    marker_vals = [v for v in markers.values() if v is not None]
    return {
        "pcc_gene_mean": _num(finite.mean()) if finite.size else None,
        "pcc_markers": markers,
        "pcc_markers_mean": _num(np.mean(marker_vals)) if marker_vals else None,
        "pcc_gene_top50": _num(top.mean()) if top.size else None,
        "pcc_gene_top50_rule": TOP50_RULE
        if finite.size >= 50
        else f"{TOP50_RULE}; only {finite.size} genes have a defined PCC, so all of them",
        "pcc_spot_mean": _num(pcc_spot(p, t)),
        "pcc_spot_mean_baseline": base_pcc,
        "rmse_mean": _num(rmse_spot(p, t)),
        "rmse_mean_baseline": base_rmse,
        "baseline": "prediction = training mean profile for every spot"
        if train_mean is not None
        else "not computed: pass train_mean (per-gene mean of the training targets)",
        "n_spots": int(t.shape[0]),
        "n_genes": int(t.shape[1]),
        "n_genes_constant": int(n_const),
        "n_genes_pred_constant": int((p_const & ~t_const).sum()),
        "per_gene": [
            {"gene": g, "pcc": _num(r), "mean_true": _num(mt), "mean_pred": _num(mp)}
            for g, r, mt, mp in zip(genes, per_gene, mean_true, mean_pred)
        ],
    }
