"""``conveyor daemon``: a resident Conveyor that runs commands without their start-up cost.

The resident process (``serve``) imports every module a command may need, freezes them, and
listens on a Unix socket that only its user can use. For each command the client
(``conveyor.launcher``) sends its arguments, working directory, environment, umask, limits
and standard streams (the descriptors themselves); the resident process forks a worker that
takes them over and runs ``conveyor.cli.main.entry``, exactly the code a process of its own
would run. The resident process hands the client the worker's pidfd (to forward signals)
and, once it has reaped the worker, its exit status. A client that dies (``kill -9``) takes
its worker with it, as a ``conveyor`` process of its own would go.

Nothing is shared between commands but the imported code: the worker is a fresh fork, and
the resident process never opens a record. A request it cannot run alike (another
interpreter, flags, encodings or groups; its code changed on disk) is answered "run it
yourself", and changed code also stops the resident process.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import fcntl
import gc
import importlib
import io
import json
import os
import pkgutil
import resource
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import click

from conveyor import launcher
from conveyor.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE

BOOT = "from conveyor.cli.daemon import serve_main; serve_main()"
DEFAULT_IDLE = "3h"
REQUEST_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the final NUL
EXIT_LOCKED = 3  # the resident process: another one holds the socket's lock
HANDED_BACK = 75  # a worker that told its client to run the command itself (never G)
GO_TIMEOUT_S = 30.0


class DaemonError(Exception):
    """Something the user can fix about the resident Conveyor's socket or folder."""


# --- the resident process ----------------------------------------------------------------


def _warm_up() -> list[str]:
    """Import every module of Conveyor and every module they import, also inside functions
    (the lazy imports of commands): what a fork then has for free."""
    import conveyor

    failed = []
    names: set[str] = set()
    for module in pkgutil.walk_packages(conveyor.__path__, "conveyor."):
        if module.name == "conveyor.__main__" or ".migrations." in module.name:
            continue  # running it runs a command; the migrations run inside Alembic
        names.add(module.name)
    for name in sorted(names):
        try:
            loaded = importlib.import_module(name)
        except Exception as exc:
            failed.append(f"{name}: {exc}")
            continue
        source = getattr(loaded, "__file__", None)
        if not source or not source.endswith(".py"):
            continue
        with contextlib.suppress(OSError, SyntaxError, ValueError):
            tree = ast.parse(Path(source).read_bytes())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        _try_import(alias.name)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    _try_import(node.module)
                    for alias in node.names:
                        _try_import(f"{node.module}.{alias.name}")
    return failed


# Loaded only to migrate a record's schema (once per home): not worth 25 MB in every fork
# (a larger process takes longer to fork: 3.4 ms instead of 1.3 ms on a 2-CPU VM).
NOT_PRELOADED = ("sqlalchemy", "alembic")


def _try_import(name: str) -> None:
    if name in sys.modules or name.split(".", 1)[0] in NOT_PRELOADED:
        return
    with contextlib.suppress(Exception):  # not a module (a name from one), or not installed
        importlib.import_module(name)


def _code_files() -> list[str]:
    """What a stamp covers: the file of each of Conveyor's modules, and each folder of the
    module path (installing, upgrading or removing a package changes its folder). A change
    made inside another installed package's files in place is not seen."""
    files = {
        path
        for name, module in list(sys.modules.items())
        if (name == "conveyor" or name.startswith("conveyor."))
        and isinstance(path := getattr(module, "__file__", None), str)
    }
    files.update(p for p in sys.path if p)
    return sorted(files)


def _stamp(files: list[str]) -> list[tuple[int, int]]:
    out = []
    for path in files:
        try:
            info = os.stat(path)
        except OSError:
            out.append((-1, -1))
            continue
        out.append((info.st_mtime_ns, info.st_size))
    return out


def _log(text: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    with contextlib.suppress(OSError, ValueError):
        print(f"{stamp}Z conveyor daemon[{os.getpid()}]: {text}", file=sys.stderr, flush=True)


HEADER = len(launcher.PROTOCOL) + 1 + 4
# Held while a worker is forked and until it has its client's dispositions: in the resident
# process they wait for the worker's registration; in the worker, for its take-over.
HELD = {
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGTSTP,
}


class _Arriving:
    """A connection whose request is still arriving (read as it comes, never waited for)."""

    def __init__(self, conn: socket.socket, client_pid: int, deadline: float) -> None:
        self.conn = conn
        self.client_pid = client_pid
        self.deadline = deadline
        self.data = b""
        self.fds: list[int] = []
        self.want = HEADER
        self.command: Request | None = None  # once accepted: waiting for its descriptors

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        self.conn.close()


class _Worker:
    def __init__(self, pid: int, pidfd: int, conn: socket.socket, started: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.conn = conn
        self.started = started
        """Read end of a pipe: "R" once it runs the command, then "D" once it has reported the
        command's exit code (what it still does is housekeeping); -1 once closed."""
        self.runs = False
        self.told = False  # whether we know (runs, or handed back)


class Resident:
    """The resident process: a listening socket, requests arriving, and the workers it forked
    and will reap. One thread, one ``epoll``; signals only set a flag."""

    def __init__(self, path: str, idle_timeout: float) -> None:
        self.path = path
        self.idle_timeout = idle_timeout
        self.started_at = time.time()
        self.last_activity = time.monotonic()
        self.served = 0
        self.fallbacks = 0
        self.last_fallback = ""
        self.stopping = ""
        self.stop_requested = False
        self.closed_now: set[int] = set()
        self.accepting_from = 0.0  # paused until then (out of descriptors)
        self.compatibility = launcher.compatibility()
        self.poller = select.epoll()
        self.arriving: dict[int, _Arriving] = {}  # connection fd
        self.workers: dict[int, _Worker] = {}  # pidfd
        self.watched: dict[int, _Worker] = {}  # connection fd, until its client hangs up
        self.starting: dict[int, _Worker] = {}  # "started" pipe, until the worker says
        self.listener: socket.socket | None = None
        self.identity: tuple[int, int] | None = None
        self.files: list[str] = []
        self.stamp: list[tuple[int, int]] = []
        self.lock: io.TextIOWrapper | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self.wake_r, select.EPOLLIN)
        self.startup_environment = _startup_environment(dict(os.environb))
        self.traits = {
            name: value
            for name, value in _traits(os.getpid()).items()
            if name not in ("SigIgn", "SigBlk")  # taken from the client, not compared
        }

    def request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True  # the wake-up pipe interrupts the poll

    # -- start and stop --

    def listen(self) -> None:
        previous = os.umask(0o077)
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a stale socket: the lock says no one serves it
            listener.bind(self.path)
        finally:
            os.umask(previous)
        listener.listen(128)
        listener.setblocking(False)
        info = os.stat(self.path)
        self.identity = (info.st_dev, info.st_ino)
        self.listener = listener
        self.poller.register(listener.fileno(), select.EPOLLIN)
        signal.set_wakeup_fd(self.wake_w)

    def close_listener(self, reason: str) -> None:
        """No more commands: the socket goes, so that clients run commands themselves, and
        the lock, so that a new resident process can start while these commands end."""
        if self.listener is None:
            return
        self.stopping = reason
        self.poller.unregister(self.listener.fileno())
        self.closed_now.add(self.listener.fileno())
        self.listener.close()  # connections not accepted yet are reset: they run by themselves
        self.listener = None
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self.identity:
                os.unlink(self.path)
        if self.lock is not None:
            self.lock.close()
            self.lock = None
        for fd in list(self.arriving):
            self.drop(fd)
        _log(f"stopping ({reason}); {len(self.workers)} command(s) still running")

    def loop(self) -> None:
        while self.listener is not None or self.workers:
            if self.stop_requested:
                self.close_listener("stopped by a signal")
                continue
            now = time.monotonic()
            deadlines = [arriving.deadline for arriving in self.arriving.values()]
            if self.listener is not None and not self.workers and not self.arriving:
                deadlines.append(self.last_activity + self.idle_timeout)
            if self.accepting_from:
                deadlines.append(self.accepting_from)
            timeout = max(0.0, min(deadlines) - now) if deadlines else -1
            self.closed_now = set()  # events of these numbers in this batch are stale
            for fd, _events in self.poller.poll(timeout):
                if fd in self.closed_now:
                    continue
                try:
                    self.handle(fd)
                except Exception:
                    _log("unexpected error, the request is dropped:\n" + traceback.format_exc())
                    if fd in self.arriving:
                        self.drop(fd)
            now = time.monotonic()
            if self.accepting_from and now >= self.accepting_from and self.listener:
                self.accepting_from = 0.0
                self.poller.modify(self.listener.fileno(), select.EPOLLIN)
            for fd, arriving in list(self.arriving.items()):
                if now >= arriving.deadline:
                    _log("dropped a request that did not arrive in time")
                    self.drop(fd)
            quiet = self.listener is not None and not self.workers and not self.arriving
            if quiet and now - self.last_activity >= self.idle_timeout:
                self.close_listener("idle")

    def handle(self, fd: int) -> None:
        if fd == self.wake_r:
            with contextlib.suppress(OSError):
                os.read(self.wake_r, 512)
        elif self.listener is not None and fd == self.listener.fileno():
            self.accept()
        elif fd in self.arriving:
            self.receive(fd)
        elif fd in self.workers:
            self.reap(fd)
        elif fd in self.watched:
            self.hung_up(fd)
        elif fd in self.starting:
            self.learn(self.starting[fd])

    # -- requests --

    def accept(self) -> None:
        while self.listener is not None:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of descriptors: clients wait (or run by themselves)
                _log(f"cannot accept a connection: {exc.strerror}; pausing for 0.2 s")
                self.poller.modify(self.listener.fileno(), 0)
                self.accepting_from = time.monotonic() + 0.2
                return
            self.last_activity = time.monotonic()
            try:
                peer = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                client_pid, uid, _gid = struct.unpack("3i", peer)
                if uid != os.geteuid():
                    _log(f"refused a connection from user {uid}")
                    conn.close()
                    continue
                conn.setblocking(False)
                deadline = time.monotonic() + REQUEST_TIMEOUT_S
                self.arriving[conn.fileno()] = _Arriving(conn, client_pid, deadline)
                self.poller.register(conn.fileno(), select.EPOLLIN)
            except OSError as exc:
                _log(f"dropped a connection: {exc}")
                conn.close()

    def drop(self, fd: int) -> None:
        arriving = self.arriving.pop(fd, None)
        if arriving is None:  # already dropped (the listener closed meanwhile)
            return
        with contextlib.suppress(OSError):
            self.poller.unregister(fd)
        arriving.close()
        self.closed_now.add(fd)

    def recv_some(self, fd: int, arriving: _Arriving, size: int) -> bytes:
        """What has arrived (descriptors kept with the request); ``b""`` if nothing yet, or
        if the request was dropped (its client gone, descriptors cut off)."""
        try:
            chunk, ancillary, flags, _addr = arriving.conn.recvmsg(
                size, socket.CMSG_SPACE(4 * (launcher.MAX_FDS + 3)), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            self.drop(fd)
            return b""
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                count = len(payload) // 4
                arriving.fds.extend(struct.unpack(f"{count}i", payload[: count * 4]))
        if not chunk or flags & socket.MSG_CTRUNC:
            self.drop(fd)
            return b""
        return chunk

    def receive(self, fd: int) -> None:
        arriving = self.arriving[fd]
        if arriving.command is not None:
            self.receive_descriptors(fd, arriving)
            return
        chunk = self.recv_some(fd, arriving, min(arriving.want - len(arriving.data), 1 << 20))
        if not chunk:
            return
        arriving.data += chunk
        if arriving.want == HEADER and len(arriving.data) >= HEADER:
            (length,) = struct.unpack("!I", arriving.data[HEADER - 4 : HEADER])
            if not arriving.data.startswith(launcher.PROTOCOL + b"\n"):
                _log("dropped a request: not a Conveyor client of this version")
                self.drop(fd)
                return
            if length > launcher.MAX_REQUEST:
                self.drop(fd)
                return
            arriving.want = HEADER + length
        if len(arriving.data) < arriving.want:
            return
        if arriving.fds:  # descriptors come only once the request is accepted
            self.drop(fd)
            return
        try:
            self.dispatch(fd, arriving)
        except (OSError, ValueError) as exc:
            _log(f"dropped a request: {exc}")
            self.drop(fd)

    def dispatch(self, fd: int, arriving: _Arriving) -> None:
        fields = arriving.data[HEADER:].split(b"\0")
        verb = fields[0]
        if verb == b"run":
            command = self.accepted(arriving.conn, fields, arriving.client_pid)
            if command is None:
                self.drop(fd)
                return
            # Now its descriptors: sent only to a resident process that will run it, so that
            # none stays in flight (held open) in one that does not read them.
            arriving.command = command
            arriving.deadline = time.monotonic() + REQUEST_TIMEOUT_S
            arriving.conn.send(b"R\n")
            return
        del self.arriving[fd]
        self.poller.unregister(fd)
        self.closed_now.add(fd)
        arriving.conn.settimeout(REQUEST_TIMEOUT_S)
        with contextlib.suppress(OSError):  # whoever asked may be gone
            if verb in (b"status", b"stop"):
                arriving.conn.sendall(json.dumps(self.status()).encode() + b"\n")
            else:
                arriving.conn.sendall(b"Funknown request\n")
        arriving.close()
        if verb == b"stop":
            self.close_listener("asked to stop")

    def receive_descriptors(self, fd: int, arriving: _Arriving) -> None:
        command = arriving.command
        assert command is not None
        chunk = self.recv_some(fd, arriving, 1)
        if not chunk:
            return
        if chunk != b"D" or len(arriving.fds) != len(command.targets):
            self.drop(fd)
            return
        del self.arriving[fd]
        self.poller.unregister(fd)
        self.closed_now.add(fd)
        command.fds, arriving.fds = arriving.fds, []
        try:
            arriving.conn.settimeout(REQUEST_TIMEOUT_S)
            if not self.start(arriving.conn, command):
                arriving.conn.close()
        finally:
            for received in command.fds:
                with contextlib.suppress(OSError):
                    os.close(received)

    def refuse(self, conn: socket.socket, reason: str) -> bool:
        self.fallbacks += 1
        self.last_fallback = reason
        with contextlib.suppress(OSError):
            conn.send(b"F" + reason.encode() + b"\n")  # a few bytes: never blocks
        return False

    def accepted(self, conn: socket.socket, fields: list[bytes], client_pid: int) -> Request | None:
        """The command, if this process can run it as the client would; else ``None`` (and
        the client told why, to run it itself)."""
        try:
            command = Request.parse(fields)
        except (ValueError, UnicodeDecodeError, IndexError):
            self.refuse(conn, "malformed request")
            return None
        if command.compatibility != self.compatibility:
            self.refuse(conn, "another " + _difference(fields[1], self.compatibility))
            return None
        if _stamp(self.files) != self.stamp:
            self.refuse(conn, "Conveyor's code changed on disk")
            self.close_listener("its code changed on disk")
            return None
        theirs = _startup_environment(command.environ)
        if theirs != self.startup_environment:
            changed = sorted(set(theirs.items()) ^ set(self.startup_environment.items()))
            name = changed[0][0].decode(errors="replace")
            self.refuse(conn, f"another {name} (read when a process starts)")
            return None
        try:
            command.traits = _traits(client_pid)
        except OSError as exc:
            self.refuse(conn, f"cannot read the client's process state: {exc.strerror}")
            return None
        for name, value in self.traits.items():
            if command.traits.get(name) != value:
                self.refuse(conn, f"another {name}")
                return None
        return command

    def start(self, conn: socket.socket, command: Request) -> bool:
        """Fork a worker for the command; ``True`` if it runs (the connection is then kept)."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
        try:
            started_r, started_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                pid = os.fork()
            except OSError as exc:
                os.close(started_r)
                os.close(started_w)
                return self.refuse(conn, f"cannot fork: {exc.strerror}")
            if pid == 0:  # pragma: no cover - the worker; it ends in os._exit
                try:
                    os.close(started_r)
                    self.become_worker(conn, command, started_w)
                finally:
                    os._exit(70)
            os.close(started_w)
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:  # cannot follow it: it must not run (it waits for "G")
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(started_r)
                return self.refuse(conn, f"cannot follow the worker: {exc.strerror}")
            worker = _Worker(pid, pidfd, conn, started_r)
            self.workers[pidfd] = worker
            self.poller.register(pidfd, select.EPOLLIN)
            self.starting[started_r] = worker
            self.poller.register(started_r, select.EPOLLIN)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", pidfd))]
            try:
                conn.sendmsg([b"P\n"], rights)
            except OSError:  # the client is gone: the worker finds no go-ahead and ends
                return True
            # Its client gone (kill -9), a worker ends at once, even stopped (Ctrl-Z).
            self.watched[conn.fileno()] = worker
            self.poller.register(conn.fileno(), select.EPOLLRDHUP)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return True

    def learn(self, worker: _Worker) -> None:
        """Whether the worker runs the command (it writes "R" after the go-ahead) or handed
        it back (it ends without): what ``status`` counts."""
        if worker.told:
            return
        try:
            said = os.read(worker.started, 1)
        except BlockingIOError:
            return
        except OSError:
            said = b""
        worker.told = True
        self.starting.pop(worker.started, None)
        with contextlib.suppress(OSError):
            self.poller.unregister(worker.started)
        self.closed_now.add(worker.started)
        if said == b"R":  # kept (not watched): "D" is read when its client hangs up
            worker.runs = True
            self.served += 1
        else:
            self.close_started(worker)
            self.fallbacks += 1
            self.last_fallback = "the worker could not take the client's state over"

    def close_started(self, worker: _Worker) -> None:
        if worker.started >= 0:
            os.close(worker.started)
            worker.started = -1

    def hung_up(self, fd: int) -> None:
        worker = self.watched.pop(fd)
        self.poller.unregister(fd)
        self.closed_now.add(fd)
        reported = False
        if worker.runs and worker.started >= 0:
            with contextlib.suppress(OSError):
                reported = os.read(worker.started, 1) == b"D"
        with contextlib.suppress(OSError):
            # Its client got the exit code and left: it ends by itself once its housekeeping
            # is done (continued if its client had stopped it: nobody else would).
            signal.pidfd_send_signal(worker.pidfd, signal.SIGCONT if reported else signal.SIGKILL)

    def reap(self, pidfd: int) -> None:
        worker = self.workers[pidfd]
        pid, status = os.waitpid(worker.pid, os.WNOHANG)
        if pid == 0:  # still running (a stale event)
            return
        del self.workers[pidfd]
        self.poller.unregister(pidfd)
        os.close(pidfd)
        self.learn(worker)
        self.close_started(worker)
        self.closed_now.update((pidfd, worker.conn.fileno()))
        if self.watched.pop(worker.conn.fileno(), None) is not None:
            self.poller.unregister(worker.conn.fileno())
        code = os.waitstatus_to_exitcode(status)
        if worker.runs:  # else its client got "F" (or gave up): it runs the command itself
            with contextlib.suppress(OSError):  # killed by a signal: the client dies of it too
                worker.conn.sendall(b"S%d\n" % -code if code < 0 else b"X%d\n" % code)
        worker.conn.close()
        self.last_activity = time.monotonic()

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "socket": self.path,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "idle_timeout_s": self.idle_timeout,
            "python": sys.executable,
            "commands_served": self.served,
            "commands_running": len(self.workers),
            "fallbacks": self.fallbacks,
            "last_fallback": self.last_fallback or None,
            "stopping": self.stopping or None,
        }

    # -- the worker --

    def become_worker(self, conn: socket.socket, command: Request, started: int) -> NoReturn:
        """In the forked child: take over the client's process state, wait for the client's
        go-ahead, then run the command. The signals it may forward stay held until the
        command's own dispositions are in place."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        self.poller.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        if self.listener is not None:
            self.listener.close()
        if self.lock is not None:
            self.lock.close()
        for worker in self.workers.values():
            os.close(worker.pidfd)
            worker.conn.close()
            if worker.started >= 0:
                os.close(worker.started)
        for arriving in self.arriving.values():
            arriving.close()
        try:
            os.setsid()  # no controlling terminal, as when started by `daemon start`
            conn, started = _out_of_the_way(conn, command, started)
            problem = _take_over(command)
            if not problem:
                _close_others({*command.targets, conn.fileno(), started})
        except BaseException as exc:
            problem = f"cannot take the client's state over: {exc}"
        if problem:
            with contextlib.suppress(BaseException):
                conn.sendall(b"F" + problem.encode() + b"\n")
            os._exit(HANDED_BACK)
        conn.settimeout(GO_TIMEOUT_S)  # sent as soon as the pidfd arrives: only a client
        try:  # stopped (SIGSTOP) at that very moment is this late; it then runs it itself
            go = conn.recv(1)
        except TimeoutError:
            with contextlib.suppress(OSError):
                conn.sendall(b"Fno go-ahead from the client in time\n")
            go = b""
        except OSError:
            go = b""
        if go != b"G":  # the client gave up (or is gone): it runs the command, or no one does
            os._exit(HANDED_BACK)
        os.write(started, b"R")
        reported = threading.Event()
        with contextlib.suppress(RuntimeError):  # no thread (RLIMIT_NPROC): this one watches
            _watch_client(conn, reported)
        _take_signals(command.traits)
        from conveyor.cli.main import entry

        def report(code: int) -> None:
            # What follows (folding the record's log) is not the command's: the client's
            # descriptors are let go (a pipe's reader sees its end now), and the resident
            # process and the watcher must not take the client's leaving for a death.
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_RDWR)
                for fd in command.targets:
                    os.dup2(null, fd)
                os.close(null)
            reported.set()
            with contextlib.suppress(OSError):
                os.write(started, b"D")
            conn.sendall(b"X%d\n" % code)

        try:
            entry(before_exit=report)
        except BaseException:
            # An exception out of ``entry`` (CONVEYOR_DEBUG's traceback, a MemoryError): the
            # interpreter prints it and exits 1.
            with contextlib.suppress(BaseException):
                traceback.print_exc()
                sys.stderr.flush()
            with contextlib.suppress(OSError):
                report(1)
            os._exit(1)


def _close_others(keep: set[int]) -> None:
    """Every descriptor but ``keep``: a worker holds nothing of the resident process's."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _difference(theirs: bytes, ours: bytes) -> str:
    """Which part of the compatibility key differs, in words."""
    pairs = zip(theirs.split(b"\x1f"), ours.split(b"\x1f"), strict=False)
    for name, (a, b) in zip(launcher.COMPATIBILITY_PARTS, pairs, strict=False):
        if a != b:
            return name
    return "client version"


class Request:
    """A ``run`` request: the client's state, as sent (see ``launcher.request``)."""

    def __init__(self) -> None:
        self.compatibility = b""
        self.streams: list[str] = []
        self.limits: dict[str, str] = {}
        self.cwd = b""
        self.umask = 0o022
        self.package = ""
        self.fds: list[int] = []  # as received here
        self.targets: list[int] = []  # their numbers in the client
        self.argv: list[str] = []
        self.environ: dict[bytes, bytes] = {}
        self.traits: dict[str, str] = {}

    @classmethod
    def parse(cls, fields: list[bytes]) -> Request:
        out = cls()
        out.compatibility = fields[1]
        out.streams = fields[2].decode().split(";")
        out.limits = dict(item.split("=", 1) for item in fields[3].decode().split(";"))
        out.cwd = fields[4]
        out.umask = int(fields[5], 8)
        out.package = fields[6].decode()
        out.targets = [int(fd) for fd in fields[7].split(b",")]
        argc = int(fields[8])
        out.argv = [os.fsdecode(arg) for arg in fields[9 : 9 + argc]]
        for item in fields[9 + argc :]:
            key, sep, value = item.partition(b"=")
            if sep and key:
                out.environ[key] = value
        if len(out.streams) != 4 or len(out.argv) != argc or not out.argv:
            raise ValueError("malformed request")
        if out.targets[:3] != [0, 1, 2] or len(out.targets) > launcher.MAX_FDS:
            raise ValueError("malformed request")
        return out


_STARTUP_PREFIXES = (b"LD_", b"PYTHON", b"OPENSSL_", b"GLIBC_", b"MALLOC_")


def _startup_environment(environ: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The variables read only when a process starts (by the dynamic loader, the C library,
    OpenSSL, the interpreter): a worker keeps the resident process's, so they must agree."""
    return {k: v for k, v in environ.items() if k.startswith(_STARTUP_PREFIXES)}


_STATUS_TRAITS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
_IOPRIO_GET = {"x86_64": 252, "aarch64": 31, "riscv64": 31, "i686": 290, "armv7l": 315}


def _traits(pid: int) -> dict[str, str]:
    """What a worker inherits from the resident process and cannot take from the client:
    capabilities, namespaces, root folder, cgroup, OOM and scheduling settings, personality,
    security label; plus the signals the client ignores and blocks (taken, not compared)."""
    base = f"/proc/{pid}"
    out: dict[str, str] = {}
    with open(f"{base}/status", encoding="utf-8") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in _STATUS_TRAITS or key in ("SigIgn", "SigBlk"):
                out[key] = value.strip()
    for name in sorted(os.listdir(f"{base}/ns")):
        out[f"{name} namespace"] = os.readlink(f"{base}/ns/{name}")
    root = os.stat(f"{base}/root")
    out["root folder"] = f"{root.st_dev}:{root.st_ino}"
    for name, file in (
        ("cgroup", "cgroup"),
        ("OOM score adjustment", "oom_score_adj"),
        ("personality", "personality"),
        ("security label", "attr/current"),
    ):
        try:
            with open(f"{base}/{file}", encoding="utf-8", errors="replace") as handle:
                out[name] = handle.read().strip()
        except FileNotFoundError:
            out[name] = ""
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # no security module: nothing to compare
                raise
            out[name] = ""
    out["scheduling policy"] = f"{os.sched_getscheduler(pid)}:{os.sched_getparam(pid)[0]}"
    out["I/O priority"] = _io_priority(pid)
    return out


_LIBC: Any = None


def _io_priority(pid: int) -> str:
    number = _IOPRIO_GET.get(os.uname().machine)
    if number is None:
        return ""
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    value = _LIBC.syscall(number, 1, pid)  # IOPRIO_WHO_PROCESS
    return str(value) if value >= 0 else ""


def _take_signals(traits: dict[str, str]) -> None:
    """The client's ignored signals and signal mask, as a process it started would have them;
    then the handlers the interpreter and ``conveyor.cli`` install at start-up."""
    ignored = int(traits.get("SigIgn", "0"), 16)
    blocked = int(traits.get("SigBlk", "0"), 16)
    valid = signal.valid_signals()
    for signum in valid:
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        wanted = signal.SIG_IGN if ignored & (1 << (signum - 1)) else signal.SIG_DFL
        if signal.getsignal(signum) != wanted:  # the resident process's own, or inherited
            signal.signal(signum, wanted)
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:  # as the interpreter starts
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from conveyor.cli import _cancelled_while_starting

    if os.path.basename(sys.argv[0]) in ("conveyor", "__main__.py"):  # as conveyor.cli does
        signal.signal(signal.SIGINT, _cancelled_while_starting)
        signal.signal(signal.SIGTERM, _cancelled_while_starting)
    mask = {signum for signum in valid if blocked & (1 << (signum - 1))}
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _out_of_the_way(
    conn: socket.socket, command: Request, started: int
) -> tuple[socket.socket, int]:
    """Move the connection, the "started" pipe and the received descriptors above the numbers
    the client's descriptors must take."""
    base = max([*command.targets, *command.fds, conn.fileno(), started]) + 1
    moved = []
    for fd in command.fds:
        moved.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base))
        os.close(fd)
    command.fds = moved
    kept = socket.socket(fileno=fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, base))
    conn.close()
    moved_started = fcntl.fcntl(started, fcntl.F_DUPFD_CLOEXEC, base)
    os.close(started)
    return kept, moved_started


def _take_over(command: Request) -> str:
    """Become the client: its directory, umask, environment, limits and descriptors. A
    problem (said to the client, which then runs the command itself), or ``""``."""
    try:
        os.chdir(command.cwd)
    except OSError as exc:
        return f"cannot enter the working directory: {exc.strerror}"
    for fd, target in zip(command.fds, command.targets, strict=True):
        os.dup2(fd, target)  # inheritable, as they were in the client
        os.close(fd)
    try:  # after the descriptors: the client's limit on them may be below their numbers
        _apply_limits(command.limits)
    except (OSError, ValueError) as exc:
        return f"cannot take the client's limits: {exc}"
    os.umask(command.umask)
    os.environ.clear()
    for key, value in command.environ.items():
        os.environb[key] = value
    time.tzset()
    sys.argv = command.argv
    main = sys.modules["__main__"]
    main.__package__ = command.package or None
    _reopen_streams(command.streams)
    return ""


def _apply_limits(limits: dict[str, str]) -> None:
    for name in launcher.RLIMITS:
        value = limits.get(name)
        kind = getattr(resource, name, None)
        if value is None or kind is None:
            continue
        soft, hard = (int(part) for part in value.split(","))
        if name in ("RLIMIT_AS", "RLIMIT_DATA") and soft != resource.RLIM_INFINITY:
            # A fork of the resident process maps more than a process of its own would.
            raise ValueError(f"a memory limit ({name})")
        if resource.getrlimit(kind) != (soft, hard):
            resource.setrlimit(kind, (soft, hard))
    priority = int(limits["priority"])
    if os.getpriority(os.PRIO_PROCESS, 0) != priority:
        os.setpriority(os.PRIO_PROCESS, 0, priority)
    affinity = {int(cpu) for cpu in limits["affinity"].split(",") if cpu}
    if affinity and affinity != os.sched_getaffinity(0):
        os.sched_setaffinity(0, affinity)


def _reopen_streams(streams: list[str]) -> None:
    """New standard streams over the client's descriptors, made as the interpreter makes them
    at start-up (``create_stdio``): the client's encodings, ``"\\n"`` newlines, raw unbuffered
    writes under ``-u``, line buffering on a terminal and for stderr."""
    unbuffered = streams[3] == "unbuffered"
    made = []
    for fd, shown in enumerate(streams[:3]):
        encoding, _, errors = shown.partition(":")
        writing = fd != 0
        raw = unbuffered and writing  # stdin is always buffered
        buffer = open(fd, "wb" if writing else "rb", buffering=0 if raw else -1, closefd=False)  # noqa: SIM115
        named: Any = buffer if raw else buffer.raw  # type: ignore[attr-defined]
        named.name = ("<stdin>", "<stdout>", "<stderr>")[fd]  # as the interpreter names them
        made.append(
            io.TextIOWrapper(
                buffer,
                encoding=encoding,
                errors=errors,
                newline="\n",
                line_buffering=not unbuffered and (os.isatty(fd) or fd == 2),
                write_through=unbuffered,
            )
        )
    sys.stdin, sys.stdout, sys.stderr = made
    # What the interpreter started with, as a process of its own would have them.
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = made  # type: ignore[misc]


def _watch_client(conn: socket.socket, reported: threading.Event) -> None:
    """A client that ends without a word (``kill -9``) takes its worker with it, as the
    process it stands for would have gone (not once it has been told the exit code). The
    watcher blocks every signal, so that the command's thread gets them (and its blocking
    calls are interrupted) as it would alone."""

    def watch() -> None:
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        if not reported.is_set():
            os.kill(os.getpid(), signal.SIGKILL)

    every = signal.valid_signals()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, every)
    try:
        conn.settimeout(None)
        threading.Thread(target=watch, name="conveyor-client-watch", daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_resident(path: str, idle_timeout: float) -> int:
    """Run the resident process in the foreground until stopped, idle, or out of date."""
    try:
        lock = _claim(path)
    except DaemonError as exc:
        _log(str(exc))
        return EXIT_USAGE
    if lock is None:
        _log(f"another resident Conveyor serves {path}")
        return EXIT_LOCKED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # each command holds descriptors here; a worker takes its client's limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    resident = Resident(path, idle_timeout)
    resident.lock = lock
    signal.signal(signal.SIGTERM, resident.request_stop)
    signal.signal(signal.SIGINT, resident.request_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    failed = _warm_up()
    for problem in failed:
        _log(f"not preloaded: {problem}")
    if threading.active_count() != 1:  # a fork copies only the calling thread
        _log("a module started a thread while loading: cannot fork safely")
        return EXIT_FAILED
    resident.files = _code_files()
    resident.stamp = _stamp(resident.files)
    gc.collect()
    gc.freeze()  # the workers' collections leave the shared modules alone (no copies)
    try:
        resident.listen()
    except OSError as exc:
        _log(f"cannot listen on {path}: {exc.strerror}")
        return EXIT_FAILED
    resident.last_activity = time.monotonic()
    _log(f"serving on {path} (python {sys.version.split()[0]}, idle timeout {idle_timeout:g} s)")
    resident.loop()
    _log("stopped")
    return EXIT_OK


def serve_main() -> None:
    """``python -c BOOT PATH IDLE_SECONDS``: the resident process (a clean stack to fork)."""
    # ``-c`` puts the current folder first on the module path: a worker would import from
    # the folder it works in (a repository's files). The client drops it as well.
    if not sys.flags.safe_path:
        del sys.path[0]
    os.chdir("/")
    path, idle = sys.argv[1], float(sys.argv[2])
    sys.argv = ["conveyor"]
    sys.exit(run_resident(path, idle))


def _claim(path: str) -> io.TextIOWrapper | None:
    """The lock that makes this the socket's only server; ``None`` if another holds it."""
    _check_path(path)
    folder = os.path.dirname(path) or "."
    _prepare_folder(folder)
    lock = open(path + ".lock", "a", encoding="utf-8")  # noqa: SIM115 - held while serving
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def _check_path(path: str) -> None:
    if not os.path.isabs(path):
        raise DaemonError(f"the socket path must be absolute, got {path!r}")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise DaemonError(
            f"the socket path is {len(os.fsencode(path))} bytes long, more than a Unix socket"
            f" allows ({MAX_SOCKET_PATH}): set {launcher.SOCKET_VARIABLE} to a shorter one"
        )


def _prepare_folder(folder: str) -> None:
    """The socket's folder: made private if new; refused if others could write to it."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(folder, mode=0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise DaemonError(f"{folder} is not a folder")
    if info.st_uid != os.geteuid():
        raise DaemonError(f"{folder} belongs to another user: choose another socket path")
    if info.st_mode & 0o022:
        raise DaemonError(
            f"{folder} can be written by other users: make it private (chmod 700) or choose"
            " another socket path"
        )


# --- the client side of the control requests ----------------------------------------------


def query(path: str, verb: str) -> dict[str, Any] | None:
    """``status`` or ``stop`` to the resident process at ``path``; ``None`` if none answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(REQUEST_TIMEOUT_S)
            sock.connect(path)
            uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid != os.geteuid():
                return None
            sock.sendall(launcher.frame(verb.encode()))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    try:
        answer = json.loads(data)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


# --- the commands ---------------------------------------------------------------------------


def _path_or_fail() -> str:
    path = launcher.socket_path()
    if path is None:
        raise click.UsageError(
            f"the resident Conveyor is turned off ({launcher.SOCKET_VARIABLE} is set but empty)"
        )
    try:
        _check_path(path)
    except DaemonError as exc:
        raise click.UsageError(str(exc)) from None
    return path


@click.group()
def daemon() -> None:
    """A resident Conveyor: commands start in milliseconds instead of a tenth of a second.

    Once started, every `conveyor` command of this user hands itself to it (socket:
    $XDG_RUNTIME_DIR/conveyor-UID/daemon.sock, or CONVEYOR_DAEMON_SOCKET), and runs by
    itself when it is not running.
    """


def _idle(value: str) -> float:
    from conveyor.spec.durations import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--idle-timeout'") from None


idle_option = click.option(
    "--idle-timeout",
    default=DEFAULT_IDLE,
    show_default=True,
    help="Stop after this long without a command (at most 7d).",
)


@daemon.command()
@idle_option
def start(idle_timeout: str) -> None:
    """Start the resident Conveyor in the background (nothing if it runs already)."""
    path = _path_or_fail()
    idle = _idle(idle_timeout)
    running = query(path, "status")
    if running is not None:
        click.echo(f"resident Conveyor already running (pid {running['pid']}, socket {path})")
        return
    try:
        _prepare_folder(os.path.dirname(path))
    except (DaemonError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    log_path = path + ".log"
    with open(log_path, "ab") as log:
        logged_from = log.tell()
        process = subprocess.Popen(
            [sys.executable, "-c", BOOT, path, repr(idle)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        answer = query(path, "status")
        if answer is not None and answer["pid"] == process.pid:
            click.echo(f"resident Conveyor started (pid {process.pid}, socket {path})")
            return
        code = process.poll()
        if code == EXIT_LOCKED and answer is not None:
            # Another `start` won the race: it runs.
            click.echo(f"resident Conveyor already running (pid {answer['pid']}, socket {path})")
            return
        if code is not None and code != EXIT_LOCKED:
            break
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
        process.wait()
    click.echo(f"error: the resident Conveyor did not start; its log ({log_path}):", err=True)
    click.echo(_log_since(log_path, logged_from), err=True)
    sys.exit(EXIT_FAILED)


def _log_since(path: str, offset: int, size: int = 4000) -> str:
    """What this start wrote to the log (its end, if long)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(offset, file.tell() - size))
            return file.read().decode("utf-8", "replace").rstrip()
    except OSError as exc:
        return f"(unreadable: {exc.strerror})"


@daemon.command()
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it has ended.")
def stop(wait: bool) -> None:
    """Stop the resident Conveyor: it takes no new command, and ends when those it runs end."""
    path = _path_or_fail()
    answer = query(path, "stop")
    if answer is None:
        click.echo("resident Conveyor not running")
        return
    pid = int(answer["pid"])
    if wait and _is_ancestor(pid):
        # A command it runs (a job's) cannot wait for it: it waits for that command.
        click.echo(
            f"resident Conveyor stopping (pid {pid}): it ends when its commands end, this one"
            " among them"
        )
        return
    if wait:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = None
        if pidfd is not None:
            running = int(answer["commands_running"])
            if running:
                click.echo(f"waiting for {running} command(s) it runs to end", err=True)
            with contextlib.closing(select.epoll()) as poller:
                poller.register(pidfd, select.EPOLLIN)
                poller.poll()
            os.close(pidfd)
        click.echo(f"resident Conveyor stopped (pid {pid})")
    else:
        click.echo(f"resident Conveyor stopping (pid {pid}): it ends when its commands end")


def _is_ancestor(pid: int) -> bool:
    current = os.getppid()
    for _ in range(1000):
        if current == pid:
            return True
        if current <= 1:
            return False
        try:
            text = Path(f"/proc/{current}/stat").read_text()
        except OSError:
            return False
        current = int(text.rpartition(")")[2].split()[1])
    return False


@daemon.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Whether the resident Conveyor runs, and what it has done (exit 1 if not running)."""
    path = _path_or_fail()
    answer = query(path, "status")
    if as_json:
        click.echo(json.dumps({"running": answer is not None, "socket": path, **(answer or {})}))
    elif answer is None:
        click.echo(f"resident Conveyor not running (socket {path})")
    else:
        click.echo(f"resident Conveyor running (pid {answer['pid']}, socket {path})")
        click.echo(f"  since {answer['started_at']}, idle timeout {answer['idle_timeout_s']:g} s")
        click.echo(
            f"  commands: {answer['commands_served']} served, {answer['commands_running']}"
            f" running, {answer['fallbacks']} run by the client itself"
        )
        if answer["last_fallback"]:
            click.echo(f"  last handed back: {answer['last_fallback']}")
        if answer["stopping"]:
            click.echo(f"  stopping: {answer['stopping']}")
    if answer is None:
        sys.exit(EXIT_FAILED)


@daemon.command()
@idle_option
def serve(idle_timeout: str) -> None:
    """Run the resident Conveyor in the foreground (for a service manager), logging to
    standard error."""
    path = _path_or_fail()
    idle = _idle(idle_timeout)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", BOOT, path, repr(idle)])
