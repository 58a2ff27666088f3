"""Checks made before any work: numbers, output paths and the size of a job.

Every front door (CLI, widgets, cohort runner) calls these, so a bad value gets the same
one-sentence ``M2ORTError`` wherever it is typed, before a slide is decoded or a spot laid
out. Nothing here imports torch: the CLI runs them before loading the model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from ..errors import M2ORTError

#: Spots one prediction may lay out unless raised (``--max-spots``); a whole Visium-pitch
#: slide of 5 x 2.5 cm is about 145,000 spots.
MAX_SPOTS = 1_000_000
#: Above this many spots the job is announced with its estimated memory and time.
WARN_SPOTS = 100_000
#: Rough throughput (spots x test-time views per second) for the time estimate; measured
#: 40-90 spots/s on a 2-core CPU (benchmarks/results/inference_cpu.md).
VIEWS_PER_S = {"cpu": 40.0, "mps": 200.0, "cuda": 1500.0}
#: Memory per spot besides its values: centre, id, flags, patch bookkeeping.
BYTES_PER_SPOT = 400

#: File types each output accepts (predictions: ``io.export.OUTPUT_SUFFIXES``).
METRICS_SUFFIXES = (".json",)
SLIDE_SUFFIXES = (".tif", ".tiff")


# ---------------------------------------------------------------- numbers


def number(
    label: str,
    value,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    above: Optional[float] = None,
    integer: bool = False,
    optional: bool = False,
):
    """``value`` as a float (or int), checked finite and in range; else one sentence.

    ``lo``/``hi`` are inclusive bounds, ``above`` an exclusive lower bound."""
    if value is None:
        if optional:
            return None
        raise M2ORTError(f"{label}: a value is required.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise M2ORTError(f"{label} {value!r} is not a number.") from None
    if not math.isfinite(v):
        raise M2ORTError(f"{label} {value!r}: give a finite number.")
    if integer:
        if v != int(v) or isinstance(value, bool):
            raise M2ORTError(f"{label} {value!r}: give a whole number.")
        v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi) or (above is not None and v <= above):
        raise M2ORTError(f"{label} {value!r} is out of range: {_range_text(lo, hi, above)}.")
    return v


def _range_text(lo, hi, above) -> str:
    if above is not None and hi is not None:
        return f"use more than {_n(above)} and at most {_n(hi)}"
    if above is not None:
        return f"use more than {_n(above)}"
    if lo is not None and hi is not None:
        return f"use at least {_n(lo)} and at most {_n(hi)}"
    if lo is not None:
        return f"use at least {_n(lo)}"
    return f"use at most {_n(hi)}" if hi is not None else "any value"


def _n(v) -> str:
    return f"{int(v):,}" if float(v) == int(v) and abs(v) >= 1 else f"{v:g}"


def mpp(value, label: str = "Pixel size (µm/px)"):
    """A user's µm per pixel (None = take the file's)."""
    return number(label, value, above=0.0, hi=100.0, optional=True)


def region(values, label: str = "Region") -> tuple[float, float, float, float]:
    """Four finite µm coordinates x0,y0,x1,y1 with some extent (negative values allowed:
    a region may start left of or above the slide)."""
    vals = [number(f"{label} coordinate", v) for v in values]
    if len(vals) != 4:
        raise M2ORTError(f"{label}: give four numbers x0,y0,x1,y1 in µm.")
    x0, y0, x1, y1 = vals
    if x0 == x1 or y0 == y1:
        raise M2ORTError(f"{label} {x0:g},{y0:g},{x1:g},{y1:g}: it has no area (x0 = x1 or y0 = y1).")
    if max(abs(v) for v in vals) > 1e7:
        raise M2ORTError(f"{label} {x0:g},{y0:g},{x1:g},{y1:g}: coordinates beyond 10 m; give µm.")
    return x0, y0, x1, y1


def spot_geometry(pitch_um, diameter_um) -> None:
    """A custom layout's pitch and spot diameter (µm), when given."""
    p = number("Spot pitch (µm)", pitch_um, lo=1.0, hi=100_000.0, optional=True)
    d = number("Spot diameter (µm)", diameter_um, lo=1.0, hi=100_000.0, optional=True)
    if p is not None and d is not None and d > 10 * p:
        raise M2ORTError(f"Spot diameter {d:g} µm is more than 10x the pitch {p:g} µm: check the two values.")


def batch_size(value, label: str = "Batch size") -> int:
    return number(label, value, lo=1, hi=65536, integer=True)


def max_spots(value) -> int:
    if value is None:
        return MAX_SPOTS
    return number("Maximum spots (--max-spots)", value, lo=1, integer=True)


# ---------------------------------------------------------------- outputs


def output_file(path, suffixes=METRICS_SUFFIXES, overwrite: bool = False, what: str = "output") -> Path:
    """The output file, checked before the work: supported type, not a folder, the
    existing-file policy (refused unless ``overwrite``), and a writable folder."""
    if path is None or not str(os.fspath(path)).strip():
        raise M2ORTError(f"No {what} file given.")
    p = Path(os.fspath(path)).expanduser()
    name = p.name.lower()
    if not any(name.endswith(s) for s in suffixes):
        raise M2ORTError(f"{p}: the {what} must be a file ending in {' or '.join(suffixes)}.")
    if p.is_dir():
        raise M2ORTError(f"{p} is a folder: give a file name for the {what} (ending in {' or '.join(suffixes)}).")
    if p.exists() and not overwrite:
        raise M2ORTError(f"{p} exists already: choose another name, or pass --overwrite to replace it.")
    writable_folder(p.parent, what)
    return p


def output_folder(path, overwrite: bool = False, holds=(), what: str = "output folder") -> Path:
    """An output folder: not a file, creatable and writable; files it would hold
    (``holds``) must not exist unless ``overwrite``."""
    if path is None or not str(os.fspath(path)).strip():
        raise M2ORTError(f"No {what} given.")
    p = Path(os.fspath(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise M2ORTError(f"{p} is a file, not a folder: give a folder for the {what}.")
    if not overwrite:
        existing = [n for n in holds if (p / n).exists()]
        if existing:
            raise M2ORTError(
                f"{p / existing[0]} exists already: choose another folder, or pass --overwrite to replace it."
            )
    writable_folder(p, what)
    return p


def writable_folder(folder: Path, what: str = "output") -> None:
    """``folder`` (or the nearest existing parent it would be created in) is writable."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise M2ORTError(f"Cannot write the {what} into {folder}: {probe} is a file, not a folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise M2ORTError(f"Cannot write the {what} into {folder}: {probe} is not writable (check its permissions).")


# ---------------------------------------------------------------- size budget


def spots_in(area_um2: float, pitch_um: float, grid: str) -> int:
    """Spots a layout puts in an area, from the area alone (no allocation)."""
    cell = pitch_um * pitch_um * (math.sqrt(3) / 2 if grid == "hex" else 1.0)
    return int(math.ceil(max(0.0, area_um2) / cell))


def job_estimate(n_spots: int, n_genes: int = 250, views: int = 1, device: str = "cpu") -> tuple[float, float]:
    """(bytes, seconds) a prediction of ``n_spots`` is expected to take, roughly."""
    per_spot = BYTES_PER_SPOT + 4 * n_genes * (2 if views > 1 else 1)
    rate = VIEWS_PER_S.get(str(device).split(":")[0], VIEWS_PER_S["cpu"]) / max(1, views)
    return float(n_spots) * per_spot, float(n_spots) / rate


def describe_estimate(n_spots: int, n_genes: int = 250, views: int = 1, device: str = "cpu") -> str:
    mem, sec = job_estimate(n_spots, n_genes, views, device)
    return f"about {n_spots:,} spots, {_bytes(mem)} of memory and {_duration(sec)} on the {device.upper()}"


def check_size(
    n_spots: int, limit: Optional[int] = MAX_SPOTS, n_genes: int = 250, views: int = 1, device: str = "cpu"
) -> Optional[str]:
    """Refuse a job above ``limit`` spots (M2ORTError with the estimate); return a
    warning for one above ``WARN_SPOTS``; None for a small one."""
    limit = MAX_SPOTS if limit is None else int(limit)
    if n_spots > limit:
        raise M2ORTError(
            f"This job would predict {describe_estimate(n_spots, n_genes, views, device)}, above the limit of "
            f"{limit:,} spots: use a smaller region or a larger pitch, or raise --max-spots."
        )
    if n_spots > min(WARN_SPOTS, limit // 2):
        return f"a large job: {describe_estimate(n_spots, n_genes, views, device)}"
    return None


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


# ---------------------------------------------------------------- whole requests


def inference_options(request) -> None:
    """``tta``, ``smooth_um`` and ``batch_size`` of a predict or evaluate request
    (normalised in place)."""
    from ..tta import check_smooth_um, check_tta

    batch_size(request.batch_size)
    request.tta = check_tta(request.tta)
    request.smooth_um = check_smooth_um(request.smooth_um)


def predict_request(request) -> None:
    """Every number and name of a ``PredictRequest``, before the slide is opened."""
    from ..spots import layout_params

    spot_geometry(request.pitch_um, request.diameter_um)
    layout_params(str(request.layout or ""), request.pitch_um, request.diameter_um)
    mpp(request.mpp)
    max_spots(request.max_spots)
    inference_options(request)


def train_config(cfg) -> None:
    """Every number of a ``training.TrainConfig`` (names are checked by training itself)."""
    number("Epochs", cfg.epochs, lo=1, hi=100_000, integer=True)
    number("Learning rate", cfg.lr, above=0.0, hi=1.0)
    batch_size(cfg.batch_size)
    number("Weight decay", cfg.weight_decay, lo=0.0, hi=10.0)
    number("Warmup epochs", cfg.warmup_epochs, lo=0.0, hi=max(0.0, float(cfg.epochs)))
    number("Colour jitter", cfg.color_jitter, lo=0.0, hi=1.0)
    number("Depth weight k", cfg.depth_k, above=0.0, hi=1e9)
    number("EMA decay", cfg.ema, lo=0.0, hi=0.99999)
    number("Drop path", cfg.drop_path, lo=0.0, hi=0.9)
    number("Target smoothing (µm)", cfg.target_smooth_um, lo=0.0, hi=5000.0)
    if cfg.mode not in ("full", "head"):
        raise M2ORTError(f"Unknown fine-tuning mode {cfg.mode!r}: use 'full' or 'head'.")
    if cfg.schedule not in ("constant", "cosine"):
        raise M2ORTError(f"Unknown learning-rate schedule {cfg.schedule!r}: use 'constant' or 'cosine'.")
    from ..training import check_target_options

    check_target_options(cfg)
    number("Seed", cfg.seed, lo=0, hi=2**32 - 1, integer=True)


def cohort_options(*, tile_spots, workers, threads_per_worker, batch) -> None:
    number("Spots per task (--tile-spots)", tile_spots, lo=1, hi=1_000_000, integer=True)
    number("Workers (--workers)", workers, lo=1, hi=4096, integer=True)
    number("Threads per worker (--threads-per-worker)", threads_per_worker, lo=1, hi=1024, integer=True)
    batch_size(batch)
