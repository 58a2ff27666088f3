"""What the ``napari-m2ort`` command prints: warnings as one clean line, progress bars.

A warning is printed once as ``warning: <message>`` (never Python's file/line form)
above the progress bar, not glued onto it; the pixel-size warning, which both the slide
reader and the inference raise in their own words, appears once. Progress is a tqdm bar
on a terminal and a few whole lines (each quarter, and the end) in a log file, so the
last line is never printed twice.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
import warnings

#: Warnings that say the same thing in different words: printed once per key.
_SAME = ((re.compile(r"pixel.size", re.I), "pixel size"),)
#: Library chatter that is not the user's business.
_QUIET = (
    (r".*Transforming to str index", None),
    (r".*", FutureWarning),
    (r".*", DeprecationWarning),
    (r".*", PendingDeprecationWarning),
)


#: Stages that only hand data to a widget (the plan of a prediction): nothing to show.
_SILENT = ("plan",)


def _write(line: str) -> None:
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def clean_warnings():
    """Print each warning once as ``warning: ...`` on stderr while the command runs."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        key = next((k for pattern, k in _SAME if pattern.search(text)), text)
        if key in seen:
            return
        seen.add(key)
        _write(f"warning: {text}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for message, category in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=category or Warning)
        old = warnings.showwarning
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = old


def text_progress(log_stages: tuple = ("epoch",), stream=None):
    """An ``on_progress`` callback: a tqdm bar per stage on a terminal, whole lines
    otherwise. Events of ``log_stages`` (per-epoch summaries) are printed as lines."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return _Bars(log_stages, stream)
    return _Lines(log_stages, stream)


class _Bars:
    def __init__(self, log_stages, stream):
        self.log_stages, self.stream = log_stages, stream
        self.stage, self.bar = None, None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.stage in _SILENT:
            return
        if event.stage in self.log_stages:
            tqdm.write(event.message, file=self.stream)
            return
        if self.stage != event.stage or self.bar is None:
            self.close()
            self.bar = tqdm(total=event.total, desc=event.stage, leave=True, dynamic_ncols=True, file=self.stream)
            self.stage = event.stage
        if self.bar.total != event.total:
            self.bar.total = event.total
        self.bar.n = event.done
        if event.message:
            self.bar.set_postfix_str(event.message, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leave=True: the final state stays, drawn once
            self.bar = None


class _Lines:
    """Progress for logs: a line at each quarter of a stage and at its end (a stage that
    never started moving prints nothing, so an early error stays the only line)."""

    def __init__(self, log_stages, stream):
        self.log_stages, self.stream = log_stages, stream
        self.stage, self.last, self.quarter, self.t0 = None, None, -1, 0.0

    def _line(self, event) -> None:
        total = f"/{event.total}" if event.total else ""
        msg = f" {event.message}" if event.message else ""
        print(f"{event.stage}: {event.done}{total}{msg} ({time.perf_counter() - self.t0:.0f} s)",
              file=self.stream, flush=True)  # fmt: skip

    def __call__(self, event) -> None:
        if event.stage in _SILENT:
            return
        if event.stage in self.log_stages:
            print(event.message, file=self.stream, flush=True)
            return
        if event.stage != self.stage:
            self.close()
            self.stage, self.quarter, self.t0 = event.stage, -1, time.perf_counter()
        quarter = int(4 * event.done / event.total) if event.total else 0
        if quarter > max(self.quarter, 0):
            self.quarter = quarter
            self._line(event)
            self.last = None
        else:
            self.last = event

    def close(self) -> None:
        if self.last is not None and self.last.done > 0:  # the end state, unless just printed
            self._line(self.last)
        self.last = None
