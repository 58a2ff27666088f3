"""The models a widget offers, by spec, with the loaded ones kept (Qt-free).

Specs are what the model combo box stores: ``"bundled"``, ``"file:<path>"`` for a
checkpoint, ``"memory:<key>"`` for a model handed over in memory (the fine-tuning
widget's "Use for prediction").  Loading goes through the use-case layer's resolver,
so a spec means here what it means to the CLI.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

from psygnal import Signal

from ..errors import M2ORTError

BUNDLED = "bundled"


def model_key(card) -> str:
    """A short identity of a model card (genes + provenance) to keep layers apart."""
    import hashlib
    import json

    text = card.to_json() if hasattr(card, "to_json") else json.dumps(card, default=str, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def describe_card(card) -> str:
    """One line about a model: variant, panel, scale, field of view, validation PCC."""
    metrics = card.metrics or {}
    val = metrics.get("validation") or metrics.get("test") or {}
    pcc = val.get("pcc_gene_mean") if isinstance(val, dict) else None
    extra = f", val PCC-gene {pcc:.2f}" if isinstance(pcc, (int, float)) else ""
    cv = cross_validated_pcc(card)
    if cv is not None:
        extra = f"; cross-validated PCC-gene {cv[0]:.2f} ({cv[1]})"
    return f"{card.variant}, {len(card.genes)} genes, {card.mpp:g} µm/px, {card.fov_um:.0f} µm field{extra}"


VARIANT_NAMES = {"m2ort_small": "M2ORT-S", "m2ort_base": "M2ORT-B", "m2ort_large": "M2ORT-L"}


def model_name(card, spec: Optional[str] = None) -> str:
    """What a layer, a legend and a colorbar call the model: "M2ORT-S bundled",
    "fine-tuned on C3 (2026-11-30)", or the checkpoint's file name."""
    variant = VARIANT_NAMES.get(str(card.variant), str(card.variant))
    data = str(getattr(card, "training_data", "") or "")
    if data.startswith("fine-tuned"):
        on = data.split(" on ", 1)[1] if " on " in data else data
        on = on.split(" (", 1)[0].strip() or "user data"
        day = str(getattr(card, "created", "") or "")[:10]
        return f"fine-tuned on {on}" + (f" ({day})" if day else "")
    if spec == BUNDLED:
        return f"{variant} bundled"
    if spec and spec.startswith("file:"):
        return f"{variant} {Path(spec[5:]).stem}"
    return variant


def cross_validated_pcc(card) -> Optional[tuple[float, str]]:
    """(PCC-gene mean over held-out sections, what it is) from the card's metrics; None
    when the card has no cross-validation for its variant.

    Cards released by scripts/release_bundled.py carry ``cross_validation``: per model the
    folds of the final recipe and their mean at the shipped inference defaults.  Older
    cards carry ``leave_one_section_out_cv_*`` per recipe; the one matching the card's
    training command is used."""
    import re

    metrics = card.metrics or {}
    cv = metrics.get("cross_validation") if isinstance(metrics.get("cross_validation"), dict) else {}
    runs = cv.get(str(card.variant))
    mean = runs.get("mean_over_folds") if isinstance(runs, dict) else None
    if isinstance(mean, dict) and isinstance(mean.get("pcc_gene_mean_defaults"), (int, float)):
        defaults = cv.get("inference_defaults") or {}
        smooth = float(defaults.get("smooth_um") or 0)
        tta = str(defaults.get("tta") or "none")
        n = mean.get("n_folds")
        where = "leave-one-section-out" + (f", {n} held-out sections" if n else "")
        where += f", σ{smooth:g} µm smoothing" if smooth > 0 else ", no smoothing"
        where += f", {tta} TTA" if tta != "none" else ""
        return float(mean["pcc_gene_mean_defaults"]), where
    command = str(metrics.get("training_command", ""))
    lr = re.search(r"--lr\s+(\S+)", command)
    schedule = re.search(r"--schedule\s+(\S+)", command)
    for key, runs in metrics.items():
        if not key.startswith("leave_one_section_out_cv") or not isinstance(runs, dict):
            continue
        recipes = [k for k in runs if str(k).startswith(str(card.variant))]
        if lr is not None:
            same = [k for k in recipes if f"lr {float(lr.group(1)):g}" in k]
            same = [k for k in same if schedule is None or schedule.group(1) in k] or same
            recipes = same or recipes
        for k in recipes:
            value = (runs[k].get("mean_over_folds") or {}).get("pcc_gene_mean")
            if isinstance(value, (int, float)):
                where = key.replace("leave_one_section_out_cv", "leave-one-section-out").replace("_", " ")
                return float(value), where.strip()
    return None


class ModelCatalogue:
    """Spec → label for the combo box, spec → (model, card) once loaded."""

    added = Signal(str)  # spec of a new entry

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}
        self._loaded: dict[str, tuple] = {}
        self._loading: dict[str, threading.Lock] = {}  # one load per spec at a time
        self._lock = threading.Lock()

    def add_bundled(self, label: str = "Bundled M2ORT-S (HER2+ breast)") -> Optional[str]:
        from ..model.weights import BUNDLED_PATH

        if not Path(BUNDLED_PATH).is_file():
            return None
        return self._add(BUNDLED, label)

    def add_checkpoint(self, path, label: Optional[str] = None) -> str:
        """Register a .safetensors checkpoint (its card is read now: a bad file fails here)."""
        from ..pipelines import read_model_card

        path = str(Path(path).expanduser())
        spec = f"file:{path}"
        card = read_model_card(spec)
        return self._add(spec, label or f"{Path(path).name} ({card.variant}, {len(card.genes)} genes)")

    def add_memory(self, model, card, name: str = "fine-tuned model") -> str:
        """Register a model held in memory under a spec every use case resolves
        (``pipelines.remember_model``); the catalogue keeps the model alive."""
        from ..pipelines import remember_model

        spec = remember_model(model, card)
        with self._lock:
            self._loaded[spec] = (model, card)
        return self._add(spec, f"{name} ({len(card.genes)} genes)")

    def _add(self, spec: str, label: str) -> str:
        if spec not in self.labels:
            self.labels[spec] = label
            self.added.emit(spec)
        return spec

    def load(self, spec: str):
        """(model, card), loaded once; called from worker threads (a second caller waits
        for a load in flight, e.g. the widget's preload, rather than loading again)."""
        with self._lock:
            hit = self._loaded.get(spec)
            gate = self._loading.setdefault(spec, threading.Lock())
        if hit is not None:
            return hit
        if spec.startswith("memory:") or spec not in self.labels:
            raise M2ORTError("The selected model is no longer available; choose another one.")
        from ..pipelines import resolve_model

        with gate:
            with self._lock:
                hit = self._loaded.get(spec)
            if hit is not None:
                return hit
            model, card = resolve_model(spec)
            with self._lock:
                self._loaded[spec] = (model, card)
        return model, card

    def card(self, spec: Optional[str]):
        """The model card of a spec without loading weights (None if unreadable)."""
        if spec is None:
            return None
        with self._lock:
            hit = self._loaded.get(spec)
        if hit is not None:
            return hit[1]
        from ..pipelines import read_model_card

        try:
            return read_model_card(spec)
        except (M2ORTError, OSError):
            return None
