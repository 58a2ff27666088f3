"""Make a trained checkpoint the bundled model (the one deliberate way to replace it).

Copies the weights as fp16 into the package, writes the cross-validation summary from
benchmarks/results/cv_*.json into the model card's metrics, and writes the card next to
the weights as MODEL_CARD.json for people who do not load the file.

    python scripts/release_bundled.py .cache/bundled_run/model.safetensors [the training command]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cv_summary() -> dict:
    """Per model and training recipe (only recipes run on all four folds)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cv_table", ROOT / "benchmarks" / "cv_table.py")
    cv_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cv_table)
    full, _ = cv_table.complete(cv_table.load())
    out: dict = {}
    for rec in full:
        key = rec["model"] if rec["recipe"] == "–" else f"{rec['model']} ({rec['recipe']})"
        out.setdefault(key, {})[rec["fold"]] = {
            k: rec["metrics"].get(k)
            for k in (
                "pcc_gene_mean",
                "pcc_gene_top50",
                "pcc_spot_mean",
                "pcc_spot_mean_baseline",
                "rmse_mean",
                "n_spots",
                "n_genes",
            )
        }
    for folds in out.values():
        keys = ("pcc_gene_mean", "pcc_gene_top50", "pcc_spot_mean", "pcc_spot_mean_baseline", "rmse_mean")
        folds["mean_over_folds"] = {
            k: sum(v[k] for v in folds.values() if v.get(k) is not None) / len(folds) for k in keys
        }
    return out


def main(src: str, command: str = "") -> None:
    import napari_m2ort  # noqa: F401
    from napari_m2ort.model import weights

    model, card = weights.load_checkpoint(src)
    card.metrics = {
        "held_out_spatial_blocks": card.metrics.get("validation"),
        "best_epoch": card.metrics.get("best_epoch"),
        "train_config": card.metrics.get("train_config"),
        "training_command": command or None,
        "leave_one_section_out_cv_patient_C": cv_summary(),
        "note": (
            "held_out_spatial_blocks pools validation blocks of all five sections (section "
            "differences inflate PCC-gene); the cross-validation numbers are on whole held-out "
            "sections and are the honest estimate."
        ),
    }
    card.notes = (
        "Trained with napari-m2ort's CLI; see README 'The bundled model' for the exact command. "
        "Held-out metrics: leave-one-section-out CV over sections C2–C5 (benchmarks/results/cv_*.json)."
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
