"""Moved to ``napari_m2ort.pipelines``; these names stay importable for older callers."""

from .pipelines.models import CNN_BACKBONES, build_model, model_for_training, new_card, resolve_genes
from .pipelines.models import DEFAULT_TRAIN_MPP as DEFAULT_MPP
from .pipelines.train import split_sections as split


def model_and_card(args, sections):
    """Old form of ``pipelines.model_for_training`` (attributes model, genes, train_mpp, tied_kv)."""
    return model_for_training(
        args.model,
        sections,
        getattr(args, "genes", "model"),
        getattr(args, "train_mpp", None),
        bool(getattr(args, "tied_kv", False)),
    )


__all__ = ["CNN_BACKBONES", "DEFAULT_MPP", "build_model", "model_and_card", "new_card", "resolve_genes", "split"]
