"""Conveyor's exceptions.

A failed job or gate is a *result* recorded as an event, never an exception. Exceptions are for
unusable input and for Conveyor's own faults::

    ConveyorError                 root; ``exit_code`` says how the CLI ends
    ├── UsageError                bad command-line use (exit 2)
    ├── SpecError                 the pipeline file is unusable; has every problem (exit 2)
    ├── SourceError               the git repository or revision cannot be used (exit 2)
    ├── StoreError                the record cannot be read or written (exit 1)
    │   └── AuditError            the hash-linked log does not verify (exit 1)
    └── ExecutorError             a job process could not be started or controlled (exit 1)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNPRINTABLE = re.compile("[\x00\ud800-\udfff]")
MAX_QUOTED = 80
"""Text quoted in a problem's message or hint (a user's value) is cut to this many characters."""
_LONG_QUOTED = re.compile(f"'[^'\\n]{{{MAX_QUOTED + 1},}}'|\"[^\"\\n]{{{MAX_QUOTED + 1},}}\"")
MAX_MESSAGE = 500
"""A longer message is cut (a safety net for text that is not quoted)."""


class ConveyorError(Exception):
    """Root of every error Conveyor raises on purpose; the message is shown to the user as is."""

    exit_code = 1
    deployment_id: int | None = None
    """The deployment it ended, when it ended one (recorded before it was raised)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """The message and, when there is one, the hint on a second line."""
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UsageError(ConveyorError):
    """The command line was used wrongly (unknown run, bad option value)."""

    exit_code = 2


@dataclass(frozen=True)
class SpecProblem:
    """One problem in a pipeline file, with where it is and how to fix it."""

    source: str
    line: int
    column: int
    message: str
    hint: str | None = None

    def __post_init__(self) -> None:
        # Messages quote the user's text, and a NUL or a lone surrogate (from an escape in the
        # file, or a file name that is not UTF-8) cannot be written to a terminal or as JSON:
        # such characters are shown as escapes.
        for name in ("source", "message", "hint"):
            value = getattr(self, name)
            if value is not None and _UNPRINTABLE.search(value):
                object.__setattr__(self, name, _UNPRINTABLE.sub(_escape, value))
        # A quoted value may be anything up to the file's size (a 900 KB name): shown cut.
        for name in ("message", "hint"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_QUOTED:
                value = _LONG_QUOTED.sub(_cut_quoted, value)
                if name == "message" and len(value) > MAX_MESSAGE:
                    value = value[: MAX_MESSAGE - 3] + "..."
                object.__setattr__(self, name, value)

    def render(self) -> str:
        """``file:LINE:COL: message`` and an indented hint line."""
        text = f"{self.source}:{self.line}:{self.column}: {self.message}"
        if self.hint:
            text += "\n  hint: " + self.hint.replace("\n", "\n  ")
        return text


def _cut_quoted(match: re.Match[str]) -> str:
    text = match.group()
    return text[: MAX_QUOTED - 2] + "..." + text[-1]


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return "\\0" if code == 0 else f"\\u{code:04x}"


MAX_SHOWN_PROBLEMS = 100
"""A :class:`SpecError` lists at most this many problems; it counts all of them."""


class SpecError(ConveyorError):
    """The pipeline file cannot be used.

    ``problems`` lists the first :data:`MAX_SHOWN_PROBLEMS` distinct problems in file order,
    ``count`` says how many were found and ``omitted`` how many of those are not listed.
    ``complete`` is false when reading stopped early: the file may have more problems than
    ``count``.
    """

    exit_code = 2

    def __init__(self, problems: list[SpecProblem], *, complete: bool = True) -> None:
        # An alias repeats a value, and with it the value's problems: each is listed once.
        ordered = sorted(dict.fromkeys(problems), key=lambda p: (p.line, p.column))
        self.count = len(ordered)
        self.all_problems = ordered
        self.problems = ordered[:MAX_SHOWN_PROBLEMS]
        self.omitted = self.count - len(self.problems)
        self.complete = complete
        self._next_line = ordered[len(self.problems)].line if self.omitted else None
        if complete:
            summary = f"{_plural(self.count, 'problem')} in the pipeline file"
        else:
            summary = f"more than {_plural(len(self.problems), 'problem')} in the pipeline file"
        super().__init__(summary)

    def render(self) -> str:
        """Every listed problem, one block each, then what is left out and a count."""
        lines = [p.render() for p in self.problems]
        if self._next_line is not None and not self.complete:
            lines.append(f"... too many problems: reading stopped at line {self._next_line}")
        elif self._next_line is not None:
            lines.append(
                f"... and {_plural(self.omitted, 'more problem')} from line {self._next_line} on,"
                " not shown"
            )
        lines.append(self.message)
        return "\n".join(lines)


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' if count != 1 else ''}"


class SourceError(ConveyorError):
    """The repository, revision or working tree cannot be used for a run."""

    exit_code = 2


class StoreError(ConveyorError):
    """The record (event store, logs) cannot be read or written."""


class AuditError(StoreError):
    """The hash-linked event log does not verify."""


class ExecutorError(ConveyorError):
    """A job process could not be started or controlled."""


class ArtifactError(ConveyorError):
    """An artifact cannot be published, stored, read or unpacked (hostile or corrupt input)."""


class VerificationError(ConveyorError):
    """An artifact's digest, signature, signer or policy does not verify."""


class DeployError(ConveyorError):
    """A deployment cannot go on: a target failed, a policy refused it, a lease is held."""


class DeployCancelled(DeployError):
    """Ctrl-C or SIGTERM asked a deployment to stop; it stopped at its next safe point."""

    exit_code = 130


class NotStarted(DeployCancelled):
    """Cancelled before a step began (a script of a target was not run)."""


class LeaseLost(DeployError):
    """A deployer's lease on an environment was taken over: it may not write any more."""


class PermissionDenied(ConveyorError):
    """The user does not hold a role the action needs."""
