"""Make ``import torchvision`` (and so ``import timm``) work with a CPU-only torch.

The torchvision wheel on the package registry is built against CUDA torch; with the CPU
torch wheel its compiled ops library does not load, and torchvision's Python side then
fails at import with ``operator torchvision::nms does not exist``.  We never call those
detection ops, so on exactly that error we declare their schemas (no kernels) and import
again.  Where torch and torchvision match, the first import succeeds and nothing here
runs.
"""

from __future__ import annotations

import re
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qroi_align": (
        "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align": (
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "_roi_align_backward": (
        "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "ps_roi_align": (
        "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"
    ),
    "_ps_roi_align_backward": (
        "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
        "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
        "SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    "roi_pool": (
        "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_roi_pool_backward": (
        "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor"
    ),
    "ps_roi_pool": (
        "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_ps_roi_pool_backward": (
        "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
        "float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
        "SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    "deform_conv2d": (
        "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
        "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"
    ),
    "_deform_conv2d_backward": (
        "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
        "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, "
        "SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
        "SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
}

_MISSING = re.compile(r"operator torchvision::(\w+) does not exist")
_library = None  # keep the fragment alive for the life of the process
_patched: list[str] = []


def _forget_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> list[str]:
    """Import torchvision, declaring missing op schemas if (and only if) it needs them.

    Returns the names of the ops that had to be declared (empty where nothing was wrong).
    """
    global _library
    import torch

    for _ in range(len(_SCHEMAS) + 1):
        try:
            import torchvision  # noqa: F401

            return list(_patched)
        except RuntimeError as exc:
            match = _MISSING.search(str(exc))
            if not match or match.group(1) in _patched:
                raise
            _forget_torchvision()
            if _library is None:
                _library = torch.library.Library("torchvision", "FRAGMENT")
            # Declare every known schema at once: the import checks them one by one.
            for name, schema in _SCHEMAS.items():
                if name in _patched:
                    continue
                try:
                    _library.define(schema)
                except RuntimeError:
                    pass  # already defined by a partially loaded library
                _patched.append(name)
            if match.group(1) not in _SCHEMAS:
                raise
    raise RuntimeError("could not import torchvision")  # pragma: no cover
