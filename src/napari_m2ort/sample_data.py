"""The bundled sample: HER2+ breast cancer section C2 (Andersson et al. 2021, CC BY 4.0).

It ships inside the package (``data/her2st_C2``, ~4.7 MB) so that napari's
File > Open Sample, the CLI demo and the tests work offline.  The image and the measured
spots are returned in µm with the same µm/px (derived from the 200 µm spot grid), so the
spots land on the tissue they were measured from.
"""

from __future__ import annotations

from pathlib import Path

from .io.napari import section_layer_data
from .io.st import STSection, read_legacy_st

__all__ = ["SAMPLE_DIR", "sample_image_path", "sample_section", "her2st_sample", "SAMPLE_CITATION"]

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
    layers = section_layer_data(sample_section())
    for _, kwargs, _kind in layers:
        kwargs.setdefault("metadata", {})["citation"] = SAMPLE_CITATION
    return layers
