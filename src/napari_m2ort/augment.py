"""Training augmentation from the spec: flips and a random rotation with white fill.

Applied to level 1 before pooling, so the three magnifications of a spot always get
the same transform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_level1(x: torch.Tensor, generator: torch.Generator | None = None, rotate: bool = True) -> torch.Tensor:
    """x: (B, 3, H, W) float in [0, 1]. Returns an augmented copy."""
    b = x.shape[0]
    dev = x.device
    flip_h = torch.rand(b, generator=generator) < 0.5
    flip_v = torch.rand(b, generator=generator) < 0.5
    angle = torch.rand(b, generator=generator) * 2 * math.pi if rotate else torch.zeros(b)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx = torch.where(flip_h, -1.0, 1.0)
    sy = torch.where(flip_v, -1.0, 1.0)
    # rotation ∘ flip, as a 2×3 affine in normalised coordinates
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * sx
    theta[:, 0, 1] = -sin * sy
    theta[:, 1, 0] = sin * sx
    theta[:, 1, 1] = cos * sy
    theta = theta.to(dev, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample the "ink" (1 - x) with zero padding, so the uncovered corners come out white
    ink = F.grid_sample(1.0 - x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return 1.0 - ink
