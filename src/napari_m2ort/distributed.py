"""Cohort-scale batch prediction on dask.distributed (``napari-m2ort batch``).

One ``.h5ad`` per slide with the same content as ``napari-m2ort predict`` writes for it
(``prediction_to_anndata``), plus a batch record in ``uns["m2ort"]["batch"]``.

How the work is split
---------------------
* The **client** opens each slide only to lay out its spots (file metadata, plus one
  thumbnail when ``tissue=True``), orders the spots spatially (``patches.spatial_order``)
  and cuts them into tiles of about ``tile_spots`` neighbouring spots. One dask task per
  tile. Slides are prepared lazily, a few tiles ahead of the cluster, so a cohort of
  thousands of slides neither waits for all layouts before starting nor floods the
  scheduler with millions of tasks.
* A **worker** (``batch_worker``) loads the model once per process (cache keyed by path,
  size, mtime and device) and keeps a small LRU of open slides; a task reads its tile's
  patches through ``Slide.read_region`` (tile by tile in a pyramidal file), predicts them
  (``pipelines.predict_spots``) and returns a ``batch_records.TileResult``. Memory per
  worker is one model, a batch of patches and a tile's outputs, whatever the slide size.
  Exception: a flat JPEG/PNG has no tiles, so the reader decodes it whole once per worker
  (~0.3 GB for a 10k x 10k px image, times up to ``batch_worker.WORKER_SLIDES`` open
  slides). **Convert cohorts to pyramidal OME-TIFF** (``napari-m2ort convert``) before
  running them at scale.
* The client gathers tiles as they complete (``as_completed``), places them by spot
  index (every index exactly once, checked) and writes ``OUT/<slide name>.h5ad``
  atomically as soon as a slide's last tile is in.

Robustness
----------
* A worker that dies mid-task: the scheduler reschedules its tasks on the surviving
  (or restarted) workers; results are placed by spot index, so nothing is duplicated
  or lost. Exceptions raised inside a task are retried ``retries`` times.
* A slide that cannot be opened, laid out or read fails alone: one line when it fails,
  a row in the summary, and the other slides go on. The exit code is 1 if any slide
  failed. Such a slide is never retried: the client opens it before any task exists, and
  a task's ``M2ORTError`` comes back as a value (dask retries only other exceptions).
* Each slide gets the checks of ``napari-m2ort predict``: the size budget
  (``max_spots``), the resolution guard (``force``) and the per-spot colour flags.
* Smoothing (``smooth_um``) runs on the client once a slide's tiles are all in, over the
  whole slide's spots, exactly as ``predict`` smooths one slide.
* Re-running the same command skips slides whose output is complete (``batch_resume``:
  a key of the slide file, the spot settings and the model weights, and the expected
  spot count). A changed setting or model re-predicts that slide, and an output without
  that record (e.g. from ``napari-m2ort predict``) is replaced.
* ``local_cluster()`` (``--scheduler local``) turns off two dask defaults that slow model
  inference down (the nanny's ``MALLOC_TRIM_THRESHOLD_`` and the worker profiler); see
  ``benchmarks/results/distributed_cpu.md``.

For an existing cluster (``scheduler="tcp://host:8786"``) the slide and model paths
must be readable by the workers under the same names (a shared file system).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .batch_cluster import connect, dashboard_link, has_bokeh, local_cluster
from .batch_records import BatchSummary, SlideResult, TileResult
from .batch_resume import BATCH_FORMAT, batch_record, job_key, output_complete, weights_id
from .batch_worker import predict_tile
from .errors import M2ORTError

__all__ = ["BatchSummary", "SlideResult", "TileResult", "batch_predict", "local_cluster", "output_name"]

#: Task retries after an exception inside the task (worker deaths are handled by the
#: scheduler, up to ``distributed.scheduler.allowed-failures`` times per task).
RETRIES = 2


def output_name(path) -> str:
    """``OUT/<this>.h5ad``: the slide's file name without extension(s) (.ome.tif too)."""
    from .io.slides import display_name

    return display_name(Path(os.fspath(path)))


def _model_file(spec) -> Path:
    """The checkpoint the workers load (each loads it once, by path)."""
    from .pipelines import checkpoint_path

    path = checkpoint_path(spec)
    if path is None:
        raise M2ORTError(
            f"Model {spec!r}: batch prediction needs trained weights in a file the workers "
            "can read: 'bundled' or the path of a .safetensors checkpoint."
        )
    return path


@dataclass
class _SlideJob:
    index: int
    result: SlideResult
    path: str
    key: str = ""
    output: Optional[Path] = None
    slide: object = None  # the slide, closed: its name, mpp and path name the output
    spots: object = None  # SpotLayout
    tiles: list = field(default_factory=list)  # list of index arrays
    values: Optional[np.ndarray] = None
    spread: Optional[np.ndarray] = None  # TTA uncertainty
    colour: Optional[np.ndarray] = None  # colour-test flags (domain.colour_flags)
    outside: Optional[np.ndarray] = None
    blank: Optional[np.ndarray] = None
    written: Optional[np.ndarray] = None  # per spot: how many times it was delivered
    remaining: int = 0
    start: float = float("inf")
    stop: float = 0.0
    info: dict = field(default_factory=dict)
    futures: dict = field(default_factory=dict)  # key -> Future, until its result is in


def batch_predict(
    slides: Sequence,
    out_dir,
    *,
    model_path="bundled",
    region=None,
    tissue: bool = False,
    layout: str = "visium",
    pitch: Optional[float] = None,
    diameter: Optional[float] = None,
    mpp: Optional[float] = None,
    device: str = "cpu",
    precision: str = "auto",
    batch_size: int = 32,
    tile_spots: int = 512,
    scheduler: str = "local",
    workers: int = 2,
    threads_per_worker: int = 1,
    client=None,
    retries: int = RETRIES,
    torch_threads: Optional[int] = None,
    progress: bool = True,
    dashboard_address: str = ":8787",
    echo=print,
    compile: bool | str = False,
    tta: str = "none",
    smooth_um: float = 0.0,
    max_spots: Optional[int] = None,
    force: bool = False,
) -> BatchSummary:
    """Predict every slide of ``slides`` into ``out_dir/<name>.h5ad`` on a dask cluster.

    ``client``: an existing ``distributed.Client`` to use (left open); otherwise
    ``scheduler="local"`` starts a ``LocalCluster`` of ``workers`` processes with
    ``threads_per_worker`` threads each (closed at the end), and any other value is the
    address of a running scheduler. ``torch_threads``: intra-op threads of torch in each
    worker; by default the cores divided by ``workers * threads_per_worker`` for the local
    cluster, and the workers' own setting (dask sets OMP_NUM_THREADS=1) otherwise.
    ``compile``: on/off/auto as in ``inference.predict``; "auto" compiles for slides of
    ``compiled.AUTO_MIN_SPOTS`` or more spots (each worker compiles its model once). Not
    part of the resume key: compiled and eager outputs differ only by rounding.
    ``tta`` / ``smooth_um`` as in ``napari-m2ort predict`` (smoothing over each whole
    slide); ``max_spots`` and ``force`` as in ``PredictRequest``, per slide.
    Raises ``M2ORTError`` for problems with the options (nothing runs); problems with one
    slide are reported in the returned summary.
    """
    from .devices import resolve_device, resolve_precision
    from .model.weights import read_card
    from .pipelines import checks, parse_region
    from .spots import layout_params
    from .tta import check_smooth_um, check_tta

    t_start = time.perf_counter()
    # ---- validate everything that does not depend on one slide (usage errors) -------
    slides = [str(os.fspath(s)) for s in slides]
    if not slides:
        raise M2ORTError("No slides given: pass one or more slide files.")
    checks.cohort_options(
        tile_spots=tile_spots, workers=workers, threads_per_worker=threads_per_worker, batch=batch_size
    )
    rect = parse_region(region)
    region_s = None if rect is None else ",".join(repr(v) for v in rect)  # the resume key's form
    checks.spot_geometry(pitch, diameter)
    layout_params(layout, pitch, diameter)
    checks.mpp(mpp)
    limit = checks.max_spots(max_spots)
    tta, smooth_um = check_tta(tta), check_smooth_um(smooth_um)
    out_dir = Path(os.fspath(out_dir)).expanduser()
    checks.output_folder(out_dir, overwrite=True, what="output folder")
    model_file = _model_file(model_path)
    card = read_card(model_file)
    resolve_precision(precision, resolve_device("cpu"))  # checks the name
    if client is None and scheduler == "local":
        resolve_device(device)  # the local workers have this machine's devices
    names: dict[str, str] = {}
    for s in slides:
        n = output_name(s)
        if n in names and os.path.abspath(names[n]) != os.path.abspath(s):
            raise M2ORTError(
                f"{names[n]} and {s} would both be written to {n}.h5ad: rename one of them "
                "or run them into different --out folders."
            )
        names[n] = s
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise M2ORTError(f"Cannot create the output folder {out_dir} ({exc}).") from None
    settings = {
        "format": BATCH_FORMAT,
        "mpp": mpp,
        "region": region_s,
        "tissue": bool(tissue),
        "layout": layout,
        "pitch": pitch,
        "diameter": diameter,
        "precision": precision,
        "weights": weights_id(model_file),
        "genes": card.genes,
        "tta": tta,
        "smooth_um": smooth_um,
    }
    spot_settings = {
        "regions": None if rect is None else [rect],
        "layout": layout,
        "pitch_um": pitch,
        "diameter_um": diameter,
        "tissue_only": bool(tissue),
        "max_spots": limit,
    }
    slide_checks = {"tta": tta, "smooth_um": smooth_um, "force": bool(force), "card": card, "echo": echo}

    seen: set[str] = set()
    jobs: list[_SlideJob] = []
    for s in slides:
        if os.path.abspath(s) in seen:
            continue  # the same file twice: once is enough
        seen.add(os.path.abspath(s))
        jobs.append(_SlideJob(len(jobs), SlideResult(slide=s, name=output_name(s)), s))
    summary = BatchSummary([j.result for j in jobs])

    # ---- slides already done: no cluster needed for them -----------------------------
    todo: deque[_SlideJob] = deque()
    for job in jobs:
        t = time.perf_counter()
        job.output = out_dir / f"{job.result.name}.h5ad"
        try:
            job.key = job_key(job.path, settings)
        except OSError as exc:
            _fail(
                job,
                f"Slide file '{job.path}' cannot be read ({exc.strerror or exc}). "
                "Check the path for typos, or that the drive holding it is mounted.",
                t,
            )
            continue
        n = output_complete(job.output, job.key)
        if n is not None:
            r = job.result
            r.status, r.spots, r.output, r.seconds = "skipped", n, job.output, time.perf_counter() - t
            r.note = "output complete"
        else:
            todo.append(job)

    if todo:
        own = client is None
        cluster = None
        if own:
            client, cluster = connect(scheduler, int(workers), int(threads_per_worker), dashboard_address)
        try:
            summary.dashboard = dashboard_link(client)
            if summary.dashboard:
                hint = "" if has_bokeh() else " (install bokeh>=3.1 for the live diagnostics)"
                echo(f"dask dashboard: {summary.dashboard}{hint}")
            if torch_threads is None and own and scheduler == "local":
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                torch_threads = max(1, cores // (int(workers) * int(threads_per_worker)))
            summary.tiles, summary.workers = _run_jobs(
                client,
                todo,
                card,
                model_file,
                spot_settings,
                mpp,
                device,
                precision,
                int(batch_size),
                int(tile_spots),
                int(retries),
                torch_threads,
                progress,
                compile=compile,
                checks=slide_checks,
            )
        finally:
            if own:
                client.close()
                if cluster is not None:
                    cluster.close()
    summary.seconds = time.perf_counter() - t_start
    return summary


def _fail(job: _SlideJob, message: str, t0: Optional[float] = None) -> None:
    r = job.result
    if r.status == "failed":
        return
    r.status, r.error = "failed", " ".join(str(message).split()) or "failed"
    if t0 is not None:
        r.seconds = time.perf_counter() - t0
    job.values = job.spread = job.colour = job.outside = job.blank = job.written = None


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, M2ORTError):
        return str(exc)
    name = type(exc).__name__
    if name == "KilledWorker":
        return f"the workers running one of its tiles died repeatedly (out of memory? a crash in a decoder?): {exc}"
    return f"{name}: {exc}"


def _run_jobs(
    client,
    todo,
    card,
    model_file,
    spot_settings,
    mpp,
    device,
    precision,
    batch_size,
    tile_spots,
    retries,
    torch_threads,
    show_progress,
    compile=False,
    checks=None,
):
    """Prepare slides a few tiles ahead of the cluster, submit, gather, write."""
    from distributed import as_completed
    from tqdm import tqdm

    from .devices import resolve_device
    from .inference import Prediction
    from .io.export import write_h5ad
    from .io.slides import open_slide
    from .patches import fov_um, spatial_order
    from .pipelines import SlidePrediction, spots_for_slide
    from .pipelines.domain import check_resolution, colour_flags
    from .tta import n_views, smooth

    checks = checks or {}
    tta, smooth_um = checks.get("tta", "none"), float(checks.get("smooth_um", 0.0))
    echo = tqdm.write if show_progress else checks.get("echo", print)  # never glued to the bar
    size_hint = {"n_genes": len(card.genes), "views": n_views(tta), "device": resolve_device(device).type}

    token = uuid.uuid4().hex[:8]
    ac = as_completed([], with_results=False)
    where: dict[str, tuple[_SlideJob, int]] = {}  # future key -> (job, tile)
    pending = 0
    n_tiles = 0
    workers_seen: set = set()
    bar = tqdm(
        total=0, unit="tile", desc="batch", dynamic_ncols=True, disable=not show_progress, delay=1.0
    )  # shown once tiles are under way, not as an empty "0tile"
    n_slides, n_finished = len(todo), 0

    def threads() -> int:
        try:
            return max(1, sum(client.nthreads().values()))
        except Exception:
            return 1

    def prepare(job: _SlideJob) -> None:
        nonlocal pending, n_tiles
        t0 = time.perf_counter()
        notes: list[str] = []
        try:
            slide = open_slide(job.path, mpp=mpp, quiet=True)  # said per slide in the summary
            try:
                note = check_resolution(slide.mpp, card.mpp, checks.get("force", False), f"'{slide.name}'")
                spots = spots_for_slide(slide, **spot_settings, size_hint=size_hint, notes=notes)
                job.colour = colour_flags(slide, spots.centers_um, fov_um(card.mpp))
                default_mpp = slide.mpp_source == "default"
            finally:
                slide.close()
        except Exception as exc:  # one slide's problem, never retried; the others go on
            _fail(job, _error_text(exc), t0)
            echo(f"{job.result.name}: failed: {job.result.error}")
            return
        n = len(spots)
        job.spots, job.slide = spots, slide
        if note:
            notes.append(note)
        if default_mpp:
            notes.append(f"no pixel size in the file: assumed {slide.mpp:g} µm/px")
        job.result.note = "; ".join(notes)
        order = spatial_order(spots.centers_um)
        k = max(1, int(np.ceil(n / tile_spots)))
        job.tiles = [t for t in np.array_split(order, k) if len(t)]
        g = len(card.genes)
        job.values = np.full((n, g), np.nan, dtype=np.float32)
        job.spread = np.full((n, g), np.nan, dtype=np.float32) if tta != "none" else None
        job.outside = np.zeros(n, dtype=bool)
        job.blank = np.zeros(n, dtype=bool)
        job.written = np.zeros(n, dtype=np.uint8)
        job.remaining = len(job.tiles)
        job.result.spots, job.result.tiles = n, len(job.tiles)
        path = os.path.abspath(job.path)
        for t, idx in enumerate(job.tiles):
            fut = client.submit(
                predict_tile,
                job.index,
                t,
                path,
                mpp,
                spots.centers_um[idx],
                idx,
                str(model_file),
                device,
                precision,
                batch_size,
                torch_threads,
                compile,
                n,
                tta,
                key=f"m2ort-tile-{token}-{job.index}-{t}",
                retries=retries,
                priority=-job.index,  # earlier slides first: outputs appear in order
            )
            where[fut.key] = (job, t)
            job.futures[fut.key] = fut
            ac.add(fut)
        pending += len(job.tiles)
        n_tiles += len(job.tiles)
        bar.total = n_tiles
        bar.refresh()

    def finish(job: _SlideJob) -> None:
        nonlocal n_finished
        r = job.result
        try:
            if not (job.written == 1).all():
                raise RuntimeError(
                    f"internal error: {(job.written == 0).sum()} spots missing and "
                    f"{(job.written > 1).sum()} delivered twice"
                )
            seconds = max(job.stop - job.start, 1e-9)
            info = {
                **job.info,
                "seconds": seconds,
                "spots_per_s": len(job.values) / seconds,
                "stopped": False,
                "tiles": len(job.tiles),
                "worker_seconds": r.worker_seconds,
                "batch": True,
                "tta": tta,
                "smooth_um": smooth_um,
            }
            values = job.values
            if smooth_um > 0:  # over the whole slide, as predict does
                values = smooth(values, job.spots.centers_um, smooth_um, use=~job.outside & ~job.blank)
            pred = Prediction(
                job.spots.centers_um,
                values,
                np.ones(len(values), bool),
                list(card.genes),
                job.outside,
                job.blank,
                info,
                job.spread,
            )
            result = SlidePrediction(pred, job.spots, card, job.slide, len(values), colour=job.colour)
            adata = result.to_anndata()
            adata.uns["m2ort"]["batch"] = batch_record(job.key, len(job.values), len(card.genes))
            r.output = write_h5ad(adata, job.output)
            r.status, r.seconds = "done", seconds
            nb, no = int(job.blank.sum()), int(job.outside.sum())
            notes = [r.note] if r.note else []
            if nb:
                notes.append(f"{nb} spots show no tissue")
            if no:
                notes.append(f"{no} spots reach past the slide edge")
            r.note = "; ".join(notes)
        except Exception as exc:
            _fail(job, f"writing {job.output} failed: {_error_text(exc)}")
        job.values = job.spread = job.colour = job.outside = job.blank = job.written = None
        job.spots = job.slide = None
        n_finished += 1

    def handle(fut) -> None:
        nonlocal pending
        job, t = where.pop(fut.key)
        job.futures.pop(fut.key, None)  # drop our reference: the cluster frees the result
        pending -= 1
        bar.update(1)
        if job.result.status == "failed":
            return
        if fut.status != "finished":
            try:
                exc = fut.exception()
            except Exception as e:  # cancelled
                exc = e
            _fail(job, f"tile {t}: {_error_text(exc)}")
            client.cancel(list(job.futures.values()))
            if show_progress:
                tqdm.write(f"{job.result.name}: failed: {job.result.error}")
            return
        res: TileResult = fut.result()
        if res.error:  # cannot succeed on retry: the slide fails, its other tiles are dropped
            _fail(job, f"tile {t}: {res.error}")
            client.cancel(list(job.futures.values()))
            if show_progress:
                tqdm.write(f"{job.result.name}: failed: {job.result.error}")
            return
        idx = job.tiles[t]
        if res.tile_id != t or res.slide_index != job.index or not np.array_equal(res.indices, idx):
            _fail(job, f"internal error: tile {t} came back with other spots")
            return
        job.written[idx] += 1
        job.values[idx] = res.values
        if job.spread is not None and res.uncertainty is not None:
            job.spread[idx] = res.uncertainty
        job.outside[idx] = res.outside
        job.blank[idx] = res.blank
        job.start, job.stop = min(job.start, res.start), max(job.stop, res.stop)
        job.result.worker_seconds += res.stop - res.start
        job.info.update({k: v for k, v in res.info.items() if k != "worker"})
        workers_seen.add(res.info.get("worker"))
        job.remaining -= 1
        if job.remaining == 0:
            finish(job)
            bar.set_postfix_str(f"{n_finished}/{n_slides} slides", refresh=True)

    try:
        while todo or pending:
            target = 4 * threads() + 4 if todo else 0
            while todo and pending < target:
                prepare(todo.popleft())
            if pending:
                handle(next(ac))
    except BaseException:
        try:
            client.cancel([f for j, _ in where.values() for f in j.futures.values()])
        except Exception:
            pass  # the cluster may be gone already
        raise
    finally:
        bar.close()
    for job in list(todo):
        _fail(job, "not run")
    return n_tiles, len(workers_seen - {None})
