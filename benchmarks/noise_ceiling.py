"""How high PCC-gene can go on these sections: the ceiling that counting noise sets.

Each spot's counts are one Poisson-like draw, so even a model that knew every spot's
true expression would not correlate perfectly with the measured targets. Binomial
thinning splits every count into two independent halves (each a draw at half the
depth); the per-gene PCC between the halves' targets is the split-half reliability,
Spearman-Brown lifts it to full depth (r = 2 r_half / (1 + r_half)), and sqrt(r) is the
highest PCC a perfect predictor of the true expression could reach against the measured
targets. The mean over the panel is the ceiling of the mean PCC-gene the models are
scored with (the same panel and targets as the bundled model's card). A spatial
reference is printed beside it: each spot predicted by the Gaussian-weighted mean of
its neighbours' measured targets (itself left out), which uses measured values the
model never has.

    python benchmarks/noise_ceiling.py --data ../shared/data/her2st
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _pcc_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-gene PCC across spots, as the models are scored (NaN where a side is constant)."""
    from napari_m2ort.metrics import pearson

    return pearson(a, b, axis=0)[0]


def _targets(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training targets of panel counts ``c`` (spots whose panel total is 0 dropped)."""
    from napari_m2ort.targets import normalize_counts

    return normalize_counts(c, np.arange(c.shape[1]))


def split_half_ceiling(counts: np.ndarray, rng: np.random.Generator, repeats: int = 20) -> np.ndarray:
    """Per-gene ceiling sqrt(Spearman-Brown(r_half)), averaged over ``repeats`` splits."""
    out = []
    for _ in range(repeats):
        a = rng.binomial(counts.astype(np.int64), 0.5)
        b = counts - a
        ya, ka = _targets(a)
        yb, kb = _targets(b)
        both = ka & kb
        r = _pcc_cols(ya[both[ka]], yb[both[kb]])
        full = np.where(r > 0, 2 * r / (1 + r), 0.0)
        out.append(np.sqrt(full))
    return np.nanmean(np.stack(out), axis=0)


def neighbour_reference(y: np.ndarray, centers_um: np.ndarray, sigma_um: float) -> np.ndarray:
    d2 = ((centers_um[:, None, :] - centers_um[None, :, :]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * sigma_um**2))
    np.fill_diagonal(w, 0.0)
    pred = (w @ y) / np.maximum(w.sum(1, keepdims=True), 1e-12)
    return _pcc_cols(pred, y)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "her2st"))
    p.add_argument("--sections", default="C2,C3,C4,C5,B4")
    p.add_argument("--model", default="bundled", help="whose gene panel: a checkpoint or 'bundled'")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sigma", type=float, default=150.0, help="µm, the neighbour reference's Gaussian")
    args = p.parse_args(argv)

    from napari_m2ort.io.st import read_her2st
    from napari_m2ort.model.weights import load_bundled, read_card
    from napari_m2ort.targets import MARKERS, as_csr, panel_indices

    card = load_bundled()[1] if args.model == "bundled" else read_card(args.model)
    genes = list(card.genes)
    rng = np.random.default_rng(0)
    print(f"panel: {len(genes)} genes of {args.model}; {args.repeats} binomial splits per section\n")
    print("| section | spots | median panel counts/spot | PCC-gene ceiling (mean over panel) | markers ceiling | "
          f"neighbour reference σ {args.sigma:g} µm |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    ceil_all = {}
    for name in args.sections.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the readers' notes on skipped spots
            s = read_her2st(args.data, name)
        idx = panel_indices(list(s.adata.var_names), genes)
        c = as_csr(s.adata.X)[:, idx].toarray()
        y, keep = _targets(c)
        ceil = split_half_ceiling(c[keep], rng, args.repeats)
        ceil_all[name] = ceil
        mk = [genes.index(g) for g in MARKERS if g in genes]
        nb = neighbour_reference(y, np.asarray(s.centers_um)[keep], args.sigma)
        print(
            f"| {name} | {keep.sum()} | {np.median(c[keep].sum(1)):.0f} | {np.nanmean(ceil):.3f} | "
            f"{np.nanmean(ceil[mk]):.3f} | {np.nanmean(nb):.3f} |"
        )
    c_sections = [k for k in ceil_all if k.startswith("C")]
    if c_sections:
        m = np.mean([np.nanmean(ceil_all[k]) for k in c_sections])
        print(f"\nmean ceiling over {', '.join(c_sections)}: {m:.3f}")
        lo = np.mean([ceil_all[k] for k in c_sections], axis=0)
        order = np.argsort(lo)
        print("markers:", ", ".join(f"{g} {lo[genes.index(g)]:.2f}" for g in MARKERS if g in genes))
        print(f"genes with ceiling < 0.3: {(lo < 0.3).sum()} of {len(lo)}; lowest: "
              + ", ".join(f"{genes[i]} {lo[i]:.2f}" for i in order[:5]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
