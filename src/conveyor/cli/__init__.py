"""The command line: the entry point of a ``conveyor`` process.

A command creates tens of thousands of objects that live as long as it does (modules, classes,
click's parameters) and few reference cycles, so the collector looks for cycles among young
objects every 50,000 allocations instead of 700: a small run never collects (about 5 ms less).

Until ``main`` takes over, Ctrl-C or SIGTERM ends the process at once with exit code 130 (and
no traceback from a half-imported module): nothing has started that would need cleaning up.
"""

import gc
import os
import signal
import sys


def _cancelled_while_starting(signum: int, frame: object) -> None:
    os.write(2, b"cancelled\n")
    os._exit(130)


if os.path.basename(sys.argv[0]) in ("conveyor", "__main__.py"):  # the command, not a library
    signal.signal(signal.SIGINT, _cancelled_while_starting)
    signal.signal(signal.SIGTERM, _cancelled_while_starting)
gc.set_threshold(50_000, 20, 10)
