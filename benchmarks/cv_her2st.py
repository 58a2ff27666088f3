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


def main(argv=None):
    import napari_m2ort  # noqa: F401
    import torch

    from napari_m2ort.io.st import read_her2st
    from napari_m2ort.progress import run_to_end
    from napari_m2ort.targets import PANEL_RULE, select_panel
    from napari_m2ort.train_setup import build_model, new_card
    from napari_m2ort.training import TrainConfig, evaluate_cached, prepare_section, spatial_block_split, train

    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "her2st"))
    p.add_argument("--models", default="m2ort_small,resnet18,mean")
    p.add_argument("--folds", default=",".join(SECTIONS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--color-jitter", type=float, default=0.0)
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup", type=float, default=0.0, help="warmup epochs")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--tied-kv", action="store_true")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--n-genes", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mpp", type=float, default=0.69)
    p.add_argument("--tag", default="", help="suffix for result files (ablations)")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "patches"))
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 2)))

    sections = {s: read_her2st(args.data, s) for s in SECTIONS}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for fold in args.folds.split(","):
        train_names = [s for s in SECTIONS if s != fold]
        genes = list(select_panel([sections[s].adata for s in train_names], n=args.n_genes))
        cached = {s: run_to_end(prepare_section(sections[s], genes, args.mpp, cache_dir=args.cache, allow_missing=(s == fold)))
                  for s in SECTIONS}
        trains, vals = [], []
        for s in train_names:
            m = spatial_block_split(cached[s].centers_um, seed=args.seed)
            trains.append(cached[s].subset(~m, ":train"))
            vals.append(cached[s].subset(m, ":val"))
        train_mean = np.concatenate([c.y for c in trains]).mean(0)
        for model_name in args.models.split(","):
            out = RESULTS / f"cv_{model_name}{args.tag}_{fold}.json"
            if out.exists() and not args.force:
                print(f"skip {out.name} (done)")
                continue
            t0 = time.time()
            history = []
            if model_name == "mean":
                from napari_m2ort.model.baselines import MeanPredictor

                model = MeanPredictor(torch.from_numpy(train_mean))
                best_epoch = 0
            else:
                torch.manual_seed(args.seed)
                model = build_model(model_name, len(genes), tied_kv=args.tied_kv, drop_path_rate=args.drop_path)
                card = new_card(model_name, genes, args.mpp, ",".join(train_names), rule=PANEL_RULE)
                cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device="cpu",
                                  precision=args.precision, seed=args.seed, color_jitter=args.color_jitter,
                                  schedule=args.schedule, warmup_epochs=args.warmup, weight_decay=args.weight_decay)

                def report(ev):
                    if ev.stage == "epoch":
                        print(f"[{model_name} {fold}] {ev.message} ({ev.data.get('epoch_seconds', 0):.0f} s)", flush=True)

                res = run_to_end(train(model, card, trains, vals, cfg), report)
                model, history, best_epoch = res.model, res.history, res.best_epoch
            metrics = evaluate_cached(model, [cached[fold]], train_mean, "cpu", "fp32")
            record = {
                "model": model_name, "tag": args.tag, "fold": fold, "train_sections": train_names, "test_section": fold,
                "best_epoch": best_epoch, "seconds": round(time.time() - t0, 1),
                "command": "python benchmarks/cv_her2st.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "seed": args.seed, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "precision": args.precision, "color_jitter": args.color_jitter,
                "schedule": args.schedule, "warmup_epochs": args.warmup, "weight_decay": args.weight_decay,
                "tied_kv": args.tied_kv, "drop_path_rate": args.drop_path, "gene_panel": "top 250 by mean log1p-CPM on training sections",
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "metrics": {k: v for k, v in metrics.items() if k != "per_gene"},
                "history": history,
            }
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2, default=float))
            os.replace(tmp, out)
            m = record["metrics"]
            print(f"== {model_name} {fold}: PCC-gene {m['pcc_gene_mean']:.3f} top50 {m['pcc_gene_top50']:.3f} "
                  f"PCC-spot {m['pcc_spot_mean']:.3f} (mean baseline {m['pcc_spot_mean_baseline']:.3f}) "
                  f"RMSE {m['rmse_mean']:.3f} [{record['seconds']:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
