"""Run ownership and orphan recovery for local runs.

The process executing a run holds an exclusive ``flock`` on ``locks/run-<id>.lock`` (not
inherited by jobs). If a later command can take that lock, the owner is gone (killed, crashed)
and the run is an orphan: its job processes, found by the run's unique token in their
environment (``conveyor.executors.local.kill_tagged``), are killed, and the run is recorded
``interrupted``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass
class RunLock:
    """The owner's lock on one run; released when the owner exits, however it exits."""

    path: Path
    handle: IO[bytes]

    def release(self) -> None:
        """Unlock and remove the lock file."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.handle.close()


def new_owner() -> dict[str, object]:
    """Who owns a new run: this process, this host, and a unique token for its jobs."""
    return {"pid": os.getpid(), "host": os.uname().nodename, "token": os.urandom(16).hex()}


def acquire_run_lock(locks_dir: Path, run_id: int) -> RunLock:
    """Take the lock of a new run (it cannot be held by anyone else)."""
    locks_dir.mkdir(parents=True, exist_ok=True)
    path = locks_dir / f"run-{run_id}.lock"
    handle = open(path, "a+b")  # noqa: SIM115 - held for the life of the run
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return RunLock(path, handle)


def run_is_live(locks_dir: Path, run_id: int) -> bool:
    """Whether a process holds the lock of run ``run_id`` (it is running now)."""
    try:
        with open(locks_dir / f"run-{run_id}.lock", "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def owner_is_gone(
    locks_dir: Path, run_id: int, owner_pid: int | None, owner_host: str | None
) -> bool:
    """Whether the process that owned a running run no longer exists."""
    if owner_host and owner_host != os.uname().nodename:
        return False  # another machine's run: not ours to judge
    path = locks_dir / f"run-{run_id}.lock"
    if path.exists():
        try:
            with open(path, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            pass
        if owner_pid is not None and _holds_run_lock(owner_pid, run_id):
            # Alive, and locking another file of that name: this home is a copy of the one the
            # run is recorded in (or its lock file was replaced). Not an orphan: its jobs live.
            return False
        with contextlib.suppress(OSError):
            path.unlink()
        return True
    if owner_pid is None:
        return True
    try:
        os.kill(owner_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _holds_run_lock(pid: int, run_id: int) -> bool:
    """Whether process ``pid`` has a run lock of ``run_id`` open (in any home)."""
    suffix = f"{os.sep}run-{run_id}.lock"
    try:
        entries = os.scandir(f"/proc/{pid}/fd")
    except PermissionError:
        return True  # another user's process: assume it is what it says
    except OSError:
        return False  # no such process (or no /proc)
    with entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if os.readlink(entry.path).endswith(suffix):
                    return True
    return False
