"""Runs a release as a local service that outlives the ``conveyor`` command.

``ProcessTarget`` starts the environment's command with ``bash --noprofile --norc -c`` in the
release folder, in a new session: its own process group, so it survives the command that started
it, never gets the terminal's Ctrl-C, and can be signalled as a whole. Its stdin is
``/dev/null``; stdout and stderr go through a log keeper (``adapters.logkeeper``) to
``<env>/logs/<deployment>.log``, rotated at the environment's ``logs.max_size``. The service is
recorded in ``<env>/run/<deployment>.json`` (written atomically): its pid (= process group id),
the kernel's start time of that pid (``/proc/<pid>/stat`` field 22, so that a recycled pid is
never taken for the service), port, digest and start time.

Guarantees:

* ``stop`` signals a process group only while the recorded pid still exists with the recorded
  start time (the pid, hence the group id, cannot have been reused); SIGTERM to the whole group,
  up to ``stop_timeout_s`` to end, then SIGKILL. It is idempotent.
* ``start`` refuses a port that something already listens on (another program could otherwise
  answer the health check), and removes ``CONVEYOR_RUN_TOKEN`` from the service's environment
  (the orphan killer of runs must never take a service for a run's leftover).
* ``check`` reports a service that exits before it is healthy at once, with the end of its log;
  whatever the service left running in its process group is then killed, so that it cannot hold
  the port the restored release needs.

Contract for the command: stay in the foreground (a command that daemonizes and exits counts as
a service that exited), listen on ``127.0.0.1:$PORT``, end on SIGTERM. Linux only (``/proc``).

The helpers at the end (environment, bounded script runs, exit descriptions, log tails) are
shared with ``targets.command``.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from conveyor.adapters.logkeeper import say, start_keeper
from conveyor.domain.delivery import Health, Release
from conveyor.domain.text import neutralise
from conveyor.errors import DeployCancelled, DeployError
from conveyor.spec.delivery import DEFAULT_LOG_FILES, DEFAULT_LOG_MAX_BYTES

BASH = ("bash", "--noprofile", "--norc")
RUN_TOKEN_VARIABLE = "CONVEYOR_RUN_TOKEN"
"""Marks a run's job processes for the orphan killer (``adapters.processes``); never inherited."""

_POLL_S = 0.15
_ALIVE_FOR_S = 1.0
_HTTP_TRY_S = 2.0
_COMMAND_TRY_S = 10.0
_TERM_GRACE_S = 2.0
CUT_SHORT = "the deployment was cancelled before the check was over"
_CANCEL_POLL_S = 0.1
"""How often a script run that can be cancelled looks at the cancel flag."""
_KILL_WAIT_S = 5.0
KEEPER_DRAIN_S = 1.0
"""How long a release's log keeper is given to write the last output once the release ended."""
_TAIL_LINES = 10
_DEAD_STATES = ("Z", "X", "x")

# Services this process spawned, by pid, with their start time: polled to reap them (a zombie
# would otherwise stay until we exit) and to learn their exit code. Entries are kept after the
# exit, so the code is still known to later calls; a Popen never dies with a live child (no
# ResourceWarning).
_children: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
_children_lock = threading.Lock()


def recorded_services(environments_dir: Path) -> set[int]:
    """The process ids of the services recorded under ``environments_dir`` (every
    environment's ``run/<deployment>.json``) that still run, whatever they look like now: a
    server may rewrite its title, and with it the variables in ``/proc/<pid>/environ``."""
    pids: set[int] = set()
    try:
        paths = list(environments_dir.glob("*/run/*.json"))
    except OSError:
        return pids
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            pid, start_time = int(data["pid"]), int(data["start_time"])
        except (OSError, ValueError, KeyError, TypeError, OverflowError):
            continue
        if _pid_held(pid, start_time):  # not a recycled id: a dead service leaves its file
            pids.add(pid)
    return pids


def recorded_writers(env_dir: Path, deployment_id: int) -> set[tuple[int, int]]:
    """The (pid, start time) of the processes recorded as writing a release's log: its
    service and the service's log keeper (until the service is stopped), and the keeper of a
    ``command`` target's scripts (``record_keeper``)."""
    found: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, OverflowError):
        data = json.loads((env_dir / "run" / f"{deployment_id}.json").read_text(encoding="utf-8"))
        found.add((int(data["pid"]), int(data["start_time"])))
        keeper = _pair(data.get("keeper"))
        if keeper:
            found.add(keeper)
    with contextlib.suppress(OSError, ValueError, TypeError, OverflowError):
        text = (env_dir / "run" / f"{deployment_id}.keeper").read_text(encoding="ascii")
        for line in text.splitlines():
            with contextlib.suppress(ValueError, TypeError, OverflowError):
                found.add(_pair(line.split()) or (0, 0))
    return found


def record_keeper(env_dir: Path, deployment_id: int, pid: int, start_time: int) -> None:
    """Note a log keeper of a deployment's scripts, one line each (best effort: only ``env
    logs -F`` reads it). Not a ``.json`` file: it is no service (``recorded_services``)."""
    path = env_dir / "run" / f"{deployment_id}.keeper"
    with contextlib.suppress(OSError):
        _drop_ended_keepers(path)  # best effort: never in the way of the new line
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="ascii") as handle:
            handle.write(f"{pid} {start_time}\n")


def _drop_ended_keepers(path: Path) -> None:
    """Remove the lines of keepers that ended (one a leftover kept alive past its deployment
    ended after the command that started it, which could not remove its line then)."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, ValueError):
        return
    live = []
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            pair = _pair(line.split())
            if pair is not None and _pid_held(*pair):
                live.append(line)
    if len(live) != len(lines):
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in live), encoding="ascii")
        os.replace(tmp, path)


def forget_keeper(env_dir: Path, deployment_id: int, pid: int, start_time: int) -> None:
    """Remove one keeper's line from the record (the file, once it names no other)."""
    path = env_dir / "run" / f"{deployment_id}.keeper"
    with contextlib.suppress(OSError):
        lines = path.read_text(encoding="ascii").splitlines()
        rest = [line for line in lines if line.split() != [str(pid), str(start_time)]]
        if rest:
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text("".join(f"{line}\n" for line in rest), encoding="ascii")
            os.replace(tmp, path)
        else:
            path.unlink()


def allocate_port(avoid: Set[int] = frozenset()) -> int:
    """A TCP port free on 127.0.0.1 right now and not in ``avoid``, outside the kernel's
    ephemeral range when it can: an environment keeps its port, and there any outgoing
    connection could take it while the service is down for a restart or a rollback."""
    import random

    low, high = _ephemeral_ports()
    spans = [(lo, hi) for lo, hi in ((10000, low - 1), (high + 1, 65535)) if hi - lo > 100]
    for _ in range(64 if spans else 0):
        lo, hi = random.choices(spans, weights=[hi - lo for lo, hi in spans])[0]
        port = random.randint(lo, hi)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))  # the kernel's pick
            port = int(sock.getsockname()[1])
        if port not in avoid:
            break
    return port


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux's default if unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(part) for part in handle.read().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (ticks after boot, ``/proc/<pid>/stat`` field 22), if it exists."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def process_alive(pid: int, start_time: int) -> bool:
    """Whether ``pid`` runs and is the process that started at ``start_time`` (not a zombie)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in _DEAD_STATES and int(fields[19]) == start_time


@dataclass(frozen=True)
class _State:
    pid: int
    start_time: int
    port: int
    digest: str
    started_at: str
    keeper: tuple[int, int] | None = None
    """The log keeper's pid and start time (none in a record written before there was one)."""


@dataclass(frozen=True)
class LogLimits:
    """How much of a release's output is kept: files of at most ``max_bytes``, ``files`` in
    all (the newest and ``files - 1`` rotated ones)."""

    max_bytes: int = DEFAULT_LOG_MAX_BYTES
    files: int = DEFAULT_LOG_FILES


DEFAULT_LOG_LIMITS = LogLimits()


def start_log_keeper(
    log: Path, limits: LogLimits, environment: str, deployment_id: int
) -> tuple[int, Any]:
    """A log keeper appending a release's output to ``log``: the pipe's write end (for the
    caller to give its processes, then close) and the keeper's ``Popen``.

    The keeper carries the release's ``CONVEYOR_DEPLOYMENT_ID``, as the release's processes
    do: a run's orphan killer spares it. Raises ``DeployError`` if it cannot be started.
    """
    env = {k: v for k, v in os.environ.items() if k != RUN_TOKEN_VARIABLE}
    env.update({"CONVEYOR_ENVIRONMENT": environment, "CONVEYOR_DEPLOYMENT_ID": str(deployment_id)})
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        return start_keeper(log, limits.max_bytes, limits.files, env)
    except OSError as exc:
        raise DeployError(
            f"cannot start the log keeper of deployment {deployment_id}: {exc.strerror or exc}",
            hint=f"check that {log.parent} is writable",
        ) from exc


def keep_child(proc: subprocess.Popen[bytes]) -> int:
    """Remember a child we spawned (reaped when polled, never dropped while it runs); its
    start time."""
    start_time = process_start_time(proc.pid) or 0  # ours and unreaped: always there
    with _children_lock:
        _children[proc.pid] = (start_time, proc)
    return start_time


def await_keeper(keeper: tuple[int, int] | None, timeout_s: float = KEEPER_DRAIN_S) -> None:
    """Give the log keeper of a release whose processes ended up to ``timeout_s`` to write
    what is left in its pipe (it ends then); one still held open by a leftover is not waited
    for longer."""
    if keeper is None:
        return
    pid, start_time = keeper
    deadline = time.monotonic() + timeout_s
    while _reap(pid, start_time) is None and process_alive(pid, start_time):
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)


class ProcessTarget:
    """Target port implementation: the release runs as a local service on a fixed port."""

    stops_releases = True

    def __init__(
        self,
        env_dir: Path,
        command: str,
        *,
        port: int,
        health_http: str | None = None,
        health_command: str | None = None,
        stop_timeout_s: float = 10.0,
        base_env: Mapping[str, str] | None = None,
        logs: LogLimits = DEFAULT_LOG_LIMITS,
    ) -> None:
        self._env_dir = Path(env_dir)
        self._logs = logs
        self._command = command
        self._port = port
        self._health_path = None
        if health_http is not None:
            self._health_path = health_http if health_http.startswith("/") else "/" + health_http
        self._health_command = health_command
        self._stop_timeout_s = stop_timeout_s
        self._base_env = base_env

    # -- Target -------------------------------------------------------------------------------

    def start(self, release: Release, previous: Release | None) -> None:
        """Spawn the service for ``release`` and record it; does not wait for it to be ready.

        ``previous`` is not used: the caller stopped it. A recorded instance of ``release``
        itself is stopped first.
        """
        del previous
        self.stop(release)
        if _port_in_use(self._port):
            raise DeployError(
                f"cannot start {_name(release)}: port {self._port} on 127.0.0.1 is already in use",
                hint=f"stop the program listening on it (`ss -ltnp 'sport = :{self._port}'` "
                "shows it) or give the environment another port",
            )
        log = self._log_path(release)
        env = release_env(self._base_env, release, {"PORT": str(self._port)})
        write_fd, keeper = start_log_keeper(
            log, self._logs, release.environment, release.deployment_id
        )
        say(
            write_fd, f"{_now()}: starting {_name(release)} ({release.digest}) on port {self._port}"
        )
        keeper_start = keep_child(keeper)
        try:
            proc = subprocess.Popen(
                [*BASH, "-c", self._command],
                cwd=release.folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise DeployError(
                f"cannot start {_name(release)} in {release.folder}: {exc.strerror or exc}",
                hint="check that the release folder exists and that bash is installed",
            ) from exc
        finally:
            os.close(write_fd)  # the keeper ends when the service's processes are all gone
        start_time = process_start_time(proc.pid)  # an unreaped child of ours: always there
        if start_time is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise DeployError(
                f"cannot start {_name(release)}: /proc/{proc.pid}/stat cannot be read",
                hint="Conveyor's process target needs Linux with /proc mounted",
            )
        with _children_lock:
            _children[proc.pid] = (start_time, proc)
        state = {
            "pid": proc.pid,
            "start_time": start_time,
            "port": self._port,
            "digest": release.digest,
            "started_at": _now(),
            "keeper": [keeper.pid, keeper_start],
        }
        try:
            _write_json_atomically(self._state_path(release), state)
        except OSError as exc:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise DeployError(
                f"cannot record {_name(release)} in {self._state_path(release)}: "
                f"{exc.strerror or exc}; it was stopped",
                hint="check that the environment folder is writable",
            ) from exc

    def check(
        self, release: Release, timeout_s: float, cancelled: Callable[[], bool] = lambda: False
    ) -> Health:
        """Poll until the service is healthy, exits, ``timeout_s`` runs out or ``cancelled()``."""
        state = self._read_state(release)
        if state is None:
            return Health(False, f"{_name(release)} is not running (it has no record)")
        log = self._log_path(release)
        env = release_env(self._base_env, release, {"PORT": str(self._port)})
        began = time.monotonic()
        deadline = began + timeout_s
        while True:
            exited = _leader_exit(state.pid, state.start_time)
            if exited is not None:
                await_keeper(state.keeper)
                detail = f"the process {exited} before it was healthy; see {log}"
                tail = log_tail(log)
                return Health(False, f"{detail}\n{tail}" if tail else detail)
            if cancelled():
                return Health(False, CUT_SHORT, cut_short=True)
            try:
                ok, last = self._probe(release, env, state, began, deadline, cancelled)
            except DeployCancelled:
                return Health(False, CUT_SHORT, cut_short=True)
            if ok and _leader_exit(state.pid, state.start_time) is None:
                return Health(True, last)  # answered while our own process runs (not another)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(_POLL_S, remaining))
        if self._health_path is not None:
            what = f"GET {self._url()}{self._health_path.lstrip('/')}"
        elif self._health_command is not None:
            what = "the health command"
        else:
            return Health(
                False,
                f"the process had not been running for {_ALIVE_FOR_S:g} s within "
                f"{_secs(timeout_s)} s",
            )
        return Health(False, f"no healthy answer from {what} within {_secs(timeout_s)} s ({last})")

    def stop(self, release: Release) -> None:
        """Stop the recorded service of ``release`` (SIGTERM, then SIGKILL) and forget it."""
        path = self._state_path(release)
        state = self._read_state(release)
        if state is None:
            return
        if _pid_held(state.pid, state.start_time):
            _signal_group(state.pid, signal.SIGTERM)
            if not _wait_group_gone(state.pid, self._stop_timeout_s):
                _signal_group(state.pid, signal.SIGKILL)
                if not _wait_group_gone(state.pid, _KILL_WAIT_S):
                    raise DeployError(
                        f"cannot stop {_name(release)}: process group {state.pid} still runs "
                        "after SIGKILL",
                        hint=f"look at it with `ps -o pid,stat,cmd -s {state.pid}`",
                    )
        _reap(state.pid, state.start_time)
        await_keeper(state.keeper)
        path.unlink(missing_ok=True)

    def restore(self, previous: Release, failed: Release) -> None:
        """Start ``previous`` again (its release folder is still in place)."""
        del failed
        self.start(previous, None)

    def describe(self, release: Release) -> dict[str, Any]:
        """``running``, ``pid`` (while running), ``url`` and ``log`` of ``release``."""
        state = self._read_state(release)
        running = state is not None and process_alive(state.pid, state.start_time)
        return {
            "running": running,
            "pid": state.pid if state is not None and running else None,
            "url": self._url(),
            "log": str(self._log_path(release)),
        }

    # -- internals ----------------------------------------------------------------------------

    def _url(self) -> str:
        return f"http://127.0.0.1:{self._port}/"

    def _log_path(self, release: Release) -> Path:
        return self._env_dir / "logs" / f"{release.deployment_id}.log"

    def _state_path(self, release: Release) -> Path:
        return self._env_dir / "run" / f"{release.deployment_id}.json"

    def _read_state(self, release: Release) -> _State | None:
        path = self._state_path(release)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return _State(
                pid=int(data["pid"]),
                start_time=int(data["start_time"]),
                port=int(data["port"]),
                digest=str(data["digest"]),
                started_at=str(data["started_at"]),
                keeper=_pair(data.get("keeper")),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as exc:
            raise DeployError(
                f"the record of {_name(release)} in {path} is unreadable ({exc})",
                hint="stop the service by hand if it still runs, then remove that file",
            ) from exc

    def _probe(
        self,
        release: Release,
        env: Mapping[str, str],
        state: _State,
        began: float,
        deadline: float,
        cancelled: Callable[[], bool],
    ) -> tuple[bool, str]:
        """One health probe: (healthy, what was observed); ``DeployCancelled`` if
        ``cancelled()`` stopped the health command."""
        elapsed = time.monotonic() - began
        remaining = deadline - time.monotonic()
        if self._health_path is not None:
            return _probe_http(self._port, self._health_path, min(_HTTP_TRY_S, remaining), elapsed)
        if self._health_command is not None:
            with tempfile.TemporaryFile() as out:
                try:
                    code = run_bounded(
                        [*BASH, "-c", self._health_command],
                        cwd=release.folder,
                        env=env,
                        stdout=out,
                        timeout_s=max(0.5, min(_COMMAND_TRY_S, remaining)),
                        cancelled=cancelled,
                    )
                except OSError as exc:
                    raise DeployError(
                        f"cannot run the health command in {release.folder}: {exc.strerror or exc}",
                        hint="check that the release folder exists and that bash is installed",
                    ) from exc
                if code == 0:
                    return True, f"the health command succeeded in {elapsed:.1f} s"
                last_line = (file_tail(out, 1) or "no output").strip()
            return False, f"last: {describe_exit(code)}: {last_line}"
        age = (datetime.now(UTC) - datetime.fromisoformat(state.started_at)).total_seconds()
        if age >= _ALIVE_FOR_S:
            return True, f"the process has been running for {age:.1f} s (no health check is set)"
        return False, f"running for {age:.1f} s"


# -- shared helpers ---------------------------------------------------------------------------


def release_env(
    base_env: Mapping[str, str] | None, release: Release, extra: Mapping[str, str]
) -> dict[str, str]:
    """``base_env`` (or ``os.environ``) with ``CONVEYOR_*`` describing ``release``, and ``extra``.

    ``CONVEYOR_RUN_TOKEN`` is removed: what a target starts is not a run's leftover.
    """
    env = dict(os.environ if base_env is None else base_env)
    env.pop(RUN_TOKEN_VARIABLE, None)
    env.update(
        {
            "CONVEYOR_ARTIFACT_PATH": release.artifact_path,
            "CONVEYOR_ARTIFACT_DIGEST": release.digest,
            "CONVEYOR_ENVIRONMENT": release.environment,
            "CONVEYOR_DEPLOYMENT_ID": str(release.deployment_id),
            "CONVEYOR_REVISION": release.revision,
        }
    )
    env.update(extra)
    return env


def run_bounded(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    stdout: IO[bytes] | int,
    timeout_s: float,
    cancelled: Callable[[], bool] | None = None,
) -> int | None:
    """Run ``argv`` in a new session, output to ``stdout``; its exit code (negative: a signal).

    Past ``timeout_s`` (or if we are interrupted) the whole process group is terminated:
    SIGTERM, a short grace, SIGKILL; returns ``None`` on timeout. So it is, too, as soon as
    ``cancelled()`` says so (looked at every ``_CANCEL_POLL_S``), and then ``DeployCancelled``
    is raised. Raises ``OSError`` if the process cannot be spawned. Processes it leaves behind
    after a normal exit are left alone.
    """
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    stopped = False
    try:
        while not stopped:
            remaining = deadline - time.monotonic()
            step = remaining if cancelled is None else min(remaining, _CANCEL_POLL_S)
            try:
                return proc.wait(timeout=max(0.0, step))
            except subprocess.TimeoutExpired:
                pass
            stopped = cancelled is not None and cancelled()
            if time.monotonic() >= deadline:
                break
    except BaseException:
        _terminate_child_group(proc, 0.0)
        raise
    if proc.poll() is not None:  # it ended as the deadline or the cancel came: its own end
        return proc.returncode
    # Outside the try: once the group is reaped, signalling it again could hit a reused id.
    _terminate_child_group(proc, _TERM_GRACE_S)
    if stopped:
        raise DeployCancelled("the script was stopped (Ctrl-C or SIGTERM)")
    return None


def describe_exit(code: int | None) -> str:
    """``exited with code N``, ``was killed by signal SIGX``, or for ``None`` ``timed out``."""
    if code is None:
        return "did not finish in time and was killed"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def log_tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines of the log at ``path``, neutralised and indented ("" if none)."""
    try:
        with open(path, "rb") as handle:
            return file_tail(handle, lines, indent="  | ")
    except OSError:
        return ""


def file_tail(handle: IO[bytes], lines: int, *, indent: str = "") -> str:
    """The last ``lines`` non-empty lines of an open file (its last 8 KiB), neutralised."""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 8192))
    text = neutralise(handle.read().decode("utf-8", "replace"))
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(indent + line for line in kept)


def _name(release: Release) -> str:
    return f"release {release.deployment_id} of {release.environment}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _secs(value: float) -> str:
    return f"{value:g}"


def _pair(value: Any) -> tuple[int, int] | None:
    """``[pid, start_time]`` as recorded, or ``None``."""
    if value is None:
        return None
    pid, start_time = value
    return int(pid), int(start_time)


def _stat(pid: int) -> list[str] | None:
    """Fields 3 and after of ``/proc/<pid>/stat`` (index ``N - 3`` is field N), if it exists."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    end = data.rfind(b")")  # field 2, the command name, is in parentheses and may hold anything
    fields = data[end + 2 :].decode("ascii", "replace").split()
    return fields if end >= 0 and len(fields) >= 20 else None


def _pid_held(pid: int, start_time: int) -> bool:
    """Whether ``pid`` is still the recorded process, possibly a zombie (so the id is not free)."""
    fields = _stat(pid)
    return fields is not None and int(fields[19]) == start_time and pid not in (1, os.getpid())


def _reap(pid: int, start_time: int) -> int | None:
    """Reap ``pid`` if it is a service we spawned that has exited; its exit code, if known."""
    with _children_lock:
        entry = _children.get(pid)
        if entry is None or entry[0] != start_time:
            return None
        return entry[1].poll()


def _leader_exit(pid: int, start_time: int) -> str | None:
    """``None`` while the service's leader runs, else how it ended (``exited with code 3``)."""
    fields = _stat(pid)
    same = fields is not None and int(fields[19]) == start_time
    if same and fields is not None and fields[0] not in _DEAD_STATES:
        return None
    if same:
        # A zombie: its id cannot be reused yet, so the group is still the service's. Kill what
        # it left behind before reaping it.
        _signal_group(pid, signal.SIGKILL)
    code = _reap(pid, start_time)
    return describe_exit(code) if code is not None else "ended (exit code unknown)"


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_running(pgid: int) -> bool:
    """Whether a process other than a zombie is in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    wanted = str(pgid)
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                fields = _stat(int(entry.name))
                if fields is not None and fields[2] == wanted and fields[0] not in _DEAD_STATES:
                    return True
    return False


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _group_running(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate_child_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the group of our child ``proc``, wait ``grace_s`` for it, SIGKILL, reap.

    The leader is reaped last: until then its id cannot be reused, so signalling the group is
    safe.
    """
    if grace_s > 0:
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            if os.waitid(os.P_PID, proc.pid, flags) is not None:
                break
            time.sleep(0.05)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _probe_http(port: int, path: str, timeout_s: float, elapsed: float) -> tuple[bool, str]:
    url = f"http://127.0.0.1:{port}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=max(0.1, timeout_s)) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    except urllib.error.URLError as exc:
        reason = exc.reason
        return False, "last: " + _network_reason(reason if isinstance(reason, Exception) else exc)
    except (OSError, http.client.HTTPException) as exc:
        return False, "last: " + _network_reason(exc)
    if 200 <= status < 300:
        return True, f"GET {path} answered {status} in {elapsed:.1f} s"
    return False, f"last: answered {status}"


def _network_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without an answer"
    return neutralise(str(exc)) or type(exc).__name__


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
