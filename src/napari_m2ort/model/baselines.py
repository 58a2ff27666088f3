"""Baselines evaluated next to M2ORT: a single-scale CNN (ST-Net style) and the mean.

The CNN takes the same three inputs as M2ORT and uses only level 1, so the training
engine, checkpoints and evaluation treat both models identically.
"""

from __future__ import annotations

import timm
import torch
from torch import nn


class SingleScaleCNN(nn.Module):
    """ST-Net-style regressor: one 224 px patch per spot through a timm CNN."""

    def __init__(self, backbone: str = "resnet18", num_classes: int = 250, **kwargs):
        super().__init__()
        kwargs.pop("tied_kv", None)
        self.backbone_name = backbone
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=num_classes, **kwargs)
        self.num_genes = num_classes

    def forward(self, level1: torch.Tensor, level2: torch.Tensor | None = None, level3: torch.Tensor | None = None):
        return self.backbone(level1)


class MeanPredictor(nn.Module):
    """Predicts the training-set mean target for every spot."""

    def __init__(self, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))

    def forward(self, level1: torch.Tensor, *_):
        return self.mean.expand(level1.shape[0], -1)
