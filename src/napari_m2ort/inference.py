"""Batched, stoppable prediction of expression at spot centres.

``predict`` is a generator (see ``progress``): the GUI runs it in a worker, the CLI with
a text bar, dask workers per tile.  Patches of the next batches are read in background
threads while the model computes the current one; tile reading releases the GIL (zarr,
imagecodecs), so both cores stay busy.  Stopping between batches returns a partial
``Prediction`` whose ``done`` mask says which spots have values.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .compiled import compiled_forward, decide, is_compiled, needs_compiling
from .cpu_chunks import CPU_CHUNK, run_eager
from .devices import resolve_device, resolve_precision
from .errors import M2ORTError
from .patches import PATCH_PX, model_inputs, sample_spots, spatial_order
from .progress import Job, Progress
from .tta import OUTPUT_RULE, check_smooth_um, check_tta, n_views, smooth, view


@dataclass
class Prediction:
    centers_um: np.ndarray  # (N, 2) x, y
    values: np.ndarray  # (N, G) float32, NaN where not done
    done: np.ndarray  # (N,) bool
    genes: list
    outside: np.ndarray  # (N,) bool
    blank: np.ndarray  # (N,) bool
    info: dict = field(default_factory=dict)
    #: (N, G) float32 spread (std) across the test-time views; None without TTA
    uncertainty: Optional[np.ndarray] = None

    @property
    def n_done(self) -> int:
        return int(self.done.sum())

    @property
    def complete(self) -> bool:
        return bool(self.done.all())


def predict(
    slide,
    centers_um: np.ndarray,
    model: torch.nn.Module,
    card,
    device: str = "auto",
    batch_size: int = 64,
    precision: str = "auto",
    should_stop: Optional[Callable[[], bool]] = None,
    prefetch: int = 2,
    compile: bool | str = False,
    job_spots: Optional[int] = None,
    tta: str = "none",
    smooth_um: float = 0.0,
    first_batch: Optional[int] = None,
) -> Job[Prediction]:
    """``compile=True`` runs the model through ``torch.compile`` (see ``compiled``): 17-39 s
    once per model and settings, then ~1.3x faster than eager bf16 on an AVX512-BF16 CPU;
    worth it for large jobs only, which is what ``"auto"`` picks. Skipped for float32 on
    CPU (no faster there); falls back to eager, with a warning, where compiling fails.
    ``job_spots``: the size of the whole job this call is one part of (a dask tile of a
    slide), for ``"auto"``; default: these spots.
    ``tta`` ("none", "flips", "dihedral") averages the model over flipped / rotated views
    of each patch and reports their spread as ``uncertainty``; ``smooth_um`` (Gaussian
    sigma in µm, 0 = off) then smooths the finished predictions over neighbouring
    predicted spots (see ``tta``). Progress events carry the unsmoothed batch values.
    ``first_batch``: the size of the first batch when smaller than ``batch_size`` (the
    widget's quick first look; ignored when compiling, which builds one batch shape). On
    the CPU the values do not depend on it (``cpu_chunks``)."""
    tta = check_tta(tta)
    smooth_um = check_smooth_um(smooth_um)
    centers_um = np.asarray(centers_um, dtype=float).reshape(-1, 2)
    n, genes = len(centers_um), list(card.genes)
    if n == 0:
        raise M2ORTError("There are no spots to predict: the region holds no spot centres.")
    if getattr(slide, "mpp_source", "metadata") == "default":
        warnings.warn(
            f"{slide.path}: the pixel size is unknown and was assumed to be {slide.mpp} µm/px; "
            "predictions are only meaningful at the right scale. Pass --mpp (CLI) or set it "
            "in the widget.",
            stacklevel=2,
        )
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    model = model.to(dev).eval()
    values = np.full((n, len(genes)), np.nan, dtype=np.float32)
    done = np.zeros(n, dtype=bool)
    outside = np.zeros(n, dtype=bool)
    blank = np.zeros(n, dtype=bool)
    spread = np.full((n, len(genes)), np.nan, dtype=np.float32) if tta != "none" else None
    compile, why_not = decide(compile, dev, amp, n if job_spots is None else job_spots)
    if why_not:
        warnings.warn(why_not, stacklevel=2)
    forwards: dict[int, Callable] = {}

    def forward_for(bs: int) -> Callable:
        """The model, or its compiled forward for batch size ``bs`` (built on first use)."""
        if not compile:
            return model
        if bs not in forwards:
            forwards[bs] = compiled_forward(model, dev, amp, bs)
        return forwards[bs]

    order = spatial_order(centers_um)
    head = 0 if compile or not first_batch else min(int(first_batch), batch_size, n)
    batches = ([order[:head]] if head else []) + [order[i : i + batch_size] for i in range(head, n, batch_size)]
    t0 = time.perf_counter()
    first_compile = compile and needs_compiling(model, dev, amp, batch_size)
    yield Progress(
        "predict",
        0,
        n,
        f"{n} spots on {dev.type}" + (" (compiling the model first: 20-40 s, once)" if first_compile else ""),
    )

    def load(idx):
        return idx, sample_spots(slide, centers_um[idx], card.mpp)

    bs = batch_size
    with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool:
        pending = [pool.submit(load, b) for b in batches[: prefetch + 1]]
        next_batch = len(pending)
        stopped = False
        while pending:
            idx, patches = pending.pop(0).result()
            if next_batch < len(batches):
                pending.append(pool.submit(load, batches[next_batch]))
                next_batch += 1
            out, sd, bs = _forward_adaptive(forward_for, patches.level1, dev, amp, bs, tta)
            values[idx] = out
            if spread is not None:
                spread[idx] = sd
            done[idx] = True
            outside[idx] = patches.outside
            blank[idx] = patches.blank
            k = int(done.sum())
            yield Progress(
                "predict",
                k,
                n,
                f"{k}/{n} spots",
                data={"indices": idx, "values": out},
            )
            if should_stop is not None and should_stop():
                stopped = True
                for f in pending:
                    f.cancel()
                break
    if smooth_um > 0:
        values = smooth(values, centers_um, smooth_um, use=done & ~outside & ~blank)
    elapsed = time.perf_counter() - t0
    nb = int(blank[done].sum())
    if nb:
        warnings.warn(
            f"{nb} of {int(done.sum())} spots show no tissue (white or uniform patches); "
            "their predictions are unreliable.",
            stacklevel=2,
        )
    info = {
        "device": str(dev),
        "precision": str(amp).replace("torch.", "") if amp else "float32",
        "batch_size": bs,
        "seconds": elapsed,
        "stopped": stopped,
        "compiled": _compiled_throughout(forwards),
        "spots_per_s": float(done.sum()) / elapsed if elapsed > 0 else float("nan"),
        "tta": tta,
        "smooth_um": smooth_um,
        "output": OUTPUT_RULE,
    }
    return Prediction(centers_um, values, done, genes, outside, blank, info, spread)


def _compiled_throughout(forwards: dict) -> bool:
    """Whether every batch ran compiled (False if compiling was off, or fell back)."""
    return bool(forwards) and all(is_compiled(f) for f in forwards.values())


def _forward_adaptive(forward_for, level1, dev, amp, batch_size, tta="none"):
    """Forward in chunks of ``batch_size``; halve it on GPU out-of-memory and go on.

    ``forward_for(bs)`` gives the callable for batch size ``bs`` (a compiled forward is
    built for one batch size). Returns (mean over views, std over views or None, bs)."""
    outs, sds = [], []
    i = 0
    while i < len(level1):
        chunk = level1[i : i + batch_size]
        try:
            m, sd = forward_views(forward_for(batch_size), chunk, dev, amp, tta)
            outs.append(m)
            sds.append(sd)
            i += len(chunk)
        except torch.cuda.OutOfMemoryError:
            if batch_size <= 1:
                raise
            torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            warnings.warn(f"GPU out of memory: continuing with batch size {batch_size}.", stacklevel=2)
    sd = np.concatenate(sds, axis=0) if sds and sds[0] is not None else None
    return np.concatenate(outs, axis=0), sd, batch_size


def forward_views(model, level1_uint8, dev, amp=None, tta: str = "none"):
    """Mean (clipped at 0) and std over the test-time views of each patch."""
    k = n_views(tta)
    if k == 1:
        return np.maximum(forward_batch(model, level1_uint8, dev, amp), 0.0), None
    outs = np.stack([np.maximum(forward_batch(model, view(level1_uint8, v), dev, amp), 0.0) for v in range(k)])
    return outs.mean(axis=0), outs.std(axis=0)


def warm_up_model(model, device: str = "auto", precision: str = "auto") -> None:
    """One forward of a blank chunk, so the first real batch does not pay for building
    kernels (about 1 s on the 2-core CPU). For a background thread while the user draws."""
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    blank = np.zeros((CPU_CHUNK if dev.type == "cpu" else 1, PATCH_PX, PATCH_PX, 3), np.uint8)
    forward_batch(model.to(dev).eval(), blank, dev, amp)


@torch.inference_mode()
def forward_batch(model, level1_uint8, dev, amp=None) -> np.ndarray:
    """``model``: the module or any callable with its forward's signature. An eager
    module runs on CPU in fixed-size chunks (``cpu_chunks``)."""
    l1, l2, l3 = model_inputs(level1_uint8, device=dev)
    call = model if not isinstance(model, torch.nn.Module) else functools.partial(run_eager, model)
    if amp is not None:
        with torch.autocast(device_type=dev.type, dtype=amp):
            y = call(l1, l2, l3)
    else:
        y = call(l1, l2, l3)
    out = y.float().cpu().numpy()
    if not np.isfinite(out).all():
        raise M2ORTError(
            "The model produced non-finite values (NaN/inf). The weights may be corrupt or the "
            "precision too low: try --precision fp32 or reload the model."
        )
    return out
