"""The bundled sample: HER2+ breast cancer section C2 (Andersson et al. 2021, CC BY 4.0).

It ships inside the package (``data/her2st_C2``, ~4.7 MB) so that napari's
File > Open Sample, the CLI demo and the tests work offline.  The image and the measured
spots are returned in µm with the same µm/px (derived from the 200 µm spot grid), so the
spots land on the tissue they were measured from.

The JPEG has no tiles: showing any full-resolution pixel means decoding all 92
megapixels (0.6-2.5 s on the UI thread) and averaging them into the next level. So the
first opening also writes a tiled pyramidal OME-TIFF copy into the user's cache folder
(in the background, once; ``NAPARI_M2ORT_CACHE`` overrides the folder, ``off`` disables
the copy), and later openings show that copy's tiles. It is for the eye only: the layer's
``path`` stays the JPEG, so predictions and "Predict at measured spots" read the original
pixels, exactly as ``napari-m2ort predict``/``evaluate`` on the JPEG do. The tissue
mask is found in the background as the sample opens, ready for the first prediction.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .io.napari import section_layer_data
from .io.st import STSection, read_legacy_st

__all__ = [
    "SAMPLE_DIR",
    "sample_image_path",
    "sample_section",
    "her2st_sample",
    "display_pyramid",
    "SAMPLE_CITATION",
]

SAMPLE_DIR = Path(__file__).parent / "data" / "her2st_C2"
_IMAGE = "5714_HE_BT_C2.jpg"
_COUNTS = "C2.tsv.gz"
_SPOTS = "C2_selection.tsv"

SAMPLE_CITATION = (
    "Andersson et al., Spatial deconvolution of HER2-positive breast cancer delineates "
    "tumor-associated cell type interactions, Nat. Commun. 12, 6012 (2021); data from "
    "almaan/her2st, CC BY 4.0"
)


def sample_image_path() -> Path:
    """Path of the bundled H&E JPEG (9274 × 9911 px, ≈ 0.69 µm/px, no pixel size in the file)."""
    return SAMPLE_DIR / _IMAGE


def sample_section() -> STSection:
    """The bundled section C2 as an STSection (187 spots × 15,706 genes, raw counts)."""
    return read_legacy_st(SAMPLE_DIR / _IMAGE, SAMPLE_DIR / _COUNTS, SAMPLE_DIR / _SPOTS, name="her2st C2")


def her2st_sample() -> list[tuple]:
    """npe2 sample-data command: [multiscale H&E image, measured ST spots], both in µm."""
    section = sample_section()
    layers = section_layer_data(section)
    from .pipelines.predict import prefetch_tissue_mask

    prefetch_tissue_mask(section.image_path, section.mpp)  # ready by the first 'tissue only' click
    pyramid = display_pyramid(section.mpp)
    for i, (data, kwargs, kind) in enumerate(layers):
        kwargs.setdefault("metadata", {})["citation"] = SAMPLE_CITATION
        if kind == "image" and pyramid is not None:
            levels = _pyramid_levels(pyramid, section.mpp, data)
            if levels is not None:
                kwargs["metadata"]["display_pyramid"] = str(pyramid)
                layers[i] = (levels, kwargs, kind)
    return layers


# ------------------------------------------------------------------ display pyramid

_BUILDING = threading.Lock()


def _cache_dir() -> Path | None:
    env = os.environ.get("NAPARI_M2ORT_CACHE", "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("napari-m2ort", appauthor=False))
    except ImportError:  # pragma: no cover - napari depends on platformdirs
        return Path.home() / ".cache" / "napari-m2ort"


def display_pyramid(mpp: float, build: bool = True) -> Path | None:
    """The cached tiled pyramid of the sample image, or None while there is none yet
    (then, with ``build``, it is written in a background thread for later openings)."""
    from .io.slides.base import file_token

    folder = _cache_dir()
    if folder is None:
        return None
    src = sample_image_path()
    path = folder / f"her2st_C2-{file_token(src)[:16]}.ome.tif"
    if path.is_file():
        return path
    if build and not _BUILDING.locked():
        threading.Thread(target=_build, args=(src, path, mpp), name="m2ort-sample-pyramid").start()
    return None


def _build(src: Path, out: Path, mpp: float) -> None:
    """Write the pyramid (temp file + rename: a stopped build leaves nothing half-done)."""
    import warnings

    from .io.convert import convert_to_ome_tiff

    if not _BUILDING.acquire(blocking=False):
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.is_file():
            convert_to_ome_tiff(src, out, mpp=mpp)
    except Exception as exc:  # a cache: the JPEG still works, say why once
        warnings.warn(f"The sample's display pyramid could not be written to {out}: {exc}", stacklevel=1)
    finally:
        _BUILDING.release()


def _pyramid_levels(path: Path, mpp: float, jpeg_levels) -> list | None:
    """The pyramid's levels when they match the JPEG's level for level (else None)."""
    from .io.slides import open_slide

    try:
        levels = list(open_slide(path, mpp=mpp, quiet=True).levels)
    except Exception:  # a damaged cache file: show the JPEG, rebuild next time
        path.unlink(missing_ok=True)
        return None
    jpeg_levels = jpeg_levels if isinstance(jpeg_levels, list) else [jpeg_levels]
    if [lv.shape for lv in levels] != [lv.shape for lv in jpeg_levels]:
        return None
    return levels
