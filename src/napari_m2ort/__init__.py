"""napari-m2ort: predict spatial transcriptomics from H&E slides with M2ORT.

Importing the package registers the M2ORT variants with timm.  torch is imported here,
before any Qt code can run, because importing torch after Qt has started crashes.
"""

__version__ = "0.1.0"

import torch  # noqa: F401  (must precede Qt)

from ._compat import ensure_torchvision

ensure_torchvision()

from .model import m2ort as _m2ort  # noqa: E402,F401  (registers m2ort_* with timm)

__all__ = ["__version__"]
