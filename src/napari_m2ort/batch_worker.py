"""The worker side of a cohort run: per-process caches and the dask task.

A worker process loads the model once (cache keyed by the checkpoint's path, size,
mtime and the device) and keeps a small LRU of open slides, so a task costs one tile of
patches and one forward pass per batch, whatever the slide size. See ``distributed``
for how the client cuts slides into these tasks.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from collections import OrderedDict
from typing import Optional

import numpy as np

from .batch_records import TileResult

#: Open slides kept per worker process (LRU).
WORKER_SLIDES = 2

_LOCK = threading.RLock()
_MODELS: OrderedDict[tuple, tuple] = OrderedDict()
_SLIDES: OrderedDict[tuple, object] = OrderedDict()


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


def predict_tile(
    slide_index: int,
    tile_id: int,
    path: str,
    mpp: Optional[float],
    centers_um: np.ndarray,
    indices: np.ndarray,
    model_path: str,
    device: str,
    precision: str,
    batch_size: int,
    torch_threads: Optional[int],
    compile: bool | str = False,
    slide_spots: Optional[int] = None,
    tta: str = "none",
) -> TileResult:
    """The dask task: predict one tile of spots of one slide (unsmoothed: the client
    smooths once the whole slide is in). A user-fixable problem (``M2ORTError``) comes
    back as ``TileResult.error`` instead of an exception, which dask would retry."""
    from .errors import M2ORTError
    from .pipelines import predict_spots
    from .progress import run_to_end

    start = time.time()
    _quiet_worker_warnings()
    _set_torch_threads(torch_threads)
    try:
        model, card = _worker_model(model_path, device)
        slide = _worker_slide(path, mpp)
        pred = run_to_end(
            predict_spots(
                slide, centers_um, model, card, device=device, batch_size=batch_size, precision=precision,
                compile=compile, job_spots=slide_spots, tta=tta,
            )
        )  # fmt: skip
    except M2ORTError as exc:
        empty = np.zeros(0)
        return TileResult(slide_index, tile_id, np.asarray(indices, dtype=np.int64), empty, empty, empty,
                          start, time.time(), error=str(exc))  # fmt: skip
    if not pred.complete:
        raise RuntimeError(f"tile {tile_id} of {path}: only {pred.n_done}/{len(indices)} spots predicted")
    info = {k: pred.info.get(k) for k in ("device", "precision", "batch_size", "compiled")}
    info["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return TileResult(
        slide_index,
        tile_id,
        np.asarray(indices, dtype=np.int64),
        pred.values.astype(np.float32, copy=False),
        pred.outside,
        pred.blank,
        start,
        time.time(),
        info,
        None if pred.uncertainty is None else pred.uncertainty.astype(np.float32, copy=False),
    )
