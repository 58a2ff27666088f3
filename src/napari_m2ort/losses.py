"""Training losses, all on the model's one output scale: log1p of panel CPM.

Legacy ST sections differ about 19x in sequencing depth. A log1p-CPM target computed
from a few hundred counts is mostly Poisson noise, and plain MSE weighs it like a target
from 10,000 counts, so the shallow section dominates the loss. The options here differ
only in how much each spot's noise is trusted; the model's output (and so everything
downstream: inference, metrics, exports) keeps one meaning whatever the loss.

- ``mse``: the specification's loss.
- ``mse_depth``: MSE weighted per spot by counting reliability ``depth / (depth + k)``.
- ``poisson`` / ``nb``: a count likelihood of the panel counts with the spot's panel
  depth as exposure: rate = expm1(output) * depth / 1e6, i.e. the output is read as
  log1p of the expected CPM. ``nb`` learns one inverse dispersion per gene.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import M2ORTError

LOSSES = ("mse", "mse_depth", "poisson", "nb")
LOSS_RULES = {
    "mse": "mean squared error on log1p panel-CPM targets, every spot weighted equally",
    "mse_depth": "mean squared error on log1p panel-CPM, each spot weighted by depth / (depth + k), "
    "depth = its panel counts",
    "poisson": "Poisson negative log-likelihood of the panel counts, rate = expm1(output) * depth / 1e6",
    "nb": "negative-binomial negative log-likelihood of the panel counts (one learned inverse dispersion "
    "per gene), mean = expm1(output) * depth / 1e6",
}


def check_loss(name: str) -> str:
    name = str(name or "mse").strip().lower()
    if name not in LOSSES:
        raise M2ORTError(f"Unknown loss {name!r}: use one of {', '.join(LOSSES)}.")
    return name


class CountLoss(torch.nn.Module):
    """One loss object per training run (``nb`` carries learnable dispersions).

    ``forward(pred, target, counts, depth)``: pred/target (B, G) on the log1p-CPM scale,
    counts (B, G) raw panel counts, depth (B,) their per-spot sum. Returns a scalar that
    is comparable between batches (normalised by the batch's weight or depth)."""

    def __init__(self, name: str = "mse", n_genes: int = 0, depth_k: float = 1000.0):
        super().__init__()
        self.name = check_loss(name)
        self.depth_k = float(depth_k)
        if self.name == "nb":
            self.log_theta = torch.nn.Parameter(torch.full((n_genes,), 2.0))

    @property
    def needs_counts(self) -> bool:
        return self.name in ("poisson", "nb", "mse_depth")

    def forward(self, pred, target, counts=None, depth=None):
        pred = pred.float()
        if self.name == "mse":
            return F.mse_loss(pred, target)
        if counts is None or depth is None:
            raise M2ORTError(f"The {self.name!r} loss needs raw panel counts; prepare the sections again.")
        depth = depth.float()
        if self.name == "mse_depth":
            w = depth / (depth + self.depth_k)
            per_spot = ((pred - target) ** 2).mean(dim=1)
            return (w * per_spot).sum() / w.sum().clamp_min(1e-8)
        # rate per gene in counts; the clamp keeps log(rate) finite at a predicted 0
        log_cpm = torch.log(torch.expm1(pred.clamp(min=1e-3, max=20.0)))
        log_mu = log_cpm + torch.log(depth.clamp_min(1.0) / 1e6)[:, None]
        mu = torch.exp(log_mu)
        if self.name == "poisson":
            nll = mu - counts * log_mu
        else:
            theta = torch.exp(self.log_theta.clamp(-6.0, 12.0))[None, :]
            log_t_mu = torch.log(theta + mu)
            nll = -(
                torch.lgamma(counts + theta)
                - torch.lgamma(theta)
                - torch.lgamma(counts + 1.0)
                + theta * (torch.log(theta) - log_t_mu)
                + counts * (log_mu - log_t_mu)
            )
        # per count: a deep spot counts more than a shallow one, but the scale stays O(1)
        return nll.sum() / depth.sum().clamp_min(1.0)
