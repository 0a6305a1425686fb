"""Runs job attempts as local processes.

Each attempt is a new session (so its whole process group can be signalled), with stdin from
``/dev/null`` and stdout and stderr merged into one pipe. Exits are observed through pidfds in
the same epoll set as the pipes, so one thread serves every job with no polling. A script with no
shell syntax is executed directly, as make does; anything else runs with
``bash --noprofile --norc -eo pipefail -c``.

What an attempt starts is found again wherever it went: in the attempt's process group; by the
run's token (``CONVEYOR_RUN_TOKEN``) in its environment; and, for a process that left the group
and dropped the token, by its ancestry: while attempts run, this process is the *child
subreaper* of their descendants (Linux ``prctl``), so whatever they orphan becomes its child and
is killed when no attempt runs any more (the end of a stage).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import select
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from conveyor.domain.ports import ExecutorEvent, Exited, JobLaunch, Output
from conveyor.errors import ExecutorError
from conveyor.signals import run_pending_handlers

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
_PR_SET_CHILD_SUBREAPER = 36
_ORPHAN_REAP_S = 2.0
"""How long killed orphans are waited for (one may be in an uninterruptible sleep)."""
_ADOPTED_REAP_S = 1.0
"""How often adopted orphans that ended are reaped while attempts run."""


def direct_argv(script: str, path: str | None) -> list[str] | None:
    """The argv to execute ``script`` without a shell, or ``None`` if it needs one."""
    key = (script, path)
    if key not in _DIRECT:
        _DIRECT[key] = _direct_argv(script, path)
    found = _DIRECT[key]
    return None if found is None else list(found)


_DIRECT: dict[tuple[str, str | None], tuple[str, ...] | None] = {}


def _direct_argv(script: str, path: str | None) -> tuple[str, ...] | None:
    text = script.strip()
    if not text or any(ch in _SHELL_SYNTAX for ch in text):
        return None
    argv = text.split()
    if argv[0] in _BUILTINS and argv[0] not in ("true", "false", "echo", "test", "printf", "kill"):
        return None
    exe = _which(argv[0], path) if "/" not in argv[0] else argv[0]
    if exe is None:
        return None
    return (exe, *argv[1:])


_WHICH: dict[tuple[str, str | None], str | None] = {}


def _which(name: str, path: str | None) -> str | None:
    """The executable ``name`` on ``path``, as ``shutil.which`` finds it on POSIX (importing
    ``shutil`` costs 2 ms at every start: it loads zlib, bz2 and lzma)."""
    key = (name, path)
    if key not in _WHICH:
        _WHICH[key] = _find_executable(name, path)
    return _WHICH[key]


def _find_executable(name: str, path: str | None) -> str | None:
    def runnable(candidate: str) -> bool:
        return os.access(candidate, os.X_OK) and not os.path.isdir(candidate)

    if os.path.dirname(name):  # a path: not looked up
        return name if runnable(name) else None
    if path is None:
        path = os.environ.get("PATH")
        if path is None:
            try:
                path = os.confstr("CS_PATH")
            except (AttributeError, ValueError):
                path = os.defpath
    if not path:  # PATH="" finds nothing; PATH=":" looks in the current directory
        return None
    for folder in path.split(os.pathsep):
        candidate = os.path.join(folder, name)
        if runnable(candidate):
            return candidate
    return None


RUN_TOKEN = "CONVEYOR_RUN_TOKEN"
"""The variable, unique to a run, by which its processes are found wherever they went."""
_SWEEP_ROUNDS = 10


def _tagged(token: str) -> Iterator[tuple[int, list[bytes]]]:
    """Processes whose environment carries the run's token: ``(pid, environment entries)``."""
    marker = f"{RUN_TOKEN}={token}".encode()
    try:
        entries = os.scandir("/proc")
    except OSError:
        return
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as handle:
                    env = handle.read().split(b"\0")
            except OSError:
                continue
            if marker in env:
                yield int(entry.name), env


def kill_tagged(
    token: str | None, spare: Callable[[int, list[bytes]], bool] | None = None
) -> list[int]:
    """SIGKILL every process carrying the run's token (but those ``spare`` keeps); scan again
    while new ones show up (a job forking in a loop); returns the pids killed."""
    if not token:
        return []
    killed: set[int] = set()
    me = os.getpid()
    for _ in range(_SWEEP_ROUNDS):
        found = [
            pid
            for pid, env in _tagged(token)
            if pid != me and not (spare is not None and spare(pid, env))
        ]
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if not set(found) - killed:
            break
        killed.update(found)
    return sorted(killed)


@dataclass
class _Proc:
    """One running attempt: its pid, output pipe and pidfd, and how its processes are known."""

    key: str
    pid: int
    out_fd: int | None
    pid_fd: int | None
    tags: tuple[bytes, bytes] = (b"", b"")
    """``CONVEYOR_JOB=...`` and ``CONVEYOR_ATTEMPT=...`` as in its processes' environment."""
    exit_code: int | None = None


class LocalExecutor:
    """Executor port implementation for processes on this machine.

    Processes are started with ``posix_spawn`` (new session, SIGPIPE and SIGXFSZ reset to their
    defaults). ``posix_spawn`` has no "change directory" action in Python 3.11, so the executor
    moves the process's own working directory to the run's workspace (every job of a run shares
    it) and moves back on ``close``.
    """

    def __init__(self, services: Callable[[], set[int]] = set) -> None:
        self._services = services
        """The process ids of the deployed services this machine's record knows (spared,
        with their sessions, when adopted: a job may run ``conveyor promote``)."""
        # epoll itself, not ``selectors``: its bookkeeping costs more than the system calls
        # (four registrations per attempt).
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[str, str]] = {}
        """Each registered descriptor: what it is (``wake``, ``out``, ``exit``) and whose."""
        self._procs: dict[str, _Proc] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._watch(self._wake_r, "wake", "")
        self._closed = False
        self._token: str | None = None
        self._swept = True
        """No attempt started since the last sweep (then closing needs none)."""
        self._adopting: set[int] | None = None
        """While attempts may have orphaned processes: the children this process had before,
        and the deployed services it adopted (spared); ``None`` when there is nothing to look
        for."""
        self._spared: set[int] = set()
        """Adopted processes spared (deployed services, the ``rm`` of old releases): reaped
        once they end."""
        self._next_adopted_reap = 0.0
        self._home_cwd = os.getcwd()
        self._cwd = self._home_cwd

    @property
    def wakeup_fd(self) -> int:
        """Write end of a pipe that interrupts ``poll`` (give it to ``signal.set_wakeup_fd``)."""
        return self._wake_w

    def start(self, launch: JobLaunch) -> int:
        """Start one attempt in its own session; returns its pid (= process group id)."""
        path = launch.env.get("PATH")
        if self._adopting is None and _set_subreaper(True):
            # Spared ones of an earlier stage stay apart: reaped once they end.
            self._adopting = _children() - self._spared
            self._next_adopted_reap = time.monotonic() + _ADOPTED_REAP_S
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            if launch.cwd != self._cwd:
                os.chdir(launch.cwd)
                self._cwd = launch.cwd
            argv = direct_argv(launch.script, path)
            pid = None
            if argv is not None:
                # As make does: exec directly; on any exec error let bash run it and explain.
                try:
                    pid = _spawn(argv, launch.env, write_fd)
                except OSError:
                    pid = None
            if pid is None:
                bash = _which(SHELL[0], path)
                if bash is None:
                    raise ExecutorError(f"cannot start job {launch.key}: bash is not on PATH")
                pid = _spawn([bash, *SHELL[1:], launch.script], launch.env, write_fd)
        except OSError as exc:
            os.close(read_fd)
            raise ExecutorError(f"cannot start job {launch.key}: {exc.strerror or exc}") from exc
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        fcntl.fcntl(read_fd, fcntl.F_SETFL, os.O_NONBLOCK)  # a new pipe has no other flag
        pid_fd = None
        if _HAVE_PIDFD:
            try:
                pid_fd = os.pidfd_open(pid)
            except OSError:
                pid_fd = None
        self._token = launch.env.get(RUN_TOKEN) or self._token
        self._swept = False
        tags = (
            f"CONVEYOR_JOB={launch.env.get('CONVEYOR_JOB', '')}".encode(),
            f"CONVEYOR_ATTEMPT={launch.env.get('CONVEYOR_ATTEMPT', '')}".encode(),
        )
        proc = _Proc(launch.key, pid, read_fd, pid_fd, tags)
        self._procs[launch.key] = proc
        self._watch(read_fd, "out", launch.key)
        if pid_fd is not None:
            self._watch(pid_fd, "exit", launch.key)
        return pid

    def poll(self, timeout: float | None) -> list[ExecutorEvent]:
        """Wait for output or exits (see ``Executor.poll``)."""
        polling = any(p.pid_fd is None for p in self._procs.values())
        if polling:
            timeout = _REAP_INTERVAL_S if timeout is None else min(timeout, _REAP_INTERVAL_S)
        if self._adopting is not None:
            # Adopted orphans that ended are reaped now and then, not left as zombies.
            timeout = _ADOPTED_REAP_S if timeout is None else min(timeout, _ADOPTED_REAP_S)
            if time.monotonic() >= self._next_adopted_reap:
                self._reap_adopted()
        if timeout is None:
            timeout = -1
        elif timeout > 0:  # whole milliseconds, rounded up: no busy loop before a deadline
            timeout = math.ceil(timeout * 1e3) * 1e-3
        else:
            timeout = 0
        ready = self._epoll.poll(timeout)
        events: list[ExecutorEvent] = []
        exited: list[str] = []
        for fd, _ in ready:
            watched = self._watched.get(fd)
            if watched is None:
                continue
            kind, key = watched
            if kind == "wake":
                self._drain_wake()
            elif kind == "out":
                self._read(self._procs[key], events)
            else:
                exited.append(key)
        if polling:
            exited.extend(
                k for k, p in self._procs.items() if p.pid_fd is None and self._try_wait(p)
            )
        for key in exited:
            proc = self._procs.get(key)
            if proc is not None:
                events.append(self._reap(proc, events))
        return events

    def kill(self, key: str, *, force: bool) -> None:
        """Signal the attempt's process group."""
        proc = self._procs.get(key)
        if proc is not None:
            _signal_group(proc.pid, signal.SIGKILL if force else signal.SIGTERM)

    def sweep(self) -> list[int]:
        """Kill the processes of ended attempts that left their process group (found by the
        run's token; those of running attempts are spared)."""
        running = list(self._procs.values())

        def spare(pid: int, env: list[bytes]) -> bool:
            for proc in running:
                if proc.tags[0] in env and proc.tags[1] in env:
                    return True
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == proc.pid:
                        return True
            return False

        killed = kill_tagged(self._token, spare)
        if not running:
            killed.extend(self._kill_orphans())
        self._swept = not running
        return killed

    def close(self) -> None:
        """Kill and reap whatever still runs, strays included; close every descriptor;
        restore the cwd."""
        if self._closed:
            return
        self._closed = True
        for proc in list(self._procs.values()):
            _signal_group(proc.pid, signal.SIGKILL)
            self._reap(proc, [])
        if not self._swept:
            kill_tagged(self._token)
        self._kill_orphans()
        self._epoll.close()
        self._uninstall_wakeup()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._cwd != self._home_cwd:
            with contextlib.suppress(OSError):
                os.chdir(self._home_cwd)

    # -- internals ---------------------------------------------------------------------------

    def _watch(self, fd: int, kind: str, key: str) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._watched[fd] = (kind, key)

    def _unwatch(self, fd: int) -> None:
        self._epoll.unregister(fd)
        del self._watched[fd]

    def _uninstall_wakeup(self) -> None:
        """Stop signals from writing to the wake-up pipe before it is closed: a signal would
        otherwise write its byte to a closed descriptor, or to whatever file reused its
        number (a log, the database)."""
        try:
            previous = signal.set_wakeup_fd(-1)
            if previous not in (-1, self._wake_w):
                signal.set_wakeup_fd(previous)  # someone else's: left as it was
        except ValueError:  # not the main thread: it cannot have installed ours
            pass

    def _kill_orphans(self) -> list[int]:
        """Kill and reap the processes attempts orphaned (adopted since the first attempt),
        their groups too; again while killing orphans orphans more. Only when no attempt
        runs: an orphan cannot be told from a running attempt's. Deployed services (a job may
        run ``conveyor promote``) are spared, found by their ``CONVEYOR_DEPLOYMENT_ID``."""
        if self._adopting is None:
            return []
        killed: list[int] = []
        tried: set[int] = set()
        for _ in range(_SWEEP_ROUNDS):
            found = sorted(self._strays() - tried)
            if not found:
                break
            for pid in found:
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pid:  # safe: unreaped, its id cannot be reused
                        os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            # One wait in all, not one per process: one that cannot die is not waited again.
            deadline = time.monotonic() + _ORPHAN_REAP_S
            waiting = set(found)
            while waiting and time.monotonic() < deadline:
                waiting = {pid for pid in waiting if not _reaped(pid)}
                if waiting:
                    time.sleep(0.005)
            tried.update(found)
            killed.extend(pid for pid in found if pid not in waiting)
        self._reap_spared()  # those still running are reaped in a later stage, or at exit
        self._adopting = None
        _set_subreaper(False)  # what a deployment's scripts leave behind is not ours
        return killed

    def _strays(self) -> set[int]:
        """Adopted children that are neither attempts nor spared (the spared set grows with
        the deployed services found)."""
        assert self._adopting is not None
        attempts = {p.pid for p in self._procs.values()}
        found = _children() - self._adopting - attempts
        if not found:
            return found
        recorded = self._services()
        services = {pid for pid in found if _is_service(pid, recorded)}
        self._adopting |= services
        self._spared |= services
        return found - services

    def _reap_adopted(self) -> None:
        """Reap adopted orphans that ended (never an attempt: its exit status is the job's),
        spared ones too (the ``rm`` of old releases, a service that ended)."""
        self._next_adopted_reap = time.monotonic() + _ADOPTED_REAP_S
        for pid in self._strays():
            _reaped(pid)
        self._reap_spared()

    def _reap_spared(self) -> None:
        for pid in list(self._spared):
            if _reaped(pid):
                self._spared.discard(pid)
                if self._adopting is not None:
                    self._adopting.discard(pid)  # its id may be given to a new process

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass
        run_pending_handlers()  # the signal's handler (a cancel) runs before we wait again

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
                self._unwatch(proc.out_fd)
                os.close(proc.out_fd)
                proc.out_fd = None
                break
            chunks.append(data)
            if len(chunks) >= 16:
                break
        if chunks:
            events.append(Output(proc.key, b"".join(chunks)))

    def _try_wait(self, proc: _Proc) -> bool:
        """Reap without blocking (no pidfd); whether the process has ended."""
        if proc.exit_code is not None:
            return True
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        proc.exit_code = os.waitstatus_to_exitcode(status)
        return True

    def _reap(self, proc: _Proc, events: list[ExecutorEvent]) -> Exited:
        """Collect the exit status, the rest of the output, and end the process group."""
        if proc.exit_code is None:
            _, status = os.waitpid(proc.pid, 0)
            proc.exit_code = os.waitstatus_to_exitcode(status)
        while proc.out_fd is not None:
            before = len(events)
            self._read(proc, events)
            if len(events) == before:
                break
        # Whatever the job left running in its group ends with the job.
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.out_fd is not None:
            self._unwatch(proc.out_fd)
            os.close(proc.out_fd)
            proc.out_fd = None
        if proc.pid_fd is not None:
            self._unwatch(proc.pid_fd)
            os.close(proc.pid_fd)
            proc.pid_fd = None
        del self._procs[proc.key]
        return Exited(proc.key, proc.exit_code)


def _spawn(argv: list[str], env: Mapping[str, str], out_fd: int) -> int:
    """posix_spawn in a new session: stdin /dev/null, stdout and stderr to ``out_fd``."""
    return os.posix_spawn(
        argv[0],
        argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_fd, 1),
            (os.POSIX_SPAWN_DUP2, out_fd, 2),
        ],
        setsid=True,
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM),
    )


def _set_subreaper(on: bool) -> bool:
    """Make this process the child subreaper of its descendants (Linux), or stop being it;
    whether it worked (never again once it did not)."""
    global _SUBREAPER_WORKS
    if _SUBREAPER_WORKS is False:
        return False
    global _PRCTL
    try:
        if _PRCTL is None:
            import ctypes

            _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
        _SUBREAPER_WORKS = _PRCTL(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        _SUBREAPER_WORKS = False
    return _SUBREAPER_WORKS


_SUBREAPER_WORKS: bool | None = None
_PRCTL: Any = None


def _children() -> set[int]:
    """The pids of this process's children (zombies included)."""
    me = os.getpid()
    pids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{me}/task")
        for tid in tasks:
            with open(f"/proc/{me}/task/{tid}/children", "rb") as handle:
                pids.update(int(pid) for pid in handle.read().split())
        return pids
    except (OSError, ValueError):
        pass
    # Without /proc/*/children (a kernel built without it): every process's parent.
    pids.clear()
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    stat = handle.read()
                if int(stat[stat.rindex(b")") + 2 :].split()[1]) == me:
                    pids.add(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def _reaped(pid: int) -> bool:
    """Reap ``pid`` if it ended (without waiting); whether it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


_SERVICE_MARK = b"CONVEYOR_DEPLOYMENT_ID="
"""Every process of a deployed release carries it (``targets.process.release_env``)."""
_TRASH_MARK = b"CONVEYOR_TRASH="
"""The ``rm`` that deletes old releases and workspaces carries it (``adapters.trash``)."""


def _is_service(pid: int, recorded: set[int]) -> bool:
    """Whether a process belongs to a deployed release: a recorded service or one of its
    session, or one whose variables say so (a service that rewrote its title may have
    blanked them: hence the record first); or is the ``rm`` of old releases (spared too)."""
    with contextlib.suppress(OSError):
        if pid in recorded or os.getsid(pid) in recorded:
            return True
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return any(
                entry.startswith((_SERVICE_MARK, _TRASH_MARK))
                for entry in handle.read().split(b"\0")
            )
    except OSError:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:  # not contextlib.suppress: this runs at the end of every attempt
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
