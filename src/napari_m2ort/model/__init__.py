"""The M2ORT architecture (``m2ort``) and its weights on disk (``weights``)."""

from .m2ort import M2ORT, VARIANTS, flops_per_spot
from .weights import (
    BUNDLED_PATH,
    ModelCard,
    check_genes,
    load_bundled,
    load_checkpoint,
    read_card,
    read_digest,
    replace_head,
    save_checkpoint,
)

__all__ = [
    "BUNDLED_PATH",
    "M2ORT",
    "VARIANTS",
    "ModelCard",
    "check_genes",
    "flops_per_spot",
    "load_bundled",
    "load_checkpoint",
    "read_card",
    "read_digest",
    "replace_head",
    "save_checkpoint",
]
