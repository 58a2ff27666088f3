"""HEST-1k samples (Jaume et al. 2024, ``mahmoodlab/HEST``): paired H&E and ST, one id per sample.

A HEST folder (what ``huggingface.co/datasets/MahmoodLab/hest`` downloads into) holds, per
sample id, the files HEST's own reader (``hest.readers.iter_hest`` / ``read_HESTData``) opens:

- ``st/<id>.h5ad``: counts, with the spot centres in ``obsm["spatial"]`` in level-0 pixels of
  the WSI (HEST cuts its patches around exactly these);
- ``wsis/<id>.tif``: the H&E slide as a pyramidal (Big)TIFF;
- ``metadata/<id>.json``: the sample's metadata; the µm/px is ``pixel_size_um_estimated``
  (what HEST itself uses), else ``pixel_size_um_embedded``; ``spot_diameter`` and
  ``inter_spot_dist`` are in µm; ``st_technology`` names the platform.

The counts and coordinates go through :func:`read_h5ad` (one set of checks for every
.h5ad), with the WSI as the image and the metadata's pixel size; the section is then
named after the sample id.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ...errors import M2ORTError
from .h5ad import read_h5ad
from .section import PLATFORM_SPOT_UM, STSection
from .validate import check_mpp

__all__ = ["HEST_MPP_KEYS", "hest_paths", "hest_samples", "read_hest"]

#: Metadata keys holding the WSI's µm/px, in the order HEST trusts them.
HEST_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
#: ``st_technology`` values -> this package's platform names.
_PLATFORMS = {"visium": "visium", "spatial transcriptomics": "legacy-st", "st": "legacy-st"}


def hest_paths(root, sample_id: str) -> dict[str, Path]:
    """{"st", "wsi", "metadata"} paths of one sample (not checked)."""
    root = Path(root).expanduser()
    sid = str(sample_id)
    return {
        "st": root / "st" / f"{sid}.h5ad",
        "wsi": root / "wsis" / f"{sid}.tif",
        "metadata": root / "metadata" / f"{sid}.json",
    }


def hest_samples(root) -> list[str]:
    """Sample ids with an ``st/<id>.h5ad`` in a HEST folder, sorted."""
    st = Path(root).expanduser() / "st"
    return sorted(p.name[: -len(".h5ad")] for p in st.glob("*.h5ad")) if st.is_dir() else []


def _number(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _metadata(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise M2ORTError(f"{path}: cannot read the sample's metadata as JSON ({exc}).") from exc
    if not isinstance(meta, dict):
        raise M2ORTError(f"{path}: the sample's metadata is not a JSON object.")
    return meta


def read_hest(root, sample_id: str, mpp=None) -> STSection:
    """Read one HEST-1k sample (``sample_id``, e.g. ``"TENX95"``) of the folder ``root``.

    ``mpp`` overrides the metadata's µm/px of the WSI. The section's image is the WSI,
    its coordinates level-0 pixels of it, its name the sample id.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise M2ORTError(f"{root}: not a folder; point to the HEST folder (with st/, wsis/ and metadata/).")
    sid = str(sample_id).strip()
    paths = hest_paths(root, sid)
    missing = [f"{k} ({p.relative_to(root)})" for k, p in paths.items() if not p.is_file()]
    if missing:
        known = hest_samples(root)
        hint = f"samples here: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}" if known else "no st/*.h5ad"
        raise M2ORTError(f"{root}: HEST sample {sid!r} lacks {', '.join(missing)}; {hint}.")
    meta = _metadata(paths["metadata"])

    if mpp is not None:
        mpp_value, source = check_mpp(mpp, paths["metadata"]), "user"
    else:
        found = [(k, _number(meta.get(k))) for k in HEST_MPP_KEYS]
        key, mpp_value = next(((k, v) for k, v in found if v is not None), (None, None))
        if mpp_value is None:
            raise M2ORTError(
                f"{paths['metadata']}: no pixel size ({' or '.join(HEST_MPP_KEYS)}); pass the WSI's µm per pixel with --mpp."
            )
        mpp_value, source = check_mpp(mpp_value, f"{paths['metadata']} ({key})"), "metadata"

    section = read_h5ad(paths["st"], image=paths["wsi"], mpp=mpp_value)
    technology = str(meta.get("st_technology") or "")
    platform = _PLATFORMS.get(technology.strip().lower(), section.platform)
    diameter = _number(meta.get("spot_diameter")) or PLATFORM_SPOT_UM.get(platform) or section.spot_diameter_um

    adata = section.adata
    lib = dict(next(iter(adata.uns["spatial"].values())))
    scalefactors = dict(lib.get("scalefactors", {}))
    if diameter is not None:
        scalefactors["spot_diameter_fullres"] = float(diameter) / section.mpp
    hest = {k: meta[k] for k in ("st_technology", "inter_spot_dist", "spot_diameter", *HEST_MPP_KEYS) if k in meta}
    lib["scalefactors"] = scalefactors
    lib["metadata"] = {
        **dict(lib.get("metadata", {})),
        "mpp_source": source,
        "platform": platform,
        "hest_sample": sid,
        "hest": json.dumps(hest, default=str),
    }
    adata.uns["spatial"] = {sid: lib}
    return dataclasses.replace(section, name=sid, mpp_source=source, platform=platform, spot_diameter_um=diameter)
