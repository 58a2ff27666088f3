"""The widgets' state as typed, evented records (psygnal), kept apart from the Qt views.

The panels write what the user chose into these records and redraw when they change;
the composers read them to build a request for the use-case layer.  Nothing here imports
Qt, so a script (or a test) can drive a widget by setting fields.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from psygnal import evented

from ..tta import DEFAULT_SMOOTH_UM, DEFAULT_TTA

DEFAULT_GENES = ("ERBB2", "GRB7", "KRT19")  # shown first when the panel has them


@evented
@dataclass
class PredictSettings:
    """What to predict, and how: the inputs and run panels' choices."""

    slide: str = ""  # name of the H&E Image layer
    mpp: float = 0.5  # µm per level-0 pixel, as shown in the pixel-size field
    mpp_source: str = ""  # metadata | user | default | st-geometry
    model: Optional[str] = None  # model spec (see widgets._models.ModelCatalogue)
    device: str = "auto"
    layout: str = "visium"
    pitch_um: float = 100.0
    diameter_um: float = 55.0
    tissue_only: bool = True
    batch_size: int = 64
    compile: bool = False
    regions: str = ""  # name of the Shapes layer with the regions
    tta: str = DEFAULT_TTA  # test-time augmentation (tta.TTA_MODES), as the CLI's --tta
    smooth_um: float = DEFAULT_SMOOTH_UM  # smoothing sigma over neighbouring spots, as --smooth-um
    force: bool = False  # predict on a slide far coarser than the model anyway


@evented
@dataclass
class DisplayState:
    """What is on screen: the predictions layer shown and how it is coloured."""

    layer: Any = None  # the predictions Points layer the display panel acts on
    gene: Optional[str] = None
    colormap: str = "viridis"
    clim: tuple = (0.0, 1.0)
    heatmap: bool = False
    side_by_side: bool = False
    show_flagged: bool = False  # spots flagged off-slide / blank / not-HE drawn too


@dataclass
class RunState:
    """Bookkeeping of the prediction in flight (main thread only)."""

    what: str  # regions | view | tissue
    geom: Any  # _layers.Geometry of the slide layer when the run started
    slide_layer: str
    t0: float = field(default_factory=time.perf_counter)
    t_first: Optional[float] = None  # seconds to the first batch on screen
    spots: Any = None  # spots.SpotLayout sent to the model
    layer: Any = None  # the predictions layer receiving this run's spots
    colour: Any = None  # per planned spot colour-test flag (pipelines.domain)
    n_done: int = 0
    pending: list = field(default_factory=list)  # (indices, values) received, not drawn yet
    t_drawn: Optional[float] = None  # perf_counter of the last draw


@dataclass(frozen=True)
class RunSummary(Mapping):
    """What the last prediction did; readable as a mapping (``last_run["n_spots"]``),
    which is how scripts and the demo have read it."""

    n_spots: int = 0
    skipped: int = 0
    seconds: float = 0.0
    n_requested: Optional[int] = None
    seconds_to_first_batch: Optional[float] = None
    stopped: bool = False
    device: Optional[str] = None
    spots_per_s: Optional[float] = None
    compiled: bool = False

    def __getitem__(self, key: str):
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    @classmethod
    def _keys(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    def record(self) -> dict:
        """Plain values, for the layer's metadata."""
        return {k: v for k, v in asdict(self).items() if isinstance(v, (int, float, str, bool, type(None)))}


@evented
@dataclass
class FinetuneSettings:
    """What to train on and how: the data and training panels' choices."""

    slide: str = ""
    st_format: str = "legacy"  # legacy | visium | h5ad
    st_mpp: float = 0.0  # 0: the data's own pixel size
    only_in_regions: bool = False
    sections: tuple = ()  # names of the loaded sections ticked for training (Train needs one)
    model: Optional[str] = None  # "bundled" or a checkpoint path
    genes_mode: str = "model"  # model | top | list
    top_n: int = 250
    gene_list: str = ""
    epochs: int = 10
    lr: float = 1e-4
    schedule: str = "constant"  # constant | cosine
    batch_size: int = 32
    mode: str = "full"  # full | head
    val: str = "blocks"  # blocks | none | the name of a section held out
    device: str = "auto"
