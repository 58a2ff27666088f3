"""Build the cross-validation table from benchmarks/results/cv_*.json.

python benchmarks/cv_table.py            # print the markdown table
python benchmarks/cv_table.py --readme   # also replace it in README.md between markers
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- cv-table:start -->", "<!-- cv-table:end -->"
LABELS = {
    "m2ort_small": "M2ORT-S",
    "resnet18": "ST-Net-style ResNet-18",
    "densenet121": "ST-Net-style DenseNet-121",
    "mean": "training-mean predictor",
}


def load():
    rows = []
    for f in sorted(RESULTS.glob("cv_*.json")):
        rec = json.loads(f.read_text())
        rec["_file"] = f.name
        rec["recipe"] = recipe(rec)
        rows.append(rec)
    return rows


def recipe(rec: dict) -> str:
    """How a result was trained, from the fields cv_her2st.py records (old files lack some)."""
    if rec["model"] == "mean":
        return "–"
    sched = rec.get("schedule", "constant")
    text = f"lr {rec['lr']:g} {sched}"
    if rec.get("warmup_epochs"):
        text += f", warmup {rec['warmup_epochs']:g}"
    text += f", {rec['epochs']} epochs"
    if rec.get("weight_decay"):
        text += f", wd {rec['weight_decay']:g}"
    if rec.get("tied_kv"):
        text += ", tied_kv"
    if rec.get("color_jitter"):
        text += f", colour jitter {rec['color_jitter']:g}"
    if rec.get("drop_path_rate"):
        text += f", drop path {rec['drop_path_rate']:g}"
    if rec.get("batch_size", 32) != 32:
        text += f", batch {rec['batch_size']}"
    if rec.get("loss", "mse") != "mse":
        text += f", loss {rec['loss']}"
    if rec.get("geometry", "rotate") != "rotate":
        text += f", {rec['geometry']} aug"
    if rec.get("stain", "rgb") != "rgb" and rec.get("color_jitter"):
        text += f", {rec['stain']} stain"
    if rec.get("ema"):
        text += f", EMA {rec['ema']:g}"
    if rec.get("precision", "bf16") != "bf16":
        text += f", {rec['precision']}"
    extra = [s for s in rec.get("train_sections", []) if not s.startswith("C")]
    if extra:
        text += f", +{'+'.join(extra)}"
    return text


def complete(rows) -> tuple[list, list]:
    """Split into recipes run on all four folds (the comparison) and partial ablations.
    The mean predictor has no recipe and goes with the complete ones."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["recipe"]), []).append(r)
    full, partial = [], []
    for rs in groups.values():
        (full if len({r["fold"] for r in rs}) == 4 else partial).extend(rs)
    return full, partial


def fmt(v):
    return "–" if v is None else f"{v:.3f}"


def table(rows, with_folds: bool = True) -> str:
    keys = ["pcc_gene_mean", "pcc_gene_top50", "pcc_spot_mean", "pcc_spot_mean_baseline", "rmse_mean"]
    lines = [
        "| model | training recipe | held-out section | PCC-gene | PCC-gene top-50 | PCC-spot | PCC-spot of mean baseline | RMSE | best epoch | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for r in sorted(rows, key=lambda r: (r["model"], r["recipe"], r["fold"])):
        m = r["metrics"]
        if with_folds:
            lines.append(
                f"| {LABELS.get(r['model'], r['model'])} | {r['recipe']} | {r['fold']} | "
                + " | ".join(fmt(m.get(k)) for k in keys)
                + f" | {r.get('best_epoch', '')} | {r.get('seconds', 0):.0f} |"
            )
        groups.setdefault((r["model"], r["recipe"]), []).append(r)
    for (model, rec), rs in groups.items():
        ms = [r["metrics"] for r in rs]
        means = [
            sum(m[k] for m in ms if m.get(k) is not None) / max(1, sum(m.get(k) is not None for m in ms)) for k in keys
        ]
        folds = ",".join(r["fold"] for r in rs)
        where = f"{len(ms)} of 4 folds" if len(ms) == 4 else f"{folds} only"
        lines.append(
            f"| **{LABELS.get(model, model)} mean** | {rec} | {where} | "
            + " | ".join(f"**{v:.3f}**" for v in means)
            + " | | |"
        )
    return "\n".join(lines)


def tables(rows) -> str:
    full, partial = complete(rows)
    text = table(full)
    if partial:
        text += (
            "\n\nAblations run on some folds only (one fold is one held-out section; "
            "compare with the same fold above, not with the 4-fold means):\n\n" + table(partial)
        )
    return text


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--readme", action="store_true")
    args = p.parse_args()
    text = tables(load())
    print(text)
    if args.readme:
        readme = ROOT / "README.md"
        s = readme.read_text()
        s = re.sub(re.escape(START) + ".*?" + re.escape(END), START + "\n" + text + "\n" + END, s, flags=re.S)
        readme.write_text(s)


if __name__ == "__main__":
    main()
