"""Read spatial transcriptomics (ST) sections into one shape: :class:`STSection`.

Three layouts are supported because that is what people have on disk: the legacy ST
layout of the public HER2+ data set (``almaan/her2st``, :mod:`.legacy`), Space Ranger
output folders (10x Visium, :mod:`.visium`), and AnnData ``.h5ad`` files with
``obsm["spatial"]`` (:mod:`.h5ad`). Each reader returns counts, gene symbols, spot ids
and spot centres in the pixel frame of the image it names (``image_path``), together
with the µm/px of that image (:mod:`.section`); where no metadata states the µm/px the
spot grid measures it (:mod:`.grid`). Every reader validates what it reads through
:mod:`.validate`, so alignment between spots and pixels never goes silently wrong.

The napari LayerData builders and the npe2 reader live in :mod:`napari_m2ort.io.napari`;
they are re-exported here (resolved on first use) for existing importers.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import M2ORTError
from ...targets import log1p_cpm
from .h5ad import read_h5ad
from .hest import read_hest
from .image import image_size
from .legacy import read_her2st, read_legacy_st
from .section import (
    LEGACY_ST_PITCH_UM,
    LEGACY_ST_SPOT_UM,
    VISIUM_PITCH_UM,
    VISIUM_SCALEFACTOR_SPOT_UM,
    VISIUM_SPOT_UM,
    STSection,
)
from .validate import STDataWarning
from .visium import is_visium_folder, read_visium

__all__ = [
    "STSection",
    "STDataWarning",
    "read_her2st",
    "read_legacy_st",
    "read_visium",
    "read_h5ad",
    "read_hest",
    "read_section",
    "image_size",
    "log1p_cpm",
    "points_layer_data",
    "section_layer_data",
    "is_visium_folder",
    "napari_get_reader",
    "LEGACY_ST_PITCH_UM",
    "LEGACY_ST_SPOT_UM",
    "VISIUM_PITCH_UM",
    "VISIUM_SPOT_UM",
    "VISIUM_SCALEFACTOR_SPOT_UM",
]


def read_section(path, image=None, mpp=None) -> STSection:
    """Dispatch on what ``path`` is: a Visium folder, an .h5ad file or a her2st-layout folder.

    For a her2st-layout root use :func:`read_her2st` (it needs a section name).
    """
    p = Path(path).expanduser()
    if p.is_dir() and is_visium_folder(p):
        return read_visium(p, mpp=mpp, image=image)
    if p.is_file() and p.suffix.lower() == ".h5ad":
        return read_h5ad(p, image=image, mpp=mpp)
    raise M2ORTError(
        f"{p}: not a recognised ST input; give a Space Ranger 'outs' folder, an .h5ad file, or a "
        "her2st-layout folder with a section name."
    )


# name here -> name in napari_m2ort.io.napari; imported lazily because io.napari imports
# this package (and, through the slide reader, napari-facing code this package must not load)
_NAPARI_FACING = {
    "points_layer_data": "points_layer_data",
    "section_layer_data": "section_layer_data",
    "napari_get_reader": "get_st_reader",
}


def __getattr__(name: str):
    if name in _NAPARI_FACING:
        from .. import napari as napari_io

        return getattr(napari_io, _NAPARI_FACING[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAPARI_FACING))
