"""The picture an ST section points at: its size from the header, and whether it is blank.

Spot coordinates are checked against the image size, and a 100-megapixel JPEG or a
gigapixel slide must not be decoded for that. Pillow's decompression-bomb limit is lifted
only around the header parse, under the package-wide lock (:func:`slide.open_image`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import M2ORTError
from ...slide import FLAT_SUFFIXES, TIFF_SUFFIXES, open_image
from .validate import existing_file

__all__ = ["IMAGE_SUFFIXES", "image_size", "is_blank_image"]

#: Suffixes of the H&E pictures an ST data set may ship.
IMAGE_SUFFIXES = FLAT_SUFFIXES | {".bmp"} | TIFF_SUFFIXES


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image file from its header only (no pixel decoding)."""
    p = existing_file(path, "image")
    if p.suffix.lower() in TIFF_SUFFIXES:
        try:
            import tifffile

            with tifffile.TiffFile(p) as tf:
                series = tf.series[0]
                axes = series.axes.upper()
                shape = series.shape
                if "Y" in axes and "X" in axes:
                    return int(shape[axes.index("X")]), int(shape[axes.index("Y")])
                page = tf.pages[0]
                return int(page.imagewidth), int(page.imagelength)
        except Exception:  # fall through to Pillow (some TIFF-like files are not TIFF)
            pass
    try:
        with open_image(p) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception as exc:
        raise M2ORTError(
            f"{p}: cannot read the image size ({type(exc).__name__}: {exc}); "
            "check that the file is a complete image (JPEG, PNG or TIFF)."
        ) from exc


def is_blank_image(path: Path) -> bool:
    """True when an image is (nearly) constant, e.g. the black hires PNG of a fixture."""
    try:
        with open_image(path) as im:
            im.draft("RGB", (512, 512))
            im = im.convert("RGB")
            im.thumbnail((256, 256))
            arr = np.asarray(im, dtype=np.float32)
    except Exception:
        return True
    return bool(arr.size == 0 or arr.std() < 3.0)
