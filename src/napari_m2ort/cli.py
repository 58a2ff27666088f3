"""The headless front door: the same core jobs as the widgets, with text progress.

Errors the user can fix (``M2ORTError``) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import M2ORTError


def _add_model_opts(p):
    p.add_argument("--model", default="bundled", help="'bundled' or a .safetensors checkpoint")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", help="auto|fp32|bf16|fp16")
    p.add_argument("--batch-size", type=int, default=64)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--compile",
        dest="compile",
        action="store_const",
        const="on",
        default="auto",
        help="torch.compile the model: 17-39 s once, then ~1.3x faster in bf16 on CPU "
        "(default: only for CPU bf16 jobs of 10,000+ spots)",
    )
    g.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="never compile")


def _add_region_opts(p):
    p.add_argument("--region", help="x0,y0,x1,y1 in µm (default: the whole slide)")
    p.add_argument("--tissue", action="store_true", help="keep only spots on tissue")
    p.add_argument("--layout", default="visium", choices=["visium", "st", "custom"])
    p.add_argument("--pitch", type=float, help="custom layout: centre-to-centre distance in µm")
    p.add_argument("--diameter", type=float, help="custom layout: spot diameter in µm")
    p.add_argument("--mpp", type=float, help="µm per pixel, for files without a pixel size")


def _add_data_opts(p):
    g = p.add_argument_group("ST data (repeat --image/--counts/--spots once per section)")
    g.add_argument("--image", action="append", default=[], help="H&E image of a section")
    g.add_argument("--counts", action="append", default=[], help="legacy ST counts table (.tsv[.gz])")
    g.add_argument("--spots", action="append", default=[], help="legacy ST spot file (*_selection.tsv)")
    g.add_argument("--her2st", help="root of an almaan/her2st-layout folder")
    g.add_argument("--sections", help="comma-separated section names under --her2st (e.g. C2,C3)")
    g.add_argument("--visium", action="append", default=[], help="Space Ranger output folder")
    g.add_argument("--h5ad", action="append", default=[], help=".h5ad with obsm['spatial'] (pair with --image)")
    g.add_argument("--mpp", type=float, help="override µm per pixel of the images")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-m2ort", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="write a tiled, pyramidal, JPEG-compressed OME-TIFF")
    p.add_argument("image")
    p.add_argument("--out", required=True)
    p.add_argument("--mpp", type=float)
    p.add_argument("--quality", type=int, default=90)

    p = sub.add_parser("predict", help="predict expression over a slide into an .h5ad")
    p.add_argument("slide")
    p.add_argument("--out", required=True)
    _add_region_opts(p)
    _add_model_opts(p)

    p = sub.add_parser("batch", help="predict many slides on dask.distributed")
    p.add_argument("slides", nargs="+")
    p.add_argument("--out", required=True, help="output folder (one .h5ad per slide)")
    p.add_argument("--scheduler", default="local", help="'local' or a scheduler address")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--tile-spots", type=int, default=512, help="spots per task")
    _add_region_opts(p)
    _add_model_opts(p)

    p = sub.add_parser("train", help="train or fine-tune on ST sections")
    _add_data_opts(p)
    p.add_argument(
        "--model", default="bundled", help="bundled | checkpoint path | m2ort_small|base|large | resnet18 (baseline)"
    )
    p.add_argument(
        "--genes", default="model", help="'model' (keep the model's panel), top:N, or a file with one gene per line"
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--mode", default="full", choices=["full", "head"])
    p.add_argument(
        "--schedule",
        default="constant",
        choices=["constant", "cosine"],
        help="learning rate: constant (the spec's reference) or linear warmup then cosine to 0",
    )
    p.add_argument("--warmup", type=float, default=0.0, help="warmup epochs (linear ramp of the lr)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled (AdamW) weight decay")
    p.add_argument("--val", default="blocks", help="'blocks' (held-out spatial blocks), 'none', or a section name")
    p.add_argument(
        "--train-mpp", type=float, default=None, help="µm/px the model works at (default: the model's, or 0.69)"
    )
    p.add_argument("--tied-kv", action="store_true")
    p.add_argument("--color-jitter", type=float, default=0.0)
    p.add_argument("--no-rotate", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="folder for cached patches")
    p.add_argument("--out", required=True, help="output folder (model.safetensors, history.json)")

    p = sub.add_parser("evaluate", help="held-out metrics of a model on ST sections")
    _add_data_opts(p)
    p.add_argument("--model", default="bundled")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--cache", default=None)
    p.add_argument("--out", required=True, help="metrics.json")

    p = sub.add_parser("demo", help="predict a region of the bundled sample; write .h5ad and an overlay PNG")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--gene", default=None, help="gene to show (default: ERBB2 if in the panel)")
    p.add_argument("--spots", type=int, default=100, help="about how many spots to predict")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="bundled", help="'bundled' or a .safetensors checkpoint")
    return parser


def main(argv=None) -> int:
    import napari_m2ort  # noqa: F401  (torch first, timm registration)

    args = build_parser().parse_args(argv)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except M2ORTError as exc:
        print(f"napari-m2ort {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-m2ort {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(job, label=""):
    from .progress import run_to_end, text_progress

    cb = text_progress(label)
    try:
        return run_to_end(job, cb)
    finally:
        cb.close()


# ------------------------------------------------------------------ commands


def cmd_convert(args) -> int:
    from .io.convert import convert_to_ome_tiff

    t = time.perf_counter()
    out = convert_to_ome_tiff(args.image, args.out, mpp=args.mpp, quality=args.quality)
    print(f"wrote {out} in {time.perf_counter() - t:.1f} s")
    return 0


def _predict_request(args, slide):
    from .pipelines import PredictRequest, parse_region

    region = parse_region(args.region)
    return PredictRequest(
        slide=slide,
        model=args.model,
        regions=None if region is None else [region],
        layout=args.layout,
        pitch_um=args.pitch,
        diameter_um=args.diameter,
        tissue_only=args.tissue,
        mpp=args.mpp,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        compile=args.compile,
    )


def cmd_predict(args) -> int:
    from .io.export import write_h5ad
    from .io.slides import open_slide
    from .pipelines import plan_slide, run_plan
    from .progress import run_to_end

    slide = open_slide(args.slide, mpp=args.mpp)
    try:
        request = _predict_request(args, slide)
        plan = run_to_end(plan_slide(request))
        spots, card = plan.spots, plan.card
        print(f"{slide.path.name}: {len(spots)} spots ({spots.layout}, {spots.diameter_um:g} µm)")
        result = _run(run_plan(plan, request))
    finally:
        slide.close()
    pred = result.prediction
    out = write_h5ad(result.to_anndata(), args.out)
    print(
        f"wrote {out}: {pred.n_done} spots × {len(card.genes)} genes, "
        f"{pred.info['spots_per_s']:.1f} spots/s on {pred.info['device']}"
        + (" (compiled)" if pred.info.get("compiled") else "")
    )
    return 0


def cmd_batch(args) -> int:
    """0 if every slide succeeded or was complete already, else 1."""
    from .distributed import batch_predict

    summary = batch_predict(
        args.slides,
        args.out,
        model_path=args.model,
        region=args.region,
        tissue=args.tissue,
        layout=args.layout,
        pitch=args.pitch,
        diameter=args.diameter,
        mpp=args.mpp,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        tile_spots=args.tile_spots,
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        compile=args.compile,
    )
    print(summary.table())
    return summary.exit_code


def load_sections(args) -> list:
    from .io import st

    sections = []
    if args.her2st:
        names = [s.strip() for s in (args.sections or "").split(",") if s.strip()]
        if not names:
            raise M2ORTError("--her2st needs --sections, e.g. --sections C2,C3,C4")
        sections += [st.read_her2st(args.her2st, n, mpp=args.mpp) for n in names]
    if args.counts or args.spots:
        if not (len(args.image) == len(args.counts) == len(args.spots)):
            raise M2ORTError("Give one --image, --counts and --spots per legacy ST section (in the same order).")
        sections += [st.read_legacy_st(i, c, s, mpp=args.mpp) for i, c, s in zip(args.image, args.counts, args.spots)]
    for v in args.visium:
        sections.append(st.read_visium(v, mpp=args.mpp))
    if args.h5ad:
        images = args.image if not (args.counts or args.spots) else []
        if images and len(images) != len(args.h5ad):
            raise M2ORTError("Give one --image per --h5ad (or none, if the .h5ad carries its image).")
        for k, h in enumerate(args.h5ad):
            sections.append(st.read_h5ad(h, image=images[k] if images else None, mpp=args.mpp))
    if not sections:
        raise M2ORTError("No ST data given: use --her2st/--sections, --image/--counts/--spots, --visium or --h5ad.")
    return sections


def cmd_train(args) -> int:
    from .io.export import atomic_write_text
    from .pipelines import FineTuneRequest, fine_tune, is_baseline
    from .training import TrainConfig

    sections = load_sections(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        mode=args.mode,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
        color_jitter=args.color_jitter,
        rotate=not args.no_rotate,
        schedule=args.schedule,
        warmup_epochs=args.warmup,
        weight_decay=args.weight_decay,
    )
    if is_baseline(args.model):
        print(f"{args.model} is an evaluation baseline: its weights are not saved, only history.json.")
    request = FineTuneRequest(
        sections,
        model=args.model,
        genes=args.genes,
        val=args.val,
        config=cfg,
        out_path=out / "model.safetensors",
        train_mpp=args.train_mpp,
        tied_kv=args.tied_kv,
        cache_dir=args.cache,
    )
    res = _run(fine_tune(request))
    atomic_write_text(out / "history.json", json.dumps(res.history, indent=2, default=float))
    print(f"best epoch {res.best_epoch}: {json.dumps(res.best_metrics, default=float)}")
    if res.checkpoint is not None:
        print(f"wrote {res.checkpoint} ({res.seconds:.0f} s)")
    return 0


def cmd_evaluate(args) -> int:
    from .io.export import atomic_write_text
    from .pipelines import EvaluateRequest, evaluate

    sections = load_sections(args)
    res = _run(
        evaluate(
            EvaluateRequest(
                sections, model=args.model, device=args.device, precision=args.precision, cache_dir=args.cache
            )
        )
    )
    atomic_write_text(args.out, json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "per_gene"}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, gene=args.gene, spots=args.spots, device=args.device, model=args.model)


COMMANDS = {
    "convert": cmd_convert,
    "predict": cmd_predict,
    "batch": cmd_batch,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
}

if __name__ == "__main__":
    sys.exit(main())
