"""``python -m conveyor`` runs the command line (through a resident Conveyor when one runs)."""

from conveyor.launcher import entry

entry()
