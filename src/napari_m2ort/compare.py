"""Predicted against measured expression on the same section, spot by spot.

Measured and predicted spots rarely share centres (another layout, another grid), so each
measured spot is paired with the nearest predicted spot, if one lies within a pitch, and
the gene's Pearson r is taken over those pairs.  Coordinates are slide µm, (x, y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_PAIRS = 3  # below this a correlation says nothing


@dataclass(frozen=True)
class Comparison:
    gene: str
    r: float | None  # None: too few pairs, or a side is constant
    n_pairs: int  # measured spots with a predicted spot within ``max_dist_um``

    @property
    def ok(self) -> bool:
        return self.n_pairs >= MIN_PAIRS and self.r is not None and math.isfinite(self.r)

    def sentence(self, measured_name: str) -> str:
        """What the comparison says, in words a user reads under the gene picker."""
        if not self.ok:
            return (
                f"'{measured_name}' coloured by {self.gene}; too few predicted spots "
                f"near measured ones ({self.n_pairs}) for a correlation."
            )
        return (
            f"{self.gene}: PCC predicted vs measured = {self.r:.2f} "
            f"(n = {self.n_pairs} measured spots, nearest predicted spot)"
        )


def nearest_pairs(pred_xy, meas_xy, max_dist_um: float) -> tuple[np.ndarray, np.ndarray]:
    """(measured indices, predicted indices) of each measured spot's nearest predicted spot
    no farther than ``max_dist_um``."""
    from scipy.spatial import cKDTree

    pred_xy = np.asarray(pred_xy, dtype=float).reshape(-1, 2)
    meas_xy = np.asarray(meas_xy, dtype=float).reshape(-1, 2)
    if len(pred_xy) == 0 or len(meas_xy) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    d, j = cKDTree(pred_xy).query(meas_xy, k=1)
    ok = d <= max_dist_um
    return np.flatnonzero(ok), j[ok]


def compare_gene(gene: str, pred_xy, pred_values, meas_xy, meas_values, max_dist_um: float) -> Comparison:
    """PCC of one gene between measured spots and their nearest predicted spots."""
    from .metrics import pcc_gene

    mi, pj = nearest_pairs(pred_xy, meas_xy, max_dist_um)
    n = len(mi)
    if n < MIN_PAIRS:
        return Comparison(gene, None, n)
    pred = np.asarray(pred_values, dtype=float)[pj][:, None]
    true = np.asarray(meas_values, dtype=float)[mi][:, None]
    r, _ = pcc_gene(pred, true)
    value = float(r[0])
    return Comparison(gene, value if math.isfinite(value) else None, n)


# ------------------------------------------------------------------ at the measured spots


@dataclass
class MeasuredComparison:
    """The model run at exactly a section's measured spots, scored as ``evaluate`` scores it.

    ``metrics`` is ``training.evaluate_cached``'s dict (``metrics.evaluate`` + missing
    genes, tta, smoothing): the numbers ``napari-m2ort evaluate`` writes for the section.
    ``pred`` and ``true`` are (spots × panel genes) on the model's target scale
    (panel-normalised log1p CPM); spots without panel counts are left out, as there.
    """

    section: str
    metrics: dict
    genes: list  # the model's panel, in its order (columns of pred / true)
    genes_missing: list  # panel genes the measured data lacks (not scored)
    pred: np.ndarray
    true: np.ndarray
    centers_um: np.ndarray  # (N, 2) x, y
    spot_ids: list
    diameter_um: float | None
    symbols_from: str | None = None  # var column the gene names were taken from, if any

    def values(self, gene: str) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, measured) of one gene over the compared spots."""
        j = self.genes.index(gene)
        return self.pred[:, j], self.true[:, j]

    def per_gene(self) -> list[dict]:
        return list(self.metrics.get("per_gene", []))

    def summary(self) -> str:
        m = self.metrics

        def f(v):
            return "n/a" if v is None else f"{v:.3f}"

        text = (
            f"{self.section}: {m.get('n_spots', 0)} spots, {m.get('n_genes', 0)} genes. PCC-gene {f(m.get('pcc_gene_mean'))}; "
            f"PCC-spot {f(m.get('pcc_spot_mean'))} (mean-profile baseline {f(m.get('pcc_spot_mean_baseline'))})."
        )
        if self.genes_missing:
            shown = ", ".join(self.genes_missing[:8]) + (" …" if len(self.genes_missing) > 8 else "")
            text += f" Not measured ({len(self.genes_missing)}): {shown}."
        return text


def with_symbols(section, genes):
    """The section with gene symbols as names when its own names miss the panel.

    Ensembl ids (Visium's ``features.tsv``, many .h5ad files) match no symbol; the data
    usually carry the other naming in a ``var`` column (``gene_symbols``,
    ``feature_name``, ...).  Returns ``(section, column)``: the column whose names match
    more panel genes than the index does (``None``: the section unchanged).
    """
    import dataclasses

    from .io.st.validate import GENE_ID_COLUMNS, make_unique

    adata = section.adata
    wanted = set(map(str, genes))
    best, best_hits = None, len(wanted & set(map(str, adata.var_names)))
    for col in GENE_ID_COLUMNS:
        if col in adata.var.columns:
            names = adata.var[col].astype(str)
            hits = len(wanted & set(names))
            if hits > best_hits:
                best, best_hits = col, hits
    if best is None:
        return section, None
    renamed = adata.copy()
    renamed.var_names = make_unique(list(renamed.var[best].astype(str)), "gene names", section.name)
    return dataclasses.replace(section, adata=renamed), best


def measured_targets(section, genes):
    """Measured values on a model's target scale: ``targets.normalize_counts`` over the
    panel genes the data has (those missing add nothing to the panel total), so they
    are what ``prepare_section`` scores against.  Returns (keep per spot, values
    (kept spots × present genes), present genes, missing genes, var column used)."""
    from .targets import normalize_counts

    section, column = with_symbols(section, genes)
    pos = {g: i for i, g in enumerate(map(str, section.adata.var_names))}
    present = [g for g in genes if g in pos]
    missing = [g for g in genes if g not in pos]
    y, keep = normalize_counts(section.adata.X, [pos[g] for g in present])
    return keep, y, present, missing, column


def subset_section(section, index):
    """The section restricted to some spots (e.g. a quick look at a few of them)."""
    import dataclasses

    return dataclasses.replace(section, adata=section.adata[np.asarray(index)].copy())


def compare_at_measured(
    model,
    card,
    section,
    device="cpu",
    precision: str = "fp32",
    batch_size: int = 64,
    tta: str = "none",
    smooth_um: float = 0.0,
    cache_dir=None,
):
    """Predict at the section's spot centres and score against its counts (a job).

    The same path as ``pipelines.evaluate``: ``training.prepare_section`` (patches at the
    spot centres, targets by ``targets.normalize_counts`` over the model's panel), then
    ``training.evaluate_cached`` with the card's training mean as the baseline.
    """
    from .evaluation import evaluate_cached
    from .training import prepare_section

    section, column = with_symbols(section, card.genes)
    cached = yield from prepare_section(section, card.genes, card.mpp, cache_dir=cache_dir, allow_missing=True)
    res = evaluate_cached(
        model, [cached], getattr(card, "target_mean", None), device=device, precision=precision,
        batch_size=batch_size, tta=tta, smooth_um=smooth_um, with_predictions=True,
    )  # fmt: skip
    pred, true = res.pop("_pred"), res.pop("_true")
    res.pop("_spread", None)
    all_xy = np.asarray(section.centers_um, dtype=float)
    row = {tuple(p): i for i, p in enumerate(map(tuple, all_xy))}
    kept = [row[tuple(p)] for p in map(tuple, np.asarray(cached.centers_um, dtype=float))]
    ids = [str(section.adata.obs_names[i]) for i in kept]
    return MeasuredComparison(
        section=str(section.name), metrics=res, genes=list(card.genes), genes_missing=list(res["genes_missing"]),
        pred=np.asarray(pred, np.float32), true=np.asarray(true, np.float32), centers_um=np.asarray(cached.centers_um),
        spot_ids=ids, diameter_um=section.spot_diameter_um, symbols_from=column,
    )  # fmt: skip


def same_slide(slide_path, section) -> bool:
    """Whether measured spots belong to this slide file: the section names the image its
    spot coordinates refer to, and it must be the slide's own file."""
    from pathlib import Path

    image = getattr(section, "image_path", None)
    if not slide_path or image is None:
        return False
    try:
        return Path(slide_path).resolve() == Path(image).resolve()
    except OSError:
        return False
