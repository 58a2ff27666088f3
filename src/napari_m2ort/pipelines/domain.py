"""Out-of-domain guard: inputs the model was never trained on, said before predicting.

The model learned H&E at ``card.mpp`` µm/px (0.69 for the bundled one). Two cheap tests
catch the nonsense cases seen in practice (a 16 µm/px Visium low-res image, a stamp-size
image, spots on bare glass):

* **Resolution.** A slide whose native pixels are coarser than the model's has no
  detail left at the model's scale: more than ``REFUSE_COARSER`` x coarser is refused
  (unless forced), more than ``WARN_COARSER`` x coarser is warned about.
* **Colour.** Per spot, on the slide's thumbnail over the model's field of view: the
  stained pixels (the tissue mask of ``spots.tissue_mask_from_rgb``, the same rule as
  "tissue only") must cover at least ``MIN_STAINED`` of the field,
  else the spot is "blank"; and they must look like H&E, pink (eosin) to blue-purple
  (haematoxylin): blue above green by at least ``MIN_BLUE_GAP`` grey levels, with mean
  saturation at least ``MIN_SATURATION``; else "not-HE" (greyscale, DAB-brown IHC,
  green-tinted or inverted images).

Flags per spot, first match wins: "off-slide" (the field of view reaches past the slide),
"blank" (this thumbnail test, or the patch itself is uniform), "not-HE", "ok".
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import M2ORTError
from .slide_cache import PerSlide

REFUSE_COARSER = 4.0
WARN_COARSER = 1.5
MIN_STAINED = 0.10
MIN_BLUE_GAP = 4.0
MIN_SATURATION = 0.06
#: Warn when more than this fraction of the spots is flagged.
WARN_FLAGGED = 0.5
FLAGS = ("ok", "off-slide", "blank", "not-HE")


def check_resolution(slide_mpp: float, model_mpp: float, force: bool = False, name: str = "the slide") -> Optional[str]:
    """Raise for a slide far coarser than the model (unless ``force``); return a warning
    sentence for a somewhat coarser one; None when the resolution is fine."""
    slide_mpp, model_mpp = float(slide_mpp), float(model_mpp)
    ratio = slide_mpp / model_mpp
    text = f"{name} is {ratio:.1f}x coarser ({slide_mpp:g} µm/px) than the model's resolution ({model_mpp:g} µm/px)"
    if ratio > REFUSE_COARSER and not force:
        raise M2ORTError(
            f"{text}: the model would see none of the cell detail it learned from, so its predictions "
            "would be nonsense. Use the full-resolution image, or pass --force (the widget: 'predict anyway')."
        )
    if ratio > WARN_COARSER:
        return f"{text}: predictions lose accuracy at this scale."
    return None


_COLOUR = PerSlide(kept=4)  # the colour test's thumbnails of the last few slides


def colour_inputs(slide, max_px: int = 1024) -> tuple[np.ndarray, np.ndarray, float]:
    """(thumbnail RGB as float32, stained mask, µm per thumbnail pixel), read and masked
    once per slide file (``slide_cache``): a prefetch makes the colour test instant."""
    return _COLOUR.get(slide, lambda s: _colour_inputs(s, max_px), max_px)


def _colour_inputs(slide, max_px: int) -> tuple[np.ndarray, np.ndarray, float]:
    thumb, down = slide.thumbnail(max_px)
    rgb = np.asarray(thumb)[..., :3].astype(np.float32)
    um_per_px = float(slide.mpp) * float(down)
    # "stained" is the tissue rule of the 'tissue only' option (saturation above an Otsu
    # threshold, not too dark or bright, cleaned): glass, even tinted glass with the ST
    # array's printed dots, falls outside it
    from ..spots import tissue_mask_from_rgb

    stained = tissue_mask_from_rgb(rgb, um_per_px).mask
    if stained.mean() < 0.01:
        # no coloured tissue anywhere (a greyscale or inverted image): judge by grey level,
        # so such tissue reads "not-HE" below rather than "blank"
        gray = rgb.mean(-1)
        stained = (gray >= 30) & (gray <= 220)
    rgb.setflags(write=False)
    stained.setflags(write=False)
    return rgb, stained, um_per_px


def colour_flags(slide, centers_um: np.ndarray, fov_um: float, max_px: int = 1024) -> np.ndarray:
    """Per spot "ok", "blank" or "not-HE" from one thumbnail read (see the module rule)."""
    centers_um = np.asarray(centers_um, dtype=float).reshape(-1, 2)
    out = np.full(len(centers_um), "ok", dtype=object)
    if len(centers_um) == 0:
        return out
    rgb, stained, um_per_px = colour_inputs(slide, max_px)
    half = max(0.5, fov_um / um_per_px / 2)
    # only the thumbnail's part under the spots (a region is a small part of a section)
    cx, cy = centers_um[:, 0] / um_per_px, centers_um[:, 1] / um_per_px
    h_all, w_all = rgb.shape[:2]
    ox = int(np.clip(np.floor(cx.min() - half), 0, w_all))
    oy = int(np.clip(np.floor(cy.min() - half), 0, h_all))
    ex = int(np.clip(np.ceil(cx.max() + half) + 1, ox, w_all))
    ey = int(np.clip(np.ceil(cy.max() + half) + 1, oy, h_all))
    rgb, stained = rgb[oy:ey, ox:ex], stained[oy:ey, ox:ex]
    cx, cy = cx - ox, cy - oy
    h, w = rgb.shape[:2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    # integral images: each spot's sums in O(1)
    tables = [
        _integral(a)
        for a in (
            stained.astype(np.float64),
            rgb[..., 1] * stained,
            rgb[..., 2] * stained,
            sat * stained,
        )
    ]
    x0 = np.clip(np.floor(cx - half), 0, w).astype(int)
    x1 = np.clip(np.ceil(cx + half), 0, w).astype(int)
    y0 = np.clip(np.floor(cy - half), 0, h).astype(int)
    y1 = np.clip(np.ceil(cy + half), 0, h).astype(int)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    n, g, b, s = (_box(t, x0, y0, x1, y1) for t in tables)
    k = np.maximum(n, 1.0)
    g, b, s = g / k, b / k, s / k
    blank = (n / area) < MIN_STAINED
    he = (b - g >= MIN_BLUE_GAP) & (s >= MIN_SATURATION)
    out[blank] = "blank"
    out[~blank & ~he] = "not-HE"
    return out


def _integral(a: np.ndarray) -> np.ndarray:
    t = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    t[1:, 1:] = a.cumsum(0).cumsum(1)
    return t


def _box(t: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    return t[y1, x1] - t[y0, x1] - t[y1, x0] + t[y0, x0]


def spot_flags(colour: Optional[np.ndarray], outside=None, blank=None) -> np.ndarray:
    """One flag per spot from the colour test and the patches' own outside/blank marks."""
    n = len(colour) if colour is not None else len(outside)
    flags = np.array(colour if colour is not None else ["ok"] * n, dtype=object)
    if blank is not None:
        flags[np.asarray(blank, dtype=bool)] = "blank"
    if outside is not None:
        flags[np.asarray(outside, dtype=bool)] = "off-slide"
    return flags


def flag_warning(flags: np.ndarray) -> Optional[str]:
    """A sentence when most spots are flagged (None otherwise)."""
    n = len(flags)
    if n == 0:
        return None
    bad = flags != "ok"
    if bad.mean() <= WARN_FLAGGED:
        return None
    counts = ", ".join(f"{int((flags == f).sum())} {f}" for f in FLAGS[1:] if (flags == f).any())
    return (
        f"{int(bad.sum())} of {n} spots do not look like H&E tissue ({counts}): predictions there are "
        "unreliable; they are marked in obs['flag'] of the output."
    )
