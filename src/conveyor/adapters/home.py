"""Where Conveyor keeps its state: ``.conveyor/`` at the repository root, or ``--home``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    """The layout of a Conveyor home directory."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "conveyor.db"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def workspaces(self) -> Path:
        return self.root / "workspaces"

    @property
    def artifacts(self) -> Path:
        """The content-addressed artifact store."""
        return self.root / "artifacts"

    @property
    def environments(self) -> Path:
        """Each environment's releases, service state, logs and port."""
        return self.root / "environments"

    @property
    def keys(self) -> Path:
        """This instance's signing key (mode 0600, never given to jobs)."""
        return self.root / "keys"

    def ensure(self) -> None:
        """Create the folder; a ``.gitignore`` inside keeps it out of the repository."""
        self.root.mkdir(parents=True, exist_ok=True)
        ignore = self.root / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# Conveyor's state: not part of the repository\n*\n")
