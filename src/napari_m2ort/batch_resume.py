"""When a cohort run may skip a slide: the resume key and the check of an earlier output.

A batch output carries ``uns["m2ort"]["batch"]`` (JSON): a key over the slide file (path,
size, mtime), the spot settings and the model weights, plus the spot and gene counts.
A re-run skips a slide only when the key matches and the counts agree with the file, so
a changed setting, a changed model or a damaged output is predicted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional

#: Version of the batch record; a new format re-predicts old outputs.
BATCH_FORMAT = 1


def weights_id(path: Path) -> str:
    """The checkpoint's tensor checksum (from its header), else its size and mtime."""
    from .errors import M2ORTError
    from .model.weights import read_digest

    try:
        digest = read_digest(path)
    except M2ORTError:
        digest = None
    if digest:
        return digest
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def job_key(slide_path: str, settings: dict) -> str:
    """The identity of one slide's job: the file as it is now plus every setting."""
    st = os.stat(slide_path)
    blob = json.dumps(
        {"slide": os.path.abspath(slide_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, **settings},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def batch_record(key: str, n_spots: int, n_genes: int) -> str:
    """The JSON stored in ``uns["m2ort"]["batch"]`` of a complete output."""
    return json.dumps(
        {"key": key, "complete": True, "n_spots": int(n_spots), "n_genes": int(n_genes), "format": BATCH_FORMAT}
    )


def output_complete(path: Path, key: str) -> Optional[int]:
    """The spot count if ``path`` is a complete batch output for ``key``, else None."""
    if not path.is_file():
        return None
    try:
        import anndata as ad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = ad.read_h5ad(path, backed="r")
        try:
            meta = json.loads(adata.uns["m2ort"]["batch"])
            n_obs, n_var = adata.n_obs, adata.n_vars
        finally:
            adata.file.close()
    except Exception:
        return None
    if (
        meta.get("key") == key
        and meta.get("complete") is True
        and meta.get("n_spots") == n_obs
        and meta.get("n_genes") == n_var
    ):
        return int(n_obs)
    return None
