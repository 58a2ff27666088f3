"""Model choices: which weights a spec names, and the model and card a training starts from.

One resolver for every front door, so "bundled", a checkpoint path, a variant name and an
in-memory model mean the same thing in the CLI, the widgets and the cohort runner.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import os
import threading
import weakref
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


MEMORY_PREFIX = "memory:"
_MEMORY: dict[str, tuple] = {}  # key -> (weak reference to the model, card)
_MEMORY_LOCK = threading.Lock()


def remember_model(model, card) -> str:
    """A ``"memory:<key>"`` spec for a model held in memory (a fine-tuned one).

    A front door that stores specs as strings (the widgets' model lists) can then pass
    the spec anywhere a model is taken. The model is held weakly: the spec resolves as
    long as its owner keeps the model."""
    text = card.to_json() if hasattr(card, "to_json") else repr(card)
    key = hashlib.sha1(f"{id(model)}:{text}".encode()).hexdigest()[:12]
    with _MEMORY_LOCK:
        _MEMORY[key] = (weakref.ref(model), card)
    return MEMORY_PREFIX + key


def _from_memory(spec):
    """The ``(model, card)`` pair of a ``"memory:<key>"`` spec; None for other specs."""
    if not (isinstance(spec, str) and spec.startswith(MEMORY_PREFIX)):
        return None
    with _MEMORY_LOCK:
        hit = _MEMORY.get(spec[len(MEMORY_PREFIX) :])
    model = hit[0]() if hit is not None else None
    if model is None:
        raise M2ORTError("The selected in-memory model is no longer available; choose another one.")
    return model, hit[1]


def _pair(spec):
    """``(model, card)`` for an in-memory spec (a pair, or ``"memory:<key>"``), else None."""
    if isinstance(spec, tuple) and len(spec) == 2 and hasattr(spec[1], "genes"):
        return spec
    return _from_memory(spec)


def _is_pair(spec) -> bool:
    return _pair(spec) is not None


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

    pair = _pair(spec)
    if pair is not None:
        return pair[1]
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
    drop_path: float = 0.0,
):
    """``(model, card)`` for a model spec.

    * ``"bundled"``: the weights shipped with the plugin;
    * a ``.safetensors`` path (also ``"file:<path>"``): a trained checkpoint;
    * a variant name (``m2ort_small|base|large``, or a CNN baseline): a new, untrained
      model with a head for ``genes`` (required) at ``mpp`` µm/px;
    * an in-memory ``(model, card)`` pair, or its ``"memory:<key>"`` spec
      (``remember_model``): returned as it is.

    Raises ``M2ORTError`` with a sentence saying what to give instead.
    """
    from ..model.weights import load_checkpoint

    pair = _pair(spec)
    if pair is not None:
        return pair
    if is_variant(spec):
        if not genes:
            raise M2ORTError(
                f"{spec!r} names an architecture, not trained weights: predicting needs a trained "
                "checkpoint or 'bundled' (a new model is made for training, with a gene panel)."
            )
        model = build_model(spec, len(genes), tied_kv=tied_kv, drop_path_rate=drop_path)
        card = new_card(spec, list(genes), mpp or DEFAULT_TRAIN_MPP, training_data, tied_kv, gene_panel_rule)
        return model.to(device), card
    return load_checkpoint(checkpoint_path(spec), device=device)


def trained_on(card, names: Sequence[str]) -> list:
    """Which of the section ``names`` the card's ``training_data`` lists (a score on them
    is a fit, not a held-out result). A fine-tune of the bundled model also counts the
    bundled model's sections."""
    import re

    text = str(getattr(card, "training_data", "") or "")
    tokens = set(re.findall(r"[A-Za-z0-9_.+-]+", text))
    if "bundled" in tokens:
        try:
            tokens |= set(re.findall(r"[A-Za-z0-9_.+-]+", str(read_model_card(BUNDLED).training_data or "")))
        except (M2ORTError, OSError):
            pass
    return [n for n in names if str(n) in tokens]


# ---------------------------------------------------------------- new models and panels


def resolve_genes(spec: str, sections, model_genes: Optional[Sequence[str]] = None, rule: Optional[str] = None) -> list:
    """The gene panel a spec names: "model", "top:N" (chosen by ``rule``, a key of
    ``targets.PANEL_RULES``), a gene-list file or "A,B,C"."""
    from ..targets import PANEL_RULES, select_panel

    rule = rule or next(iter(PANEL_RULES))
    if rule not in PANEL_RULES:
        raise M2ORTError(f"Unknown panel rule {rule!r}: use one of {', '.join(PANEL_RULES)}.")

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
        if not 1 <= n <= 100_000:
            raise M2ORTError(f"--genes {spec!r}: N must be from 1 to 100000.")
        return list(select_panel([s.adata for s in sections], n=n, rule=rule))
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
    panel_rule: Optional[str] = None,
    drop_path: float = 0.0,
):
    """``(model, card)`` a training starts from.

    Trained weights keep their encoder; a different panel gets a fresh head. An
    in-memory model is copied (its owner keeps the original). A variant name gives a new
    model on the data's top 250 genes unless ``genes`` says otherwise; ``drop_path``
    (stochastic depth) is built into a new model only.
    """
    from ..model.weights import replace_head
    from ..targets import PANEL_RULES

    data_desc = ", ".join(s.name for s in sections)
    if not is_variant(spec):
        if drop_path:
            raise M2ORTError(
                f"Drop path {drop_path:g} is built into a new model; "
                f"{spec if isinstance(spec, str) else 'this in-memory model'} is trained weights, "
                "which keep their own. Leave drop path at 0 to fine-tune it, or train a new model "
                "(m2ort_small, m2ort_base, m2ort_large)."
            )
        pair = _pair(spec)
        if pair is not None:
            model, card = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
            source = "an in-memory model"
        else:
            model, card = resolve_model(spec)
            source = str(spec)
        panel = resolve_genes(genes, sections, card.genes, panel_rule)
        if panel != list(card.genes):
            model = replace_head(model, len(panel))
            card.genes = panel
            card.target_mean = None
            if (genes or "").startswith("top:"):
                card.gene_panel_rule = PANEL_RULES[panel_rule or next(iter(PANEL_RULES))]
        if train_mpp:
            card.mpp, card.fov_um = float(train_mpp), 224 * float(train_mpp)
        # The card describes this training only: nothing of the parent's own evaluation,
        # notes or date may pass for the fine-tuned model's.
        from ..model.weights import package_version, utc_now

        card.training_data = f"fine-tuned from {source} on {data_desc}"
        card.metrics = {}
        card.notes = f"Fine-tuned from {source} ({card.variant}) on {data_desc}."
        card.created, card.version = utc_now(), package_version()
        card.extra = {"started_from": source}
        return model, card
    genes = genes if genes and genes != "model" else "top:250"
    panel = resolve_genes(genes, sections, rule=panel_rule)
    rule = PANEL_RULES[panel_rule or next(iter(PANEL_RULES))] if genes.startswith("top:") else ""
    return resolve_model(
        spec,
        genes=panel,
        mpp=train_mpp or DEFAULT_TRAIN_MPP,
        tied_kv=bool(tied_kv),
        training_data=data_desc,
        gene_panel_rule=rule,
        drop_path=drop_path,
    )
