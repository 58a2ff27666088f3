"""Progress events shared by every long job (sampling, inference, training, batch).

Jobs are generators that yield ``Progress`` and return their result, the pattern of
stardist-napari: the widget runs the generator in a ``thread_worker`` and forwards each
event to a progress bar, the CLI draws a text bar, tests just run it to the end.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

T = TypeVar("T")


@dataclass
class Progress:
    stage: str
    done: int
    total: int
    message: str = ""
    data: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


Job = Generator[Progress, None, T]


def run_to_end(gen: Job, on_progress: Optional[Callable[[Progress], Any]] = None) -> Any:
    """Run a job generator synchronously and return what it returns."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(event)


def text_progress(prefix: str = "", log_stages: tuple = ("epoch",)):
    """A tqdm-backed ``on_progress`` callback for the CLI.

    One bar per stage (a new stage closes the previous bar); events of ``log_stages``
    (per-epoch summaries) are printed as lines above the bar instead.
    """
    from tqdm import tqdm

    state: dict = {"stage": None, "bar": None}

    def callback(event: Progress) -> None:
        if event.stage in log_stages:
            tqdm.write(f"{prefix}{event.message}")
            return
        bar = state["bar"]
        if state["stage"] != event.stage or bar is None:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=event.total, desc=f"{prefix}{event.stage}", leave=True, dynamic_ncols=True)
            state["stage"] = event.stage
        if bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        if event.message:
            bar.set_postfix_str(event.message, refresh=False)
        bar.refresh()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    callback.close = close  # type: ignore[attr-defined]
    return callback
