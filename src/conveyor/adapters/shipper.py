"""Hand a checkpoint to the user's shipping command (``CONVEYOR_CHECKPOINT_COMMAND``).

As PostgreSQL's ``archive_command``: a shell command, given the checkpoint on its standard
input, that puts it somewhere this machine cannot rewrite (``ssh backup 'cat > ...'``, an
object store's copy command, a write-once folder). Exit status 0 means it is kept.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping

from conveyor.domain.text import inline

OUTPUT_SHOWN = 2000
"""The end of the command's output shown when it fails (characters); only that much is kept."""
_POLL_S = 0.05
"""How often the command's exit is looked for when it cannot be waited for (no pidfd)."""


def ship(command: str, data: bytes, env: Mapping[str, str], timeout_s: float) -> str | None:
    """Run ``command`` with ``sh -c``, ``data`` on its standard input, in a session of its
    own; ``None`` when it exits 0 within ``timeout_s``, else what went wrong ("exited with
    status 3: <the end of what it printed>"). When it has exited, or has run too long, what it
    started in its process group is killed (a process that left it with ``setsid`` is not)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=write_fd,
            stderr=write_fd,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        os.close(read_fd)
        return f"cannot be started: {exc.strerror or exc}"
    finally:
        os.close(write_fd)
    try:
        tail, finished = _feed_and_watch(proc, data, read_fd, time.monotonic() + timeout_s)
    except _StatusLost:
        _end_group(proc)
        return "ended, but its exit status was lost (SIGCHLD is ignored): it may have failed"
    except BaseException:
        _end_group(proc)  # a Ctrl-C: it does not run on without us
        raise
    finally:
        os.close(read_fd)
    _end_group(proc)
    said = " ".join(inline(bytes(tail).decode("utf-8", "replace")).split())[-OUTPUT_SHOWN:]
    said = f": {said}" if said else ""
    if not finished:
        return f"did not finish within {timeout_s:g} s and was stopped{said}"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"was killed by signal {-proc.returncode}{said}"
    return f"exited with status {proc.returncode}{said}"


def _feed_and_watch(
    proc: subprocess.Popen[bytes], data: bytes, read_fd: int, deadline: float
) -> tuple[bytearray, bool]:
    """Give ``data`` to the command, keep the end of its output until it exits (not until
    whatever it left running closes the output); (that end, whether it exited in time)."""
    assert proc.stdin is not None
    in_fd = proc.stdin.fileno()
    os.set_blocking(in_fd, False)
    os.set_blocking(read_fd, False)
    pending: memoryview | None = memoryview(data)
    tail = bytearray()
    try:
        pid_fd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pid_fd = None
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    poller.register(in_fd, select.POLLOUT)
    if pid_fd is not None:
        poller.register(pid_fd, select.POLLIN)
    try:
        while not _exited(proc.pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return tail, False
            wait = left if pid_fd is not None else min(left, _POLL_S)
            for fd, _ in poller.poll(wait * 1000):
                if fd == read_fd and not _read_into(read_fd, tail):
                    poller.unregister(read_fd)  # end of output: only the exit is awaited now
                elif fd == in_fd and pending is not None:
                    pending = _write_some(in_fd, pending)
                    if pending is None:
                        poller.unregister(in_fd)
                        proc.stdin.close()  # all given: it sees the end of its input
        _read_into(read_fd, tail)  # what it wrote just before it exited
        return tail, True
    finally:
        if pid_fd is not None:
            os.close(pid_fd)
        if not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()


def _write_some(fd: int, pending: memoryview) -> memoryview | None:
    """Write what the pipe takes now; what is left (``None``: all, or it stopped reading)."""
    try:
        written = os.write(fd, pending)
    except BlockingIOError:
        return pending
    except OSError:  # it closed its input (it does not read it): its exit status says more
        return None
    return pending[written:] if written < len(pending) else None


def _read_into(fd: int, tail: bytearray) -> bool:
    """Read what is there (a few pipes' worth at most: the deadline is looked at between
    calls), keeping the last ``4 * OUTPUT_SHOWN`` bytes; ``False`` at its end."""
    for _ in range(16):
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        tail += chunk
        del tail[: max(0, len(tail) - 4 * OUTPUT_SHOWN)]
    return True


class _StatusLost(Exception):
    """The command was reaped by someone else: whether it succeeded is not known."""


def _exited(pid: int) -> bool:
    """Whether the command exited, without reaping it: its process group id cannot be taken
    by another process until it is reaped (after its group is killed)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped unseen (SIGCHLD ignored): its exit status is lost
        raise _StatusLost from None


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill what is left of the command's process group, then reap the command."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
