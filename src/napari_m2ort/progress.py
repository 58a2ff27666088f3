"""Progress events shared by every long job (sampling, inference, training, batch).

Jobs are generators that yield ``Progress`` and return their result, the pattern of
stardist-napari: the widget runs the generator in a ``thread_worker`` and forwards each
event to a progress bar, the CLI draws a text bar, tests just run it to the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Optional, TypeVar

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


def run_to_end(
    gen: Job, on_progress: Optional[Callable[[Progress], Any]] = None
) -> Any:
    """Run a job generator synchronously and return what it returns."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(event)


def text_progress(prefix: str = ""):
    """A tqdm-backed ``on_progress`` callback for the CLI (one bar per stage)."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def callback(event: Progress) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bars.clear()
            bar = bars[event.stage] = tqdm(
                total=event.total, desc=f"{prefix}{event.stage}", unit="", leave=True
            )
        if bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        if event.message:
            bar.set_postfix_str(event.message, refresh=False)
        bar.refresh()

    callback.close = lambda: [b.close() for b in bars.values()]  # type: ignore[attr-defined]
    return callback
