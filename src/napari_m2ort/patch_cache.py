"""The on-disk cache of a section's level-1 patches, trusted only when verified.

Sampling patches from a whole-slide image is the slow part of preparing a section, so
``training.prepare_section`` keeps them as ``<section>-<key>.npy`` (``<key>`` hashes the
image file, the pixel sizes and the spot centres). A cache that was truncated by a full
disk or a killed process, corrupted, or written for other spots must never be used and
must never block the next run: the ``.npy`` header is checked against the expected
``(N, 224, 224, 3)`` uint8, and its size and SHA-1 against the ``.json`` written beside
it after the ``.npy``. Any mismatch is named in a :class:`PatchCacheWarning`, and the
file is deleted so the caller samples the patches again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

__all__ = ["PatchCacheWarning", "load_patches", "save_patches", "PATCH_SHAPE"]

#: Bumped when the patches a cache holds change meaning; older files are then rebuilt.
CACHE_FORMAT = 1
PATCH_SHAPE = (224, 224, 3)


class PatchCacheWarning(UserWarning):
    """A patch cache file was truncated, corrupted or stale (and is rebuilt), or could not be written."""


def _sidecar(cache_file: Path) -> Path:
    return cache_file.with_suffix(".json")


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _npy_header(path: Path) -> tuple[tuple, bool, np.dtype]:
    with open(path, "rb") as fh:
        version = npy_format.read_magic(fh)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(fh)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(fh)
        raise ValueError(f"unsupported .npy format version {version}")


def problem(cache_file: Path, expected: tuple) -> str | None:
    """What is wrong with a cache file (completing "the patch cache ..."), or None."""
    try:
        shape, fortran, dtype = _npy_header(cache_file)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return f"is not a readable .npy file ({exc}); truncated or corrupted"
    if tuple(shape) != tuple(expected) or dtype != np.uint8 or fortran:
        return f"holds {dtype} {tuple(shape)}, expected uint8 {tuple(expected)}; stale"
    sidecar = _sidecar(cache_file)
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        return f"has no checksum file {sidecar.name} beside it (written by an older version, or interrupted)"
    except (OSError, ValueError) as exc:
        return f"has an unreadable checksum file {sidecar.name} ({exc})"
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return f"was written in another cache format ({sidecar.name}); stale"
    if tuple(meta.get("shape") or ()) != tuple(expected):
        return f"was recorded with shape {meta.get('shape')} in {sidecar.name}, expected {list(expected)}; stale"
    size = cache_file.stat().st_size
    if size != meta.get("bytes"):
        return f"is {size} bytes but {meta.get('bytes')} were written; truncated or overwritten"
    if _sha1(cache_file) != meta.get("sha1"):
        return f"does not match the SHA-1 in {sidecar.name}; corrupted"
    return None


def load_patches(cache_file: Path, n: int) -> np.ndarray | None:
    """The cached ``(n, 224, 224, 3)`` uint8 patches; None when absent or not trustworthy.

    An untrustworthy file is named in a :class:`PatchCacheWarning` and deleted (with its
    checksum file), so it is rebuilt once instead of failing every later run.
    """
    cache_file = Path(cache_file)
    if not cache_file.exists():
        return None
    why = problem(cache_file, (n, *PATCH_SHAPE))
    if why is None:
        try:
            return np.load(cache_file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            why = f"cannot be read ({exc})"
    warnings.warn(
        f"{cache_file}: the patch cache {why}. Deleting it and sampling the patches again.",
        PatchCacheWarning,
        stacklevel=3,
    )
    for p in (cache_file, _sidecar(cache_file)):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass  # the new file replaces it, or save_patches says why it cannot
    return None


def save_patches(cache_file: Path, level1: np.ndarray) -> None:
    """Write the patches, then their size and SHA-1, each atomically (temp file + rename).

    A cache that cannot be written costs only the next run's time, so it warns and the
    patches already sampled are still used.
    """
    cache_file = Path(cache_file)
    pid = os.getpid()
    tmp = cache_file.with_suffix(f".tmp{pid}.npy")
    tmp_meta = cache_file.with_suffix(f".tmp{pid}.json")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, np.ascontiguousarray(level1, dtype=np.uint8))
        meta = {
            "format": CACHE_FORMAT,
            "shape": list(level1.shape),
            "dtype": "uint8",
            "bytes": tmp.stat().st_size,
            "sha1": _sha1(tmp),
        }
        os.replace(tmp, cache_file)
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, _sidecar(cache_file))
    except OSError as exc:
        for p in (tmp, tmp_meta):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        warnings.warn(
            f"{cache_file}: cannot write the patch cache ({exc}); continuing without it.",
            PatchCacheWarning,
            stacklevel=3,
        )
