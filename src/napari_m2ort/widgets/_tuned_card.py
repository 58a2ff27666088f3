"""The card a fine-tuned model is saved with: what this training did, and nothing else.

A fine-tune starts from a card that describes another model (the bundled one carries
its own cross-validation and a note about it).  The saved card must describe its own
training instead: the data, the epochs, the validation result, the fit on the training
spots, what it started from and when.  Qt-free, so the same record can back the CLI.
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Sequence
from typing import Any, Optional

VAL_WORDS = {"blocks": "held-out spatial blocks (20 %) of each section", "none": "none"}


def validation_words(val: str) -> str:
    val = (val or "blocks").strip()
    return VAL_WORDS.get(val, f"section {val} held out")


def _pcc(v) -> str:
    return "n/a" if not isinstance(v, (int, float)) else f"{v:.3f}"


def per_section_words(metrics: Optional[dict], key: str = "pcc_gene_mean") -> str:
    """'C2:val 0.31 (20 spots), C3 0.28 (180 spots)' from an evaluate_sections record."""
    per = (metrics or {}).get("per_section") or {}
    return ", ".join(f"{name} {_pcc(m.get(key))} ({m.get('n_spots', '?')} spots)" for name, m in per.items())


def fit_table(fit: Optional[dict]) -> str:
    """'C2:train PCC-gene 0.452, PCC-spot 0.913 (29 spots)' per training section."""
    per = (fit or {}).get("per_section") or {}
    return "; ".join(
        f"{name} PCC-gene {_pcc(m.get('pcc_gene_mean'))}, PCC-spot {_pcc(m.get('pcc_spot_mean'))} "
        f"({m.get('n_spots', '?')} spots)"
        for name, m in per.items()
    )


def kept_epoch_words(result) -> str:
    """'kept epoch 2 (validation PCC-gene 0.310)', or '' when no epoch was kept."""
    if result is None or result.best_epoch is None or result.best_epoch < 1:
        return ""
    pcc = (result.best_metrics or {}).get("pcc_gene_mean")
    if isinstance(pcc, (int, float)):
        return f"kept epoch {result.best_epoch} (validation PCC-gene {pcc:.3f})"
    return f"kept epoch {result.best_epoch} (no validation)"


def describe_training(
    result,
    *,
    started_from: str,
    sections: Sequence[Any],
    val: str,
    epochs_planned: int,
    now: Optional[_dt.datetime] = None,
):
    """A copy of ``result.card`` that describes this fine-tune only.

    ``sections``: the ``io.st.STSection`` objects trained on (after any region cut);
    ``started_from``: how the user named the starting model.
    """
    from .. import __version__

    now = now or _dt.datetime.now(_dt.timezone.utc)
    card = copy.deepcopy(result.card)
    metrics = dict(card.metrics or {})
    validation = metrics.get("validation") or result.best_metrics or None
    fit = metrics.get("fit") or result.fit or None
    cfg = metrics.get("train_config") or {}
    data = {str(s.name): int(s.n_spots) for s in sections}
    history = [
        {
            "epoch": h.get("epoch"),
            "train_loss": h.get("train_loss"),
            "val_pcc_gene": (h.get("val") or {}).get("pcc_gene_mean"),
        }
        for h in result.history
    ]
    metrics["fine_tune"] = {
        "date": now.isoformat(timespec="seconds"),
        "started_from": started_from,
        "sections": data,
        "validation_on": validation_words(val),
        "epochs_planned": int(epochs_planned),
        "epochs_done": int(result.epochs_done),
        "stopped": bool(result.stopped),
        "best_epoch": result.best_epoch,
        "history": history,
    }
    metrics["validation"] = validation
    metrics["fit"] = fit
    card.metrics = metrics
    card.created = now.isoformat(timespec="seconds")
    card.version = __version__
    names = ", ".join(data)
    if not str(card.training_data or "").startswith("fine-tuned"):
        card.training_data = f"fine-tuned from {started_from} on {names}"
    lines = [
        f"Fine-tuned with napari-m2ort {__version__} on {now:%Y-%m-%d %H:%M} UTC, starting from {started_from}.",
        "Data: " + ", ".join(f"{n} ({k} spots)" for n, k in data.items()) + ".",
        f"Training: {result.epochs_done} of {epochs_planned} epoch(s)"
        + (" (cancelled)" if result.stopped else "")
        + (f", mode {cfg.get('mode')}, lr {cfg.get('lr'):g}, batch {cfg.get('batch_size')}" if cfg else "")
        + (f"; {kept_epoch_words(result)}" if kept_epoch_words(result) else "")
        + ".",
        (
            f"Validation on {validation_words(val)}: PCC-gene {_pcc(validation.get('pcc_gene_mean'))}"
            f" (mean over sections: {per_section_words(validation)})."
            if validation
            else "Validation: none (no spots were held out; the fit below is not an accuracy)."
        ),
        "Fit on the training spots: "
        + (fit_table(fit) or ("not measured (training was cancelled)" if result.stopped else "not measured"))
        + ".",
        "These numbers describe this fine-tune only; the starting model's own evaluation is not carried over.",
    ]
    card.notes = "\n".join(lines)
    return card
