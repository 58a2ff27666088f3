"""napari-m2ort: predict spatial transcriptomics from H&E slides with M2ORT.

Importing the package registers the M2ORT variants with timm.  torch is imported here,
before any Qt code can run, because importing torch after Qt has started crashes.
The ``napari-m2ort`` command is the exception: it answers ``--help`` and argument errors
without torch (seconds to import) and calls ``load()`` itself once a command runs.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys


def load() -> None:
    """Import torch (before any Qt) and register the M2ORT variants with timm."""
    import torch  # noqa: F401  (must precede Qt)

    from ._compat import ensure_torchvision

    ensure_torchvision()

    from .model import m2ort as _m2ort  # noqa: F401  (registers m2ort_* with timm)


def _command_line_tool() -> bool:
    """Whether this process is the ``napari-m2ort`` console script."""
    argv0 = _os.path.basename(_sys.argv[0]) if _sys.argv and _sys.argv[0] else ""
    return argv0.lower().startswith("napari-m2ort")


if not _command_line_tool():
    load()

__all__ = ["__version__", "load"]
