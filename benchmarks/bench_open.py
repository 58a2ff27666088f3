"""Open-time benchmark: how fast and how cheaply does ``open_slide`` open big slides?

Makes (or reuses from ``--workdir``) a 100,000 x 100,000 px JPEG-tiled pyramidal
OME-TIFF, then measures, each in a fresh Python process so caches and imports don't
leak between rows: the time of ``open_slide`` (+ ``layer_data``), the resident memory it
adds (VmRSS from /proc, so psutil is not needed), and the time to read a 1024 x 1024
region at level 0 and at the lowest level. The same for a HER2+ JPEG (flat, 92 MP).
Targets: open < 1 s and < 200 MB added memory.

    python benchmarks/bench_open.py [--workdir /tmp/m2ort_bench] [--size 100000]

The OS page cache is not dropped (that needs root), so file reads are warm after the
first run; open touches only headers either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JPEG = ROOT.parent / "shared/data/her2st/ST-imgs/C/C2/5714_HE_BT_C2.jpg"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(path: str, mpp: float | None) -> dict:
    """Runs in the child process."""
    # import everything first: module import is a one-off cost, not the cost of opening
    import dask.array  # noqa: F401
    import imagecodecs  # noqa: F401
    import PIL.Image  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    from napari_m2ort.io.slides import open_slide

    result: dict = {}
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    slide = open_slide(path, mpp=mpp)
    result["open_s"] = time.perf_counter() - t0
    layers = slide.layer_data()
    result["open_layer_s"] = time.perf_counter() - t0
    result["open_mb"] = (_status_kb("VmRSS") - rss0) / 1024
    result["shape"] = slide.shape
    result["levels"] = len(slide.levels)
    result["mpp"] = slide.mpp
    result["mpp_source"] = slide.mpp_source
    del layers

    last = len(slide.levels) - 1
    lh, lw = slide.levels[last].shape[:2]
    t0 = time.perf_counter()
    slide.read_region(max(0, (lw - 1024) // 2), max(0, (lh - 1024) // 2), 1024, 1024, last)
    result["read_low_s"] = time.perf_counter() - t0
    result["after_low_mb"] = (_status_kb("VmRSS") - rss0) / 1024

    h, w = slide.shape
    t0 = time.perf_counter()
    slide.read_region(w // 2 - 512 + 100, h // 2 - 512 + 100, 1024, 1024, 0)
    result["read0_s"] = time.perf_counter() - t0
    result["after_read0_mb"] = (_status_kb("VmRSS") - rss0) / 1024
    result["peak_mb"] = (_status_kb("VmHWM") - rss0) / 1024
    slide.close()
    return result


def run_child(path: Path, mpp: float | None) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(path)]
    if mpp is not None:
        cmd += ["--mpp", str(mpp)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_synthetic(workdir: Path, size: int) -> tuple[Path, float | None]:
    from napari_m2ort.io.convert import make_synthetic_pyramid

    path = workdir / f"synthetic_{size}.ome.tif"
    if path.exists():
        return path, None
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_synthetic_pyramid(path, size, size, mpp=0.25)
    return path, time.perf_counter() - t0


def ensure_converted(workdir: Path, jpeg: Path) -> Path:
    from napari_m2ort.io.convert import convert_to_ome_tiff

    out = workdir / f"{jpeg.stem}.ome.tif"
    if not out.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        convert_to_ome_tiff(jpeg, out, mpp=0.69)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/m2ort_bench"))
    parser.add_argument("--size", type=int, default=100_000, help="synthetic slide side (px)")
    parser.add_argument("--jpeg", type=Path, default=DEFAULT_JPEG, help="a big flat JPEG")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--mpp", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(args.measure, args.mpp)))
        return

    synthetic, build_s = ensure_synthetic(args.workdir, args.size)
    rows = [("synthetic OME-TIFF, JPEG tiles 512²", synthetic, None)]
    if args.jpeg.exists():
        rows.append(("HER2+ C2 JPEG (flat)", args.jpeg, 0.69))
        converted = ensure_converted(args.workdir, args.jpeg)
        rows.append(("same JPEG converted to OME-TIFF", converted, None))

    print(f"# open_slide benchmark ({platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()})\n")
    if build_s is not None:
        size_gb = synthetic.stat().st_size / 1e9
        print(f"Built {synthetic.name} ({size_gb:.2f} GB) in {build_s:.1f} s.\n")
    print(
        "| file | size (px) | levels | file size | open (s) | open + layer_data (s) "
        "| RSS added by open (MB) | read 1024² lowest level (s) | read 1024² level 0 (s) "
        "| RSS after reads (MB) | peak RSS added (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, path, mpp in rows:
        r = run_child(path, mpp)
        h, w = r["shape"]
        print(
            f"| {label} | {w:,} × {h:,} | {r['levels']} | {path.stat().st_size / 1e6:,.0f} MB "
            f"| {r['open_s']:.3f} | {r['open_layer_s']:.3f} | {r['open_mb']:.1f} "
            f"| {r['read_low_s']:.3f} | {r['read0_s']:.3f} | {r['after_read0_mb']:.0f} "
            f"| {r['peak_mb']:.0f} |"
        )
    print(
        "\nTargets: open < 1 s, < 200 MB added. Reads at the lowest level come first "
        "(what napari shows on open); for the flat JPEG the level-0 read includes the "
        "one-off full decode."
    )


if __name__ == "__main__":
    main()
