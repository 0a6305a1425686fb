"""The ``conveyor`` command's entry point: hand the command to a resident Conveyor, or run it here.

A resident Conveyor (``conveyor daemon start``, see ``conveyor.cli.daemon``) has every module
imported already. For each command it forks a worker that takes over this process's standard
streams, working directory, environment, umask and limits, runs the command, and reports its
exit status; this process forwards the signals it gets (Ctrl-C, SIGTERM, Ctrl-Z…) and exits
with that status. A command so skips the ≈ 0.1 s of imports and class creation it would spend
here. When no resident Conveyor answers, or it cannot run the command exactly as this process
would (another interpreter, other flags or encodings, changed code), the command runs here.

This module runs before that decision, so it imports only C modules: ``socket`` and ``signal``
would cost 20 ms of ``enum`` at import, as much as the interpreter's own start-up.
"""

import _signal  # type: ignore[import-not-found]  # no stubs: the C half of ``signal``
import _socket
import _struct
import os
import sys

PROTOCOL = b"conveyor-daemon/1"
SOCKET_VARIABLE = "CONVEYOR_DAEMON_SOCKET"
MAX_REQUEST = 64 * 1024 * 1024
MAX_FDS = 250  # the kernel passes at most 253 descriptors in one message
ANSWER_TIMEOUT_S = 5.0  # for the resident process to fork the worker; else run it here
FORWARDED = (
    _signal.SIGINT,
    _signal.SIGTERM,
    _signal.SIGHUP,
    _signal.SIGQUIT,
    _signal.SIGWINCH,
    _signal.SIGTSTP,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
)
RLIMITS = (
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_NOFILE",
    "RLIMIT_AS",
    "RLIMIT_NPROC",
    "RLIMIT_MEMLOCK",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
)


def socket_path(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> str | None:
    """Where the resident Conveyor of this user listens; ``None`` when it is turned off
    (``CONVEYOR_DAEMON_SOCKET`` set to an empty value)."""
    explicit = environ.get(SOCKET_VARIABLE)
    if explicit is not None:
        return explicit or None
    base = environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return f"{base}/conveyor-{os.getuid()}/daemon.sock"


COMPATIBILITY_PARTS = (
    "interpreter",
    "Python version",
    "interpreter flags",
    "warning options",
    "-X options",
    "module path",
    "file system encoding",
    "file system encoding errors",
    "locale encoding",
    "user and groups",
)


def compatibility() -> bytes:
    """What must be the same in the client and the resident Conveyor for a command to run
    alike in both: the interpreter, its flags, its module path and its encodings."""
    import _locale

    parts = (  # named in COMPATIBILITY_PARTS
        sys.executable,
        sys.version,
        repr(tuple(sys.flags)),
        repr(sys.warnoptions),
        repr(sys._xoptions),
        repr(sys.path),
        sys.getfilesystemencoding(),
        sys.getfilesystemencodeerrors(),
        _locale.nl_langinfo(_locale.CODESET),
        repr((os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups()))),
    )
    return "\x1f".join(parts).encode("utf-8", "surrogateescape")


def _streams() -> bytes:
    """The standard streams' encodings, and whether they are unbuffered (``-u``), as the
    interpreter made them."""
    shown = []
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if stream is None:
            return b""
        shown.append(f"{stream.encoding}:{stream.errors}")
    unbuffered = type(getattr(sys.stdout, "buffer", None)).__name__ == "FileIO"
    shown.append("unbuffered" if unbuffered else "buffered")
    return ";".join(shown).encode()


def _limits() -> bytes:
    import resource

    shown = []
    for name in RLIMITS:
        limit = getattr(resource, name, None)
        if limit is not None:
            soft, hard = resource.getrlimit(limit)
            shown.append(f"{name}={soft},{hard}")
    shown.append(f"priority={os.getpriority(os.PRIO_PROCESS, 0)}")
    shown.append("affinity=" + ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    return ";".join(shown).encode()


def inherited_fds(own: int) -> list[int]:
    """The descriptors this process got from whoever started it, as its children would get
    them: 0, 1, 2 and every other one not closed on exec (a make jobserver's, ``7>file``)."""
    extra = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != own:
            try:
                if os.get_inheritable(fd):
                    extra.append(fd)
            except OSError:  # the listing's own descriptor, closed by now
                continue
    return [0, 1, 2, *sorted(extra)]


def request(argv: list[str], main_package: str, fds: list[int]) -> bytes:
    """The command as the resident Conveyor gets it (fields separated by NUL bytes, which no
    argument, variable or path can hold)."""
    umask = os.umask(0o022)
    os.umask(umask)
    fields = [
        b"run",
        compatibility(),
        _streams(),
        _limits(),
        os.getcwdb(),
        b"%o" % umask,
        main_package.encode(),
        ",".join(map(str, fds)).encode(),
        b"%d" % len(argv),
        *map(os.fsencode, argv),
        *(key + b"=" + value for key, value in os.environb.items()),
    ]
    return b"\0".join(fields)


def frame(payload: bytes) -> bytes:
    return PROTOCOL + b"\n" + _struct.pack("!I", len(payload)) + payload


class _Client:
    """One command handed over: the connection, and the worker's pidfd once it exists.

    Until the resident process has forked the worker (``P``), nothing runs: a signal acts on
    this process as it would on a command starting up, and a silence or a hang-up means the
    command runs here. With the pidfd, this process gives the go-ahead (``G``; a worker that
    does not get it ends without running anything) and from then on only forwards signals.
    """

    def __init__(self, sock: "_socket.socket") -> None:
        self.sock = sock
        self.pidfd: int | None = None

    def forward(self, signum: int, frame: object) -> None:
        if self.pidfd is None:  # nothing runs yet: as a command starting up would
            if signum in (_signal.SIGINT, _signal.SIGTERM):
                _cancelled(signum, frame)
            elif signum == _signal.SIGTSTP:
                _stop_here(self.forward)
            elif signum != _signal.SIGWINCH:
                _die_of(signum)
            return
        try:
            if signum == _signal.SIGTSTP:  # stop the worker, then this process, as a shell would
                _signal.pidfd_send_signal(self.pidfd, _signal.SIGSTOP)
                _stop_here(self.forward)
                _signal.pidfd_send_signal(self.pidfd, _signal.SIGCONT)
            else:
                _signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:  # it has just ended: its status is on the way
            pass

    def outcome(self, fds: list[int]) -> int | None:
        """The command's exit status, or ``None`` when it is to run here after all. The
        descriptors go once the resident process has accepted the command (``R``)."""
        buffer = b""
        space = _socket.CMSG_SPACE(4 * 4)
        while True:
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(
                    4096, space, _socket.MSG_CMSG_CLOEXEC
                )
            except OSError:
                if self.pidfd is None:  # a timeout, or a reset: nothing runs, so run it here
                    return None
                raise
            for level, kind, payload in ancillary:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    count = len(payload) // 4
                    got = _struct.unpack(f"{count}i", payload[: count * 4])
                    for extra in got[1:]:
                        os.close(extra)
                    if got and self.pidfd is None:
                        self.pidfd = got[0]  # first: a signal from now on goes to the worker
                        self.sock.settimeout(None)  # as long as the command takes
                        try:
                            self.sock.sendall(b"G")
                        except OSError:  # it handed the command back and ended: F follows
                            pass
                    elif got:
                        os.close(got[0])
            if not data:
                if self.pidfd is None:
                    return None
                os.write(
                    2,
                    b"conveyor: the resident Conveyor ended before the command's exit status"
                    b" was known (see `conveyor daemon status`)\n",
                )
                return 1
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.startswith(b"F"):
                    return None
                if line == b"R":
                    rights = _struct.pack(f"{len(fds)}i", *fds)
                    self.sock.sendmsg([b"D"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
                if line.startswith(b"X"):
                    return int(line[1:])
                if line.startswith(b"S"):  # the worker was killed by a signal: so is this
                    _die_of(int(line[1:]))
                    return 128 + int(line[1:])


def _stop_here(handler: object) -> None:
    """Stop this process as Ctrl-Z would; returns once it is continued."""
    _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
    os.kill(os.getpid(), _signal.SIGTSTP)
    _signal.signal(_signal.SIGTSTP, handler)


def _die_of(signum: int) -> None:
    """End this process by ``signum``, as the worker ended (its parent sees the same status)."""
    if signum in (_signal.SIGSTOP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU):
        return
    _signal.signal(signum, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)


def _cancelled(signum: int, frame: object) -> None:
    os.write(2, b"cancelled\n")
    os._exit(130)


def _private(path: str) -> bool:
    """Whether the socket and its folder are this user's, and no one else can write there:
    checked before connecting (a socket someone else put there could hold the command)."""
    uid = os.geteuid()
    try:
        folder = os.lstat(os.path.dirname(path) or ".")
        sock = os.lstat(path)
    except OSError:
        return False
    return (
        folder.st_uid == uid
        and not folder.st_mode & 0o022
        and sock.st_uid == uid
        and (sock.st_mode & 0o170000) == 0o140000  # a socket
    )


def delegate(path: str, argv: list[str], main_package: str) -> int | None:
    """Run the command in the resident Conveyor at ``path``: its exit status, or ``None``
    when none answers there or it cannot run this command alike."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            # In the background of a shell with job control: the terminal's stops (SIGTTOU,
            # SIGTTIN) are for this process group; a worker elsewhere would not get them.
            if os.isatty(fd) and os.tcgetpgrp(fd) != os.getpgrp():
                return None
        except OSError:  # started with it closed, or a terminal that is not ours
            return None
    if not _private(path):
        return None
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    client = _Client(sock)
    try:
        sock.settimeout(ANSWER_TIMEOUT_S)  # until the worker exists
        sock.connect(path)
        credentials = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        if _struct.unpack("3i", credentials)[1] != os.geteuid():  # someone else's socket
            sock.close()
            return None
        fds = inherited_fds(sock.fileno())
        message = frame(request(argv, main_package, fds))
        if len(message) > MAX_REQUEST or len(fds) > MAX_FDS:
            sock.close()
            return None
        for signum in FORWARDED:
            if _signal.getsignal(signum) != _signal.SIG_IGN:  # ignored by who started us: kept
                _signal.signal(signum, client.forward)
        sock.sendall(message)
        code = client.outcome(fds)
    except (OSError, ValueError):
        if client.pidfd is None:
            code = None
        else:
            code = 1
            os.write(2, b"conveyor: lost the resident Conveyor while it ran the command\n")
    if code is None:  # runs here: the usual start-up handlers until ``main`` takes over
        for signum in FORWARDED:
            if _signal.getsignal(signum) == client.forward:
                _signal.signal(signum, _signal.SIG_DFL)
        _signal.signal(_signal.SIGINT, _cancelled)
        _signal.signal(_signal.SIGTERM, _cancelled)
    sock.close()
    return code


def _in_process() -> bool:
    """Whether this command must run here: ``daemon`` itself, or asked for."""
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            return arg == "daemon"
    return False


def entry() -> None:
    """The console script: the resident Conveyor's exit status, or ``main`` here."""
    if not sys.flags.safe_path and sys.path:
        # The script's folder, or with ``python -m`` the current one: Conveyor is loaded from
        # elsewhere, and a module imported later must not come from a repository's files.
        del sys.path[0]
    if os.path.basename(sys.argv[0]) in ("conveyor", "__main__.py"):
        _signal.signal(_signal.SIGINT, _cancelled)
        _signal.signal(_signal.SIGTERM, _cancelled)
    path = socket_path()
    if path is not None and not _in_process():
        main = sys.modules.get("__main__")
        package = getattr(main, "__package__", None) or ""
        code = delegate(path, sys.argv, package)
        if code is not None:
            os._exit(code)
    from conveyor.cli.main import entry as run_here

    run_here()
