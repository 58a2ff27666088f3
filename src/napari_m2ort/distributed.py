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
* A **worker** loads the model once per process (cache keyed by path, size, mtime and
  device) and keeps a small LRU of open slides; a task reads its tile's patches through
  ``Slide.read_region`` (tile by tile in a pyramidal file), runs ``inference.predict`` on
  them and returns ``(tile id, spot indices, values float32, outside, blank)``. Memory
  per worker is one model, a batch of patches and a tile's outputs, whatever the slide
  size. Exception: a flat JPEG/PNG has no tiles, so the reader decodes it whole once per
  worker (~0.3 GB for a 10k x 10k px image, times up to ``WORKER_SLIDES`` open slides). **Convert cohorts to pyramidal OME-TIFF**
  (``napari-m2ort convert``) before running them at scale.
* The client gathers tiles as they complete (``as_completed``), places them by spot
  index (every index exactly once, checked) and writes ``OUT/<slide name>.h5ad``
  atomically as soon as a slide's last tile is in.

Robustness
----------
* A worker that dies mid-task: the scheduler reschedules its tasks on the surviving
  (or restarted) workers; results are placed by spot index, so nothing is duplicated
  or lost. Exceptions raised inside a task are retried ``retries`` times.
* A slide that cannot be opened, laid out or read fails alone: it is reported in the
  summary and the other slides go on. The exit code is 1 if any slide failed.
* Re-running the same command skips slides whose output is complete: the ``.h5ad``
  carries ``uns["m2ort"]["batch"]`` (JSON: a key of the slide file, the spot settings
  and the model weights, and the expected spot count), which must match and agree with
  the file's number of spots. A changed setting or model re-predicts that slide, and an
  output without that record (e.g. from ``napari-m2ort predict``) is replaced.
* ``local_cluster()`` (``--scheduler local``) turns off two dask defaults that slow model
  inference down (the nanny's ``MALLOC_TRIM_THRESHOLD_`` and the worker profiler); see
  ``benchmarks/results/distributed_cpu.md``.

For an existing cluster (``scheduler="tcp://host:8786"``) the slide and model paths
must be readable by the workers under the same names (a shared file system).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np

from .errors import M2ORTError

__all__ = ["BatchSummary", "SlideResult", "TileResult", "batch_predict", "local_cluster", "run_batch"]

#: Task retries after an exception inside the task (worker deaths are handled by the
#: scheduler, up to ``distributed.scheduler.allowed-failures`` times per task).
RETRIES = 2
#: Open slides kept per worker process (LRU).
WORKER_SLIDES = 2
_BATCH_FORMAT = 1


# ======================================================================================
# Results
# ======================================================================================


@dataclass
class SlideResult:
    """What happened to one slide of the cohort."""

    slide: str  # the path as given
    name: str  # output name (slide name without extension)
    status: str = "pending"  # "done" | "skipped" (output complete already) | "failed"
    spots: int = 0
    seconds: float = 0.0  # done: first tile start -> last tile end on the cluster
    output: Optional[Path] = None
    error: str = ""
    note: str = ""
    tiles: int = 0
    worker_seconds: float = 0.0  # summed task time over the slide's tiles

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")


@dataclass
class BatchSummary:
    slides: list[SlideResult]
    seconds: float = 0.0
    tiles: int = 0
    dashboard: str = ""
    workers: int = 0  # worker processes that delivered tiles (a restarted worker counts anew)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.slides)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def by_status(self, status: str) -> list[SlideResult]:
        return [r for r in self.slides if r.status == status]

    @property
    def done(self) -> list[SlideResult]:
        return self.by_status("done")

    @property
    def skipped(self) -> list[SlideResult]:
        return self.by_status("skipped")

    @property
    def failed(self) -> list[SlideResult]:
        return self.by_status("failed")

    @property
    def spots_predicted(self) -> int:
        return sum(r.spots for r in self.done)

    def __getitem__(self, key: str) -> SlideResult:
        for r in self.slides:
            if key in (r.name, r.slide, Path(r.slide).name):
                return r
        raise KeyError(key)

    def table(self) -> str:
        """Plain-text summary: one row per slide, then the errors and notes in full."""
        rows = [("slide", "spots", "seconds", "status", "output")]
        for r in self.slides:
            rows.append((r.name, str(r.spots) if r.spots else "-", f"{r.seconds:.1f}", r.status,
                         str(r.output) if r.output else "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = []
        for k, row in enumerate(rows):
            lines.append("  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]),
                                    row[2].rjust(widths[2]), row[3].ljust(widths[3]), row[4]]).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ------")
        for r in self.slides:
            if r.error:
                lines.append(f"{r.name}: {r.status}: {r.error}")
            elif r.note and r.status == "done":
                lines.append(f"{r.name}: {r.note}")
        n = self.spots_predicted
        rate = f", {n / self.seconds:.1f} spots/s" if n and self.seconds > 0 else ""
        lines.append(
            f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed; "
            f"{n} spots predicted in {self.seconds:.1f} s on {self.workers} worker(s){rate}"
        )
        return "\n".join(lines)


@dataclass
class TileResult:
    """One task's output (plain arrays: cheap to pickle back to the client)."""

    slide_index: int
    tile_id: int
    indices: np.ndarray  # (n,) int64 into the slide's spot list
    values: np.ndarray  # (n, G) float32
    outside: np.ndarray  # (n,) bool
    blank: np.ndarray  # (n,) bool
    start: float  # time.time() on the worker
    stop: float
    info: dict = field(default_factory=dict)


# ======================================================================================
# Worker side: per-process caches and the task
# ======================================================================================

_LOCK = threading.RLock()
_MODELS: "OrderedDict[tuple, tuple]" = OrderedDict()
_SLIDES: "OrderedDict[tuple, object]" = OrderedDict()


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _worker_model(model_path: str, device: str):
    """The model of ``model_path`` on ``device``, loaded once per process."""
    from .devices import resolve_device
    from .model.weights import load_checkpoint

    dev = str(resolve_device(device))
    key = (*_file_key(model_path), dev)
    with _LOCK:
        hit = _MODELS.get(key)
        if hit is None:
            _MODELS.clear()  # one model per worker: a new file or device replaces the old
            hit = _MODELS[key] = load_checkpoint(model_path, device=dev)
        return hit


def _worker_slide(path: str, mpp: Optional[float]):
    """An open slide, shared by the tasks of this process (bounded LRU)."""
    from .io.slides import open_slide

    key = (*_file_key(path), mpp)
    with _LOCK:
        slide = _SLIDES.get(key)
        if slide is not None:
            _SLIDES.move_to_end(key)
            return slide
        slide = open_slide(path, mpp=mpp)
        _SLIDES[key] = slide
        while len(_SLIDES) > WORKER_SLIDES:
            _, old = _SLIDES.popitem(last=False)
            old.close()  # a read still running on it re-opens the file
        return slide


_QUIET = False


def _quiet_worker_warnings() -> None:
    """The client reports these per slide; in worker logs they would repeat per tile.

    Process-wide filters, installed once (``catch_warnings`` is not thread-safe)."""
    global _QUIET
    if _QUIET:
        return
    for pattern in (r".*spots show no tissue", r".*pixel.size"):
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    _QUIET = True


def _set_torch_threads(n: Optional[int]) -> None:
    if not n:
        return
    import torch

    with _LOCK:
        if torch.get_num_threads() != int(n):
            torch.set_num_threads(int(n))


def _predict_tile(slide_index: int, tile_id: int, path: str, mpp: Optional[float],
                  centers_um: np.ndarray, indices: np.ndarray, model_path: str, device: str,
                  precision: str, batch_size: int, torch_threads: Optional[int],
                  compile: bool | str = False, slide_spots: Optional[int] = None) -> TileResult:
    """The dask task: predict one tile of spots of one slide."""
    from .inference import predict
    from .progress import run_to_end

    start = time.time()
    _quiet_worker_warnings()
    _set_torch_threads(torch_threads)
    model, card = _worker_model(model_path, device)
    slide = _worker_slide(path, mpp)
    pred = run_to_end(predict(slide, centers_um, model, card, device=device,
                              batch_size=batch_size, precision=precision, compile=compile,
                              job_spots=slide_spots))
    if not pred.complete:
        raise RuntimeError(f"tile {tile_id} of {path}: only {pred.n_done}/{len(indices)} spots predicted")
    info = {k: pred.info.get(k) for k in ("device", "precision", "batch_size", "compiled")}
    info["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return TileResult(slide_index, tile_id, np.asarray(indices, dtype=np.int64),
                      pred.values.astype(np.float32, copy=False), pred.outside, pred.blank,
                      start, time.time(), info)


# ======================================================================================
# Client side
# ======================================================================================


def output_name(path) -> str:
    """``OUT/<this>.h5ad``: the slide's file name without extension(s) (.ome.tif too)."""
    from .io.slides import _display_name

    return _display_name(Path(os.fspath(path)))


def _parse_region(region) -> Optional[str]:
    """``None``, "x0,y0,x1,y1" or 4 numbers -> the CLI's string form (validated)."""
    if region is None or (isinstance(region, str) and not region.strip()):
        return None
    if isinstance(region, str):
        parts = region.split(",")
    else:
        parts = list(region)
    try:
        vals = [float(v) for v in parts]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise M2ORTError(f"--region {region!r}: give four numbers x0,y0,x1,y1 in µm.")
    return ",".join(repr(v) for v in vals)


def _resolve_model_path(spec) -> Path:
    from .model.weights import BUNDLED_PATH

    if spec is None or str(spec) == "bundled":
        path = Path(BUNDLED_PATH)
        if not path.is_file():
            raise M2ORTError(
                f"The bundled model weights are not installed ({path} is missing). Reinstall "
                "napari-m2ort, or pass --model with a trained .safetensors checkpoint."
            )
        return path
    path = Path(os.fspath(spec)).expanduser()
    if not path.exists():
        if path.suffix == ".safetensors":
            raise M2ORTError(f"{path}: no such model file.")
        raise M2ORTError(f"--model {str(spec)!r}: give 'bundled' or the path of a .safetensors checkpoint.")
    return path.resolve()


def _weights_id(path: Path) -> str:
    """The checkpoint's tensor checksum (from its header), else its size and mtime."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            digest = (fh.metadata() or {}).get("napari_m2ort.tensor_sha256")
        if digest:
            return digest
    except Exception:
        pass
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def _job_key(slide_path: str, settings: dict) -> str:
    st = os.stat(slide_path)
    blob = json.dumps({"slide": os.path.abspath(slide_path), "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _output_complete(path: Path, key: str) -> Optional[int]:
    """The spot count if ``path`` is a complete batch output for ``key``, else None."""
    if not path.is_file():
        return None
    try:
        import anndata as ad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = ad.read_h5ad(path, backed="r")
        try:
            meta = json.loads(adata.uns["m2ort"]["batch"])
            n_obs, n_var = adata.n_obs, adata.n_vars
        finally:
            adata.file.close()
    except Exception:
        return None
    if (meta.get("key") == key and meta.get("complete") is True
            and meta.get("n_spots") == n_obs and meta.get("n_genes") == n_var):
        return int(n_obs)
    return None


@dataclass
class _SlideJob:
    index: int
    result: SlideResult
    path: str
    key: str = ""
    output: Optional[Path] = None
    meta: object = None  # name/mpp/path of the slide, for prediction_to_anndata
    spots: object = None  # SpotLayout
    tiles: list = field(default_factory=list)  # list of index arrays
    values: Optional[np.ndarray] = None
    outside: Optional[np.ndarray] = None
    blank: Optional[np.ndarray] = None
    written: Optional[np.ndarray] = None  # per spot: how many times it was delivered
    remaining: int = 0
    start: float = float("inf")
    stop: float = 0.0
    info: dict = field(default_factory=dict)
    futures: dict = field(default_factory=dict)  # key -> Future, until its result is in


def local_cluster(workers: int = 2, threads_per_worker: int = 1, dashboard_address: str = ":8787"):
    """A ``LocalCluster`` of worker processes set up for model inference.

    dask's defaults cost throughput here: ``MALLOC_TRIM_THRESHOLD_`` (set by the nanny)
    turns off glibc's adaptive mmap threshold, so every activation tensor becomes a fresh
    mmap plus page faults (~15 % slower forward passes), and the 10 ms stack-sampling
    profiler competes for the GIL. Tasks here are few and long, so neither is needed.
    """
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                          "distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                            processes=True, dashboard_address=dashboard_address)


def _connect(scheduler: str, workers: int, threads_per_worker: int, dashboard_address: str):
    from distributed import Client

    if scheduler == "local":
        cluster = local_cluster(workers, threads_per_worker, dashboard_address)
        try:
            client = Client(cluster)
        except BaseException:
            cluster.close()
            raise
        return client, cluster
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise M2ORTError(
            f"Cannot reach the dask scheduler at {scheduler!r} ({exc}). Start it (dask scheduler) "
            "and its workers first, check the address, or use --scheduler local."
        ) from None
    return client, None


def _dashboard(client) -> str:
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:
        services = {}
    if "dashboard" not in services:
        return ""
    return client.dashboard_link


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


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
    Raises ``M2ORTError`` for problems with the options (nothing runs); problems with one
    slide are reported in the returned summary.
    """
    from .devices import resolve_device, resolve_precision
    from .model.weights import read_card
    from .spots import layout_params

    t_start = time.perf_counter()
    # ---- validate everything that does not depend on one slide (usage errors) -------
    slides = [str(os.fspath(s)) for s in slides]
    if not slides:
        raise M2ORTError("No slides given: pass one or more slide files.")
    for name, v in (("--tile-spots", tile_spots), ("--workers", workers),
                    ("--threads-per-worker", threads_per_worker), ("--batch-size", batch_size)):
        if int(v) < 1:
            raise M2ORTError(f"{name} must be at least 1, got {v}.")
    region_s = _parse_region(region)
    layout_params(layout, pitch, diameter)
    if mpp is not None and not (float(mpp) > 0 and np.isfinite(float(mpp))):
        raise M2ORTError(f"--mpp {mpp!r}: give a positive number of µm per pixel.")
    model_file = _resolve_model_path(model_path)
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
    out_dir = Path(os.fspath(out_dir)).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise M2ORTError(f"Cannot create the output folder {out_dir} ({exc}).") from None
    settings = {"format": _BATCH_FORMAT, "mpp": mpp, "region": region_s, "tissue": bool(tissue),
                "layout": layout, "pitch": pitch, "diameter": diameter, "precision": precision,
                "weights": _weights_id(model_file), "genes": card.genes}
    spot_args = argparse.Namespace(region=region_s, layout=layout, pitch=pitch,
                                   diameter=diameter, tissue=tissue)

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
            job.key = _job_key(job.path, settings)
        except OSError as exc:
            _fail(job, f"Slide file '{job.path}' cannot be read ({exc.strerror or exc}). "
                       "Check the path for typos, or that the drive holding it is mounted.", t)
            continue
        n = _output_complete(job.output, job.key)
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
            client, cluster = _connect(scheduler, int(workers), int(threads_per_worker), dashboard_address)
        try:
            summary.dashboard = _dashboard(client)
            if summary.dashboard:
                hint = "" if _has_bokeh() else " (install bokeh>=3.1 for the live diagnostics)"
                echo(f"dask dashboard: {summary.dashboard}{hint}")
            if torch_threads is None and own and scheduler == "local":
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                torch_threads = max(1, cores // (int(workers) * int(threads_per_worker)))
            summary.tiles, summary.workers = _run_jobs(
                client, todo, card, model_file, spot_args, mpp, device, precision,
                int(batch_size), int(tile_spots), int(retries), torch_threads, progress,
                compile=compile,
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
    job.values = job.outside = job.blank = job.written = None


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, M2ORTError):
        return str(exc)
    name = type(exc).__name__
    if name == "KilledWorker":
        return ("the workers running one of its tiles died repeatedly (out of memory? "
                f"a crash in a decoder?): {exc}")
    return f"{name}: {exc}"


def _run_jobs(client, todo, card, model_file, spot_args, mpp, device, precision, batch_size,
              tile_spots, retries, torch_threads, show_progress, compile=False):
    """Prepare slides a few tiles ahead of the cluster, submit, gather, write."""
    from distributed import as_completed
    from tqdm import tqdm

    from .cli import spots_for_slide
    from .inference import Prediction
    from .io.export import prediction_to_anndata, write_h5ad
    from .io.slides import open_slide
    from .patches import spatial_order

    token = uuid.uuid4().hex[:8]
    ac = as_completed([], with_results=False)
    where: dict[str, tuple[_SlideJob, int]] = {}  # future key -> (job, tile)
    pending = 0
    n_tiles = 0
    workers_seen: set = set()
    bar = tqdm(total=0, unit="tile", desc="batch", dynamic_ncols=True, disable=not show_progress,
               delay=1.0)  # shown once tiles are under way, not as an empty "0tile"
    n_slides, n_finished = len(todo), 0

    def threads() -> int:
        try:
            return max(1, sum(client.nthreads().values()))
        except Exception:
            return 1

    def prepare(job: _SlideJob) -> None:
        nonlocal pending, n_tiles
        t0 = time.perf_counter()
        try:
            slide = open_slide(job.path, mpp=mpp)  # warns here (once) if it has no pixel size
            try:
                spots = spots_for_slide(slide, spot_args)
                meta = SimpleNamespace(name=slide.name, mpp=slide.mpp, path=slide.path)
                default_mpp = slide.mpp_source == "default"
            finally:
                slide.close()
        except Exception as exc:  # one slide's problem; the others go on
            _fail(job, _error_text(exc), t0)
            return
        n = len(spots)
        job.spots, job.meta = spots, meta
        if default_mpp:
            job.result.note = f"no pixel size in the file: assumed {meta.mpp:g} µm/px"
        order = spatial_order(spots.centers_um)
        k = max(1, int(np.ceil(n / tile_spots)))
        job.tiles = [t for t in np.array_split(order, k) if len(t)]
        g = len(card.genes)
        job.values = np.full((n, g), np.nan, dtype=np.float32)
        job.outside = np.zeros(n, dtype=bool)
        job.blank = np.zeros(n, dtype=bool)
        job.written = np.zeros(n, dtype=np.uint8)
        job.remaining = len(job.tiles)
        job.result.spots, job.result.tiles = n, len(job.tiles)
        path = os.path.abspath(job.path)
        for t, idx in enumerate(job.tiles):
            fut = client.submit(
                _predict_tile, job.index, t, path, mpp, spots.centers_um[idx], idx,
                str(model_file), device, precision, batch_size, torch_threads, compile, n,
                key=f"m2ort-tile-{token}-{job.index}-{t}", retries=retries,
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
                    f"{(job.written > 1).sum()} delivered twice")
            seconds = max(job.stop - job.start, 1e-9)
            info = {**job.info, "seconds": seconds, "spots_per_s": len(job.values) / seconds,
                    "stopped": False, "tiles": len(job.tiles), "worker_seconds": r.worker_seconds,
                    "batch": True}
            pred = Prediction(job.spots.centers_um, job.values, np.ones(len(job.values), bool),
                              list(card.genes), job.outside, job.blank, info)
            adata = prediction_to_anndata(pred, card, job.meta, job.spots)
            adata.uns["m2ort"]["batch"] = json.dumps({
                "key": job.key, "complete": True, "n_spots": len(job.values),
                "n_genes": len(card.genes), "format": _BATCH_FORMAT})
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
        job.values = job.outside = job.blank = job.written = None
        job.spots = None
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
        idx = job.tiles[t]
        if res.tile_id != t or res.slide_index != job.index or not np.array_equal(res.indices, idx):
            _fail(job, f"internal error: tile {t} came back with other spots")
            return
        job.written[idx] += 1
        job.values[idx] = res.values
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


# ======================================================================================
# CLI
# ======================================================================================


def run_batch(args) -> int:
    """``napari-m2ort batch``: 0 if every slide succeeded or was complete already, else 1."""
    summary = batch_predict(
        args.slides, args.out, model_path=args.model, region=args.region, tissue=args.tissue,
        layout=args.layout, pitch=args.pitch, diameter=args.diameter, mpp=args.mpp,
        device=args.device, precision=args.precision, batch_size=args.batch_size,
        tile_spots=args.tile_spots, scheduler=args.scheduler, workers=args.workers,
        threads_per_worker=args.threads_per_worker, compile=args.compile,
    )
    print(summary.table())
    return summary.exit_code
