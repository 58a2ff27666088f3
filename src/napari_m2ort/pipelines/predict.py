"""Predicting a slide: spots from regions and a layout, then the model over them.

``predict_slide`` is the whole use case; ``plan_slide`` and ``run_plan`` are its two
halves, for a front door that filters the spots in between (the widget leaves out spots
already shown). ``predict_spots`` is the one place inference options reach
``inference.predict``, also for the cohort runner's tiles.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from ..errors import M2ORTError
from ..progress import Job, Progress
from . import checks
from .models import read_model_card, resolve_model
from .requests import PredictionPlan, PredictRequest, SlidePrediction
from .slide_cache import PerSlide

Rect = tuple[float, float, float, float]


def parse_region(region) -> Optional[Rect]:
    """``None`` / "" (the whole slide), "x0,y0,x1,y1" or four numbers -> a µm rectangle."""
    if region is None or (isinstance(region, str) and not region.strip()):
        return None
    parts = region.split(",") if isinstance(region, str) else list(np.asarray(region, dtype=object).ravel())
    if len(parts) != 4:
        raise M2ORTError(f"Region {region!r}: give four numbers x0,y0,x1,y1 in µm.")
    return checks.region(parts)


def _as_regions(regions) -> Optional[list]:
    """None, one region (a string, four numbers or a ``Region``) or a list of regions."""
    from ..spots import Region

    if regions is None:
        return None
    if isinstance(regions, np.ndarray) and regions.ndim <= 2:  # one rectangle or one polygon
        return [regions]
    if isinstance(regions, (str, Region)):
        one = parse_region(regions) if isinstance(regions, str) else regions
        return None if one is None else [one]
    items = list(regions)
    if len(items) == 4 and all(isinstance(v, numbers.Real) for v in items):
        return [parse_region(items)]
    return items


def merge_layouts(parts: Sequence):
    """One ``SpotLayout`` from several regions' layouts, each spot once (ids are global)."""
    from ..spots import SpotLayout

    first = parts[0]
    if len(parts) == 1:
        return first
    centers = np.concatenate([p.centers_um for p in parts])
    ids = np.concatenate([np.asarray(p.ids, dtype=object) for p in parts])
    _, keep = np.unique(ids.astype(str), return_index=True)
    keep = np.sort(keep)
    return SpotLayout(
        centers[keep], ids[keep], first.diameter_um, first.pitch_um, first.layout, first.grid, dict(first.info)
    )


def estimate_spots(slide_size_um, areas, layout: str = "visium", pitch_um=None, diameter_um=None) -> int:
    """Spots the layout would put in the regions (clipped to the slide), from their areas
    alone: nothing is allocated, whatever the pitch."""
    from ..spots import as_region, layout_params

    grid, pitch, _ = layout_params(layout, pitch_um, diameter_um)
    h, w = slide_size_um
    total = 0
    for r in areas:
        region = as_region(r)
        x0, y0, x1, y1 = region.bounds
        cw, ch = max(0.0, min(x1, w) - max(x0, 0.0)), max(0.0, min(y1, h) - max(y0, 0.0))
        area = min(region.area_um2, cw * ch)
        # a row and a column of spots on the edges come on top of area / cell
        total += checks.spots_in(area, pitch, grid) + int(math.ceil((cw + ch) / pitch)) + 1
    return total


def spots_for_slide(
    slide,
    regions=None,
    layout: str = "visium",
    pitch_um: Optional[float] = None,
    diameter_um: Optional[float] = None,
    tissue_only: bool = False,
    mask=None,
    max_spots: Optional[int] = None,
    size_hint: Optional[dict] = None,
    notes: Optional[list] = None,
):
    """The spots of ``layout`` inside ``regions`` (µm; None = the whole slide) of ``slide``.

    ``tissue_only`` keeps the spots on tissue, using ``mask`` if given (a
    ``spots.TissueMask`` of this slide) or computing one. Before laying anything out, the
    spot count is estimated from the areas: above ``max_spots`` (default
    ``checks.MAX_SPOTS``) it is refused with the estimate, well before it is warned about
    (``size_hint``: ``n_genes``, ``views``, ``device`` for the estimate's memory and time;
    the warning is appended to ``notes`` when given, else ``warnings.warn``). Raises ``M2ORTError`` when no spot is left.
    """
    from ..spots import layout_spots, restrict_to_tissue, tissue_mask

    checks.spot_geometry(pitch_um, diameter_um)
    areas = _as_regions(regions)
    if areas is None:
        h, w = slide.size_um
        areas = [(0.0, 0.0, w, h)]
    n_est = estimate_spots(slide.size_um, areas, layout, pitch_um, diameter_um)
    note = checks.check_size(n_est, checks.max_spots(max_spots), **(size_hint or {}))
    if note and notes is not None:
        notes.append(note)
    elif note:
        warnings.warn(note, stacklevel=2)
    spots = merge_layouts([layout_spots(r, layout, pitch_um, diameter_um, slide_size_um=slide.size_um) for r in areas])
    if tissue_only and len(spots):
        spots = restrict_to_tissue(spots, mask if mask is not None else tissue_mask(slide))
    if len(spots) == 0:
        raise M2ORTError(
            f"The region holds no spot centres: make it larger than the spot pitch ({spots.pitch_um:g} µm)."
        )
    return spots


def predict_spots(
    slide,
    centers_um: np.ndarray,
    model,
    card,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    compile: bool | str = "auto",
    tta: str = "none",
    smooth_um: float = 0.0,
    should_stop: Optional[Callable[[], bool]] = None,
    job_spots: Optional[int] = None,
    first_batch: Optional[int] = None,
):
    """``inference.predict`` with the request's inference options (a job).

    ``smooth_um`` smooths over the spots of this call only: a cohort tile's edge spots
    see fewer neighbours than in a whole-slide call."""
    from ..inference import predict

    return predict(
        slide, centers_um, model, card, device=device, batch_size=batch_size, precision=precision,
        should_stop=should_stop, compile=compile, job_spots=job_spots, tta=tta, smooth_um=smooth_um,
        first_batch=first_batch,
    )  # fmt: skip


def _open(request: PredictRequest):
    """(slide, opened here?) for the request's slide or slide path."""
    from ..io.slides import open_slide

    if isinstance(request.slide, (str, os.PathLike)):
        return open_slide(request.slide, mpp=request.mpp), True
    return request.slide, False


def warm_up(slide) -> threading.Thread:
    """Read one full-resolution pixel in a background thread.

    A flat JPEG/PNG decodes whole on its first full-resolution read (about a second for
    a 90-megapixel section), which the first batch's patches would otherwise wait for;
    started before the tissue mask, the two overlap (the decode releases the GIL). For a
    tiled slide it reads one tile. Errors are left to the real read, which reports them."""

    def read():
        try:
            np.asarray(slide.levels[0][:1, :1])
        except Exception:
            pass

    from ..background import start

    return start(read, "m2ort-warm-up")


_MASKS = PerSlide(kept=4)  # the tissue masks of the last few slides


def slide_tissue_mask(slide):
    """``spots.tissue_mask(slide)``, found once per slide file and pixel size in this
    process: a second click, or a ``prefetch_slide`` started when the slide was opened,
    finds it ready (or waits for the one in flight rather than redoing it)."""
    from ..spots import tissue_mask

    return _MASKS.get(slide, tissue_mask)


def prepare_slide(slide, decode: bool = True) -> None:
    """Everything a first prediction on ``slide`` would wait for, done now: the
    full-resolution decode of a flat image (kept while ``slide`` lives; ``decode``), the
    tissue mask and the colour test's thumbnail. Called in a background thread as a
    slide is opened or selected."""
    import matplotlib.path  # noqa: F401  (laying out spots in a region: 0.2-0.5 s to import)

    from .. import inference, patches  # noqa: F401
    from ..background import stopping
    from .domain import colour_inputs

    warm = warm_up(slide) if decode else None
    if not stopping():
        slide_tissue_mask(slide)
    if not stopping():
        colour_inputs(slide)
    if warm is not None:
        warm.join()


def prefetch_tissue_mask(path, mpp: Optional[float] = None) -> threading.Thread:
    """``prepare_slide`` of a slide file in the background (e.g. while the user draws a
    region), without the decode: nothing keeps this slide open afterwards. Errors are
    left to the prediction, which reports them."""

    def work():
        from ..io.slides import open_slide

        try:
            prepare_slide(open_slide(path, mpp=mpp, quiet=True), decode=False)
        except Exception:
            pass

    from ..background import start

    return start(work, "m2ort-tissue-prefetch")


def plan_slide(request: PredictRequest) -> Job[PredictionPlan]:
    """Check the request, load the model and the slide, and lay out the spots (a job:
    it may find tissue).

    Before any pixel is decoded: every number is checked (``checks.predict_request``),
    the slide's resolution against the model's (``domain.check_resolution``: far coarser
    is refused unless ``request.force``) and the job's size (``max_spots``). Then the
    colour test flags spots that look blank or unlike H&E. Warnings go through
    ``warnings.warn`` and are kept in ``plan.notes``."""
    from ..devices import resolve_device
    from ..patches import fov_um
    from ..tta import n_views
    from .domain import check_resolution, colour_flags, flag_warning

    checks.predict_request(request)
    yield Progress("prepare", 0, 1, "loading the model and slide")
    card = read_model_card(request.model)
    slide, opened = _open(request)
    notes: list[str] = []
    try:
        note = check_resolution(slide.mpp, card.mpp, request.force, f"'{slide.name}'")
        if note:
            notes.append(note)
        hint = {
            "n_genes": len(card.genes),
            "views": n_views(request.tta),
            "device": resolve_device(request.device).type,
        }
        mask = request.tissue_mask
        if request.tissue_only and mask is None:
            warm_up(slide)  # full resolution decoded while the tissue is found
            yield Progress("prepare", 0, 1, "finding tissue")
            mask = slide_tissue_mask(slide)
        spots = spots_for_slide(
            slide, request.regions, request.layout, request.pitch_um, request.diameter_um, request.tissue_only,
            mask, max_spots=request.max_spots, size_hint=hint, notes=notes,
        )  # fmt: skip
        colour = colour_flags(slide, spots.centers_um, fov_um(card.mpp))
        note = flag_warning(colour)
        if note:
            notes.append(note)
        model, card = resolve_model(request.model)
    except BaseException:
        if opened:
            slide.close()
        raise
    for note in notes:
        warnings.warn(note, stacklevel=2)
    plan = PredictionPlan(slide, model, card, spots, len(spots), mask, opened, colour, notes)
    return plan.without(request.skip_ids)


def run_plan(
    plan: PredictionPlan, request: PredictRequest, should_stop: Optional[Callable[[], bool]] = None
) -> Job[SlidePrediction]:
    """Predict the plan's spots with the request's inference options.

    Yields ``Progress("plan", 0, n, data={"plan": plan})`` first, then the prediction's
    events (``data={"indices", "values"}``); stopping keeps the spots done so far."""
    result = SlidePrediction(None, plan.spots, plan.card, plan.slide, plan.n_candidates, plan.tissue_mask, plan.colour)
    if len(plan.spots) == 0:
        return result
    yield Progress("plan", 0, len(plan.spots), f"{len(plan.spots)} spots", data={"plan": plan})
    result.prediction = yield from predict_spots(
        plan.slide,
        plan.spots.centers_um,
        plan.model,
        plan.card,
        device=request.device,
        precision=request.precision,
        batch_size=request.batch_size,
        first_batch=request.first_batch,
        compile=request.compile,
        tta=request.tta,
        smooth_um=request.smooth_um,
        should_stop=should_stop,
    )
    return result


def predict_slide(request: PredictRequest, should_stop: Optional[Callable[[], bool]] = None) -> Job[SlidePrediction]:
    """The whole use case: ``plan_slide`` then ``run_plan`` (a job yielding Progress).

    A slide given as a path is opened here and closed at the end; the result still names
    it (``name``, ``mpp``, ``path``) for writing the output."""
    plan = yield from plan_slide(request)
    try:
        return (yield from run_plan(plan, request, should_stop))
    finally:
        if plan.opened:
            plan.slide.close()
