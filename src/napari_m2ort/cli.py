"""napari-m2ort: predict spatial gene expression from H&E slides, from the command line.

The same jobs as the napari widgets, with text progress. A problem with the input prints
one line (`napari-m2ort COMMAND: error: ...`) and exits with code 2; every value and output
path is checked before any work starts.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings

from .errors import M2ORTError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LAYOUTS = ("visium", "st", "custom")
# Names of the training recipe (checked against losses.LOSSES, augment.GEOMETRIES/STAINS,
# targets.PANEL_RULES and training.TARGET_NORMS by tests/test_cli.py: those modules import
# torch, --help must not).
LOSSES = ("mse", "mse_depth", "poisson", "nb")
GEOMETRIES = ("rotate", "dihedral", "flips", "none")
STAINS = ("rgb", "hed", "none")
PANEL_RULES = ("mean_log1p_cpm", "markers+mean_log1p_cpm")
TARGET_NORMS = ("none", "section_center", "section_z")
OVERWRITE_HELP = "replace an existing output (without it, an existing output is refused)"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (none for flags and unset options)."""

    def _get_help_string(self, action):
        if (
            action.default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
            or isinstance(action, argparse._StoreConstAction)  # flags say their default themselves
        ):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2, like every other input error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _tta_defaults():
    from .tta import DEFAULT_SMOOTH_UM, DEFAULT_TTA, TTA_MODES

    return DEFAULT_TTA, DEFAULT_SMOOTH_UM, tuple(TTA_MODES)


def _add_inference_opts(p):
    tta, smooth_um, modes = _tta_defaults()
    p.add_argument("--tta", default=tta, choices=modes,
                   help="test-time augmentation: average over flipped/rotated views of each patch "
                        "(their spread is the per-spot uncertainty)")  # fmt: skip
    p.add_argument("--smooth-um", type=float, default=smooth_um, metavar="SIGMA",
                   help="Gaussian smoothing of the predictions over neighbouring predicted spots, sigma in µm "
                        "(0 = off; smoothed outputs say so)")  # fmt: skip


def _add_model_opts(p, precision="auto", batch_size=64):
    p.add_argument("--model", default="bundled", help="'bundled' (the weights shipped) or a .safetensors checkpoint")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where the model runs; auto = CUDA, else MPS, else CPU")  # fmt: skip
    p.add_argument("--precision", default=precision, choices=PRECISIONS,
                   help="auto = bf16 on CUDA, fp16 on MPS, bf16 on CPUs with native bf16, else fp32")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=batch_size, help="patches per forward pass")


def _add_predict_opts(p):
    from .pipelines.checks import MAX_SPOTS

    p.add_argument("--region", metavar="X0,Y0,X1,Y1",
                   help="rectangle in µm of the slide (default: the whole slide); negative values are allowed")  # fmt: skip
    p.add_argument("--tissue", action="store_true", help="keep only spots on tissue")
    p.add_argument("--layout", default="visium", choices=LAYOUTS,
                   help="spot layout: visium (55 µm spots, 100 µm pitch), st (100 µm, 200 µm) or custom")  # fmt: skip
    p.add_argument("--pitch", type=float, metavar="UM", help="custom layout: centre-to-centre distance in µm")
    p.add_argument("--diameter", type=float, metavar="UM", help="custom layout: spot diameter in µm (default: pitch/2)")
    p.add_argument("--mpp", type=float, metavar="UM_PER_PX",
                   help="µm per pixel of the slide (default: from the file; needed for files without it)")  # fmt: skip
    p.add_argument("--max-spots", type=int, default=None, metavar="N",
                   help=f"refuse jobs of more spots than this (default: {MAX_SPOTS:,}; estimated before any work)")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="predict even on a slide more than 4x coarser than the model's resolution")  # fmt: skip
    _add_inference_opts(p)
    _add_model_opts(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_const", const="on", default="auto",
                   help="torch.compile the model: 17-39 s once, then ~1.3x faster in bf16 on CPU "
                        "(default: only for CPU bf16 jobs of 10,000+ spots)")  # fmt: skip
    g.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="never compile")


def _add_data_opts(p):
    g = p.add_argument_group("ST data (repeat --image/--counts/--spots once per section)")
    g.add_argument("--image", action="append", default=[], help="H&E image of a section")
    g.add_argument("--counts", action="append", default=[], help="legacy ST counts table (.tsv[.gz])")
    g.add_argument("--spots", action="append", default=[], help="legacy ST spot file (*_selection.tsv)")
    g.add_argument("--her2st", help="root of an almaan/her2st-layout folder")
    g.add_argument("--sections", help="comma-separated section names under --her2st (e.g. C2,C3)")
    g.add_argument("--visium", action="append", default=[], help="Space Ranger output folder")
    g.add_argument("--h5ad", action="append", default=[], help=".h5ad with obsm['spatial'] (pair with --image)")
    g.add_argument("--hest", metavar="DIR", help="root of HEST-1k data (st/, wsis/, metadata/)")
    g.add_argument("--samples", metavar="ID[,ID]", help="comma-separated HEST-1k sample ids under --hest")
    g.add_argument("--mpp", type=float, metavar="UM_PER_PX", help="override µm per pixel of the images")
    p.add_argument("--cache", default=None, metavar="DIR", help="folder for cached patches (reused by later runs)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="napari-m2ort", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help):
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=_Formatter)

    p = command("convert", "write a tiled, pyramidal, JPEG-compressed OME-TIFF of a slide image")
    p.add_argument("image", help="the slide image (TIFF, SVS, JPEG, PNG, ...)")
    p.add_argument("--out", required=True, help="the OME-TIFF to write (.ome.tif)")
    p.add_argument("--mpp", type=float, metavar="UM_PER_PX",
                   help="µm per pixel, for images without it (required then: the output states it as fact)")  # fmt: skip
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the tiles (1-100)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = command("predict", "predict expression at the spots of a slide into .h5ad, .csv or .zarr")
    p.add_argument("slide", help="the slide file")
    p.add_argument("--out", required=True, help="output file: .h5ad (AnnData), .csv or .zarr (SpatialData)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_predict_opts(p)

    p = command("batch", "predict many slides on a dask cluster, one .h5ad per slide")
    p.add_argument("slides", nargs="+", help="slide files")
    p.add_argument("--out", required=True,
                   help="output folder; slides whose output is complete are skipped on a re-run")  # fmt: skip
    p.add_argument("--scheduler", default="local", help="'local' (start workers here) or a scheduler address")
    p.add_argument("--workers", type=int, default=2, help="local worker processes")
    p.add_argument("--threads-per-worker", type=int, default=1, help="threads of each local worker")
    p.add_argument("--tile-spots", type=int, default=512, help="spots per task")
    _add_predict_opts(p)

    p = command("train", "train or fine-tune a model on measured ST sections")
    _add_data_opts(p)
    p.add_argument("--model", default="bundled",
                   help="start from: bundled | a checkpoint | m2ort_small|m2ort_base|m2ort_large (new) | "
                        "resnet18 (a baseline, not saved)")  # fmt: skip
    p.add_argument("--genes", default="model",
                   help="'model' (keep the model's panel), top:N (by --panel-rule), or a file with one gene per line")  # fmt: skip
    p.add_argument("--panel-rule", default=PANEL_RULES[0], choices=PANEL_RULES, help="how top:N chooses genes")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training spots")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    p.add_argument("--batch-size", type=int, default=96, help="spots per optimiser step")
    p.add_argument("--mode", default="full", choices=["full", "head"], help="train all weights, or the head only")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="learning rate: constant, or linear warmup then cosine to 0")  # fmt: skip
    p.add_argument("--warmup", type=float, default=0.0, help="warmup epochs (linear ramp of the lr)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled (AdamW) weight decay")
    p.add_argument("--loss", default="mse", choices=LOSSES,
                   help="mse on log1p CPM; mse_depth (spots weighted by depth/(depth+k)); poisson or nb "
                        "(count likelihoods with the library size as offset)")  # fmt: skip
    p.add_argument("--depth-k", type=float, default=1000.0, help="k of the mse_depth weight depth/(depth+k)")
    p.add_argument("--geometry", default="rotate", choices=GEOMETRIES,
                   help="augmentation: any-angle rotation, the 8 flips/quarter turns, flips only, or none")  # fmt: skip
    p.add_argument("--stain", default="rgb", choices=STAINS, help="colour augmentation: RGB gains or HED stain jitter")
    p.add_argument("--color-jitter", type=float, default=0.0, help="amplitude of the colour augmentation (0 = off)")
    p.add_argument("--ema", type=float, default=0.0, help="decay of a moving average of the weights (0 = off)")
    p.add_argument("--target-norm", default="none", choices=TARGET_NORMS,
                   help="take between-section differences out of the targets: none; section_center (common mean "
                        "profile); section_z (common mean and spread per gene, genes weighted equally)")  # fmt: skip
    p.add_argument("--target-smooth", type=float, default=0.0, metavar="UM",
                   help="Gaussian sigma in µm: train on targets averaged over neighbouring training spots (0 = off)")  # fmt: skip
    p.add_argument("--val", default="blocks", help="'blocks' (held-out spatial blocks), 'none', or a section name")
    p.add_argument("--train-mpp", type=float, default=None, metavar="UM_PER_PX",
                   help="µm/px the model works at (default: the model's, or 0.69 for a new one)")  # fmt: skip
    p.add_argument("--tied-kv", action="store_true", help="new M2ORT model: share key/value projections")
    p.add_argument("--drop-path", type=float, default=0.0,
                   help="new model: stochastic depth rate of its deepest block (0 = off)")  # fmt: skip
    p.add_argument(
        "--device", default="auto", choices=DEVICES, help="where training runs; auto = CUDA, else MPS, else CPU"
    )
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="training precision (autocast)")
    p.add_argument("--seed", type=int, default=0, help="random seed (split, sampling, augmentation)")
    p.add_argument("--out", required=True, help="output folder (model.safetensors, history.json)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = command("evaluate", "score a model on measured ST sections into metrics.json")
    _add_data_opts(p)
    _add_model_opts(p, precision="fp32")
    _add_inference_opts(p)
    p.add_argument("--out", required=True, help="the metrics file to write (.json)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = command("demo", "predict a region of the bundled sample in napari; write .h5ad and an overlay PNG")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--gene", default=None, help="gene to show (default: ERBB2 if in the panel)")
    p.add_argument("--spots", type=int, default=100, help="about how many spots to predict")
    p.add_argument(
        "--device", default="auto", choices=DEVICES, help="where the model runs; auto = CUDA, else MPS, else CPU"
    )
    p.add_argument("--model", default="bundled", help="'bundled' or a .safetensors checkpoint")
    p.add_argument("--compare", action="store_true",
                   help="predict at the sample's measured spots instead, and write compare.json (the scores "
                        "'evaluate' gives on the section) and compare.png (overlay, per-gene table, scatter)")  # fmt: skip
    _add_inference_opts(p)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parser


def _join_negative(argv: list) -> list:
    """``--region -5,0,100,100`` as ``--region=-5,0,100,100`` (argparse would take the
    value for an option)."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] == "--region" and re.match(r"^-[\d.]", out[i + 1] or ""):
            out[i : i + 2] = [f"--region={out[i + 1]}", None]
    return [a for a in out if a is not None]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(_join_negative(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return int(exc.code or 0)
    from .cli_console import clean_warnings

    try:
        with clean_warnings():
            import napari_m2ort

            napari_m2ort.load()  # torch before any Qt, M2ORT variants registered with timm
            return int(COMMANDS[args.command](args) or 0)
    except M2ORTError as exc:
        print(f"napari-m2ort {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-m2ort {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(job):
    from .cli_console import text_progress
    from .progress import run_to_end

    cb = text_progress()
    try:
        return run_to_end(job, cb)
    finally:
        cb.close()


# ------------------------------------------------------------------ commands


def cmd_convert(args) -> int:
    from .io.convert import convert_to_ome_tiff
    from .pipelines import checks

    checks.mpp(args.mpp)
    checks.number("JPEG quality (--quality)", args.quality, lo=1, hi=100, integer=True)
    out = checks.output_file(args.out, checks.SLIDE_SUFFIXES, args.overwrite, what="converted slide")
    t = time.perf_counter()
    out = convert_to_ome_tiff(args.image, out, mpp=args.mpp, quality=args.quality)
    print(f"wrote {out} in {time.perf_counter() - t:.1f} s")
    return 0


def _predict_request(args, slide):
    from .pipelines import PredictRequest, parse_region

    region = parse_region(args.region)
    return PredictRequest(
        slide=slide, model=args.model, regions=None if region is None else [region], layout=args.layout,
        pitch_um=args.pitch, diameter_um=args.diameter, tissue_only=args.tissue, mpp=args.mpp, device=args.device,
        precision=args.precision, batch_size=args.batch_size, compile=args.compile, tta=args.tta,
        smooth_um=args.smooth_um, max_spots=args.max_spots, force=args.force,
    )  # fmt: skip


def cmd_predict(args) -> int:
    from .io.slides import open_slide
    from .pipelines import check_prediction_output, checks, plan_slide, run_plan, write_prediction

    out = check_prediction_output(args.out, args.overwrite)
    checks.predict_request(_predict_request(args, args.slide))  # every number, before opening anything
    slide = open_slide(args.slide, mpp=args.mpp, quiet=True)
    if slide.mpp_source == "default":  # said once, here, in the command's own words
        warnings.warn(
            f"{args.slide} has no pixel size in its metadata: assuming {slide.mpp:g} µm/px. "
            "Predictions are only meaningful at the right scale: pass --mpp if that is wrong.",
            stacklevel=1,
        )
    try:
        request = _predict_request(args, slide)
        plan = _run(plan_slide(request))
        spots = plan.spots
        print(f"{slide.path.name}: {len(spots)} spots ({spots.layout}, {spots.diameter_um:g} µm)")
        result = _run(run_plan(plan, request))
        pred = result.prediction
        written = write_prediction(result, out, overwrite=args.overwrite)
    finally:
        slide.close()
    extra = f", TTA {request.tta}" if request.tta != "none" else ""
    extra += f", smoothed {request.smooth_um:g} µm" if request.smooth_um > 0 else ""
    print(
        f"wrote {written}: {pred.n_done} spots × {len(plan.card.genes)} genes, "
        f"{pred.info['spots_per_s']:.1f} spots/s on {pred.info['device']}"
        + (" (compiled)" if pred.info.get("compiled") else "")
        + extra
    )
    return 0


def cmd_batch(args) -> int:
    """0 if every slide succeeded or was complete already, else 1."""
    from .distributed import batch_predict

    summary = batch_predict(
        args.slides, args.out, model_path=args.model, region=args.region, tissue=args.tissue, layout=args.layout,
        pitch=args.pitch, diameter=args.diameter, mpp=args.mpp, device=args.device, precision=args.precision,
        batch_size=args.batch_size, tile_spots=args.tile_spots, scheduler=args.scheduler, workers=args.workers,
        threads_per_worker=args.threads_per_worker, compile=args.compile, tta=args.tta, smooth_um=args.smooth_um,
        max_spots=args.max_spots, force=args.force,
    )  # fmt: skip
    print(summary.table())
    return summary.exit_code


def load_sections(args) -> list:
    from .io import st
    from .pipelines import checks

    checks.mpp(args.mpp)
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
    if args.hest or args.samples:
        ids = [s.strip() for s in (args.samples or "").split(",") if s.strip()]
        if not (args.hest and ids):
            raise M2ORTError(
                "--hest needs --samples and --samples needs --hest, e.g. --hest DIR --samples TENX95,NCBI783"
            )
        sections += [st.read_hest(args.hest, i, mpp=args.mpp) for i in ids]
    for v in args.visium:
        sections.append(st.read_visium(v, mpp=args.mpp))
    if args.h5ad:
        images = args.image if not (args.counts or args.spots) else []
        if images and len(images) != len(args.h5ad):
            raise M2ORTError("Give one --image per --h5ad (or none, if the .h5ad carries its image).")
        for k, h in enumerate(args.h5ad):
            sections.append(st.read_h5ad(h, image=images[k] if images else None, mpp=args.mpp))
    if not sections:
        raise M2ORTError(
            "No ST data given: use --her2st/--sections, --hest/--samples, --image/--counts/--spots, --visium or --h5ad."
        )
    return sections


def _train_config(args):
    from .pipelines import checks
    from .training import TrainConfig

    cfg = TrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, mode=args.mode, device=args.device,
        precision=args.precision, seed=args.seed, color_jitter=args.color_jitter, geometry=args.geometry,
        stain=args.stain, loss=args.loss, depth_k=args.depth_k, ema=args.ema, schedule=args.schedule,
        warmup_epochs=args.warmup, weight_decay=args.weight_decay, drop_path=args.drop_path,
        target_norm=args.target_norm, target_smooth_um=args.target_smooth,
    )  # fmt: skip
    checks.train_config(cfg)
    checks.mpp(args.train_mpp, "Training resolution (--train-mpp)")
    return cfg


def cmd_train(args) -> int:
    from .pipelines import FineTuneRequest, checks, fine_tune, is_baseline, write_json

    cfg = _train_config(args)
    out = checks.output_folder(args.out, args.overwrite, holds=("model.safetensors", "history.json"))
    sections = load_sections(args)
    if is_baseline(args.model):
        print(f"{args.model} is an evaluation baseline: its weights are not saved, only history.json.")
    request = FineTuneRequest(
        sections, model=args.model, genes=args.genes, val=args.val, config=cfg, out_path=out / "model.safetensors",
        train_mpp=args.train_mpp, tied_kv=args.tied_kv, cache_dir=args.cache, panel_rule=args.panel_rule,
    )  # fmt: skip
    made = [d for d in (out, *out.parents) if not d.exists()]  # innermost first
    out.mkdir(parents=True, exist_ok=True)
    try:
        res = _run(fine_tune(request))
    except BaseException:
        for d in made:  # a refused or failed run leaves no empty folders behind
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    write_json(out / "history.json", res.history)
    last = res.history[-1]["train_loss"] if res.history else float("nan")
    print(f"best epoch {res.best_epoch}; training loss (mean over the last epoch's steps) {last:.4f}")
    print(section_table(res.best_metrics, res.fit))
    if res.checkpoint is not None:
        print(f"wrote {res.checkpoint} ({res.seconds:.0f} s)")
    return 0


def section_table(validation: dict, fit: dict) -> str:
    """PCC-gene per held-out section (validation) and per training section (fit)."""
    rows = [("section", "spots", "PCC-gene", "PCC-spot", "role")]
    for role, block in (("validation", validation or {}), ("fit (training spots)", fit or {})):
        for name, m in (block.get("per_section") or {}).items():
            rows.append((name, str(m.get("n_spots", "")), _f(m.get("pcc_gene_mean")), _f(m.get("pcc_spot_mean")), role))
        if block.get("per_section"):
            rows.append(("mean", str(block.get("n_spots", "")), _f(block.get("pcc_gene_mean")),
                         _f(block.get("pcc_spot_mean")), role))  # fmt: skip
    if len(rows) == 1:
        return "no per-section metrics (no validation, or training stopped early)"
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w[i]) if i in (0, 4) else c.rjust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def cmd_evaluate(args) -> int:
    from .pipelines import EvaluateRequest, checks, evaluate, write_json

    out = checks.output_file(args.out, checks.METRICS_SUFFIXES, args.overwrite, what="metrics file")
    request = EvaluateRequest(
        [], model=args.model, device=args.device, precision=args.precision, batch_size=args.batch_size,
        cache_dir=args.cache, tta=args.tta, smooth_um=args.smooth_um,
    )  # fmt: skip
    checks.inference_options(request)
    request.sections = load_sections(args)
    res = _run(evaluate(request))
    write_json(out, res)
    print(f"wrote {out}")
    shown = ("pcc_gene_mean", "pcc_gene_top50", "pcc_spot_mean", "pcc_spot_mean_baseline", "pcc_markers_mean",
             "n_spots", "n_genes", "tta", "smooth_um", "in_training_data")  # fmt: skip
    for k in shown:
        if k in res:
            v = res[k]
            print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, gene=args.gene, spots=args.spots, device=args.device, model=args.model,
                    overwrite=args.overwrite, compare=args.compare, tta=args.tta, smooth_um=args.smooth_um)  # fmt: skip


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
