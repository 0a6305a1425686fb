"""Holding Ctrl-C and SIGTERM while a step that must not be cut in half finishes."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block has ended, then act on the first one received
    (as the handlers in place before the block say: usually a ``KeyboardInterrupt``).

    For steps whose interruption would leave something half done: a schema migration (a
    ``KeyboardInterrupt`` inside SQLAlchemy can be swallowed by its cleanup).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda num, _: received.append(num)) for sig in signals}
    try:
        yield
    finally:
        try:
            run_pending_handlers()  # under the handlers of the block, not those restored below
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    if received:
        # To this thread, at once: os.kill may hand it to another thread, and its handler
        # then run in this one only some time after the block (when it may not be expected).
        signal.raise_signal(received[0])


def run_pending_handlers() -> None:
    """Run now the Python handlers of the signals this process has received.

    CPython 3.11 runs them when the main thread next checks its eval breaker, which another
    thread taking the GIL can clear (the breaker is shared): a signal received while the main
    thread was in a blocking call could wait for an unrelated later event.
    ``pthread_sigmask`` checks the signals themselves (it is a no-op here otherwise).
    """
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, ())
