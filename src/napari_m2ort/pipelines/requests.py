"""What a front door asks the use-case layer for, as typed records.

The CLI fills these from its arguments, the widgets from their controls, the cohort
runner from its options; none of them needs to know how the request is carried out.
Units: regions, pitch, diameter and smoothing in µm of the slide's level-0 frame.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from torch import nn

    from ..inference import Prediction
    from ..model.weights import ModelCard
    from ..spots import RegionLike, SpotLayout, TissueMask
    from ..training import TrainConfig

#: "bundled", a .safetensors path, a timm variant name ("m2ort_small", or a CNN baseline
#: for training), or an in-memory ``(model, card)`` pair. See ``resolve_model``.
ModelSpec = Union[str, "os.PathLike[str]", "tuple[nn.Module, ModelCard]"]


def _default_train_config():
    from ..training import TrainConfig

    return TrainConfig()


@dataclass
class PredictRequest:
    """Predict expression at the spots of a layout over (regions of) one slide.

    ``slide``: an open slide (anything with the slide contract: ``mpp``, ``size_um``,
    ``read_region``...) or the path of a slide file (opened with ``mpp``, which is then
    the pixel size for files that lack one). ``regions``: rectangles ``(x0, y0, x1, y1)``
    or polygons (``spots.Region``) in µm; ``None`` is the whole slide. ``tissue_only``
    keeps the spots on tissue (``tissue_mask`` reuses a mask computed earlier for this
    slide). ``skip_ids``: spot ids already predicted, left out (a second, overlapping
    region adds only the new spots). ``tta`` / ``smooth_um`` are passed to
    ``inference.predict`` (the front doors offer ``tta.DEFAULT_TTA`` /
    ``DEFAULT_SMOOTH_UM``). ``max_spots``: the size budget (``checks.MAX_SPOTS``), checked
    before any spot is laid out. ``force``: predict on a slide far coarser than the
    model's resolution anyway (see ``domain``). ``first_batch``: a smaller first batch,
    so that a viewer shows the first colours after a fraction of the model's time.
    """

    slide: Any
    model: ModelSpec = "bundled"
    regions: Optional[Sequence[RegionLike]] = None
    layout: str = "visium"
    pitch_um: Optional[float] = None
    diameter_um: Optional[float] = None
    tissue_only: bool = False
    mpp: Optional[float] = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    first_batch: Optional[int] = None
    compile: Union[bool, str] = "auto"
    tta: str = "none"
    smooth_um: float = 0.0
    skip_ids: Collection[str] = ()
    tissue_mask: Optional[TissueMask] = None
    max_spots: Optional[int] = None
    force: bool = False


@dataclass
class PredictionPlan:
    """A prediction ready to run: the model, the open slide and the spots to predict.

    ``n_candidates``: spots of the layout before ``skip_ids`` were removed;
    ``tissue_mask``: the mask used (worth keeping for the next request on this slide).
    """

    slide: Any
    model: nn.Module
    card: ModelCard
    spots: SpotLayout
    n_candidates: int
    tissue_mask: Optional[TissueMask] = None
    opened: bool = False  # the plan opened the slide itself (from a path)
    #: per spot "ok" / "blank" / "not-HE" from the colour test (``domain.colour_flags``)
    colour: Optional[Any] = None
    #: warnings found while planning (resolution, flagged spots, job size), also warned
    notes: list = field(default_factory=list)

    def without(self, ids: Collection[str]) -> PredictionPlan:
        """The same plan without the spots whose id is in ``ids``."""
        import dataclasses

        import numpy as np

        if not ids:
            return self
        ids = {str(i) for i in ids}
        keep = np.array([str(i) not in ids for i in self.spots.ids], dtype=bool)
        colour = None if self.colour is None else self.colour[keep]
        return dataclasses.replace(self, spots=self.spots.subset(keep), colour=colour)

    @property
    def n_skipped(self) -> int:
        return self.n_candidates - len(self.spots)


@dataclass
class SlidePrediction:
    """The result of ``predict_slide``: the prediction with everything needed to use it.

    ``prediction`` is None when every spot was skipped (nothing left to predict)."""

    prediction: Optional[Prediction]
    spots: SpotLayout
    card: ModelCard
    slide: Any
    n_candidates: int
    tissue_mask: Optional[TissueMask] = None
    colour: Optional[Any] = None  # per spot colour-test flag (see PredictionPlan)

    @property
    def n_skipped(self) -> int:
        return self.n_candidates - len(self.spots)

    @property
    def flags(self):
        """Per spot "ok" / "off-slide" / "blank" / "not-HE" (``domain.spot_flags``)."""
        from .domain import spot_flags

        p = self.prediction
        return spot_flags(self.colour, None if p is None else p.outside, None if p is None else p.blank)

    def to_anndata(self):
        """AnnData of the predicted spots: ``outputs.prediction_anndata``, the one
        structure every front door writes."""
        from .outputs import prediction_anndata

        return prediction_anndata(self)


@dataclass
class FineTuneRequest:
    """Train a model (new, or starting from trained weights) on measured ST sections.

    ``sections``: ``io.st.STSection`` objects. ``model``: a trained model to fine-tune
    ("bundled", a checkpoint, an in-memory pair) or a variant name for a new one.
    ``genes``: "model" (keep the model's panel; "top:250" for a new model), "top:N" (the
    data's top N genes by the panel rule), a file with one gene per line, or a comma
    separated list. ``val``: "blocks" (held-out spatial blocks of every section), "none",
    or the name(s) of held-out section(s). ``out_path``: where the best checkpoint goes
    (None: kept in memory only; CNN baselines are never saved). ``train_mpp``: the µm/px
    the model works at (default: the model's, or 0.69 for a new model). ``panel_rule``:
    how "top:N" picks genes (a key of ``targets.PANEL_RULES``; default its first).
    """

    sections: Sequence[Any]
    model: ModelSpec = "bundled"
    genes: str = "model"
    val: str = "blocks"
    config: TrainConfig = field(default_factory=_default_train_config)
    out_path: Optional[Path] = None
    train_mpp: Optional[float] = None
    tied_kv: bool = False
    cache_dir: Optional[Path] = None
    panel_rule: Optional[str] = None


@dataclass
class EvaluateRequest:
    """Held-out metrics of a trained model on measured ST sections (genes of the model's
    panel missing from the data are reported, not fatal). ``tta`` / ``smooth_um`` as in
    ``PredictRequest``."""

    sections: Sequence[Any]
    model: ModelSpec = "bundled"
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 64
    cache_dir: Optional[Path] = None
    tta: str = "none"
    smooth_um: float = 0.0


__all__ = [
    "EvaluateRequest",
    "FineTuneRequest",
    "ModelSpec",
    "PredictRequest",
    "PredictionPlan",
    "SlidePrediction",
]
