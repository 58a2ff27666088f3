"""Write slides as tiled, pyramidal, JPEG-compressed OME-TIFF.

A flat 100-megapixel JPEG must be decoded whole before any pixel can be shown; the same
image as a tiled pyramid opens instantly and reads only the tiles in view. Converting
once pays off for every later viewing, prediction and training run, and the OME
PhysicalSize tags carry the µm/px so it never has to be given again.

Memory: level 0 is written tile by tile from the source slide; each lower level is read
tile by tile from the source's own pyramid (or its decode cache for flat images). Only
when the source has no level close enough is one whole output level held in memory and
the remaining levels halved from it: at most the source image plus one level.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_m2ort.errors import Cancelled, M2ORTError
from napari_m2ort.io.slides import Slide, open_slide
from napari_m2ort.io.slides.pyramid import half_np, level_shapes
from napari_m2ort.progress import Job, Progress, run_to_end
from napari_m2ort.slide import OME_SUFFIXES, choose_level, validate_mpp

__all__ = ["convert_to_ome_tiff", "iter_convert_to_ome_tiff", "make_synthetic_pyramid"]

# Reading a native level and shrinking by up to this factor per tile is cheaper than
# materialising a whole level (SVS pyramids step by 4).
_MAX_TILEWISE_FACTOR = 4.5


def convert_to_ome_tiff(
    src: str | os.PathLike,
    out: str | os.PathLike,
    mpp: float | None = None,
    tile: int = 512,
    quality: int = 90,
    progress: Callable[[Progress], Any] | None = None,
    memory_budget: int | None = None,
) -> Path:
    """Convert any slide ``open_slide`` reads into a pyramidal OME-TIFF; return its path.

    ``mpp`` overrides the source's pixel size (µm/px) and is required when the source
    has none: the output states its pixel size as fact, so a guess must not go in.
    ``progress`` receives ``Progress("convert", tiles_done, tiles_total, message)``.
    ``memory_budget`` (bytes) is what decoding a flat source whole may take (see
    ``open_slide``); sources over it, or with impossible header sizes, are refused
    before anything is written.
    """
    job = iter_convert_to_ome_tiff(src, out, mpp=mpp, tile=tile, quality=quality, memory_budget=memory_budget)
    return run_to_end(job, progress)


def iter_convert_to_ome_tiff(
    src: str | os.PathLike,
    out: str | os.PathLike,
    mpp: float | None = None,
    tile: int = 512,
    quality: int = 90,
    memory_budget: int | None = None,
) -> Job:
    """Generator form of ``convert_to_ome_tiff`` (stoppable with ``gen.close()``).

    tifffile pulls tiles from an iterator inside one ``write`` call per level, so the
    writing runs in a worker thread and this generator relays its progress; closing the
    generator makes the tile iterator raise ``Cancelled``. The file appears at ``out``
    only when complete (temp file + ``os.replace``); a stopped or failed conversion
    leaves nothing behind.
    """
    out = Path(os.fspath(out)).expanduser()
    _check_options(out, tile, quality)
    slide = open_slide(src, mpp, quiet=True, memory_budget=memory_budget)
    if slide.mpp_source == "default":
        slide.close()
        raise M2ORTError(
            f"'{slide.path}' has no pixel-size metadata, and an OME-TIFF must record one. "
            "Pass the scanner's µm/px with mpp= (--mpp on the command line), e.g. 0.5 "
            "for a 20x scan."
        )
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
    stop = threading.Event()
    events: queue.Queue = queue.Queue()
    worker: threading.Thread | None = None
    try:
        if out.exists() and out.resolve() == slide.path.resolve():
            raise M2ORTError(f"The output '{out}' is the input file itself; choose another output name.")
        shapes = level_shapes(*slide.shape)
        total = sum(_n_tiles(h, w, tile) for h, w in shapes)
        yield Progress("convert", 0, total, f"writing {out.name}")

        def work() -> None:
            try:
                _write_pyramid(slide, tmp, shapes, tile, quality, events, stop)
                events.put(("done", None))
            except BaseException as exc:  # relayed to the consumer's thread
                events.put(("error", exc))

        worker = threading.Thread(target=work, name="m2ort-convert", daemon=True)
        worker.start()
        while True:
            kind, value = events.get()
            if kind == "tiles":
                done, level = value
                yield Progress("convert", done, total, f"level {level + 1}/{len(shapes)}")
            elif kind == "error":
                raise value
            else:
                break
        os.replace(tmp, out)
        yield Progress("convert", total, total, f"wrote {out.name}")
        return out
    finally:
        stop.set()
        if worker is not None:
            worker.join()
        if tmp.exists():
            tmp.unlink()
        slide.close()


def _write_pyramid(
    slide: Slide,
    path: Path,
    shapes: list[tuple[int, int]],
    tile: int,
    quality: int,
    events: queue.Queue,
    stop: threading.Event,
) -> None:
    done = 0
    with _writer(path) as tw:
        prev: np.ndarray | None = None
        for k, (h, w) in enumerate(shapes):
            prev, tiles = _level_tiles(slide, k, shapes, tile, prev)

            def counted(tiles: Iterator[np.ndarray] = tiles, k: int = k) -> Iterator[np.ndarray]:
                nonlocal done
                for t in tiles:
                    if stop.is_set():
                        raise Cancelled("conversion stopped")
                    yield t
                    done += 1
                    if done % 64 == 0:
                        events.put(("tiles", (done, k)))

            options = _level_options(slide.mpp, slide.shape[1], slide.name, (h, w), k, len(shapes), tile, quality)
            # tifffile buffers this many bytes of raw tiles per parallel encode pass
            # (default 256 MB): keep it small next to the source image.
            options["buffersize"] = 32 * 2**20
            try:
                tw.write(counted(), **options)
            except OSError as exc:
                raise M2ORTError(f"Writing '{path}' failed: {exc.strerror or exc}. Check free disk space.") from exc


def _level_options(
    mpp: float,
    width0: int,
    name: str,
    shape: tuple[int, int],
    k: int,
    n_levels: int,
    tile: int,
    quality: int,
) -> dict[str, Any]:
    """tifffile.write arguments for level ``k``: OME metadata on level 0, SubIFDs after."""
    mpp_k = mpp * width0 / shape[1]
    options: dict[str, Any] = dict(
        shape=(*shape, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(quality)},
        resolution=(1e4 / mpp_k, 1e4 / mpp_k),
        resolutionunit="CENTIMETER",
    )
    if k == 0:
        options["subifds"] = n_levels - 1
        options["metadata"] = {
            "axes": "YXS",
            "Name": name,
            "PhysicalSizeX": mpp,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm",
        }
    else:
        options["subfiletype"] = 1
        options["metadata"] = None
    return options


def _check_options(out: Path, tile: int, quality: int) -> None:
    if tile < 16 or tile % 16:
        raise M2ORTError(f"Tile size {tile} for '{out}' must be a multiple of 16 (e.g. 256 or 512).")
    if not 1 <= quality <= 100:
        raise M2ORTError(f"JPEG quality {quality} for '{out}' must be between 1 and 100.")
    if not out.name.lower().endswith(OME_SUFFIXES):
        raise M2ORTError(f"Output '{out}' should end in .ome.tif so other tools recognise it as OME-TIFF.")
    if out.is_dir():
        raise M2ORTError(f"Output '{out}' is a folder; give a file name ending in .ome.tif.")
    if not out.parent.is_dir():
        raise M2ORTError(f"The folder for the output '{out}' does not exist; create it first.")


def _n_tiles(h: int, w: int, tile: int) -> int:
    return math.ceil(h / tile) * math.ceil(w / tile)


def _writer(path: Path):
    import tifffile

    try:
        return tifffile.TiffWriter(path, bigtiff=True, ome=True)
    except OSError as exc:
        raise M2ORTError(
            f"Cannot write '{path.parent}': {exc.strerror or exc}. Choose a folder you can "
            "write to with enough free space."
        ) from exc


def _level_tiles(
    slide: Slide,
    k: int,
    shapes: list[tuple[int, int]],
    tile: int,
    prev: np.ndarray | None,
) -> tuple[np.ndarray | None, Iterator[np.ndarray]]:
    """Tiles of output level ``k`` and, when it had to be built whole, the level itself."""
    h, w = shapes[k]
    ds = slide.shape[1] / w
    native = slide.downsamples[: slide.native_levels]
    s = choose_level(native, ds)
    factor = ds / native[s]
    if prev is None and factor <= _MAX_TILEWISE_FACTOR:
        return None, _tiles_from_slide(slide, s, factor, (h, w), tile)
    if prev is not None:
        level = half_np(prev)
    else:
        sh, sw = slide.levels[s].shape[:2]
        level = _shrink(slide.read_region(0, 0, sw, sh, s), factor, (h, w))
    return level, _tiles_from_array(level, tile)


def _tiles_from_array(level: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    h, w = level.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            yield _pad_edge(level[y : y + tile, x : x + tile], tile)


def _pad_edge(t: np.ndarray, tile: int) -> np.ndarray:
    """Fill a partial edge tile by repeating its last row/column.

    White or black padding would put a sharp edge inside the JPEG block and ring into
    the real pixels next to it.
    """
    if t.shape[:2] == (tile, tile):
        return t
    return np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")


def _tiles_from_slide(slide: Slide, s: int, factor: float, shape: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
    """Tiles read from source level ``s`` and shrunk by ``factor`` (~1, 2 or 4)."""
    h, w = shape
    sh, sw = slide.levels[s].shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            th, tw = min(tile, h - y), min(tile, w - x)  # valid part of this tile
            x0, y0 = round(x * factor), round(y * factor)
            x1, y1 = min(sw, round((x + tw) * factor)), min(sh, round((y + th) * factor))
            region = slide.read_region(x0, y0, max(1, x1 - x0), max(1, y1 - y0), s)
            yield _pad_edge(_shrink(region, factor, (th, tw)), tile)


def _shrink(a: np.ndarray, factor: float, shape: tuple[int, int]) -> np.ndarray:
    """Area-downsample to ``shape``: repeated 2x averages when the factor is a power of
    two (the same arithmetic as the slide's own synthesised levels), else a box filter."""
    halvings = round(math.log2(factor)) if factor >= 1 else 0
    if abs(factor - 2**halvings) < 0.01:
        for _ in range(halvings):
            a = half_np(a)
        if a.shape[:2] == shape:
            return a
        if a.shape[0] >= shape[0] and a.shape[1] >= shape[1]:
            return a[: shape[0], : shape[1]]
    return _resize(a, shape)


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if a.shape[:2] == shape:
        return a
    return np.asarray(Image.fromarray(a).resize((shape[1], shape[0]), Image.Resampling.BOX))


# --------------------------------------------------------------------------------------
# Synthetic slides for tests and benchmarks
# --------------------------------------------------------------------------------------


def make_synthetic_pyramid(
    out: str | os.PathLike,
    width: int,
    height: int,
    mpp: float,
    tile: int = 512,
    quality: int = 85,
    seed: int = 0,
) -> Path:
    """Write a big H&E-looking JPEG-tiled pyramidal OME-TIFF without allocating it.

    The image is one tile-periodic texture, so every level is a true 2x average of the
    one above (level k repeats the texture averaged 2^k times), and each level needs a
    single JPEG encode: tifffile writes the same pre-compressed tile bytes everywhere.
    100,000 x 100,000 px (~51k tiles) is limited by disk speed.
    """
    import tifffile

    out = Path(os.fspath(out))
    mpp = validate_mpp(mpp, f"Pixel size for '{out}'")
    if tile % 16 or tile < 16:
        raise ValueError("tile must be a multiple of 16")
    shapes = level_shapes(height, width)
    texture = _texture(tile, seed)
    encode = tifffile.TIFF.COMPRESSORS[7]  # the JPEG encoder tifffile itself uses
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
            for k, (h, w) in enumerate(shapes):
                level_tile = _periodic_level_tile(texture, k)
                data = encode(
                    level_tile,
                    level=quality,
                    subsampling=(2, 2),
                    colorspace="RGB",
                    outcolorspace="YCBCR",
                )
                n = _n_tiles(h, w, tile)
                options = _level_options(mpp, width, "synthetic", (h, w), k, len(shapes), tile, quality)
                tw.write((data for _ in range(n)), **options)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _texture(size: int, seed: int) -> np.ndarray:
    """Pink stroma, purple nuclei and white gaps; periodic because it is built by FFT."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)
    r2 = f[:, None] ** 2 + f[None, :] ** 2

    def field(sigma: float) -> np.ndarray:
        noise = np.fft.fft2(rng.standard_normal((size, size)))
        smooth = np.fft.ifft2(noise * np.exp(-2 * (np.pi * sigma) ** 2 * r2)).real
        return (smooth - smooth.mean()) / (smooth.std() + 1e-9)

    stroma = field(10.0)
    nuclei = np.clip((field(2.5) - 1.2) * 2.0, 0, 1)[..., None]
    gaps = np.clip((field(24.0) - 1.0) * 1.5, 0, 1)[..., None]
    pink = np.array([230, 160, 200], np.float32) + 12 * stroma[..., None]
    purple = np.array([95, 60, 150], np.float32)
    img = pink * (1 - nuclei) + purple * nuclei
    img = img * (1 - gaps) + 245 * gaps
    return np.clip(img, 0, 255).astype(np.uint8)


def _periodic_level_tile(texture: np.ndarray, k: int) -> np.ndarray:
    """A level-k tile of the infinite periodic image: the texture averaged 2^k times,
    repeated 2^k x 2^k."""
    small = texture
    for _ in range(k):
        small = half_np(small)
    reps = texture.shape[0] // small.shape[0]
    return np.ascontiguousarray(np.tile(small, (reps, reps, 1)))
