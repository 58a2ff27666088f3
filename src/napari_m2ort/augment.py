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


GEOMETRIES = ("rotate", "dihedral", "flips", "none")
STAINS = ("rgb", "hed", "none")


def dihedral_level1(x: torch.Tensor, generator: torch.Generator | None = None, turns: bool = True) -> torch.Tensor:
    """Random flips and (with ``turns``) quarter turns: the tissue's symmetries without
    the white corners an arbitrary-angle rotation leaves on a square patch."""
    b = x.shape[0]
    k = torch.randint(0, 4 if turns else 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    vflip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(x)
    for t in range(4):
        for f in (False, True):
            for v in (False, True):
                m = (k == t) & (flip == f) & (vflip == v)
                if not bool(m.any()):
                    continue
                y = x[m.to(x.device)]
                if t:
                    y = torch.rot90(y, t, dims=(2, 3))
                if f:
                    y = torch.flip(y, dims=(3,))
                if v:
                    y = torch.flip(y, dims=(2,))
                out[m.to(x.device)] = y
    return out


# Ruifrok & Johnston's stain vectors (as in scikit-image's rgb_from_hed)
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def hed_jitter(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale and shift each stain's optical density (haematoxylin, eosin, DAB) by up to
    ``amount``: the way real H&E varies between labs, unlike a per-RGB-channel gain."""
    b = x.shape[0]
    od = -torch.log(x.clamp_min(1e-6))
    hed = torch.einsum("bchw,cd->bdhw", od, _HED_FROM_RGB.to(x.device, x.dtype))
    alpha = 1.0 + (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1).to(x.device, x.dtype) * amount
    beta = (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1).to(x.device, x.dtype) * amount * 0.1
    hed = hed * alpha + beta
    od = torch.einsum("bdhw,dc->bchw", hed, _RGB_FROM_HED.to(x.device, x.dtype))
    return torch.exp(-od).clamp_(0.0, 1.0)
