"""The pixel size (µm/px) a TIFF states: OME, Aperio, ImageJ or resolution tags.

Values outside a microscope's range are software defaults (72 dpi = 352.8 µm/px) and
count as no metadata; a resolution that is not a number at all (a zero denominator) is
an error, since guessing would put wrong physical units on everything downstream.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides.base import ENV_MPP, plausible
from napari_m2ort.slide import MPP_RANGE

__all__ = ["UNIT_TO_UM", "tiff_mpp"]

UNIT_TO_UM = {
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}


def tiff_mpp(path: Path, tif: Any, si: int, keyframe: Any) -> float | None:
    """µm/px from OME, Aperio, ImageJ or resolution tags, in that order of trust."""
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata, si)
        if mpp is not None:
            return mpp
    description = getattr(tif.pages[0], "description", "") or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.]+(?:[eE][-+]?\d+)?)", description)
    if match:
        mpp = plausible(float(match.group(1)), MPP_RANGE)
        if mpp is not None:
            return mpp
    tags = keyframe.tags
    xres = tags.get("XResolution")
    yres = tags.get("YResolution")
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 1
    per_px: list[float] = []
    for tag in (xres, yres):
        if tag is None:
            continue
        value = tag.value
        if isinstance(value, tuple) and len(value) == 2 and value[1] == 0:
            raise M2ORTError(
                f"The pixel size stored in '{path}' is invalid: its {tag.name} is "
                f"{value[0]}/{value[1]}, a fraction with a zero denominator. Give the scanner's "
                "pixel size instead: --mpp on the command line (e.g. --mpp 0.5 for a 20x scan), "
                f"mpp= in Python, or {ENV_MPP} before opening it in napari."
            )
        ppu = value[0] / value[1] if isinstance(value, tuple) else float(value)
        if ppu > 0:
            per_px.append(1.0 / ppu)
    if not per_px:
        return None
    upp = sum(per_px) / len(per_px)  # units per pixel
    if unit == 3:
        return plausible(upp * 1e4, MPP_RANGE)
    if unit == 2:
        return plausible(upp * 25400.0, MPP_RANGE)
    imagej = getattr(tif, "imagej_metadata", None) or {}
    scale = UNIT_TO_UM.get(str(imagej.get("unit", "")).replace("\\u00B5", "µ"))
    if scale is not None:
        return plausible(upp * scale, MPP_RANGE)
    return None


def _ome_mpp(xml: str, si: int) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = [el for el in root if el.tag.endswith("Image")]
    if not images:
        return None
    image = images[si] if si < len(images) else images[0]
    pixels = next((el for el in image if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    values = []
    for axis in ("X", "Y"):
        raw = pixels.get(f"PhysicalSize{axis}")
        if raw is None:
            continue
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        scale = UNIT_TO_UM.get(unit)
        try:
            if scale is not None:
                values.append(float(raw) * scale)
        except ValueError:
            continue
    if not values:
        return None
    return plausible(sum(values) / len(values), MPP_RANGE)
