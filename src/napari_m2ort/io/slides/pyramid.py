"""Pyramid arithmetic shared by the format families and the converter.

One 2x area-average (``half_np``, rounding half up) makes every synthesised level, in
memory or lazily per dask chunk, so a level computed from a flat image, added below a
TIFF's own pyramid or written by ``convert`` has the same pixels.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

#: Synthesised pyramids stop once the largest side of a level is below this.
MIN_LEVEL_SIDE = 1024

#: Dask chunk edge (px). Region reads bypass dask and slicing a level fuses into a read of
#: only the tiles needed, so this only sets the graph size (2,401 chunks for 100k px).
CHUNK = 2048


def half_np(a: np.ndarray) -> np.ndarray:
    """2x area downsample, rounding half up, edge-padded to even size.

    Works in bands of rows with strided adds into a reused uint16 buffer: a 92 MP
    image takes a fraction of a second and little extra memory.
    """
    h, w, c = a.shape
    oh, ow = (h + 1) // 2, (w + 1) // 2
    out = np.empty((oh, ow, c), dtype=np.uint8)
    band = 256
    acc = np.empty((min(band, oh), ow, c), dtype=np.uint16)
    for r0 in range(0, oh, band):
        r1 = min(oh, r0 + band)
        n = r1 - r0
        src = a[2 * r0 : 2 * r1]
        if src.shape[0] < 2 * n or w % 2:
            src = np.pad(src, ((0, 2 * n - src.shape[0]), (0, w % 2), (0, 0)), mode="edge")
        s = acc[:n]
        np.add(src[0::2, 0::2], src[1::2, 0::2], out=s, dtype=np.uint16)
        s += src[0::2, 1::2]
        s += src[1::2, 1::2]
        s += 2
        s >>= 2
        out[r0:r1] = s
    return out


def half_dask(d: da.Array) -> da.Array:
    """``half_np`` per chunk, lazily, for files without (enough of) a pyramid.

    Each output chunk depends on exactly one input chunk, so the graph stays one
    blockwise layer per level (fast to build, culls to what a view needs) and chunk
    sizes halve level by level. Interior chunks must be even for chunk-wise halving to
    equal whole-image halving, hence the occasional rechunk.
    """
    ys, xs = d.chunks[0], d.chunks[1]
    if any(c % 2 for c in ys[:-1] + xs[:-1]) or len(d.chunks[2]) != 1:
        d = d.rechunk((_even(ys[0]), _even(xs[0]), 3))
    chunks = (
        tuple((c + 1) // 2 for c in d.chunks[0]),
        tuple((c + 1) // 2 for c in d.chunks[1]),
        d.chunks[2],
    )
    meta = np.empty((0, 0, 0), np.uint8)
    return d.map_blocks(half_np, chunks=chunks, dtype=np.uint8, meta=meta)


def _even(n: int) -> int:
    return max(2, n + (n % 2))


def extend_pyramid(levels: list[da.Array], readers: list[Any]) -> None:
    """Add lazily averaged levels below the file's smallest one (napari's overview).

    Chunks halve with each level (16 px at 1/128 of a 2048-chunked level): many small
    tasks, but each depends on one chunk above, so any view reads only what it covers.
    Still, the overview of a big file without a pyramid needs every level-0 pixel once:
    such files should be converted (napari-m2ort convert).
    """
    while max(levels[-1].shape[:2]) >= MIN_LEVEL_SIDE:
        half = half_dask(levels[-1])
        levels.append(half)
        readers.append(half)


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Level shapes of a synthesised pyramid: halving (rounding up) until the largest side
    is below MIN_LEVEL_SIDE. Flat images and converted OME-TIFFs both follow it."""
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) >= MIN_LEVEL_SIDE:
        ph, pw = shapes[-1]
        shapes.append(((ph + 1) // 2, (pw + 1) // 2))
    return shapes
