"""Build the cross-validation tables from benchmarks/results/cv_*.json.

python benchmarks/cv_table.py            # print the markdown tables (the final recipe first)
python benchmarks/cv_table.py --readme   # also replace them in README.md between markers

The final-recipe table (tag FINAL_TAG) reads each fold's inference grid ("tta/smooth_um"
keys), its uncertainty check and its fit on the training spots; it works with any subset
of the four folds and says how many it has.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from napari_m2ort.targets import MARKERS
from napari_m2ort.tta import DEFAULT_SMOOTH_UM, DEFAULT_TTA

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- cv-table:start -->", "<!-- cv-table:end -->"
FINAL_START, FINAL_END = "<!-- cv-final:start -->", "<!-- cv-final:end -->"
FINAL_TAG = "_r2_markers_B4_dp2wd10"
FINAL_MODELS = ("m2ort_small", "resnet18")
FOLDS = ("C2", "C3", "C4", "C5")
DEFAULT_KEY = f"{DEFAULT_TTA}/{DEFAULT_SMOOTH_UM:g}"  # the shipped inference defaults
LABELS = {
    "m2ort_small": "M2ORT-S",
    "m2ort_base": "M2ORT-B",
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
    if rec.get("target_norm", "none") != "none":
        text += f", targets {rec['target_norm']}"
    if rec.get("target_smooth_um"):
        text += f", targets smoothed {rec['target_smooth_um']:g} µm"
    if rec.get("precision", "bf16") != "bf16":
        text += f", {rec['precision']}"
    extra = [s for s in rec.get("train_sections", []) if not s.startswith("C")]
    if extra:
        text += f", +{'+'.join(extra)}"
    if rec.get("seed"):
        text += f", seed {rec['seed']}"
    if str(rec.get("device", "cpu")).startswith("cuda"):
        text += ", GPU"  # the same recipe on another device is another run, not another fold
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


def fmt(v, digits: int = 3):
    return "–" if v is None else f"{v:.{digits}f}"


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


# ---------------------------------------------------------------- the final recipe


def mean(values):
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(vals) / len(vals) if vals else None


def tag_of(rec: dict) -> str:
    """The run's tag; old files lack the field, so it comes from cv_<model><tag>_<fold>.json."""
    if "tag" in rec:
        return rec["tag"] or ""
    stem = rec.get("_file", "")[3:-5]
    return stem[len(rec["model"]) : -len(rec["fold"]) - 1] if stem.startswith(rec["model"]) else ""


def grid(rec: dict, key: str) -> dict:
    """Metrics at one "tta/smooth_um" setting; a file without that grid entry has it only
    in "metrics" when those were measured at that setting (old files: none/0)."""
    inference = rec.get("inference") or {}
    if key in inference:
        return inference[key]
    m = rec.get("metrics") or {}
    return m if f"{m.get('tta', 'none')}/{float(m.get('smooth_um') or 0):g}" == key else {}


def uncertainty_key(rec: dict):
    """Where the TTA-spread check is read: dihedral at the shipped smoothing, else raw
    dihedral, else any key with TTA."""
    u = rec.get("uncertainty") or {}
    keys = (f"dihedral/{DEFAULT_SMOOTH_UM:g}", "dihedral/0", *sorted(k for k in u if not k.startswith("none/")))
    return next((k for k in keys if k in u), None)


def final_values(rec: dict) -> dict:
    """One fold's numbers for the final table and the model card."""
    per = (rec.get("fit") or {}).get("per_section") or {}
    at = grid(rec, DEFAULT_KEY)
    src = at if at.get("pcc_markers") else rec.get("metrics") or {}
    ukey = uncertainty_key(rec)
    return {
        "raw": grid(rec, "none/0").get("pcc_gene_mean"),
        "smoothed": grid(rec, "none/100").get("pcc_gene_mean"),
        "tta": grid(rec, "dihedral/0").get("pcc_gene_mean"),
        "tta_smoothed": grid(rec, "dihedral/100").get("pcc_gene_mean"),
        "defaults": at.get("pcc_gene_mean"),
        "markers_mean": src.get("pcc_markers_mean"),
        "markers": dict(src.get("pcc_markers") or {}),
        "uncertainty": ((rec.get("uncertainty") or {}).get(ukey) or {}).get("spearman_spot_gene"),
        "uncertainty_key": ukey,
        "fit_c": mean(v.get("pcc_gene_mean") for k, v in per.items() if k.startswith("C")),
        "fit_b4": mean(v.get("pcc_gene_mean") for k, v in per.items() if k.split(":")[0] == "B4"),
        "fit_sections": {k: v.get("pcc_gene_mean") for k, v in per.items()},
        "best_epoch": rec.get("best_epoch"),
        "seconds": rec.get("seconds"),
    }


NUMBERS = ("raw", "smoothed", "tta", "tta_smoothed", "defaults", "markers_mean", "uncertainty", "fit_c", "fit_b4")


def final_mean(values: list) -> dict:
    """Mean over folds of every number (a fold lacking one is left out of that mean)."""
    out = {k: mean(v.get(k) for v in values) for k in (*NUMBERS, "best_epoch", "seconds")}
    genes = list(dict.fromkeys(g for v in values for g in v["markers"]))
    out["markers"] = {g: mean(v["markers"].get(g) for v in values) for g in genes}
    return out


def final_rows(rows, tag: str = FINAL_TAG) -> dict:
    """model -> its runs with this tag, one per held-out fold, in fold order."""
    return {
        model: sorted((r for r in rows if r["model"] == model and tag_of(r) == tag), key=lambda r: r["fold"])
        for model in FINAL_MODELS
    }


def final_table(rows, tag: str = FINAL_TAG) -> str:
    runs = final_rows(rows, tag)
    ukeys = sorted({k for rs in runs.values() for r in rs if (k := uncertainty_key(r))}) or ["–"]
    cols = [
        "PCC-gene raw (none/0)",
        "smoothed σ100 µm (none/100)",
        "dihedral TTA (dihedral/0)",
        "TTA + smoothed (dihedral/100)",
        f"markers mean PCC (shipped defaults, {DEFAULT_KEY})",
        f"uncertainty Spearman spot-gene ({', '.join(ukeys)})",
        "fit: mean PCC-gene on C training sections' own spots",
        "fit on B4",
        "best epoch",
        "time (s)",
    ]
    keys = [k for k in NUMBERS if k != "defaults"]
    recipes = "; ".join(f"{LABELS[m]}: {recipe(rs[0])}" for m, rs in runs.items() if rs)
    lines = [
        f"Final recipe `{tag}` ({recipes or 'no fold yet'}); shipped inference defaults: "
        f"TTA {DEFAULT_TTA}, smoothing σ {DEFAULT_SMOOTH_UM:g} µm.",
        "",
        "| model | held-out section | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    means = []
    for model, rs in runs.items():
        values = [final_values(r) for r in rs]
        for r, v in zip(rs, values):
            lines.append(
                f"| {LABELS[model]} | {r['fold']} | "
                + " | ".join(fmt(v[k]) for k in keys)
                + f" | {v['best_epoch'] if v['best_epoch'] is not None else '–'} | {fmt(v['seconds'], 0)} |"
            )
        m = final_mean(values)
        folds = ", ".join(r["fold"] for r in rs)
        where = f"{len(rs)} of 4 folds" + (f" ({folds})" if 0 < len(rs) < 4 else "")
        cells = [bold(fmt(m[k])) for k in keys] + [bold(fmt(m["best_epoch"], 1)), bold(fmt(m["seconds"], 0))]
        means.append(f"| **{LABELS[model]} mean** | {where} | " + " | ".join(cells) + " |")
    return "\n".join(lines + means)


def marker_table(rows, tag: str = FINAL_TAG) -> str:
    """Mean over folds of each marker's PCC at the shipped inference defaults."""
    runs = final_rows(rows, tag)
    means = {m: final_mean([final_values(r) for r in rs])["markers"] for m, rs in runs.items()}
    genes = list(dict.fromkeys([*MARKERS, *(g for ms in means.values() for g in ms)]))
    head = [f"{LABELS[m]} ({len(rs)} of 4 folds)" for m, rs in runs.items()]
    lines = [
        f"Marker genes: PCC per gene at the shipped defaults ({DEFAULT_KEY}), mean over held-out folds:",
        "",
        "| gene | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(head),
    ]
    lines += [f"| {g} | " + " | ".join(fmt(means[m].get(g)) for m in runs) + " |" for g in genes]
    mm = [mean(ms.values()) for ms in means.values()]
    lines.append("| **mean** | " + " | ".join(bold(fmt(v)) for v in mm) + " |")
    return "\n".join(lines)


SEED_CHECK = (
    (FINAL_TAG, "final: drop path 0.2, weight decay 0.1"),
    ("_r2_markers_B4", "the same without them (release 4)"),
)
SEEDS_START, SEEDS_END = "<!-- cv-seeds:start -->", "<!-- cv-seeds:end -->"


def seed_table(rows, model: str = "m2ort_small") -> str:
    """PCC-gene at the shipped defaults per seed (CPU runs; seed 0 has no suffix, seed k
    the suffix _sk), and the mean over seeds: whether a recipe change beats seed noise."""
    folds = ["C2", "C3", "C4", "C5"]
    lines = [
        f"| {LABELS[model]} recipe | seed | "
        + " | ".join(folds)
        + f" | mean ({DEFAULT_KEY}) | fit on C training spots |",
        "|---|---|" + "---|" * (len(folds) + 2),
    ]
    for tag, words in SEED_CHECK:
        per_seed = []
        for seed in range(10):
            t = tag if seed == 0 else f"{tag}_s{seed}"
            runs = {r["fold"]: final_values(r) for r in rows if r["model"] == model and tag_of(r) == t}
            if runs:
                per_seed.append((seed, runs))
        for seed, runs in per_seed:
            cells = [fmt(runs[f]["defaults"]) if f in runs else "–" for f in folds]
            m = mean(runs[f]["defaults"] for f in folds if f in runs) if len(runs) == 4 else None
            fit = mean(runs[f]["fit_c"] for f in runs)
            lines.append(f"| {words} | {seed} | " + " | ".join(cells) + f" | {fmt(m)} | {fmt(fit)} |")
        if len(per_seed) > 1:
            both = [f for f in folds if all(f in r for _, r in per_seed)]
            cells = [fmt(mean(r[f]["defaults"] for _, r in per_seed)) if f in both else "–" for f in folds]
            m = mean(mean(r[f]["defaults"] for _, r in per_seed) for f in both) if len(both) == 4 else None
            fit = mean(r[f]["fit_c"] for _, r in per_seed for f in r)
            lines.append(
                f"| {words} | **mean of {len(per_seed)}** | " + " | ".join(cells) + f" | {bold(fmt(m))} | {fmt(fit)} |"
            )
    return "\n".join(lines)


def bold(text: str) -> str:
    return text if text == "–" else f"**{text}**"


def final_tables(rows) -> str:
    return final_table(rows) + "\n\n" + marker_table(rows)


def replace_between(text: str, start: str, end: str, body: str) -> str:
    """Put body between the markers (the text is unchanged when they are absent)."""
    pattern = re.escape(start) + ".*?" + re.escape(end)
    return re.sub(pattern, lambda _: start + "\n" + body + "\n" + end, text, flags=re.S)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--readme", action="store_true")
    args = p.parse_args()
    rows = load()
    final, text, seeds = final_tables(rows), tables(rows), seed_table(rows)
    print(final + "\n\n" + seeds + "\n\n" + text)
    if args.readme:
        readme = ROOT / "README.md"
        s = replace_between(readme.read_text(), FINAL_START, FINAL_END, final)
        s = replace_between(s, SEEDS_START, SEEDS_END, seeds)
        readme.write_text(replace_between(s, START, END, text))


if __name__ == "__main__":
    main()
