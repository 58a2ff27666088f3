"""Moved to ``napari_m2ort.pipelines``; these names stay importable for older callers."""

from .pipelines.models import CNN_BACKBONES, build_model, new_card, resolve_genes
from .pipelines.models import DEFAULT_TRAIN_MPP as DEFAULT_MPP
from .pipelines.train import split_sections as split

__all__ = ["CNN_BACKBONES", "DEFAULT_MPP", "build_model", "new_card", "resolve_genes", "split"]
