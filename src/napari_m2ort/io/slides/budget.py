"""How much memory decoding a whole image may take, and whether a header's size is believable.

Flat JPEG/PNG images and TIFFs stored as one huge strip have to be decoded whole, into
an array as big as their header says. A damaged header, or a deliberate decompression
bomb, can claim 60,000 x 60,000 px in a file of a few kB, and decoding it would take
tens of GB before anything fails. So before such a decode the claim is checked against
the file (no codec compresses image data better than about 1000:1) and against a memory
budget, and refused with a message saying what was claimed and what to do instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from napari_m2ort.errors import M2ORTError

__all__ = [
    "DEFAULT_DECODE_BUDGET",
    "ENV_DECODE_BUDGET",
    "budget_scope",
    "check_claim",
    "decode_budget",
]

#: Most bytes a whole-image decode may use, unless the machine has less than twice that.
DEFAULT_DECODE_BUDGET = 8 * 2**30

#: Environment variable overriding the budget, in GB (e.g. 32 for one big conversion).
ENV_DECODE_BUDGET = "NAPARI_M2ORT_MAX_DECODE_GB"

_SCOPE: ContextVar[int | None] = ContextVar("m2ort_decode_budget", default=None)


@contextmanager
def budget_scope(nbytes: int | None) -> Iterator[None]:
    """Use ``nbytes`` as the budget for the slides opened inside the block (None: keep)."""
    if nbytes is not None and not (isinstance(nbytes, (int, float)) and 0 < nbytes < float("inf")):
        raise M2ORTError(f"memory_budget={nbytes!r} is not a positive number of bytes (e.g. 16 * 2**30 for 16 GB).")
    token = _SCOPE.set(int(nbytes) if nbytes is not None else _SCOPE.get())
    try:
        yield
    finally:
        _SCOPE.reset(token)


def decode_budget() -> int:
    """The budget in force: ``budget_scope``, else the environment variable, else
    ``DEFAULT_DECODE_BUDGET`` capped at half the machine's memory."""
    scoped = _SCOPE.get()
    if scoped is not None:
        return scoped
    raw = os.environ.get(ENV_DECODE_BUDGET, "").strip()
    if raw:
        try:
            gb = float(raw)
        except ValueError:
            gb = float("nan")
        if not gb > 0 or gb == float("inf"):
            raise M2ORTError(
                f"{ENV_DECODE_BUDGET}={raw!r} is not a positive number of GB; set it to e.g. 16, or unset it."
            )
        return int(gb * 2**30)
    return min(DEFAULT_DECODE_BUDGET, _physical_memory() // 2)


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 2 * DEFAULT_DECODE_BUDGET


def check_claim(
    path: Path,
    what: str,
    shape: tuple[int, int],
    *,
    stored_bytes: int,
    raw_bytes: int,
    max_ratio: float | None,
    peak_bytes: int,
) -> None:
    """Refuse a whole-image decode of ``path`` before any pixel memory is taken.

    ``shape`` is the (H, W) the header claims, ``raw_bytes`` the samples it stands for,
    ``stored_bytes`` the compressed data actually in the file, ``max_ratio`` the best
    compression the codec can reach (None: unbounded) and ``peak_bytes`` what the
    decode would hold at its peak.
    """
    h, w = shape
    claim = f"'{path}' claims to be {w:,} x {h:,} px ({what}), which needs about {_gb(peak_bytes)} of memory to decode"
    ratio = raw_bytes / max(stored_bytes, 1)
    if max_ratio is not None and ratio > max_ratio:
        raise M2ORTError(
            f"{claim}, but it holds only {_size(stored_bytes)} of image data: {ratio:,.0f}:1 "
            f"compression, where at most {max_ratio:,.0f}:1 is possible. The header is damaged "
            "or the file is a decompression bomb; nothing was decoded. If the slide is genuine, "
            "export it again from the scanner software as a tiled pyramid (SVS or OME-TIFF; "
            "`napari-m2ort convert` writes one from any image that opens)."
        )
    budget = decode_budget()
    if peak_bytes > budget:
        need = max(1, -(-peak_bytes // 2**30))
        raise M2ORTError(
            f"{claim}, more than the memory budget of {_gb(budget)}; nothing was decoded. "
            "Convert it once to a tiled pyramid, which opens instantly and reads only the "
            f"tiles in view: run `napari-m2ort convert '{path.name}' '{path.stem}.ome.tif' "
            f"--mpp ...` with {ENV_DECODE_BUDGET}={need} on a machine with that much free memory."
        )


def _gb(n: int) -> str:
    return f"{n / 2**30:,.1f} GB"


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n:,} bytes"
