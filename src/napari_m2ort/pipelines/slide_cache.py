"""Work done once per slide file in this process, shared by threads.

Finding tissue and reading the colour test's thumbnail take 0.5-4 s on a 90-megapixel
section: paid on every click, that time sits between Predict and the first colours. A
``PerSlide`` cache keys each result by file (real path, size, mtime) and pixel size, so a
second click, or a prefetch started when the slide was opened, finds it ready; a thread
asking while another computes it waits for that one rather than redoing it. Slides
without a file (a napari layer) are not cached: their key would not say when the pixels
change.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Optional


def slide_file_key(slide) -> Optional[tuple]:
    """(real path, size, mtime, µm/px) of a file-backed slide; None otherwise."""
    path = getattr(slide, "path", None)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, round(float(slide.mpp), 6))


class _Pending:
    def __init__(self):
        self.done = threading.Event()
        self.value = None


class PerSlide:
    """``get(slide, compute)``: ``compute(slide)`` once per slide file (the last ``kept``)."""

    def __init__(self, kept: int = 4):
        self._entries: dict = {}
        self._lock = threading.Lock()
        self._kept = kept

    def get(self, slide, compute: Callable[[Any], Any], *extra):
        key = slide_file_key(slide)
        if key is None:
            return compute(slide)
        key = key + extra
        with self._lock:
            entry = self._entries.get(key)
            owner = entry is None
            if owner:
                entry = self._entries[key] = _Pending()
                while len(self._entries) > self._kept:
                    self._entries.pop(next(iter(self._entries)))
        if not owner:
            entry.done.wait()
            return entry.value if entry.value is not None else compute(slide)
        try:
            entry.value = compute(slide)
        except BaseException:
            with self._lock:
                self._entries.pop(key, None)
            raise
        finally:
            entry.done.set()
        return entry.value

    def ready(self, slide, *extra) -> bool:
        """Whether the value is computed (no waiting, no computing)."""
        key = slide_file_key(slide)
        if key is None:
            return False
        with self._lock:
            entry = self._entries.get(key + extra)
        return entry is not None and entry.done.is_set() and entry.value is not None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
