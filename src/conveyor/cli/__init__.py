"""The command line: the entry point of a ``conveyor`` process.

A command creates tens of thousands of objects that live as long as it does (modules, classes,
click's parameters) and few reference cycles, so the collector looks for cycles among young
objects every 50,000 allocations instead of 700: a small run never collects (about 5 ms less).
"""

import gc

gc.set_threshold(50_000, 20, 10)
