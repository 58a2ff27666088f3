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
LABELS = {"m2ort_small": "M2ORT-S", "resnet18": "ST-Net-style ResNet-18", "densenet121": "ST-Net-style DenseNet-121",
          "mean": "training-mean predictor"}


def load():
    rows = []
    for f in sorted(RESULTS.glob("cv_*.json")):
        rec = json.loads(f.read_text())
        rec["_file"] = f.name
        rows.append(rec)
    return rows


def fmt(v):
    return "–" if v is None else f"{v:.3f}"


def table(rows) -> str:
    keys = ["pcc_gene_mean", "pcc_gene_top50", "pcc_spot_mean", "pcc_spot_mean_baseline", "rmse_mean"]
    lines = ["| model | held-out section | PCC-gene | PCC-gene top-50 | PCC-spot | PCC-spot of mean baseline | RMSE | best epoch | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_model: dict = {}
    for r in sorted(rows, key=lambda r: (r["model"], r["fold"])):
        m = r["metrics"]
        lines.append(f"| {LABELS.get(r['model'], r['model'])} | {r['fold']} | " + " | ".join(fmt(m.get(k)) for k in keys)
                     + f" | {r.get('best_epoch', '')} | {r.get('seconds', 0):.0f} |")
        by_model.setdefault(r["model"], []).append(m)
    for model, ms in by_model.items():
        means = [sum(m[k] for m in ms if m.get(k) is not None) / max(1, sum(m.get(k) is not None for m in ms)) for k in keys]
        lines.append(f"| **{LABELS.get(model, model)} mean** | {len(ms)} of 4 folds | " + " | ".join(f"**{v:.3f}**" for v in means) + " | | |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--readme", action="store_true")
    args = p.parse_args()
    text = table(load())
    print(text)
    if args.readme:
        readme = ROOT / "README.md"
        s = readme.read_text()
        s = re.sub(re.escape(START) + ".*?" + re.escape(END), START + "\n" + text + "\n" + END, s, flags=re.S)
        readme.write_text(s)


if __name__ == "__main__":
    main()
