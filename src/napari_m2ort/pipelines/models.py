"""Model choices: which weights a spec names, and the model and card a training starts from.

One resolver for every front door, so "bundled", a checkpoint path, a variant name and an
in-memory model mean the same thing in the CLI, the widgets and the cohort runner.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..errors import M2ORTError
from .requests import ModelSpec

#: µm/px a new model is trained at when nothing else is said (HER2+ ST images).
DEFAULT_TRAIN_MPP = 0.69
#: Single-scale CNNs trained only as evaluation baselines (weights never saved).
CNN_BACKBONES = ("resnet18", "resnet34", "densenet121")
BUNDLED = "bundled"


def _variants() -> tuple[str, ...]:
    from ..model.m2ort import VARIANTS

    return tuple(VARIANTS)


def is_variant(spec) -> bool:
    """Whether ``spec`` names an architecture (a new, untrained model) rather than weights."""
    return isinstance(spec, str) and (spec in _variants() or spec in CNN_BACKBONES)


def is_baseline(spec) -> bool:
    """Whether ``spec`` names a CNN evaluation baseline (trained, never saved)."""
    return isinstance(spec, str) and spec in CNN_BACKBONES


def _is_pair(spec) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and hasattr(spec[1], "genes")


def _bad_spec(spec) -> M2ORTError:
    return M2ORTError(
        f"Model {str(spec)!r}: give 'bundled', the path of a .safetensors checkpoint, or a model "
        f"variant to train from scratch ({', '.join(_variants() + CNN_BACKBONES)})."
    )


def checkpoint_path(spec: ModelSpec) -> Optional[Path]:
    """The checkpoint file behind a spec (checked to exist); None for a variant name or
    an in-memory model. Raises ``M2ORTError`` for a missing file or a spec that names
    nothing."""
    from ..model.weights import BUNDLED_PATH

    if spec is None:
        spec = BUNDLED
    if _is_pair(spec) or is_variant(spec):
        return None
    if isinstance(spec, str) and spec == BUNDLED:
        path = Path(BUNDLED_PATH)
        if not path.is_file():
            raise M2ORTError(
                f"The bundled model weights are not installed ({path} is missing). Reinstall "
                "napari-m2ort, or give a trained .safetensors checkpoint instead."
            )
        return path
    if not isinstance(spec, (str, os.PathLike)):
        raise _bad_spec(spec)
    text = os.fspath(spec)
    if text.startswith("file:"):  # the widgets' combo-box data
        text = text[5:]
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if path.suffix == ".safetensors" or os.sep in text or path.exists():
        raise M2ORTError(f"{path}: no such model file. Check the path.")
    raise _bad_spec(spec)


def read_model_card(spec: ModelSpec):
    """The ``ModelCard`` of a trained spec without loading its weights."""
    from ..model.weights import read_card

    if _is_pair(spec):
        return spec[1]
    path = checkpoint_path(spec)
    if path is None:
        raise M2ORTError(f"{spec!r} names an architecture, not trained weights: it has no model card yet.")
    return read_card(path)


def resolve_model(
    spec: ModelSpec,
    device: str = "cpu",
    *,
    genes: Optional[Sequence[str]] = None,
    mpp: Optional[float] = None,
    tied_kv: bool = False,
    training_data: str = "",
    gene_panel_rule: str = "",
):
    """``(model, card)`` for a model spec.

    * ``"bundled"``: the weights shipped with the plugin;
    * a ``.safetensors`` path (also ``"file:<path>"``): a trained checkpoint;
    * a variant name (``m2ort_small|base|large``, or a CNN baseline): a new, untrained
      model with a head for ``genes`` (required) at ``mpp`` µm/px;
    * an in-memory ``(model, card)`` pair: returned as it is.

    Raises ``M2ORTError`` with a sentence saying what to give instead.
    """
    from ..model.weights import load_checkpoint

    if _is_pair(spec):
        return spec
    if is_variant(spec):
        if not genes:
            raise M2ORTError(
                f"{spec!r} names an architecture, not trained weights: predicting needs a trained "
                "checkpoint or 'bundled' (a new model is made for training, with a gene panel)."
            )
        model = build_model(spec, len(genes), tied_kv=tied_kv)
        card = new_card(spec, list(genes), mpp or DEFAULT_TRAIN_MPP, training_data, tied_kv, gene_panel_rule)
        return model.to(device), card
    return load_checkpoint(checkpoint_path(spec), device=device)


# ---------------------------------------------------------------- new models and panels


def resolve_genes(spec: str, sections, model_genes: Optional[Sequence[str]] = None) -> list:
    """The gene panel a spec names: "model", "top:N", a gene-list file or "A,B,C"."""
    from ..targets import select_panel

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


def new_card(variant: str, genes: list, mpp: float, training_data: str = "", tied_kv: bool = False, rule: str = ""):
    """The card of a model about to be trained (metrics filled in by training)."""
    from .. import __version__
    from ..model.weights import ModelCard

    return ModelCard(
        variant=variant,
        genes=list(genes),
        target="log1p(counts * 1e6 / panel_total)",
        mpp=float(mpp),
        fov_um=224 * float(mpp),
        tied_kv=tied_kv,
        training_data=training_data,
        gene_panel_rule=rule,
        metrics={},
        version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def build_model(variant: str, n_genes: int, tied_kv: bool = False, drop_path_rate: float = 0.0):
    """A new, untrained model: an M2ORT variant or a single-scale CNN baseline."""
    import timm

    from ..model.baselines import SingleScaleCNN

    if variant in CNN_BACKBONES:
        return SingleScaleCNN(variant, num_classes=n_genes, drop_path_rate=drop_path_rate)
    try:
        return timm.create_model(variant, num_classes=n_genes, tied_kv=tied_kv, drop_path_rate=drop_path_rate)
    except RuntimeError as exc:
        raise M2ORTError(
            f"Unknown model {variant!r}: use m2ort_small, m2ort_base, m2ort_large or a checkpoint."
        ) from exc


def model_for_training(
    spec: ModelSpec,
    sections: Sequence,
    genes: str = "model",
    train_mpp: Optional[float] = None,
    tied_kv: bool = False,
):
    """``(model, card)`` a training starts from.

    Trained weights keep their encoder; a different panel gets a fresh head. An
    in-memory model is copied (its owner keeps the original). A variant name gives a new
    model on the data's top 250 genes unless ``genes`` says otherwise.
    """
    from ..model.weights import replace_head
    from ..targets import PANEL_RULE

    data_desc = ", ".join(s.name for s in sections)
    if not is_variant(spec):
        if _is_pair(spec):
            model, card = copy.deepcopy(spec[0]), copy.deepcopy(spec[1])
            source = "an in-memory model"
        else:
            model, card = resolve_model(spec)
            source = str(spec)
        panel = resolve_genes(genes, sections, card.genes)
        if panel != list(card.genes):
            model = replace_head(model, len(panel))
            card.genes = panel
            card.target_mean = None
        if train_mpp:
            card.mpp, card.fov_um = float(train_mpp), 224 * float(train_mpp)
        card.training_data = f"fine-tuned from {source} on {data_desc}"
        card.metrics = {}
        return model, card
    genes = genes if genes and genes != "model" else "top:250"
    panel = resolve_genes(genes, sections)
    rule = PANEL_RULE if genes.startswith("top:") else ""
    return resolve_model(
        spec,
        genes=panel,
        mpp=train_mpp or DEFAULT_TRAIN_MPP,
        tied_kv=bool(tied_kv),
        training_data=data_desc,
        gene_panel_rule=rule,
    )
