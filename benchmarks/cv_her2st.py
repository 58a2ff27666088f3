"""Leave-one-section-out cross-validation on the patient-C HER2+ sections (C2–C5).

For each fold: the gene panel is chosen on the three training sections only (top 250
by mean normalised expression), the model trains on them with spatial-block validation
for epoch selection, and all metrics are measured on the held-out section.  Each
(model, fold) result is written to benchmarks/results/cv_<model>_<fold>.json as soon as
it finishes, with the command, seed and time, so an interrupted run loses nothing and a
later run skips what is done.  ``cv_table.py`` builds the README table from those files.

    python benchmarks/cv_her2st.py --models m2ort_small,resnet18,mean --folds C2,C3,C4,C5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ["C2", "C3", "C4", "C5"]


INFERENCE_GRID = [
    ("none", 0.0),
    ("none", 100.0),
    ("none", 150.0),
    ("none", 200.0),
    ("flips", 0.0),
    ("dihedral", 0.0),
    ("dihedral", 100.0),
    ("dihedral", 150.0),
    ("dihedral", 200.0),
]


def _summary(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "per_gene" and not k.startswith("_")}


def inference_grid(model, section, train_mean, precision="fp32", device="cpu") -> tuple[dict, dict, np.ndarray]:
    """Held-out metrics for each (tta, smooth_um) pair, how well the TTA spread ranks the
    errors (Spearman of uncertainty vs absolute error), and the raw predictions (no TTA,
    no smoothing) that ``--save-pred`` keeps for ensembles."""
    from scipy.stats import spearmanr

    from napari_m2ort.evaluation import predict_cached
    from napari_m2ort.metrics import evaluate
    from napari_m2ort.tta import smooth

    raw = {}
    for tta in sorted({t for t, _ in INFERENCE_GRID}):
        raw[tta] = predict_cached(model, section.level1, device, precision, 64, tta, with_spread=True)
    grid = {}
    keep = np.array([g not in set(section.genes_missing) for g in section.genes])
    genes = [g for g, k in zip(section.genes, keep) if k]
    for tta, sm in INFERENCE_GRID:
        p = raw[tta][0]
        if sm > 0:
            p = smooth(p, section.centers_um, sm)
        m = evaluate(p[:, keep], section.y[:, keep], genes, train_mean=np.asarray(train_mean)[keep])
        grid[f"{tta}/{sm:g}"] = _summary(m)
    unc = {}
    for tta in ("flips", "dihedral"):
        for sm in (0.0, 150.0):
            p, sd = raw[tta]
            if sm > 0:
                p = smooth(p, section.centers_um, sm)
            err = np.abs(p - section.y)[:, keep]
            sd = sd[:, keep]
            r_all = spearmanr(sd.ravel(), err.ravel())[0]
            r_spot = spearmanr(sd.mean(1), err.mean(1))[0]
            unc[f"{tta}/{sm:g}"] = {"spearman_spot_gene": float(r_all), "spearman_spot_mean": float(r_spot)}
    return grid, unc, raw["none"][0]


def main(argv=None):
    import torch

    import napari_m2ort  # noqa: F401
    from napari_m2ort.evaluation import evaluate_cached
    from napari_m2ort.io.st import read_her2st
    from napari_m2ort.progress import run_to_end
    from napari_m2ort.targets import PANEL_RULES, select_panel
    from napari_m2ort.train_setup import build_model, new_card
    from napari_m2ort.training import TARGET_NORMS, TrainConfig, prepare_section, spatial_block_split, train

    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "her2st"))
    p.add_argument("--models", default="m2ort_small,resnet18,mean")
    p.add_argument("--folds", default=",".join(SECTIONS))
    p.add_argument("--extra-train", default="", help="sections added to every fold's training set, e.g. B4")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--color-jitter", type=float, default=0.0)
    p.add_argument("--stain", default="rgb", choices=["rgb", "hed", "none"])
    p.add_argument("--geometry", default="rotate", choices=["rotate", "dihedral", "flips", "none"])
    p.add_argument("--loss", default="mse", choices=["mse", "mse_depth", "poisson", "nb"])
    p.add_argument("--depth-k", type=float, default=1000.0)
    p.add_argument("--ema", type=float, default=0.0)
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup", type=float, default=0.0, help="warmup epochs")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--tied-kv", action="store_true")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--target-norm", default="none", choices=list(TARGET_NORMS))
    p.add_argument("--target-smooth", type=float, default=0.0, help="sigma (um) of training-target smoothing")
    p.add_argument("--n-genes", type=int, default=250)
    p.add_argument("--panel-rule", default="mean_log1p_cpm", choices=sorted(PANEL_RULES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mpp", type=float, default=0.69)
    p.add_argument("--tag", default="", help="suffix for result files (ablations)")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "patches"))
    p.add_argument("--force", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps: training and evaluation")
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON (and .npz) results")
    p.add_argument(
        "--save-pred", action="store_true", help="also write the held-out raw predictions (.npz), for ensembles"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 2)))

    extra = [s for s in args.extra_train.split(",") if s]
    names = SECTIONS + [s for s in extra if s not in SECTIONS]
    sections = {s: read_her2st(args.data, s) for s in names}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for fold in args.folds.split(","):
        train_names = [s for s in SECTIONS if s != fold] + [s for s in extra if s != fold]
        genes = list(select_panel([sections[s].adata for s in train_names], n=args.n_genes, rule=args.panel_rule))
        cached = {
            s: run_to_end(
                prepare_section(sections[s], genes, args.mpp, cache_dir=args.cache, allow_missing=(s == fold))
            )
            for s in names
        }
        trains, vals = [], []
        for s in train_names:
            m = spatial_block_split(cached[s].centers_um, seed=args.seed)
            trains.append(cached[s].subset(~m, ":train"))
            vals.append(cached[s].subset(m, ":val"))
        train_mean = np.concatenate([c.y for c in trains]).mean(0)
        for model_name in args.models.split(","):
            out = results / f"cv_{model_name}{args.tag}_{fold}.json"
            if out.exists() and not args.force:
                print(f"skip {out.name} (done)")
                continue
            t0 = time.time()
            history, fit = [], {}
            if model_name == "mean":
                from napari_m2ort.model.baselines import MeanPredictor

                model = MeanPredictor(torch.from_numpy(train_mean))
                best_epoch = 0
            else:
                torch.manual_seed(args.seed)
                model = build_model(model_name, len(genes), tied_kv=args.tied_kv, drop_path_rate=args.drop_path)
                card = new_card(model_name, genes, args.mpp, ",".join(train_names), rule=PANEL_RULES[args.panel_rule])
                cfg = TrainConfig(
                    epochs=args.epochs,
                    lr=args.lr,
                    batch_size=args.batch_size,
                    device=args.device,
                    precision=args.precision,
                    seed=args.seed,
                    color_jitter=args.color_jitter,
                    schedule=args.schedule,
                    warmup_epochs=args.warmup,
                    weight_decay=args.weight_decay,
                    geometry=args.geometry,
                    stain=args.stain,
                    loss=args.loss,
                    depth_k=args.depth_k,
                    ema=args.ema,
                    drop_path=args.drop_path,
                    target_norm=args.target_norm,
                    target_smooth_um=args.target_smooth,
                )

                def report(ev, model_name=model_name, fold=fold):
                    if ev.stage == "epoch":
                        print(
                            f"[{model_name}{args.tag} {fold}] {ev.message} ({ev.data.get('epoch_seconds', 0):.0f} s)",
                            flush=True,
                        )

                res = run_to_end(train(model, card, trains, vals, cfg), report)
                model, history, best_epoch, fit = res.model, res.history, res.best_epoch, res.fit
            metrics = evaluate_cached(model, [cached[fold]], train_mean, args.device, "fp32")
            grid, unc, raw_pred = (
                inference_grid(model, cached[fold], train_mean, device=args.device)
                if model_name != "mean"
                else ({}, {}, None)
            )
            if args.save_pred and raw_pred is not None:
                np.savez_compressed(
                    out.with_suffix(".pred.npz"),
                    pred=raw_pred.astype(np.float16),
                    genes=np.array(genes),
                    train_mean=np.asarray(train_mean, np.float32),
                )
            record = {
                "model": model_name,
                "tag": args.tag,
                "fold": fold,
                "train_sections": train_names,
                "test_section": fold,
                "best_epoch": best_epoch,
                "seconds": round(time.time() - t0, 1),
                "command": "python benchmarks/cv_her2st.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "seed": args.seed,
                "epochs": args.epochs,
                "lr": args.lr,
                "batch_size": args.batch_size,
                "precision": args.precision,
                "color_jitter": args.color_jitter,
                "stain": args.stain,
                "geometry": args.geometry,
                "loss": args.loss,
                "depth_k": args.depth_k,
                "ema": args.ema,
                "schedule": args.schedule,
                "warmup_epochs": args.warmup,
                "weight_decay": args.weight_decay,
                "tied_kv": args.tied_kv,
                "drop_path_rate": args.drop_path,
                "target_norm": args.target_norm,
                "target_smooth_um": args.target_smooth,
                "gene_panel": PANEL_RULES[args.panel_rule] + " (on the training sections)",
                "validation": "held-out spatial blocks of each training section; score = mean over sections "
                "of each section's own PCC-gene"
                if args.tag
                else "held-out blocks, pooled",
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
                + (f", {torch.cuda.get_device_name()}" if str(args.device).startswith("cuda") else ""),
                "device": args.device,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "metrics": _summary(metrics),
                "inference": grid,
                "uncertainty": unc,
                "fit": fit,
                "history": history,
            }
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2, default=float))
            os.replace(tmp, out)
            m = record["metrics"]
            print(
                f"== {model_name}{args.tag} {fold}: PCC-gene {m['pcc_gene_mean']:.3f} top50 {m['pcc_gene_top50']:.3f} "
                f"markers {m.get('pcc_markers_mean') or 0:.3f} "
                f"PCC-spot {m['pcc_spot_mean']:.3f} (mean baseline {m['pcc_spot_mean_baseline']:.3f}) "
                f"RMSE {m['rmse_mean']:.3f} [{record['seconds']:.0f} s]",
                flush=True,
            )
            for k, v in grid.items():
                print(
                    f"   {k:>14}: PCC-gene {v['pcc_gene_mean']:.3f} markers {v.get('pcc_markers_mean') or 0:.3f}",
                    flush=True,
                )
            if fit:
                print(
                    "   fit (training spots): "
                    + ", ".join(f"{k} {v['pcc_gene_mean']:.3f}" for k, v in fit["per_section"].items()),
                    flush=True,
                )


if __name__ == "__main__":
    main()
