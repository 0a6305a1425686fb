"""Attempt logs as files under Conveyor's home.

Output is written as it arrives (one ``write`` per chunk, no buffering) so ``conveyor logs
--follow`` sees it at once; the file is fsynced when the attempt ends. A log is capped (default
50 MB): past the cap the output is dropped and a mark says how much; the cut falls between two
UTF-8 characters, never inside one.

A log file is created exclusively: one that exists already belongs to another attempt (a run id
used again by a record restored from a backup) and is never appended to; the attempt fails.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from conveyor.domain.ports import LogSummary

DEFAULT_CAP = 50 * 1024 * 1024
_EMPTY_SHA256 = hashlib.sha256().hexdigest()


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 character they do not finish."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for its lead byte
            continue
        if byte >= 0xC0:  # a lead byte: how long its character is
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if length > back else 0
        return 0
    return 0


class FileAttemptLog:
    """The log of one attempt; the file is created on the first write."""

    def __init__(self, home: Path, rel_path: str, cap: int, *, check: bool = True) -> None:
        """``check=False``: the caller knows the file cannot exist (its folder did not)."""
        self.path = rel_path
        self._home = home
        self._cap = cap
        self._fd: int | None = None
        self._size = 0
        self._dropped = 0
        self._pending = b""  # the start of a character whose end has not arrived yet
        self._sha: hashlib._Hash | None = None  # made at the first write: most logs stay empty
        self.problem = ""
        if check and os.path.lexists(home / rel_path):
            self._refuse()

    def write(self, data: bytes) -> None:
        """Append masked output, up to the cap (cut between two characters)."""
        if self._dropped or self.problem:
            self._dropped += len(data)
            return
        data, self._pending = self._pending + data, b""
        room = self._cap - self._size
        if len(data) > room:
            keep = data[:room]
            keep = keep[: len(keep) - incomplete_tail(keep)]
            self._dropped += len(data) - len(keep)
            data = keep
        else:
            held = incomplete_tail(data)
            if held:
                data, self._pending = data[:-held], data[-held:]
        if data:
            self._raw_write(data)

    def close(self) -> LogSummary:
        """Write the truncation mark if needed, fsync and close."""
        if self._pending:  # never completed: binary output, kept as it came if it fits
            pending, self._pending = self._pending, b""
            if len(pending) <= self._cap - self._size and not self.problem:
                self._raw_write(pending)
            else:
                self._dropped += len(pending)
        truncated = self._dropped > 0 and not self.problem
        if truncated:
            self._raw_write(
                f"\n[conveyor: log truncated at {self._size} bytes; "
                f"{self._dropped} more bytes were not stored]\n".encode()
            )
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self.problem = self.problem or (
                    f"the log file {self.path} cannot be written ({exc.strerror or exc})"
                )
            os.close(self._fd)
            self._fd = None
        digest = self._sha.hexdigest() if self._sha is not None else _EMPTY_SHA256
        return LogSummary(self.path, self._size, digest, truncated, self.problem)

    def _refuse(self) -> None:
        self.problem = (
            f"the log file {self.path} exists already: another run used this run id (was the"
            " record restored from a backup or replaced?); the output of this attempt is not"
            " stored"
        )

    def _raw_write(self, data: bytes) -> None:
        if self.problem:
            return
        try:
            if self._fd is None:  # most attempts of a quiet job never get here
                path = self._home / self.path
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._fd = os.open(
                        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640
                    )
                except FileExistsError:
                    self._refuse()
                    self._dropped += len(data)
                    return
            if self._sha is None:
                self._sha = hashlib.sha256()
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                self._size += written
                self._sha.update(view[:written])
                view = view[written:]
        except OSError as exc:  # a full disk, a quota, an I/O error: the run goes on
            self.problem = (
                f"the log file {self.path} cannot be written ({exc.strerror or exc}): the rest"
                " of this attempt's output is not stored"
            )
            self._dropped += len(data)


class FileLogStore:
    """``LogStore`` on the filesystem: ``logs/<run>/<job>.<attempt>.log`` under the home."""

    def __init__(self, home: Path, cap: int = DEFAULT_CAP) -> None:
        self.home = home
        self.cap = cap
        self._new_runs: set[int] = set()
        """Runs whose log folder did not exist at their first attempt: no file of another
        record can be in it (one ``lstat`` per run instead of one per attempt)."""

    def open_attempt(self, run_id: int, job: str, attempt: int) -> FileAttemptLog:
        """A new log for one attempt (the job name is validated by the spec: no ``/``)."""
        if run_id not in self._new_runs and not os.path.lexists(self.home / f"logs/{run_id}"):
            self._new_runs.add(run_id)
        check = run_id not in self._new_runs
        return FileAttemptLog(
            self.home, f"logs/{run_id}/{job}.{attempt}.log", self.cap, check=check
        )
