"""End-to-end prediction throughput (read + sample + model) against model-only.

Converts a HER2+ section to a JPEG-tiled pyramidal OME-TIFF (cached in --workdir), lays
out Visium spots over it, and measures on the same spots:
  - model-only: forward passes on pre-sampled patches,
  - end-to-end: ``inference.predict`` (tile reads + sampling in background threads),
plus peak RSS. Prints a markdown table.

    python benchmarks/bench_inference.py [--spots 512] [--batch-size 64] [--precision fp32|bf16]
                                         [--compile]

``--compile`` uses the opt-in ``torch.compile`` forward (``napari_m2ort.compiled``) for
both passes; its one-time compile is timed separately and left out of the rates.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    import timm
    import torch

    import napari_m2ort  # noqa: F401
    from napari_m2ort.inference import forward_batch, predict
    from napari_m2ort.io.convert import convert_to_ome_tiff
    from napari_m2ort.io.slides import open_slide
    from napari_m2ort.model.weights import ModelCard
    from napari_m2ort.patches import sample_spots
    from napari_m2ort.progress import run_to_end
    from napari_m2ort.spots import layout_spots

    p = argparse.ArgumentParser()
    p.add_argument("--image", default=str(ROOT.parent / "shared/data/her2st/ST-imgs/C/C2/5714_HE_BT_C2.jpg"))
    p.add_argument("--workdir", default="/tmp/m2ort_bench")
    p.add_argument("--spots", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tif = work / "C2.ome.tif"
    if not tif.exists():
        convert_to_ome_tiff(args.image, tif, mpp=0.69)
    slide = open_slide(tif)
    h, w = slide.size_um
    spots = layout_spots((0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h), "visium")
    centers = spots.centers_um[: args.spots]
    torch.manual_seed(0)
    model = timm.create_model("m2ort_small", num_classes=250).eval()
    card = ModelCard(variant="m2ort_small", genes=[f"g{i}" for i in range(250)], mpp=0.69)
    dev = torch.device(args.device)
    from napari_m2ort.devices import resolve_precision

    amp = resolve_precision(args.precision, dev)
    model.to(dev)

    patches = sample_spots(slide, centers[: args.batch_size], 0.69).level1
    fwd, compile_s = model, float("nan")
    if args.compile:
        from napari_m2ort.compiled import compiled_forward, is_compiled

        fwd = compiled_forward(model.eval(), dev, amp, args.batch_size)
    t = time.perf_counter()
    forward_batch(fwd, patches, dev, amp)  # warm-up (and the compile)
    if args.compile:
        compile_s = time.perf_counter() - t
        assert is_compiled(fwd), "torch.compile failed"
    t = time.perf_counter()
    reps = max(1, len(centers) // args.batch_size)
    for _ in range(reps):
        forward_batch(fwd, patches, dev, amp)
    model_rate = reps * len(patches) / (time.perf_counter() - t)

    t = time.perf_counter()
    pred = run_to_end(
        predict(
            slide,
            centers,
            model,
            card,
            device=args.device,
            batch_size=args.batch_size,
            precision=args.precision,
            compile=args.compile,
        )
    )
    assert pred.info.get("compiled", False) == args.compile
    e2e = pred.n_done / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(0, len(centers), args.batch_size):
        sample_spots(slide, centers[i : i + args.batch_size], 0.69)
    sample_rate = len(centers) / (time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mode = args.precision + (f" + compile ({compile_s:.0f} s once)" if args.compile else "")
    print(
        "| slide | spots | batch | precision | model-only spots/s | sampling-only spots/s | end-to-end spots/s | end-to-end / model-only | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {tif.name} ({slide.shape[1]}×{slide.shape[0]}) | {len(centers)} | {args.batch_size} | {mode} | "
        f"{model_rate:.1f} | {sample_rate:.0f} | {e2e:.1f} | {e2e / model_rate:.2f} | {peak:.0f} |"
    )


if __name__ == "__main__":
    main()
