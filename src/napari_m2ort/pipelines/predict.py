"""Predicting a slide: spots from regions and a layout, then the model over them.

``predict_slide`` is the whole use case; ``plan_slide`` and ``run_plan`` are its two
halves, for a front door that filters the spots in between (the widget leaves out spots
already shown). ``predict_spots`` is the one place inference options reach
``inference.predict``, also for the cohort runner's tiles.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from ..errors import M2ORTError
from ..progress import Job, Progress
from .models import resolve_model
from .requests import PredictionPlan, PredictRequest, SlidePrediction

Rect = tuple[float, float, float, float]


def parse_region(region) -> Optional[Rect]:
    """``None`` / "" (the whole slide), "x0,y0,x1,y1" or four numbers -> a µm rectangle."""
    if region is None or (isinstance(region, str) and not region.strip()):
        return None
    parts = region.split(",") if isinstance(region, str) else list(np.asarray(region, dtype=object).ravel())
    try:
        vals = [float(v) for v in parts]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise M2ORTError(f"Region {region!r}: give four numbers x0,y0,x1,y1 in µm.")
    return tuple(vals)  # type: ignore[return-value]


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


def spots_for_slide(
    slide,
    regions=None,
    layout: str = "visium",
    pitch_um: Optional[float] = None,
    diameter_um: Optional[float] = None,
    tissue_only: bool = False,
    mask=None,
):
    """The spots of ``layout`` inside ``regions`` (µm; None = the whole slide) of ``slide``.

    ``tissue_only`` keeps the spots on tissue, using ``mask`` if given (a
    ``spots.TissueMask`` of this slide) or computing one. Raises ``M2ORTError`` when no
    spot is left.
    """
    from ..spots import layout_spots, restrict_to_tissue, tissue_mask

    areas = _as_regions(regions)
    if areas is None:
        h, w = slide.size_um
        areas = [(0.0, 0.0, w, h)]
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
):
    """``inference.predict`` with the request's inference options (a job).

    ``smooth_um`` smooths over the spots of this call only: a cohort tile's edge spots
    see fewer neighbours than in a whole-slide call."""
    from ..inference import predict

    return predict(
        slide, centers_um, model, card, device=device, batch_size=batch_size, precision=precision,
        should_stop=should_stop, compile=compile, job_spots=job_spots, tta=tta, smooth_um=smooth_um,
    )  # fmt: skip


def _open(request: PredictRequest):
    """(slide, opened here?) for the request's slide or slide path."""
    from ..io.slides import open_slide

    if isinstance(request.slide, (str, os.PathLike)):
        return open_slide(request.slide, mpp=request.mpp), True
    return request.slide, False


def plan_slide(request: PredictRequest) -> Job[PredictionPlan]:
    """Load the model and the slide and lay out the spots (a job: it may find tissue)."""
    from ..spots import tissue_mask

    yield Progress("prepare", 0, 1, "loading the model and slide")
    model, card = resolve_model(request.model)
    slide, opened = _open(request)
    try:
        mask = request.tissue_mask
        if request.tissue_only and mask is None:
            yield Progress("prepare", 0, 1, "finding tissue")
            mask = tissue_mask(slide)
        spots = spots_for_slide(
            slide, request.regions, request.layout, request.pitch_um, request.diameter_um, request.tissue_only, mask
        )
    except BaseException:
        if opened:
            slide.close()
        raise
    plan = PredictionPlan(slide, model, card, spots, len(spots), mask, opened)
    return plan.without(request.skip_ids)


def run_plan(
    plan: PredictionPlan, request: PredictRequest, should_stop: Optional[Callable[[], bool]] = None
) -> Job[SlidePrediction]:
    """Predict the plan's spots with the request's inference options.

    Yields ``Progress("plan", 0, n, data={"plan": plan})`` first, then the prediction's
    events (``data={"indices", "values"}``); stopping keeps the spots done so far."""
    result = SlidePrediction(None, plan.spots, plan.card, plan.slide, plan.n_candidates, plan.tissue_mask)
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
