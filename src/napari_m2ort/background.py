"""Background threads that finish before the interpreter shuts down.

The widget prepares the model and the slide in threads while the user draws a region. A
daemon thread still inside torch or an image decoder when Python finalizes can abort the
whole process ("terminate called without an active exception", exit status 134), seen
in test runs that ended just after a widget opened. Threads started here are joined at
exit: ``atexit`` handlers run before daemon threads are torn down, and each job checks
``stopping()`` between its steps so the wait is one step at most.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable

_THREADS: set = set()
_LOCK = threading.Lock()
_STOP = threading.Event()
#: The longest exit waits for the running steps (a tissue mask of a large slide).
EXIT_WAIT_S = 60.0


def start(target: Callable[[], object], name: str) -> threading.Thread:
    """Run ``target`` in a daemon thread that the interpreter's exit waits for."""

    def run():
        try:
            target()
        finally:
            with _LOCK:
                _THREADS.discard(threading.current_thread())

    thread = threading.Thread(target=run, name=name, daemon=True)
    with _LOCK:
        _THREADS.add(thread)
    thread.start()
    return thread


def stopping() -> bool:
    """True once the interpreter is exiting: start no further step."""
    return _STOP.is_set()


@atexit.register
def _join_all() -> None:
    _STOP.set()
    deadline = time.monotonic() + EXIT_WAIT_S
    with _LOCK:
        threads = list(_THREADS)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
