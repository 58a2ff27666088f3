"""Make a trained checkpoint the bundled model (the one deliberate way to replace it).

Copies the weights as fp16 into the package, writes into the model card's metrics the
cross-validation of the final recipe (benchmarks/results/cv_<model><FINAL_TAG>_<fold>.json,
read through benchmarks/cv_table.py), the checkpoint's own validation and fit, the marker
genes and the shipped inference defaults, and writes the card next to the weights as
MODEL_CARD.json for people who do not load the file.

    python scripts/release_bundled.py .cache/bundled_run/model.safetensors [the training command]
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CV_DESIGN = "leave-one-section-out over C2–C5, B4 added to every fold's training set"
ABOUT = {
    "cross_validation": (
        "whole held-out sections never seen in training (one fold per held-out section): the "
        "honest estimate for a new slide; pcc_gene_mean_defaults is at the shipped inference defaults"
    ),
    "validation": (
        "the checkpoint's epoch choice: mean over its training sections of each section's own "
        "PCC-gene on its held-out spatial blocks (same sections as training, so optimistic)"
    ),
    "fit": "each training section's PCC-gene on its own training spots (how well the model fits)",
}


def load_cv_table():
    """benchmarks/cv_table.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("cv_table", ROOT / "benchmarks" / "cv_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(v: dict) -> dict:
    """Card keys for one fold's values (cv_table.final_values) or their mean (final_mean)."""
    return {
        "pcc_gene_mean_raw": v.get("raw"),
        "pcc_gene_mean_defaults": v.get("defaults"),
        "pcc_gene_mean_dihedral_100": v.get("tta_smoothed"),
        "pcc_markers_mean_defaults": v.get("markers_mean"),
        "pcc_markers_defaults": v.get("markers"),
        "uncertainty_spearman_spot_gene": v.get("uncertainty"),
        "fit": {"pcc_gene_mean_C_train": v.get("fit_c"), "pcc_gene_mean_B4_train": v.get("fit_b4")},
        "best_epoch": v.get("best_epoch"),
    }


def cross_validation(cv_rows: list, cv=None) -> dict:
    """The final recipe's folds per model, each fold summarised, plus the mean over folds."""
    cv = cv or load_cv_table()
    runs = cv.final_rows(cv_rows)
    out: dict = {
        "design": CV_DESIGN,
        "recipe": {"tag": cv.FINAL_TAG, **{m: cv.recipe(rs[0]) for m, rs in runs.items() if rs}},
        "inference_defaults": {"tta": cv.DEFAULT_TTA, "smooth_um": cv.DEFAULT_SMOOTH_UM},
    }
    for model, rs in runs.items():
        values = [cv.final_values(r) for r in rs]
        entry: dict = {}
        for r, v in zip(rs, values):
            fold = entry[r["fold"]] = _summary(v)
            fold["fit"]["per_section"] = v["fit_sections"]
            fold.update(uncertainty_at=v["uncertainty_key"], train_sections=r.get("train_sections"))
        entry["mean_over_folds"] = dict(
            _summary(cv.final_mean(values)),
            uncertainty_at=sorted({v["uncertainty_key"] for v in values if v["uncertainty_key"]}),
            n_folds=len(rs),
            folds=[r["fold"] for r in rs],
        )
        out[model] = entry
    return out


def card_metrics(
    checkpoint_metrics: dict, cv_rows: list, command: str = "", panel_rule: str = "", cv=None, genes=None
) -> dict:
    """The released card's metrics: cross-validation of the final recipe plus the
    checkpoint's own record (validation, fit, best epoch, config), written by training."""
    from napari_m2ort.targets import MARKER_PANEL_RULE, MARKERS

    cv = cv or load_cv_table()
    m = checkpoint_metrics or {}
    markers = {"genes": list(MARKERS), "panel_rule": panel_rule or MARKER_PANEL_RULE}
    if genes is not None:  # a panel chosen without the marker rule may lack some
        markers["missing_from_panel"] = [g for g in MARKERS if g not in set(genes)]
    return {
        "cross_validation": cross_validation(cv_rows, cv),
        "validation": m.get("validation"),
        "fit": m.get("fit"),
        "markers": markers,
        "inference_defaults": {"tta": cv.DEFAULT_TTA, "smooth_um": cv.DEFAULT_SMOOTH_UM},
        "training_command": command or None,
        "best_epoch": m.get("best_epoch"),
        "train_config": m.get("train_config"),
        "about": ABOUT,
    }


def main(src: str, command: str = "") -> None:
    import napari_m2ort  # noqa: F401
    from napari_m2ort.model import weights

    cv = load_cv_table()
    model, card = weights.load_checkpoint(src)
    card.metrics = card_metrics(card.metrics, cv.load(), command, card.gene_panel_rule, cv, card.genes)
    for name in cv.FINAL_MODELS:
        n = card.metrics["cross_validation"][name]["mean_over_folds"]["n_folds"]
        if n < 4:
            print(f"warning: {name} has {n} of 4 cross-validation folds ({cv.FINAL_TAG})")
    card.notes = (
        "Trained with napari-m2ort's CLI; see README 'The bundled model' for the exact command. "
        f"Held-out metrics (metrics.cross_validation): {CV_DESIGN} "
        f"(benchmarks/results/cv_*{cv.FINAL_TAG}_*.json)."
    )
    target = Path(weights.BUNDLED_PATH)
    tmp = target.with_name("release-tmp.safetensors")
    weights.save_checkpoint(model, card, tmp, dtype="float16")
    os.replace(tmp, target)
    target.chmod(0o644)
    (target.parent / "MODEL_CARD.json").write_text(json.dumps(json.loads(card.to_json()), indent=2) + "\n")
    print(f"bundled {target} ({target.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1], " ".join(sys.argv[2:]))
