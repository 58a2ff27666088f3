"""Training targets and the gene panel, exactly as the M2ORT specification defines them.

Targets: raw counts of the G panel genes per spot; spot total = sum over the panel;
spots whose total is 0 are dropped; ``y = log1p(counts · 1e6 / total)``.  The panel is
chosen by a rule that is stated as a string (:data:`PANEL_RULE`) so the model card can
record exactly how its genes were picked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "normalize_counts",
    "select_panel",
    "panel_indices",
    "PANEL_RULE",
    "PANEL_RULES",
    "TARGET_RULE",
    "MARKERS",
    "MARKER_PANEL_RULE",
]

TARGET_RULE = (
    "y = log1p(counts * 1e6 / total), counts = raw counts of the panel genes, total = sum of "
    "those counts per spot; spots with total 0 are dropped"
)

PANEL_RULE = (
    "mean_log1p_cpm: the n genes with the highest mean log1p(CPM) (CPM per spot over all "
    "measured genes; spots with no counts skipped), averaged over the spots of each section "
    "and then over sections with equal weight, among genes measured in every section; "
    "ties broken by gene name; no gene families excluded"
)
#: Genes a HER2+ pathologist looks at first: the HER2 amplicon, luminal epithelium,
#: stroma and immune cells. Forced into the panel so they are always predicted and
#: always reported (``pcc_markers`` in metrics.json).
MARKERS = [
    "ERBB2",
    "GRB7",
    "KRT19",
    "SCGB2A2",
    "CD24",
    "COL1A1",
    "COL3A1",
    "FN1",
    "LUM",
    "MGP",
    "IGKC",
    "IGHG3",
    "IGHA1",
    "CD74",
    "HLA-DRA",
]

MARKER_PANEL_RULE = (
    "markers+mean_log1p_cpm: the marker genes " + ", ".join(MARKERS) + " (those measured in every "
    "section), then the remaining genes with the highest mean log1p(CPM) (CPM per spot over all "
    "measured genes; spots with no counts skipped), averaged over the spots of each section and "
    "then over sections with equal weight, among genes measured in every section; ties broken "
    "by gene name; no gene families excluded"
)
PANEL_RULES = {"mean_log1p_cpm": PANEL_RULE, "markers+mean_log1p_cpm": MARKER_PANEL_RULE}


def as_csr(counts) -> sp.csr_matrix:
    """Counts (dense or sparse) as float64 CSR, the form every counts computation takes."""
    if sp.issparse(counts):
        return sp.csr_matrix(counts, dtype=np.float64)
    return sp.csr_matrix(np.asarray(counts, dtype=np.float64))


def log1p_cpm(counts) -> sp.csr_matrix:
    """log1p(counts per million) per spot over all genes; spots with no counts stay 0."""
    x = as_csr(counts)
    total = np.asarray(x.sum(axis=1)).ravel()
    inv = np.divide(1e6, total, out=np.zeros_like(total), where=total > 0)
    y = sp.csr_matrix(sp.diags(inv) @ x)
    y.data = np.log1p(y.data)
    return y


def normalize_counts(counts, panel_idx) -> tuple[np.ndarray, np.ndarray]:
    """Targets for one section: ``(y, keep)``.

    ``counts`` is spots × all genes (dense or sparse, raw counts); ``panel_idx`` the column
    indices of the panel genes, in panel order. Returns ``y`` (float32, kept spots × G)
    and ``keep`` (bool per input spot, False where the panel total is 0, or where a count
    is negative or non-finite — such spots carry no usable target).
    """
    panel_idx = np.asarray(panel_idx, dtype=np.intp)
    c = as_csr(counts)[:, panel_idx].toarray()
    finite = np.isfinite(c).all(axis=1) & (c >= 0).all(axis=1)
    total = np.where(finite, np.nansum(np.where(np.isfinite(c), c, 0), axis=1), 0.0)
    keep = finite & (total > 0)
    y = np.log1p(c[keep] * (1e6 / total[keep])[:, None])
    return y.astype(np.float32), keep


def panel_indices(genes: Sequence[str], panel: Sequence[str]) -> np.ndarray:
    """Column indices of ``panel`` in ``genes``; KeyError naming the missing genes."""
    pos = {g: i for i, g in enumerate(map(str, genes))}
    missing = [g for g in panel if g not in pos]
    if missing:
        raise KeyError(f"{len(missing)} panel genes are not measured: {', '.join(missing[:5])}")
    return np.array([pos[g] for g in panel], dtype=np.intp)


def _mean_log1p_cpm(counts) -> np.ndarray:
    c = as_csr(counts)
    ok = np.asarray(c.sum(axis=1)).ravel() > 0
    if not ok.any():
        return np.zeros(c.shape[1])
    return np.asarray(log1p_cpm(c[np.flatnonzero(ok)]).mean(axis=0)).ravel()


def _counts_and_genes(section):
    adata = getattr(section, "adata", section)  # STSection or AnnData
    return adata.X, [str(g) for g in adata.var_names]


def select_panel(sections, n: int = 250, rule: str = "mean_log1p_cpm") -> list[str]:
    """The ``n`` panel genes (ordered, highest first) chosen by ``rule`` (see PANEL_RULE).

    ``sections`` are STSections or AnnData objects with raw counts in ``X``. Only genes
    measured in all of them qualify, so every section yields complete targets.
    """
    if rule not in PANEL_RULES:
        raise ValueError(f"unknown panel rule {rule!r}; known: {', '.join(PANEL_RULES)}")
    sections = list(sections)
    if not sections:
        raise ValueError("select_panel needs at least one section")
    per_section = []
    for s in sections:
        x, genes = _counts_and_genes(s)
        per_section.append(dict(zip(genes, _mean_log1p_cpm(x))))
    common = set(per_section[0])
    for d in per_section[1:]:
        common &= set(d)
    if not common:
        raise ValueError("the sections share no gene names")
    names = sorted(common)
    score = np.mean([[d[g] for g in names] for d in per_section], axis=0)
    order = np.lexsort((np.array(names, dtype=object).astype(str), -score))
    ranked = [names[i] for i in order]
    if rule == "markers+mean_log1p_cpm":
        forced = [g for g in MARKERS if g in common]
        rest = [g for g in ranked if g not in set(forced)]
        return (forced + rest)[: int(n)]
    return ranked[: int(n)]
