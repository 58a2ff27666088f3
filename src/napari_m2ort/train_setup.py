"""Turning user choices (model, gene panel, validation) into a model, card and splits.

Shared by the CLI's ``train`` and the fine-tuning widget so both behave the same.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import M2ORTError

DEFAULT_MPP = 0.69
CNN_BACKBONES = ("resnet18", "resnet34", "densenet121")


def resolve_genes(spec: str, sections, model_genes: Optional[list] = None) -> list:
    from .targets import select_panel

    spec = (spec or "model").strip()
    if spec == "model":
        if model_genes is None:
            raise M2ORTError("--genes model needs a trained model; use top:250 or a gene list file for a new model.")
        return list(model_genes)
    if spec.startswith("top:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise M2ORTError(f"--genes {spec!r}: write top:N with a number, e.g. top:250.") from None
        return list(select_panel([s.adata for s in sections], n=n))
    path = Path(spec)
    if path.is_file():
        genes = [g.strip() for g in path.read_text().replace(",", "\n").splitlines() if g.strip()]
    else:
        genes = [g.strip() for g in spec.replace("\n", ",").split(",") if g.strip()]
    if not genes:
        raise M2ORTError(f"--genes {spec!r}: no genes found.")
    return list(dict.fromkeys(genes))


def new_card(variant: str, genes: list, mpp: float, training_data: str = "", tied_kv: bool = False,
             rule: str = ""):
    from . import __version__
    from .model.weights import ModelCard

    return ModelCard(
        variant=variant, genes=list(genes), target="log1p(counts * 1e6 / panel_total)",
        mpp=float(mpp), fov_um=224 * float(mpp), tied_kv=tied_kv, training_data=training_data,
        gene_panel_rule=rule, metrics={}, version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def build_model(variant: str, n_genes: int, tied_kv: bool = False, drop_path_rate: float = 0.0):
    import timm

    from .model.baselines import SingleScaleCNN

    if variant in CNN_BACKBONES:
        return SingleScaleCNN(variant, num_classes=n_genes, drop_path_rate=drop_path_rate)
    try:
        return timm.create_model(variant, num_classes=n_genes, tied_kv=tied_kv, drop_path_rate=drop_path_rate)
    except RuntimeError as exc:
        raise M2ORTError(f"Unknown model {variant!r}: use m2ort_small, m2ort_base, m2ort_large or a checkpoint.") from exc


def model_and_card(args, sections):
    """(model, card) for training from CLI-style arguments."""
    from .model.weights import load_bundled, load_checkpoint, replace_head

    spec = args.model
    mpp = getattr(args, "train_mpp", None)
    data_desc = ", ".join(s.name for s in sections)
    if spec == "bundled" or spec.endswith(".safetensors") or Path(spec).exists():
        model, card = load_bundled() if spec == "bundled" else load_checkpoint(Path(spec))
        genes = resolve_genes(args.genes, sections, card.genes)
        if genes != list(card.genes):
            model = replace_head(model, len(genes))
            card.genes = genes
            card.target_mean = None
        if mpp:
            card.mpp, card.fov_um = float(mpp), 224 * float(mpp)
        card.training_data = f"fine-tuned from {spec} on {data_desc}"
        card.metrics = {}
        return model, card
    genes = resolve_genes(args.genes if args.genes != "model" else "top:250", sections)
    tied = bool(getattr(args, "tied_kv", False))
    model = build_model(spec, len(genes), tied_kv=tied)
    rule = ""
    if str(args.genes).startswith("top:") or args.genes == "model":
        from .targets import PANEL_RULE

        rule = PANEL_RULE
    card = new_card(spec, genes, mpp or DEFAULT_MPP, data_desc, tied, rule)
    return model, card


def split(cached: Sequence, val: str, seed: int = 0):
    """Training and validation sets: spatial blocks, held-out section(s), or none."""
    from .training import spatial_block_split

    val = (val or "blocks").strip()
    if val == "none":
        return list(cached), []
    if val == "blocks":
        train_sets, val_sets = [], []
        for s in cached:
            mask = spatial_block_split(s.centers_um, seed=seed)
            train_sets.append(s.subset(~mask, ":train"))
            val_sets.append(s.subset(mask, ":val"))
        return train_sets, val_sets
    names = {v.strip() for v in val.split(",")}
    val_sets = [s for s in cached if s.name in names]
    train_sets = [s for s in cached if s.name not in names]
    if not val_sets:
        raise M2ORTError(f"--val {val!r}: no loaded section has that name ({', '.join(s.name for s in cached)}).")
    if not train_sets:
        raise M2ORTError("All sections are held out for validation: keep at least one for training.")
    return train_sets, val_sets
