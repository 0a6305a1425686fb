"""Runs job attempts as local processes.

Each attempt is a new session (so its whole process group can be signalled), with stdin from
``/dev/null`` and stdout and stderr merged into one pipe. Exits are observed through pidfds in
the same selector as the pipes, so one thread serves every job with no polling. A script with no
shell syntax is executed directly, as make does; anything else runs with
``bash --noprofile --norc -eo pipefail -c``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from conveyor.domain.ports import ExecutorEvent, Exited, JobLaunch, Output
from conveyor.errors import ExecutorError

SHELL = ("bash", "--noprofile", "--norc", "-eo", "pipefail", "-c")
_SHELL_SYNTAX = frozenset("\n;&|<>()$`\\\"'*?[]#~=%{}!")
_BUILTINS = frozenset(
    [
        "alias",
        "bg",
        "bind",
        "break",
        "builtin",
        "caller",
        "case",
        "cd",
        "command",
        "compgen",
        "complete",
        "continue",
        "declare",
        "dirs",
        "disown",
        "echo",
        "enable",
        "eval",
        "exec",
        "exit",
        "export",
        "false",
        "fc",
        "fg",
        "for",
        "function",
        "getopts",
        "hash",
        "help",
        "history",
        "if",
        "jobs",
        "kill",
        "let",
        "local",
        "logout",
        "mapfile",
        "popd",
        "printf",
        "pushd",
        "pwd",
        "read",
        "readarray",
        "readonly",
        "return",
        "select",
        "set",
        "shift",
        "shopt",
        "source",
        "suspend",
        "test",
        "time",
        "times",
        "trap",
        "true",
        "type",
        "typeset",
        "ulimit",
        "umask",
        "unalias",
        "unset",
        "until",
        "wait",
        "while",
        ".",
        "[",
        "[[",
        "{",
    ]
)
_READ_SIZE = 65536
_HAVE_PIDFD = hasattr(os, "pidfd_open")
_REAP_INTERVAL_S = 0.02


def direct_argv(script: str, path: str | None) -> list[str] | None:
    """The argv to execute ``script`` without a shell, or ``None`` if it needs one."""
    text = script.strip()
    if not text or any(ch in _SHELL_SYNTAX for ch in text):
        return None
    argv = text.split()
    if argv[0] in _BUILTINS and argv[0] not in ("true", "false", "echo", "test", "printf", "kill"):
        return None
    exe = shutil.which(argv[0], path=path) if "/" not in argv[0] else argv[0]
    if exe is None:
        return None
    return [exe, *argv[1:]]


@dataclass
class _Proc:
    key: str
    popen: subprocess.Popen[bytes]
    out_fd: int | None
    pid_fd: int | None


class LocalExecutor:
    """Executor port implementation for processes on this machine."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._procs: dict[str, _Proc] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", ""))
        self._closed = False

    @property
    def wakeup_fd(self) -> int:
        """Write end of a pipe that interrupts ``poll`` (give it to ``signal.set_wakeup_fd``)."""
        return self._wake_w

    def start(self, launch: JobLaunch) -> int:
        """Start one attempt in its own session; returns its pid (= process group id)."""
        argv = direct_argv(launch.script, launch.env.get("PATH"))
        if argv is None:
            argv = [*SHELL, launch.script]
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            popen = subprocess.Popen(
                argv,
                cwd=launch.cwd,
                env=dict(launch.env),
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            raise ExecutorError(f"could not start job {launch.key}: {exc.strerror}") from exc
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        pid_fd = None
        if _HAVE_PIDFD:
            try:
                pid_fd = os.pidfd_open(popen.pid)
            except OSError:
                pid_fd = None
        proc = _Proc(launch.key, popen, read_fd, pid_fd)
        self._procs[launch.key] = proc
        self._selector.register(read_fd, selectors.EVENT_READ, ("out", launch.key))
        if pid_fd is not None:
            self._selector.register(pid_fd, selectors.EVENT_READ, ("exit", launch.key))
        return popen.pid

    def poll(self, timeout: float | None) -> list[ExecutorEvent]:
        """Wait for output or exits (see ``Executor.poll``)."""
        if not _HAVE_PIDFD and self._procs:
            timeout = _REAP_INTERVAL_S if timeout is None else min(timeout, _REAP_INTERVAL_S)
        ready = self._selector.select(timeout)
        events: list[ExecutorEvent] = []
        exited: list[str] = []
        for selkey, _ in ready:
            kind, key = selkey.data
            if kind == "wake":
                self._drain_wake()
            elif kind == "out":
                self._read(self._procs[key], events)
            else:
                exited.append(key)
        if not _HAVE_PIDFD:
            exited.extend(k for k, p in self._procs.items() if p.popen.poll() is not None)
        for key in exited:
            proc = self._procs.get(key)
            if proc is not None:
                events.append(self._reap(proc, events))
        return events

    def kill(self, key: str, *, force: bool) -> None:
        """Signal the attempt's process group."""
        proc = self._procs.get(key)
        if proc is not None:
            _signal_group(proc.popen.pid, signal.SIGKILL if force else signal.SIGTERM)

    def close(self) -> None:
        """Kill and reap whatever still runs; close every descriptor."""
        if self._closed:
            return
        self._closed = True
        for proc in list(self._procs.values()):
            _signal_group(proc.popen.pid, signal.SIGKILL)
            self._reap(proc, [])
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- internals ---------------------------------------------------------------------------

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def _read(self, proc: _Proc, events: list[ExecutorEvent]) -> None:
        """Read what is available from the attempt's pipe; close it at end of file."""
        if proc.out_fd is None:
            return
        chunks: list[bytes] = []
        while True:
            try:
                data = os.read(proc.out_fd, _READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                self._selector.unregister(proc.out_fd)
                os.close(proc.out_fd)
                proc.out_fd = None
                break
            chunks.append(data)
            if len(chunks) >= 16:
                break
        if chunks:
            events.append(Output(proc.key, b"".join(chunks)))

    def _reap(self, proc: _Proc, events: list[ExecutorEvent]) -> Exited:
        """Collect the exit status, the rest of the output, and end the process group."""
        code = proc.popen.wait()
        while proc.out_fd is not None:
            before = len(events)
            self._read(proc, events)
            if len(events) == before:
                break
        # Whatever the job left running in its group ends with the job.
        _signal_group(proc.popen.pid, signal.SIGKILL)
        if proc.out_fd is not None:
            self._selector.unregister(proc.out_fd)
            os.close(proc.out_fd)
            proc.out_fd = None
        if proc.pid_fd is not None:
            self._selector.unregister(proc.pid_fd)
            os.close(proc.pid_fd)
            proc.pid_fd = None
        del self._procs[proc.key]
        return Exited(proc.key, code)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def describe_command(script: str, env: Mapping[str, str]) -> str:
    """How a script will be executed, for ``conveyor plan``."""
    argv = direct_argv(script, env.get("PATH"))
    return shlex.join(argv) if argv else "bash -eo pipefail -c <script>"
