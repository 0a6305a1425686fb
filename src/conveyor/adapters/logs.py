"""Attempt logs as files under Conveyor's home.

Output is written as it arrives (one ``write`` per chunk, no buffering) so ``conveyor logs
--follow`` sees it at once; the file is fsynced when the attempt ends. A log is capped (default
50 MB): past the cap the output is dropped and a mark says how much.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from conveyor.domain.ports import LogSummary

DEFAULT_CAP = 50 * 1024 * 1024


class FileAttemptLog:
    """The log of one attempt; the file is created on the first write."""

    def __init__(self, home: Path, rel_path: str, cap: int) -> None:
        self.path = rel_path
        self._home = home
        self._cap = cap
        self._fd: int | None = None
        self._size = 0
        self._dropped = 0
        self._sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        """Append masked output, up to the cap."""
        room = self._cap - self._size
        if room <= 0:
            self._dropped += len(data)
            return
        if len(data) > room:
            self._dropped += len(data) - room
            data = data[:room]
        self._raw_write(data)

    def close(self) -> LogSummary:
        """Write the truncation mark if needed, fsync and close."""
        truncated = self._dropped > 0
        if truncated:
            self._raw_write(
                f"\n[conveyor: log truncated at {self._cap} bytes; "
                f"{self._dropped} more bytes were not stored]\n".encode()
            )
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        return LogSummary(self.path, self._size, self._sha.hexdigest(), truncated)

    def _raw_write(self, data: bytes) -> None:
        if self._fd is None:  # most attempts of a quiet job never get here
            path = self._home / self.path
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)
        self._sha.update(data)


class FileLogStore:
    """``LogStore`` on the filesystem: ``logs/<run>/<job>.<attempt>.log`` under the home."""

    def __init__(self, home: Path, cap: int = DEFAULT_CAP) -> None:
        self.home = home
        self.cap = cap

    def open_attempt(self, run_id: int, job: str, attempt: int) -> FileAttemptLog:
        """A new log for one attempt (the job name is validated by the spec: no ``/``)."""
        return FileAttemptLog(self.home, f"logs/{run_id}/{job}.{attempt}.log", self.cap)
