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
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
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


def _try_import(name: str) -> None:
    if name in sys.modules:
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


class _Stop(Exception):
    """SIGTERM or SIGINT to the resident process."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop


class Resident:
    """The resident process: a listening socket, and the workers it forked and will reap."""

    def __init__(self, path: str, idle_timeout: float) -> None:
        self.path = path
        self.idle_timeout = idle_timeout
        self.started_at = time.time()
        self.last_activity = time.monotonic()
        self.served = 0
        self.fallbacks = 0
        self.last_fallback = ""
        self.stopping = ""
        self.compatibility = launcher.compatibility()
        self.workers: dict[int, tuple[int, socket.socket]] = {}  # pidfd: (pid, connection)
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.identity: tuple[int, int] | None = None
        self.files: list[str] = []
        self.stamp: list[tuple[int, int]] = []
        self.lock: io.TextIOWrapper | None = None
        self.startup_environment = _startup_environment(dict(os.environb))
        self.traits = {
            name: value
            for name, value in _traits(os.getpid()).items()
            if name not in ("SigIgn", "SigBlk")  # taken from the client, not compared
        }

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
        self.selector.register(listener, selectors.EVENT_READ, None)

    def close_listener(self, reason: str) -> None:
        """No more commands: the socket goes, so that clients run commands themselves."""
        if self.listener is None:
            return
        self.stopping = reason
        self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self.identity:
                os.unlink(self.path)
        _log(f"stopping ({reason}); {len(self.workers)} command(s) still running")

    def loop(self) -> None:
        while self.listener is not None or self.workers:
            timeout = None
            if self.listener is not None and not self.workers:
                idle = time.monotonic() - self.last_activity
                if idle >= self.idle_timeout:
                    self.close_listener("idle")
                    continue
                timeout = self.idle_timeout - idle
            try:
                ready = self.selector.select(timeout)
            except _Stop:
                self.close_listener("stopped by a signal")
                continue
            for key, _events in ready:
                try:
                    if key.data is None:
                        self.accept()
                    else:
                        self.reap(key.fd)
                except _Stop:
                    self.close_listener("stopped by a signal")

    # -- commands --

    def accept(self) -> None:
        if self.listener is None:
            return
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        self.last_activity = time.monotonic()
        received: list[int] = []
        keep = False
        try:
            peer = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            client_pid, uid, _gid = struct.unpack("3i", peer)
            if uid != os.geteuid():
                _log(f"refused a connection from user {uid}")
                return
            conn.settimeout(REQUEST_TIMEOUT_S)
            payload, received = _read_request(conn)
            fields = payload.split(b"\0")
            verb = fields[0]
            if verb == b"status":
                conn.sendall(json.dumps(self.status()).encode() + b"\n")
            elif verb == b"stop":
                conn.sendall(json.dumps(self.status()).encode() + b"\n")
                self.close_listener("asked to stop")
            elif verb == b"run":
                # kept until its worker is reaped
                keep = self.start(conn, fields, received, client_pid)
            else:
                conn.sendall(b"Funknown request\n")
        except (OSError, ValueError, struct.error) as exc:
            _log(f"dropped a request: {exc}")
        finally:
            for fd in received:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if not keep:
                conn.close()

    def refuse(self, conn: socket.socket, reason: str) -> bool:
        self.fallbacks += 1
        self.last_fallback = reason
        with contextlib.suppress(OSError):
            conn.sendall(b"F" + reason.encode() + b"\n")
        return False

    def start(
        self, conn: socket.socket, fields: list[bytes], fds: list[int], client_pid: int
    ) -> bool:
        """Fork a worker for the command; ``True`` if it runs (the connection is then kept)."""
        try:
            command = Request.parse(fields, fds)
        except (ValueError, UnicodeDecodeError, IndexError):
            return self.refuse(conn, "malformed request")
        if command.compatibility != self.compatibility:
            return self.refuse(conn, "another " + _difference(fields[1], self.compatibility))
        if _stamp(self.files) != self.stamp:
            self.refuse(conn, "Conveyor's code changed on disk")
            self.close_listener("its code changed on disk")
            return False
        theirs = _startup_environment(command.environ)
        if theirs != self.startup_environment:
            changed = sorted(set(theirs.items()) ^ set(self.startup_environment.items()))
            name = changed[0][0].decode(errors="replace")
            return self.refuse(conn, f"another {name} (read when a process starts)")
        try:
            command.traits = _traits(client_pid)
        except OSError as exc:
            return self.refuse(conn, f"cannot read the client's process state: {exc.strerror}")
        for name, value in self.traits.items():
            if command.traits.get(name) != value:
                return self.refuse(conn, f"another {name}")
        # No stop request may come between the fork and the worker's registration (or, in
        # the worker, before it has dropped the resident process's handlers).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            try:
                pid = os.fork()
            except OSError as exc:
                return self.refuse(conn, f"cannot fork: {exc.strerror}")
            if pid == 0:  # pragma: no cover - the worker; it ends in os._exit
                try:
                    self.become_worker(conn, command, held)
                finally:
                    os._exit(70)
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:  # cannot follow it: it must not run unreported
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return self.refuse(conn, f"cannot follow the worker: {exc.strerror}")
            self.workers[pidfd] = (pid, conn)
            self.selector.register(pidfd, selectors.EVENT_READ, pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self.served += 1
        with contextlib.suppress(OSError):
            conn.sendmsg(
                [b"P\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", pidfd))]
            )
        return True

    def reap(self, pidfd: int) -> None:
        pid, conn = self.workers.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):  # killed by a signal: the client dies of it too
            conn.sendall(b"S%d\n" % -code if code < 0 else b"X%d\n" % code)
        conn.close()
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

    def become_worker(self, conn: socket.socket, command: Request, mask: set[int]) -> NoReturn:
        """In the forked child: take over the client's process state, then run the command."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)  # until the command's own handlers
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.selector.close()
        if self.listener is not None:
            self.listener.close()
        for pidfd, (_pid, other) in self.workers.items():
            os.close(pidfd)
            other.close()
        if self.lock is not None:
            self.lock.close()
        os.setpgid(0, 0)
        conn = _out_of_the_way(conn, command)
        problem = _take_over(command)
        if problem:
            with contextlib.suppress(OSError):
                conn.sendall(b"F" + problem.encode() + b"\n")
            os._exit(0)
        _watch_client(conn)
        _take_signals(command.traits)
        from conveyor.cli.main import entry

        def report(code: int) -> None:
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


def _difference(theirs: bytes, ours: bytes) -> str:
    """Which part of the compatibility key differs, in words."""
    pairs = zip(theirs.split(b"\x1f"), ours.split(b"\x1f"), strict=False)
    for name, (a, b) in zip(launcher.COMPATIBILITY_PARTS, pairs, strict=False):
        if a != b:
            return name
    return "client version"


def _read_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """A framed request and the descriptors sent with it."""
    fds: list[int] = []
    data = b""
    header = len(launcher.PROTOCOL) + 1 + 4
    want = header
    while len(data) < want:
        chunk, ancillary, _flags, _addr = conn.recvmsg(
            min(want - len(data), 1 << 20),
            socket.CMSG_SPACE(4 * (launcher.MAX_FDS + 3)),
            socket.MSG_CMSG_CLOEXEC,
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                count = len(payload) // 4
                fds.extend(struct.unpack(f"{count}i", payload[: count * 4]))
        if not chunk:
            raise ValueError("connection closed mid-request")
        data += chunk
        if want == header and len(data) >= header:
            if not data.startswith(launcher.PROTOCOL + b"\n"):
                raise ValueError("not a Conveyor client of this version")
            (length,) = struct.unpack("!I", data[header - 4 : header])
            if length > launcher.MAX_REQUEST:
                raise ValueError("request too large")
            want = header + length
    return data[header:], fds


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
    def parse(cls, fields: list[bytes], fds: list[int]) -> Request:
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
        out.fds = fds
        if len(out.streams) != 3 or len(out.argv) != argc or not out.argv:
            raise ValueError("malformed request")
        if out.targets[:3] != [0, 1, 2] or len(out.targets) != len(fds):
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


def _io_priority(pid: int) -> str:
    number = _IOPRIO_GET.get(os.uname().machine)
    if number is None:
        return ""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    value = libc.syscall(number, 1, pid)  # IOPRIO_WHO_PROCESS
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
        if ignored & (1 << (signum - 1)):
            signal.signal(signum, signal.SIG_IGN)
        elif signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:  # as the interpreter starts
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from conveyor.cli import _cancelled_while_starting

    if os.path.basename(sys.argv[0]) in ("conveyor", "__main__.py"):  # as conveyor.cli does
        signal.signal(signal.SIGINT, _cancelled_while_starting)
        signal.signal(signal.SIGTERM, _cancelled_while_starting)
    mask = {signum for signum in valid if blocked & (1 << (signum - 1))}
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _out_of_the_way(conn: socket.socket, command: Request) -> socket.socket:
    """Move the connection and the received descriptors above the numbers they must take."""
    base = max([*command.targets, *command.fds, conn.fileno()]) + 1
    moved = []
    for fd in command.fds:
        moved.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base))
        os.close(fd)
    command.fds = moved
    kept = socket.socket(fileno=fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, base))
    conn.close()
    return kept


def _take_over(command: Request) -> str:
    """Become the client: its directory, umask, environment, limits and descriptors. A
    problem (said to the client, which then runs the command itself), or ``""``."""
    try:
        os.chdir(command.cwd)
    except OSError as exc:
        return f"cannot enter the working directory: {exc.strerror}"
    try:
        _apply_limits(command.limits)
    except (OSError, ValueError) as exc:
        return f"cannot take the client's limits: {exc}"
    os.umask(command.umask)
    os.environ.clear()
    for key, value in command.environ.items():
        os.environb[key] = value
    time.tzset()
    for fd, target in zip(command.fds, command.targets, strict=True):
        os.dup2(fd, target)  # inheritable, as they were in the client
        os.close(fd)
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
    """New standard streams over the client's descriptors, with the client's encodings and
    the buffering a process started on them would choose."""
    made = []
    for fd, shown in enumerate(streams):
        encoding, _, errors = shown.partition(":")
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        buffer = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        line_buffering = fd == 2 or (fd == 1 and raw.isatty())
        made.append(
            io.TextIOWrapper(
                buffer, encoding=encoding, errors=errors, line_buffering=line_buffering
            )
        )
    sys.stdin, sys.stdout, sys.stderr = made
    # What the interpreter started with, as a process of its own would have them.
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = made  # type: ignore[misc]


def _watch_client(conn: socket.socket) -> None:
    """A client that ends without a word (``kill -9``) takes its worker with it, as the
    process it stands for would have gone. The watcher blocks every signal, so that the
    command's thread gets them (and its blocking calls are interrupted) as it would alone."""

    def watch() -> None:
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
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
        return EXIT_FAILED
    resident = Resident(path, idle_timeout)
    resident.lock = lock
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
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
    try:
        resident.loop()
    except _Stop:
        resident.close_listener("stopped by a signal")
        resident.loop()
    _log("stopped")
    lock.close()
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


@daemon.command()
@click.option(
    "--idle-timeout",
    default=DEFAULT_IDLE,
    show_default=True,
    help="Stop after this long without a command (at most 7d).",
)
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
        if process.poll() is not None:
            break
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
        process.wait()
    tail = _tail(log_path)
    click.echo(f"error: the resident Conveyor did not start; its log ({log_path}):", err=True)
    click.echo(tail, err=True)
    sys.exit(EXIT_FAILED)


def _tail(path: str, size: int = 2000) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - size))
            return file.read().decode("utf-8", "replace")
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
    if wait:
        for _ in _until_gone(answer["pid"]):
            pass
    click.echo(f"resident Conveyor stopped (pid {answer['pid']})")


def _until_gone(pid: int) -> Iterator[None]:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.05)
        yield


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
@click.option(
    "--idle-timeout",
    default=DEFAULT_IDLE,
    show_default=True,
    help="Stop after this long without a command (at most 7d).",
)
def serve(idle_timeout: str) -> None:
    """Run the resident Conveyor in the foreground (for a service manager), logging to
    standard error."""
    path = _path_or_fail()
    idle = _idle(idle_timeout)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", BOOT, path, repr(idle)])
