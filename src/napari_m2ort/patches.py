"""Three-magnification patches of spots, read tile-efficiently from a slide.

The model sees each spot's field of view at its training µm/px (level 1, 224 px), and the
same field of view at half and quarter resolution (levels 2 and 3).  Levels 2 and 3 are
area-downsampled from level 1, which the spec allows and which guarantees the three show
exactly the same tissue whatever the file's pyramid factors (SVS uses 1, 4, 16).

Reading: spots of one batch are grouped into spatial clusters and each cluster's bounding
box is read once, so a tile shared by neighbouring spots is decoded once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_m2ort.slide import SlideLike

PATCH_PX = 224
WHITE = 255
# A cluster's bounding box may be at most this many times the summed crop area before we
# split it: keeps reads bounded for scattered spots while merging neighbours.
_MAX_BBOX_WASTE = 4.0
_MAX_BBOX_PX = 6000 * 6000


@dataclass
class SpotPatches:
    level1: np.ndarray  # (N, 224, 224, 3) uint8
    outside: np.ndarray  # (N,) bool: the field of view extends past the slide (padded white)
    blank: np.ndarray  # (N,) bool: almost uniform white/black/no tissue

    def __len__(self) -> int:
        return len(self.level1)


def area_downsample(images: np.ndarray, factor: int) -> np.ndarray:
    n, h, w, c = images.shape
    x = images.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float32)
    return np.round(x.mean(axis=(2, 4))).astype(np.uint8)


def model_inputs(level1_uint8, device=None, dtype=None):
    """uint8 NHWC level-1 patches -> the model's three float NCHW inputs in [0, 1].

    Pooling happens on the device, so only the 224 px patch crosses the bus. The tensors
    keep the NHWC memory they came in (NCHW shape, channels-last strides): the model cuts
    (p, p, 3) patches from contiguous rows then, and no NCHW copy is made (same values).
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(level1_uint8)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    l2 = F.avg_pool2d(x, 2)
    l3 = F.avg_pool2d(x, 4)
    if dtype is not None:
        x, l2, l3 = x.to(dtype), l2.to(dtype), l3.to(dtype)
    return x, l2, l3


def fov_um(mpp: float, size_px: int = PATCH_PX) -> float:
    return size_px * mpp


def sample_spots(slide: SlideLike, centers_um: np.ndarray, mpp: float, size_px: int = PATCH_PX) -> SpotPatches:
    """Level-1 patches (size_px at ``mpp`` µm/px) centred on each spot.

    Uses only the ``SlideLike`` contract: ``mpp``, ``best_level``, ``downsamples``,
    ``levels[k].shape`` and ``read_region``.
    """
    centers_um = np.asarray(centers_um, dtype=float).reshape(-1, 2)
    n = len(centers_um)
    out = np.full((n, size_px, size_px, 3), WHITE, dtype=np.uint8)
    outside = np.zeros(n, dtype=bool)
    if n == 0:
        return SpotPatches(out, outside, np.zeros(0, dtype=bool))
    scale = mpp / slide.mpp  # level-0 px per model px
    level = slide.best_level(scale)
    d = float(slide.downsamples[level])
    fov_lvl = size_px * scale / d  # crop size in the chosen level's pixels
    # within 1 % of the model's scale we crop directly; otherwise crop and resample
    crop = size_px if abs(fov_lvl - size_px) <= 0.01 * size_px else max(1, int(round(fov_lvl)))
    centers_lvl = centers_um / slide.mpp / d
    x0s = np.round(centers_lvl[:, 0] - crop / 2).astype(np.int64)
    y0s = np.round(centers_lvl[:, 1] - crop / 2).astype(np.int64)
    lh, lw = slide.levels[level].shape[:2]
    outside[:] = (x0s < 0) | (y0s < 0) | (x0s + crop > lw) | (y0s + crop > lh)

    for idx in _clusters(x0s, y0s, crop):
        bx0, by0 = int(x0s[idx].min()), int(y0s[idx].min())
        bx1, by1 = int(x0s[idx].max()) + crop, int(y0s[idx].max()) + crop
        block = slide.read_region(bx0, by0, bx1 - bx0, by1 - by0, level=level)
        crops = np.stack(
            [block[y - by0 : y - by0 + crop, x - bx0 : x - bx0 + crop] for x, y in zip(x0s[idx], y0s[idx])]
        )
        out[idx] = _resize(crops, size_px) if crop != size_px else crops
    blank = _is_blank(out)
    return SpotPatches(out, outside, blank)


def _clusters(x0s: np.ndarray, y0s: np.ndarray, crop: int) -> list[np.ndarray]:
    """Split spot indices into groups whose bounding box is not mostly empty."""
    result = []
    stack = [np.arange(len(x0s))]
    while stack:
        idx = stack.pop()
        w = x0s[idx].max() - x0s[idx].min() + crop
        h = y0s[idx].max() - y0s[idx].min() + crop
        area = float(w) * float(h)
        if len(idx) == 1 or (area <= _MAX_BBOX_WASTE * len(idx) * crop * crop and area <= _MAX_BBOX_PX):
            result.append(idx)
            continue
        key = x0s[idx] if w >= h else y0s[idx]
        order = idx[np.argsort(key, kind="stable")]
        half = len(order) // 2
        stack.extend([order[:half], order[half:]])
    return result


def _resize(crops: np.ndarray, size_px: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    if x.shape[-1] > size_px:
        y = F.interpolate(x, size=(size_px, size_px), mode="bilinear", antialias=True, align_corners=False)
    else:
        y = F.interpolate(x, size=(size_px, size_px), mode="bilinear", align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _is_blank(patches: np.ndarray) -> np.ndarray:
    """Patches with (almost) no texture: white padding, glass, pen-free background."""
    if len(patches) == 0:
        return np.zeros(0, dtype=bool)
    small = patches[:, ::4, ::4].astype(np.float32)
    mean = small.mean(axis=(1, 2, 3))
    std = small.std(axis=(1, 2, 3))
    return (std < 4.0) | (mean > 245.0)


def spatial_order(centers_um: np.ndarray, cell_um: float = 1000.0) -> np.ndarray:
    """An order that keeps neighbours in the same batch (serpentine rows of cells)."""
    if len(centers_um) == 0:
        return np.zeros(0, dtype=np.int64)
    cx = np.floor(centers_um[:, 0] / cell_um).astype(np.int64)
    cy = np.floor(centers_um[:, 1] / cell_um).astype(np.int64)
    serp = np.where(cy % 2 == 0, cx, -cx)
    return np.lexsort((centers_um[:, 0], centers_um[:, 1], serp, cy))
