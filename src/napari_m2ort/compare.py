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
