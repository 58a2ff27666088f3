"""Generator → napari worker glue shared by the two dock widgets.

A core job is a generator that yields ``Progress`` and returns its result (see
``napari_m2ort.progress``).  ``start_job`` runs one in a napari ``thread_worker`` and
forwards, in the main thread:

- each ``Progress`` to ``on_progress`` and, once the job has run for a few seconds,
  to a napari progress bar (activity dock);
- the returned value to ``on_done``;
- an ``M2ORTError`` (a problem the user can fix) to ``on_failed`` and to a napari error
  notification carrying just its message (no traceback);
- always, at the very end, ``on_finished``.

Stopping is cooperative: ``JobHandle.cancel()`` sets a flag that the job reads through the
``should_stop`` callable it was built with, so the job ends after its current batch or
step and returns what it has (partial predictions, best checkpoint).  Unexpected
exceptions (bugs) still reach napari's own error notification, with a traceback.

A small registry lets the fine-tuning widget find the prediction widget docked in the
same viewer ("Use for prediction") without holding strong references to either.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Optional

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer

from ..errors import M2ORTError
from ..progress import Progress

#: A job still running after this long gets a bar in napari's activity dock.
ACTIVITY_DELAY_MS = 3000

#: Python's GIL switch interval while a job runs (default 5 ms). The worker releases the
#: GIL inside each torch op and needs it back between ops; with the UI thread rendering
#: (panning under software OpenGL) each handback could wait up to 5 ms, hundreds of times
#: per forward. At 0.5 ms, Predict on 116 spots while panning showed all spots in 4.2-4.9 s
#: instead of 5.2-6.1 s; the median pan gap stayed 52-56 ms, its p95 rose from 149-177 to
#: 174-295 ms (`benchmarks/results/gui_pan_cpu.md`).
JOB_SWITCH_INTERVAL_S = 0.0005
_switch = {"jobs": 0, "saved": None}


def _job_started() -> None:
    if _switch["jobs"] == 0:
        _switch["saved"] = sys.getswitchinterval()
        sys.setswitchinterval(min(JOB_SWITCH_INTERVAL_S, _switch["saved"]))
    _switch["jobs"] += 1


def _job_ended() -> None:
    _switch["jobs"] = max(0, _switch["jobs"] - 1)
    if _switch["jobs"] == 0 and _switch["saved"] is not None:
        sys.setswitchinterval(_switch["saved"])
        _switch["saved"] = None


@dataclass
class JobFailed:
    """Returned by the worker when the job raised an ``M2ORTError``."""

    error: M2ORTError


def _run(make_job: Callable[[Callable[[], bool]], Generator], stop: threading.Event):
    """The worker's generator: the core job, with user errors turned into a value."""
    try:
        job = make_job(stop.is_set)
        result = yield from job
    except M2ORTError as exc:
        return JobFailed(exc)
    return result


@dataclass
class JobHandle:
    worker: GeneratorWorker
    stop: threading.Event
    desc: str
    pbar: Any = None
    finished: bool = False
    result: Any = None
    error: Optional[BaseException] = None
    events: list = field(default_factory=list)

    def cancel(self) -> None:
        """Ask the job to stop after its current batch/step (results so far are kept)."""
        self.stop.set()

    @property
    def running(self) -> bool:
        return not self.finished

    @property
    def cancelled(self) -> bool:
        return self.stop.is_set()


def start_job(
    make_job: Callable[[Callable[[], bool]], Generator],
    *,
    desc: str,
    on_progress: Optional[Callable[[Progress], Any]] = None,
    on_done: Optional[Callable[[Any], Any]] = None,
    on_failed: Optional[Callable[[BaseException], Any]] = None,
    on_finished: Optional[Callable[[], Any]] = None,
    show_progress: bool = True,
    activity_delay_ms: int = ACTIVITY_DELAY_MS,
) -> JobHandle:
    """Run ``make_job(should_stop)`` (a Progress generator) in a napari thread worker;
    napari's activity bar appears if it still runs after ``activity_delay_ms``."""
    stop = threading.Event()
    handle = JobHandle(worker=None, stop=stop, desc=desc)  # type: ignore[arg-type]
    shown_stage = [None]
    last_event: list = [None]

    def _show(pbar, event) -> None:
        try:
            if pbar.total != event.total:
                pbar.total = event.total
                pbar.n = 0
            if event.stage != shown_stage[0]:  # each description costs a window relayout
                shown_stage[0] = event.stage
                pbar.set_description(f"{desc}: {event.stage}")
            pbar.update(max(0, event.done - pbar.n))
        except Exception:  # pragma: no cover - the bar is decoration only
            pass

    def _yielded(event):
        if not isinstance(event, Progress):
            return
        last_event[0] = event
        if on_progress is not None:
            on_progress(event)
        if handle.pbar is not None:
            _show(handle.pbar, event)

    def _returned(value):
        if isinstance(value, JobFailed):
            handle.error = value.error
            show_error(str(value.error))
            if on_failed is not None:
                on_failed(value.error)
            return
        handle.result = value
        if on_done is not None:
            on_done(value)

    def _errored(exc):
        # napari's own handler already shows the notification (with traceback).
        handle.error = exc
        if on_failed is not None:
            on_failed(exc)

    def _finished():
        if not handle.finished:
            _job_ended()
        if handle.pbar is not None:
            try:
                handle.pbar.close()
            except Exception:  # pragma: no cover
                pass
            handle.pbar = None
        handle.finished = True
        if on_finished is not None:
            on_finished()

    # napari's progress widgets call QApplication.processEvents() when updated, so a
    # handler can be re-entered by the next queued signal.  Every signal goes through one
    # queue: handlers run one at a time, in emission order.  A drain handles only what
    # was queued when it began; signals arriving meanwhile wait for the next turn of the
    # event loop, so a job faster than its handlers cannot hold the main thread (and
    # whoever called processEvents) until it ends.
    pending: deque = deque()
    draining = [False]
    scheduled = [False]

    def drain():
        scheduled[0] = False
        if draining[0]:
            return
        draining[0] = True
        try:
            for _ in range(len(pending)):
                h, a = pending.popleft()
                try:
                    h(*a)
                except RuntimeError as exc:
                    # the widget was closed while its job ran: nothing left to update
                    if "deleted" not in str(exc):
                        raise
        finally:
            draining[0] = False
            if pending and not scheduled[0]:
                scheduled[0] = True
                QTimer.singleShot(0, drain)

    def dispatch(handler):
        def slot(*args):
            pending.append((handler, args))
            drain()

        return slot

    # Connecting "errored" here stops superqt from re-raising the exception in the main
    # thread; napari's worker class still relays it to a notification.
    worker = create_worker(
        _run,
        make_job,
        stop,
        _start_thread=False,
        _connect={
            "yielded": dispatch(_yielded),
            "returned": dispatch(_returned),
            "errored": dispatch(_errored),
            "finished": dispatch(_finished),
        },
    )
    handle.worker = worker
    _job_started()
    worker.start()
    if show_progress:

        def activity_bar():
            if handle.finished or handle.pbar is not None:
                return
            try:
                handle.pbar = napari_progress(total=0, desc=desc)
            except Exception:  # pragma: no cover - no activity dock: keep going without it
                return
            if last_event[0] is not None:
                _show(handle.pbar, last_event[0])

        # The widgets show their own bar from the first event. napari's activity bar is
        # for long jobs: making it, and each new description, relayouts the main window
        # (0.2-1.7 s of the main thread measured under Xvfb, taken from the model's two
        # cores), so a job over in seconds never gets one.
        if activity_delay_ms <= 0:
            activity_bar()
        else:
            QTimer.singleShot(int(activity_delay_ms), activity_bar)
    return handle


def run_in_thread(
    func: Callable[[], Any],
    *,
    on_done: Optional[Callable[[Any], Any]] = None,
    on_failed: Optional[Callable[[BaseException], Any]] = None,
    on_finished: Optional[Callable[[], Any]] = None,
    desc: str = "",
) -> JobHandle:
    """A plain function (file reading, model loading) as a one-step job."""

    def make_job(_should_stop):
        yield Progress(desc or "working", 0, 1)
        return func()

    return start_job(
        make_job,
        desc=desc or "working",
        on_done=on_done,
        on_failed=on_failed,
        on_finished=on_finished,
        show_progress=bool(desc),
    )


def cancel_on_destroy(widget) -> list:
    """A list the widget appends its jobs to; they are cancelled when the widget goes."""
    jobs: list = []

    def stop(*_):
        for job in jobs:
            job.cancel()

    widget.destroyed.connect(stop)
    return jobs


def notify(kind: str, message: str) -> None:
    """A napari notification: "error", "warning" or "info"."""
    from napari.utils import notifications as n

    {"error": n.show_error, "warning": n.show_warning, "info": n.show_info}[kind](message)


# ------------------------------------------------------------------ widget registry

_PREDICT_WIDGETS: weakref.WeakSet = weakref.WeakSet()


def register_predict_widget(widget) -> None:
    _PREDICT_WIDGETS.add(widget)


def unwrap(obj):
    """The object behind napari's plugin proxies (each widget gets its own proxy)."""
    for _ in range(8):
        inner = getattr(obj, "__wrapped__", None)
        if inner is None:
            break
        obj = inner
    return obj


def predict_widget_for(viewer):
    """The prediction widget docked in ``viewer``, if any (else None)."""
    target = unwrap(viewer)
    for w in list(_PREDICT_WIDGETS):
        try:
            if unwrap(w.viewer) is target:
                return w
        except RuntimeError:  # its C++ side is gone
            continue
    return None


_DOCKED_WIDGETS: weakref.WeakSet = weakref.WeakSet()  # every napari-m2ort dock widget


def _dock_of(widget):
    from qtpy.QtWidgets import QDockWidget

    parent = widget.parent()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parent()
    return parent


def tab_with_siblings(widget) -> bool:
    """Tab ``widget``'s dock with another napari-m2ort dock of the same viewer and side.

    Stacked in one column of a 1000 px screen, the Predict and Fine-tune docks each get
    a few rows; as tabs each keeps the whole height.  Call it when the widget is first
    shown (each widget registers itself here); returns whether the docks are tabbed.
    """
    from qtpy.QtWidgets import QMainWindow

    _DOCKED_WIDGETS.add(widget)
    try:
        mine = _dock_of(widget)
    except RuntimeError:  # deleted before a deferred call
        return False
    window = mine.parent() if mine is not None else None
    if mine is None or mine.isFloating() or not isinstance(window, QMainWindow):
        return False
    viewer = unwrap(getattr(widget, "viewer", None))
    for other in list(_DOCKED_WIDGETS) + list(_PREDICT_WIDGETS):
        try:
            if other is widget or unwrap(getattr(other, "viewer", None)) is not viewer:
                continue
            dock = _dock_of(other)
            if dock is None or dock is mine or dock.isFloating() or not dock.isVisible():
                continue
            if window.dockWidgetArea(dock) != window.dockWidgetArea(mine):
                continue
            if mine not in window.tabifiedDockWidgets(dock):
                window.tabifyDockWidget(dock, mine)
            mine.show()
            mine.raise_()
            return True
        except RuntimeError:  # its C++ side is gone
            continue
    return False
