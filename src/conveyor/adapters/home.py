"""Where Conveyor keeps its state: ``.conveyor/`` at the repository root, or ``--home``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import UsageError

_HOME_HINT = "pass --home (or set CONVEYOR_HOME to) a folder Conveyor can create and write"
_FOLDERS = ("locks", "logs", "workspaces", "artifacts", "environments", "keys", "cache")
"""The folders Conveyor makes in a home (a file or a dead link in their place is refused; a
link to a folder, e.g. on a larger disk, is fine)."""


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
        """Create the folder; a ``.gitignore`` inside keeps it out of the repository.

        Raises:
            UsageError: the home is a file, under a file, or cannot be created or written.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            ignore = self.root / ".gitignore"
            if not ignore.exists():
                ignore.write_text("# Conveyor's state: not part of the repository\n*\n")
        except (FileExistsError, NotADirectoryError):
            what = "it is" if self.root.exists() else "a part of its path is"
            raise UsageError(
                f"the home {self.root} cannot be used: {what} not a folder", hint=_HOME_HINT
            ) from None
        except OSError as exc:
            raise UsageError(
                f"the home {self.root} cannot be created or written: {exc.strerror or exc}",
                hint=_HOME_HINT,
            ) from None
        for name in _FOLDERS:
            path = self.root / name
            if not path.is_dir() and (path.exists() or path.is_symlink()):  # a file, a dead link
                raise UsageError(
                    f"the home's {name}/ is not a folder ({path}): Conveyor keeps its {name} there",
                    hint="move it away (Conveyor creates the folder again)",
                )
