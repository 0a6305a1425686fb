"""Deployment targets: how a release is put in place in an environment.

``ProcessTarget`` runs the artifact as a local service (its own session, recorded in
``<env>/run/``); ``CommandTarget`` delegates to the user's deploy, health and rollback scripts.
Both write what they start to ``<env>/logs/<deployment>.log`` and raise ``DeployError`` with a
message for the user when they cannot do their part.
"""

from __future__ import annotations

from conveyor.adapters.targets.command import CommandTarget
from conveyor.adapters.targets.process import ProcessTarget, allocate_port, process_alive

__all__ = ["CommandTarget", "ProcessTarget", "allocate_port", "process_alive"]
