"""Conveyor: a self-hosted deployment pipeline.

The package is layered (see ``docs/architecture.md``): ``spec`` (pipeline definition),
``domain`` (events, states, graph, ports), ``engine`` (scheduling and stop-the-line), then the
adapters (``executors``, ``store``, ``adapters``), the composition root (``bootstrap``) and the
command line (``cli``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
