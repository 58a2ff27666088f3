"""Scoring a model on cached patches exactly as prediction would score it.

Evaluation and prediction share one forward (``inference.forward_views``: the same
test-time views, clipped at 0) and one smoothing, so the numbers ``evaluate`` prints are
the numbers a user sees in the widget. Sections are scored one by one and averaged,
never pooled (see ``evaluate_sections``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .devices import resolve_precision

if TYPE_CHECKING:
    from .training import CachedSection


def predict_cached(
    model,
    level1: np.ndarray,
    device="cpu",
    precision: str = "fp32",
    batch_size: int = 64,
    tta: str = "none",
    with_spread: bool = False,
):
    """The same forward as ``inference.predict`` (clipped at 0, same views), on cached
    patches, so evaluation scores exactly what prediction shows."""
    from .inference import forward_views

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    amp = resolve_precision(precision, dev)
    model.eval()
    outs, sds = [], []
    for i in range(0, len(level1), batch_size):
        m, sd = forward_views(model, level1[i : i + batch_size], dev, amp, tta)
        outs.append(m)
        sds.append(sd)
    pred = np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)
    if not with_spread:
        return pred
    spread = np.concatenate(sds).astype(np.float32) if sds and sds[0] is not None else None
    return pred, spread


def evaluate_cached(
    model,
    sections: Sequence[CachedSection],
    train_mean: Optional[np.ndarray],
    device="cpu",
    precision="fp32",
    batch_size: int = 64,
    tta: str = "none",
    smooth_um: float = 0.0,
    with_predictions: bool = False,
) -> dict:
    """Metrics over the spots of ``sections`` (pooled). ``tta``/``smooth_um`` as in
    ``inference.predict``; smoothing runs within each section, never across them."""
    from .metrics import evaluate
    from .tta import smooth

    preds, spreads = [], []
    for s in sections:
        p, sd = predict_cached(model, s.level1, device, precision, batch_size, tta, with_spread=True)
        if smooth_um > 0:
            p = smooth(p, s.centers_um, smooth_um)
        preds.append(p)
        spreads.append(sd)
    pred = np.concatenate(preds)
    true = np.concatenate([s.y for s in sections])
    genes = sections[0].genes
    missing = set().union(*[set(s.genes_missing) for s in sections])
    keep = np.array([g not in missing for g in genes])
    res = evaluate(
        pred[:, keep],
        true[:, keep],
        [g for g, k in zip(genes, keep) if k],
        train_mean=None if train_mean is None else np.asarray(train_mean)[keep],
    )
    res["genes_missing"] = sorted(missing)
    res["tta"], res["smooth_um"] = tta, float(smooth_um)
    if with_predictions:
        res["_pred"] = pred
        res["_spread"] = None if spreads[0] is None else np.concatenate(spreads)
        res["_true"] = true
    return res


def evaluate_sections(
    model,
    sections: Sequence[CachedSection],
    train_mean: Optional[np.ndarray],
    device="cpu",
    precision="fp32",
    batch_size: int = 64,
) -> dict:
    """Each section scored on its own spots, then averaged over sections.

    Pooling spots of different sections into one PCC-gene mostly measures which section
    a spot comes from (their depth and composition differ), so it cannot choose an epoch
    or a recipe; the mean of per-section scores can."""
    per = {}
    for s in sections:
        if len(s) < 3:
            continue
        m = evaluate_cached(model, [s], train_mean, device, precision, batch_size)
        per[s.name] = {k: v for k, v in m.items() if k != "per_gene"}
    out: dict = {"per_section": per, "aggregate": "mean over sections of each section's own metric"}
    for key in (
        "pcc_gene_mean",
        "pcc_gene_top50",
        "pcc_spot_mean",
        "pcc_spot_mean_baseline",
        "rmse_mean",
        "rmse_mean_baseline",
    ):
        vals = [v[key] for v in per.values() if v.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    out["n_spots"] = int(sum(v["n_spots"] for v in per.values()))
    return out


# ---------------------------------------------------------------- the loop
