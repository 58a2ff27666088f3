"""What a cohort run reports: one record per slide, the summary table, one per tile.

Plain records (no dask), so the CLI, tests and notebooks can read a run's outcome
without the cluster machinery of ``distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass
class SlideResult:
    """What happened to one slide of the cohort."""

    slide: str  # the path as given
    name: str  # output name (slide name without extension)
    status: str = "pending"  # "done" | "skipped" (output complete already) | "failed"
    spots: int = 0
    seconds: float = 0.0  # done: first tile start -> last tile end on the cluster
    output: Optional[Path] = None
    error: str = ""
    note: str = ""
    tiles: int = 0
    worker_seconds: float = 0.0  # summed task time over the slide's tiles

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")


@dataclass
class BatchSummary:
    slides: list[SlideResult]
    seconds: float = 0.0
    tiles: int = 0
    dashboard: str = ""
    workers: int = 0  # worker processes that delivered tiles (a restarted worker counts anew)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.slides)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def by_status(self, status: str) -> list[SlideResult]:
        return [r for r in self.slides if r.status == status]

    @property
    def done(self) -> list[SlideResult]:
        return self.by_status("done")

    @property
    def skipped(self) -> list[SlideResult]:
        return self.by_status("skipped")

    @property
    def failed(self) -> list[SlideResult]:
        return self.by_status("failed")

    @property
    def spots_predicted(self) -> int:
        return sum(r.spots for r in self.done)

    def __getitem__(self, key: str) -> SlideResult:
        for r in self.slides:
            if key in (r.name, r.slide, Path(r.slide).name):
                return r
        raise KeyError(key)

    def table(self) -> str:
        """Plain-text summary: one row per slide, then the errors and notes in full."""
        rows = [("slide", "spots", "seconds", "status", "output")]
        for r in self.slides:
            rows.append(
                (
                    r.name,
                    str(r.spots) if r.spots else "-",
                    f"{r.seconds:.1f}",
                    r.status,
                    str(r.output) if r.output else "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = []
        for k, row in enumerate(rows):
            lines.append(
                "  ".join(
                    [
                        row[0].ljust(widths[0]),
                        row[1].rjust(widths[1]),
                        row[2].rjust(widths[2]),
                        row[3].ljust(widths[3]),
                        row[4],
                    ]
                ).rstrip()
            )
            if k == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ------")
        for r in self.slides:
            if r.error:
                lines.append(f"{r.name}: {r.status}: {r.error}")
            elif r.note and r.status == "done":
                lines.append(f"{r.name}: {r.note}")
        n = self.spots_predicted
        rate = f", {n / self.seconds:.1f} spots/s" if n and self.seconds > 0 else ""
        lines.append(
            f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed; "
            f"{n} spots predicted in {self.seconds:.1f} s on {self.workers} worker(s){rate}"
        )
        return "\n".join(lines)


@dataclass
class TileResult:
    """One task's output (plain arrays: cheap to pickle back to the client)."""

    slide_index: int
    tile_id: int
    indices: np.ndarray  # (n,) int64 into the slide's spot list
    values: np.ndarray  # (n, G) float32
    outside: np.ndarray  # (n,) bool
    blank: np.ndarray  # (n,) bool
    start: float  # time.time() on the worker
    stop: float
    info: dict = field(default_factory=dict)
    uncertainty: Optional[np.ndarray] = None  # (n, G) float32 spread across TTA views
    #: a problem that cannot succeed on retry (``M2ORTError``): returned, not raised, so
    #: the scheduler does not run the tile again
    error: str = ""
