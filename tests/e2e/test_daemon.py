"""The resident Conveyor (``conveyor daemon``): commands handed to it run as they would alone."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Repo, Result

SLEEPER = "sleep 67.25"
PYTHON = sys.executable  # a job process no other test starts, to find it in /proc


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short: a Unix socket's path holds at most 107 bytes, and pytest's tmp_path is long.
    folder = Path(tempfile.mkdtemp(prefix="cvd-", dir="/tmp"))
    try:
        yield folder
    finally:
        _kill_residents_under(folder)  # a test that failed half-way may have left one
        shutil.rmtree(folder, ignore_errors=True)


def _kill_residents_under(folder: Path) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"conveyor.cli.daemon" in cmdline and str(folder).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


class Resident:
    """A resident Conveyor for one test, on a socket of its own."""

    def __init__(self, repo: Repo, folder: Path) -> None:
        self.repo = repo
        self.socket = folder / "d" / "daemon.sock"
        self.env = {"CONVEYOR_DAEMON_SOCKET": str(self.socket)}

    def conveyor(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return self.repo.conveyor(*args, env={**self.env, **(env or {})})

    def status(self) -> dict[str, Any]:
        result = self.repo.conveyor("daemon", "status", "--json", env=self.env)
        return dict(json.loads(result.out))

    def bash(self, script: str) -> subprocess.CompletedProcess[str]:
        """``script`` run by bash in the repository, ``$CONVEYOR`` the command."""
        return subprocess.run(
            ["bash", "-c", script],
            cwd=self.repo.path,
            env={**self.repo.env, **self.env, "CONVEYOR": f"{PYTHON} -m conveyor"},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args],
            cwd=self.repo.path,
            env={**self.repo.env, **self.env},
            stdin=subprocess.DEVNULL,
            **kwargs,
        )


@pytest.fixture
def resident(repo: Repo, socket_dir: Path) -> Iterator[Resident]:
    daemon = Resident(repo, socket_dir)
    started = repo.conveyor("daemon", "start", "--idle-timeout", "10m", env=daemon.env)
    assert started.code == 0, started.err
    pid = int(daemon.status()["pid"])
    try:
        yield daemon
    finally:
        repo.conveyor("daemon", "stop", env=daemon.env)
        with_pid_gone(pid)


def with_pid_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} still running")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def _sleepers() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()  # sleep, or /usr/bin/sleep
                if cmdline.endswith(SLEEPER.replace(" ", "\0").encode() + b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_for(predicate: Callable[[], object], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_command_runs_in_the_resident_process_as_it_would_alone(
    repo: Repo, resident: Resident
) -> None:
    repo.pipeline(
        """\
        pipeline: p
        stages:
          - name: s
            jobs:
              show:
                run: |
                  echo "from=$FROM_CLIENT umask=$(umask) dir=$(basename "$PWD")"
                  ulimit -n
        """
    )
    umask = os.umask(0o027)
    try:
        through = resident.conveyor("run", "--progress", "plain", env={"FROM_CLIENT": "yes"})
    finally:
        os.umask(umask)
    assert through.code == 0, through.err
    assert "from=yes umask=0027 dir=1" in through.out
    assert int(resident.status()["commands_served"]) == 1

    alone = repo.conveyor("run", "--progress", "plain", "--no-cache", env={"FROM_CLIENT": "yes"})
    assert alone.code == 0
    assert alone.out.replace("run 2", "run 1").split("\n")[1:3] == through.out.split("\n")[1:3]

    # Usage errors, exit codes and messages are those of a process of its own.
    repo.write("bad.yml", "pipeline: p\nstages:\n  - name: s\n    jobs: {a: {runn: x}}\n")
    bad = resident.conveyor("validate", "-f", "bad.yml")
    assert (bad.code, bad.err) == (2, repo.conveyor("validate", "-f", "bad.yml").err)
    assert "bad.yml:4:" in bad.err
    usage = resident.conveyor("runs", "show")
    assert (usage.code, usage.err) == (2, repo.conveyor("runs", "show").err)
    assert "Usage: conveyor runs show" in usage.err
    assert int(resident.status()["commands_served"]) == 3


def test_ctrl_c_to_the_client_cancels_the_run(repo: Repo, resident: Resident) -> None:
    repo.pipeline(
        f"""\
        pipeline: p
        stages:
          - name: s
            jobs:
              long: {{run: "echo go; {SLEEPER}"}}
        """
    )
    client = resident.popen("run", "--progress", "plain", stdout=subprocess.PIPE)
    assert client.stdout is not None
    for line in client.stdout:
        if b"long | go" in line:
            break
    assert _sleepers()
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=30) == 130
    client.stdout.close()
    assert repo.show()["status"] == "cancelled"
    assert not _sleepers()


def _long_run(repo: Repo, resident: Resident) -> tuple[subprocess.Popen[bytes], int]:
    """A run through the resident process whose job sleeps; its client and its worker."""
    repo.pipeline(
        f"""\
        pipeline: p
        stages:
          - name: s
            jobs:
              long: {{run: "echo $PPID > ../../../worker.pid; {SLEEPER}"}}
        """
    )
    client = resident.popen("run", "--progress", "quiet", process_group=0)  # see ctrl_z
    pid_file = repo.path / "worker.pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
    return client, int(pid_file.read_text())


@pytest.mark.slow
def test_kill_9_of_the_client_ends_its_worker_as_it_would_end_the_run(
    repo: Repo, resident: Resident
) -> None:
    client, worker = _long_run(repo, resident)
    assert _alive(worker)
    client.kill()
    client.wait()
    with_pid_gone(worker)
    wait_for(lambda: resident.status()["commands_running"] == 0)
    # As after kill -9 of a conveyor process of its own: the next command finds the run
    # orphaned, ends its jobs and records it interrupted.
    assert repo.show()["status"] == "interrupted"
    wait_for(lambda: not _sleepers())


def test_ctrl_z_stops_the_worker_with_the_client(repo: Repo, resident: Resident) -> None:
    repo.pipeline(
        """\
        pipeline: p
        stages:
          - name: s
            jobs:
              wait:
                run: |
                  echo $PPID > ../../../worker.pid
                  while [ ! -e ../../../go ]; do sleep 0.05; done
        """
    )
    # A process group of its own whose parent is in the same session: not orphaned, so that
    # the terminal stop signals are not discarded (as for a shell's foreground job).
    client = resident.popen("run", "--progress", "quiet", process_group=0)
    pid_file = repo.path / "worker.pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
    worker = int(pid_file.read_text())
    try:
        client.send_signal(signal.SIGTSTP)
        wait_for(lambda: _state(client.pid) == "T" and _state(worker) == "T")
        client.send_signal(signal.SIGCONT)
        wait_for(lambda: _state(worker) != "T")
    finally:
        (repo.path / "go").touch()
        client.send_signal(signal.SIGCONT)
    assert client.wait(timeout=30) == 0
    assert repo.show()["status"] == "succeeded"


def _own_terminal() -> None:
    os.setsid()
    fcntl.ioctl(1, termios.TIOCSCTTY, 0)


def test_the_live_view_on_a_terminal(repo: Repo, resident: Resident) -> None:
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: 'echo hi'}\n")
    main, side = pty.openpty()
    try:
        # In a session of its own whose controlling terminal it is, as in a terminal window.
        client = resident.popen("run", stdout=side, stderr=side, preexec_fn=_own_terminal)
        os.close(side)
        shown = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal's other side closed
                break
            if not chunk:
                break
            shown += chunk
        assert client.wait(timeout=30) == 0
    finally:
        os.close(main)
    assert b"\x1b[" in shown  # rich drew it: the worker saw a terminal on its standard output
    assert b"succeeded" in shown
    assert int(resident.status()["commands_served"]) == 1


def test_what_it_cannot_run_alike_the_client_runs_itself(repo: Repo, resident: Resident) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::ResourceWarning", "-m", "conveyor", "runs", "list"],
        cwd=repo.path,
        env={**repo.env, **resident.env},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    status = resident.status()
    assert (status["commands_served"], status["fallbacks"]) == (0, 1)
    assert status["last_fallback"] == "another warning options"


def test_changed_code_sends_commands_back_and_stops_it(repo: Repo, socket_dir: Path) -> None:
    extra = socket_dir / "site"
    extra.mkdir()
    env = {"PYTHONPATH": str(extra)}
    daemon = Resident(repo, socket_dir)
    daemon.env.update(env)
    assert repo.conveyor("daemon", "start", env=daemon.env).code == 0
    pid = int(daemon.status()["pid"])
    assert daemon.conveyor("runs", "list").code == 0
    (extra / "upgraded.py").write_text("")  # a package installed on the module path
    assert daemon.conveyor("runs", "list").code == 0
    with_pid_gone(pid)
    assert not daemon.socket.exists()
    stopped = repo.conveyor("daemon", "status", env=daemon.env)
    assert stopped.code == 1 and "not running" in stopped.out
    assert "its code changed on disk" in (daemon.socket.parent / "daemon.sock.log").read_text()


@pytest.mark.slow
def test_start_stop_status_and_idle_timeout(repo: Repo, socket_dir: Path) -> None:
    daemon = Resident(repo, socket_dir)
    assert repo.conveyor("daemon", "status", env=daemon.env).code == 1
    first = repo.conveyor("daemon", "start", "--idle-timeout", "1s", env=daemon.env)
    assert first.code == 0 and "started" in first.out, first.err
    assert (daemon.socket.parent.stat().st_mode & 0o777) == 0o700
    again = repo.conveyor("daemon", "start", env=daemon.env)
    assert again.code == 0 and "already running" in again.out
    pid = int(daemon.status()["pid"])
    with_pid_gone(pid)  # idle for a second
    assert not daemon.socket.exists()
    assert repo.conveyor("daemon", "start", env=daemon.env).code == 0
    pid = int(daemon.status()["pid"])
    stopped = repo.conveyor("daemon", "stop", env=daemon.env)
    assert stopped.code == 0 and f"stopped (pid {pid})" in stopped.out
    assert not _alive(pid) and not daemon.socket.exists()
    assert repo.conveyor("daemon", "stop", env=daemon.env).out.strip() == (
        "resident Conveyor not running"
    )
    assert daemon.conveyor("runs", "list").code == 0


def test_bad_socket_places_are_refused(repo: Repo, socket_dir: Path) -> None:
    shared = socket_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    refused = repo.conveyor(
        "daemon", "start", env={"CONVEYOR_DAEMON_SOCKET": str(shared / "daemon.sock")}
    )
    assert refused.code == 2 and "can be written by other users" in refused.err
    long = str(socket_dir / ("x" * 120) / "daemon.sock")
    too_long = repo.conveyor("daemon", "start", env={"CONVEYOR_DAEMON_SOCKET": long})
    assert too_long.code == 2 and "more than a Unix socket allows" in too_long.err
    relative = repo.conveyor("daemon", "status", env={"CONVEYOR_DAEMON_SOCKET": "d.sock"})
    assert relative.code == 2 and "must be absolute" in relative.err
    off = repo.conveyor("daemon", "start", env={"CONVEYOR_DAEMON_SOCKET": ""})
    assert off.code == 2 and "turned off" in off.err
    # A command with nothing listening at the socket runs by itself.
    alone = repo.conveyor(
        "runs", "list", env={"CONVEYOR_DAEMON_SOCKET": str(socket_dir / "none.sock")}
    )
    assert alone.code == 0, alone.err


def test_the_worker_takes_the_clients_other_descriptors_and_signals(
    repo: Repo, resident: Resident, tmp_path: Path
) -> None:
    repo.pipeline(
        """\
        pipeline: p
        stages:
          - name: s
            jobs:
              show:
                run: |
                  echo "to the caller's descriptor" >&"$EXTRA_FD"
                  grep -E '^Sig(Ign|Blk)' /proc/self/status
        """
    )
    outputs = []
    for env in (resident.env, {"CONVEYOR_DAEMON_SOCKET": ""}):
        target = tmp_path / "extra.txt"
        with open(target, "w") as extra:
            proc = subprocess.run(
                [sys.executable, "-m", "conveyor", "run", "--no-cache", "--progress", "plain"],
                cwd=repo.path,
                env={**repo.env, **env, "EXTRA_FD": str(extra.fileno())},
                pass_fds=(extra.fileno(),),
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                # as under nohup, with SIGUSR1 blocked by whoever started it
                preexec_fn=_ignore_hangups,
            )
        assert proc.returncode == 0, proc.stderr
        assert target.read_text() == "to the caller's descriptor\n"
        outputs.append([line for line in proc.stdout.splitlines() if "Sig" in line])
    assert outputs[0] == outputs[1]
    assert int(outputs[0][1].split()[-1], 16) & (1 << (signal.SIGHUP - 1))
    assert int(resident.status()["commands_served"]) == 1


def _ignore_hangups() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})


@pytest.mark.slow
def test_a_death_by_signal_is_the_clients_too(repo: Repo, resident: Resident) -> None:
    repo.pipeline(
        f"""\
        pipeline: p
        stages:
          - name: s
            jobs:
              long: {{run: "echo go; {SLEEPER}"}}
        """
    )
    codes = []
    for env in (resident.env, {"CONVEYOR_DAEMON_SOCKET": ""}):
        client = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "run", "--progress", "plain"],
            cwd=repo.path,
            env={**repo.env, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            # SIGHUP as a terminal's client has it, even when the suite runs under nohup.
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
        )
        assert client.stdout is not None
        for line in client.stdout:
            if b"long | go" in line:
                break
        client.send_signal(signal.SIGHUP)
        codes.append(client.wait(timeout=30))
        client.stdout.close()
        repo.conveyor("runs", "list")  # recovers the run, ends its job
        wait_for(lambda: not _sleepers())
    assert codes == [-signal.SIGHUP, -signal.SIGHUP]


def test_a_repository_file_never_shadows_a_module_in_the_worker(
    repo: Repo, resident: Resident
) -> None:
    # A run that publishes an artifact imports ``_strptime`` (provenance) while it works in
    # the run's checkout; a module of that name committed there must not be the one loaded.
    repo.write("_strptime.py", "import pathlib\npathlib.Path('SHADOWED').touch()\n")
    repo.pipeline(
        """\
        pipeline: p
        artifacts:
          app: {path: dist/app.txt}
        stages:
          - name: s
            jobs:
              build: {run: "mkdir -p dist && echo app > dist/app.txt", outputs: [app]}
        """
    )
    result = resident.conveyor("run", "--progress", "quiet")
    assert result.code == 0, result.err
    assert not list(repo.path.rglob("SHADOWED"))
    assert int(resident.status()["commands_served"]) == 1
    # Nor in a process of its own, though `python -m` puts the current folder on the path.
    alone = repo.conveyor("run", "--progress", "quiet", "--no-cache")
    assert alone.code == 0, alone.err
    assert not list(repo.path.rglob("SHADOWED"))


def test_start_up_settings_that_differ_make_the_client_run_it(
    repo: Repo, resident: Resident
) -> None:
    malloc = resident.conveyor("runs", "list", env={"MALLOC_ARENA_MAX": "2"})
    assert malloc.code == 0, malloc.err
    assert resident.status()["last_fallback"] == (
        "another MALLOC_ARENA_MAX (read when a process starts)"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "runs", "list"],
        cwd=repo.path,
        env={**repo.env, **resident.env},
        capture_output=True,
        stdin=subprocess.DEVNULL,
        preexec_fn=_less_important,
    )
    assert proc.returncode == 0, proc.stderr
    status = resident.status()
    assert status["last_fallback"] == "another OOM score adjustment"
    assert (status["commands_served"], status["fallbacks"]) == (0, 2)


def _less_important() -> None:
    Path("/proc/self/oom_score_adj").write_text("500")


def _daemon_pid(daemon: Resident) -> int:
    return int(daemon.status()["pid"])


def test_ctrl_c_before_the_worker_exists_runs_nothing(repo: Repo, resident: Resident) -> None:
    repo.pipeline(
        "pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: 'touch ../../../RAN'}\n"
    )
    daemon = _daemon_pid(resident)
    os.kill(daemon, signal.SIGSTOP)  # it accepts nothing now: the client waits for it
    try:
        client = resident.popen("run", stderr=subprocess.PIPE)
        time.sleep(0.5)
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=10)
        assert client.returncode == 130 and b"cancelled" in err
    finally:
        os.kill(daemon, signal.SIGCONT)
    wait_for(lambda: resident.status()["commands_running"] == 0)
    time.sleep(0.3)
    assert not (repo.path / "RAN").exists()
    assert "no runs" in repo.conveyor("runs", "list").out.lower()


@pytest.mark.slow
def test_a_silent_resident_process_is_given_up_for(repo: Repo, resident: Resident) -> None:
    daemon = _daemon_pid(resident)
    os.kill(daemon, signal.SIGSTOP)
    try:
        started = time.monotonic()
        alone = resident.conveyor("runs", "list")
        assert alone.code == 0, alone.err
        assert time.monotonic() - started < 15
    finally:
        os.kill(daemon, signal.SIGCONT)


@pytest.mark.slow
def test_ctrl_z_then_kill_9_of_the_client_ends_the_stopped_worker(
    repo: Repo, resident: Resident
) -> None:
    client, worker = _long_run(repo, resident)
    client.send_signal(signal.SIGTSTP)
    wait_for(lambda: _state(worker) == "T")
    client.kill()
    client.wait()
    with_pid_gone(worker)
    assert repo.show()["status"] == "interrupted"
    wait_for(lambda: not _sleepers())


def test_a_job_may_stop_the_resident_process_that_runs_it(repo: Repo, socket_dir: Path) -> None:
    # Jobs get no CONVEYOR_ variables: the job finds the socket where the user's default is.
    runtime = socket_dir / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in repo.env.items() if k != "CONVEYOR_DAEMON_SOCKET"}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    repo.pipeline(
        f"""\
        pipeline: p
        stages:
          - name: s
            jobs:
              stop: {{run: "{sys.executable} -m conveyor daemon stop", timeout: 60s}}
        """
    )

    def conveyor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "conveyor", *args],
            cwd=repo.path,
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )

    assert conveyor("daemon", "start").returncode == 0
    ran = conveyor("run", "--progress", "plain")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "it ends when its commands end, this one among them" in ran.stdout
    assert conveyor("daemon", "status").returncode == 1  # it ended with the run


@pytest.mark.slow
def test_unbuffered_output_to_a_closed_pipe_as_alone(repo: Repo, socket_dir: Path) -> None:
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      big: {run: 'seq 200000'}\n")
    daemon = Resident(repo, socket_dir)
    daemon.env["PYTHONUNBUFFERED"] = "1"
    assert repo.conveyor("daemon", "start", env=daemon.env).code == 0
    try:
        assert daemon.conveyor("run", "--progress", "quiet").code == 0
        codes = []
        for socket_env in (str(daemon.socket), ""):
            env = {**repo.env, **daemon.env, "CONVEYOR_DAEMON_SOCKET": socket_env}
            piped = subprocess.run(
                [
                    "bash",
                    "-c",
                    f"{sys.executable} -m conveyor logs latest big | head -1;"
                    " echo ${PIPESTATUS[0]}",
                ],
                cwd=repo.path,
                env=env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            assert piped.stdout.splitlines()[0] == "1"
            codes.append(piped.stdout.splitlines()[-1])
        assert codes[0] == codes[1]
        assert int(daemon.status()["commands_served"]) == 2
    finally:
        repo.conveyor("daemon", "stop", env=daemon.env)


@pytest.mark.slow
def test_two_starts_at_once_and_a_restart_while_a_command_runs(
    repo: Repo, socket_dir: Path
) -> None:
    daemon = Resident(repo, socket_dir)
    both = [
        subprocess.Popen(
            [sys.executable, "-m", "conveyor", "daemon", "start"],
            cwd=repo.path,
            env={**repo.env, **daemon.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [process.communicate(timeout=60) for process in both]
    assert [process.returncode for process in both] == [0, 0], outs
    said = sorted(out.split(" (")[0] for out, _ in outs)
    assert said == ["resident Conveyor already running", "resident Conveyor started"]
    first = _daemon_pid(daemon)
    repo.pipeline(f"pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {{run: '{SLEEPER}'}}\n")
    client = daemon.popen("run", "--progress", "quiet")
    wait_for(_sleepers)
    stopping = repo.conveyor("daemon", "stop", "--no-wait", env=daemon.env)
    assert "stopping" in stopping.out
    again = repo.conveyor("daemon", "start", env=daemon.env)
    assert again.code == 0 and "started" in again.out, again.err
    second = _daemon_pid(daemon)
    assert second != first and _alive(first)  # the first ends when its run ends
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=30) == 130
    with_pid_gone(first)
    assert repo.conveyor("daemon", "stop", env=daemon.env).code == 0
    with_pid_gone(second)


@pytest.mark.slow
def test_requests_that_go_wrong_leave_the_resident_process_serving(
    repo: Repo, socket_dir: Path
) -> None:
    daemon = Resident(repo, socket_dir)
    daemon.env["CONVEYOR_DAEMON_SOCKET"] = str(daemon.socket)
    # Started with few descriptors and with signals ignored that its commands must not inherit.
    started = daemon.bash("trap '' USR1 QUIT; ulimit -n 64; $CONVEYOR daemon start")
    assert started.returncode == 0, started.stderr
    pid = _daemon_pid(daemon)
    try:
        # A status request whose asker is gone before the answer.
        from conveyor import launcher

        with socket.socket(socket.AF_UNIX) as asker:
            asker.connect(str(daemon.socket))
            asker.sendall(launcher.frame(b"status"))
        # More connections than it has descriptors for.
        crowd = []
        for _ in range(80):
            extra = socket.socket(socket.AF_UNIX)
            extra.settimeout(2)
            with contextlib.suppress(OSError):
                extra.connect(str(daemon.socket))
            crowd.append(extra)
        time.sleep(0.5)
        for extra in crowd:
            extra.close()
        # A client whose descriptor numbers are above its own limit on them.
        limited = daemon.bash("exec 30>/dev/null; ulimit -n 20; $CONVEYOR validate")
        assert limited.returncode == 2 and "no pipeline file" in limited.stderr.lower(), limited
        repo.pipeline(
            "pipeline: p\nstages:\n  - name: s\n    jobs:\n"
            "      a: {run: 'grep SigIgn /proc/self/status'}\n"
        )
        through = daemon.conveyor("run", "--progress", "plain", "--no-cache")
        alone = repo.conveyor("run", "--progress", "plain", "--no-cache")
        assert through.code == alone.code == 0
        ignored = [line for line in through.out.splitlines() if "SigIgn" in line]
        assert ignored == [line for line in alone.out.splitlines() if "SigIgn" in line]
        status = daemon.status()
        # (the run is handed back: its hard limit on descriptors is above the resident one)
        assert status["pid"] == pid and status["commands_served"] >= 1
        assert "Traceback" not in (daemon.socket.parent / "daemon.sock.log").read_text()
    finally:
        repo.conveyor("daemon", "stop", env=daemon.env)


def test_a_worker_that_cannot_be_the_client_hands_the_command_back(
    repo: Repo, resident: Resident
) -> None:
    # A memory limit: a fork of the resident process maps more than a process of its own.
    limited = resident.bash("ulimit -v 8000000; $CONVEYOR validate")
    assert limited.returncode == 2 and "no pipeline file" in limited.stderr.lower()
    wait_for(lambda: resident.status()["fallbacks"] == 1)
    status = resident.status()
    assert status["commands_served"] == 0
    assert status["last_fallback"] == "the worker could not take the client's state over"


def test_the_log_is_folded_after_the_client_has_its_exit_code(
    repo: Repo, resident: Resident
) -> None:
    # 200 jobs write more than 1 MiB of write-ahead log: the run folds it into the database.
    jobs = "".join(f"      j{i}: {{run: 'true'}}\n" for i in range(200))
    repo.pipeline(f"pipeline: p\nstages:\n  - name: s\n    jobs:\n{jobs}")
    wal = repo.path / ".conveyor" / "conveyor.db-wal"
    ran = resident.conveyor("run", "--no-cache", "--jobs", "4")
    assert ran.code == 0, ran.err
    # Its worker did that after telling the client (who has left): it was not killed for
    # the client's leaving, and the next command finds an empty log.
    deadline = time.monotonic() + 10
    while int(resident.status()["commands_running"]) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wal.stat().st_size == 0
    assert resident.conveyor("audit", "verify").code == 0


def test_housekeeping_is_put_off_only_past_a_resident_workers_report() -> None:
    script = """\
import conveyor.cli.main as m

def main() -> None:
    m.after_report(lambda: print("housekeeping", flush=True))
    print("command", flush=True)

m.main = main
m.entry({report})
"""
    alone = subprocess.run(
        [sys.executable, "-c", script.format(report="")], capture_output=True, text=True
    )
    assert alone.stdout.split() == ["housekeeping", "command"]
    worker = subprocess.run(
        [sys.executable, "-c", script.format(report="lambda code: print('reported', code)")],
        capture_output=True,
        text=True,
    )
    assert worker.stdout.split() == ["command", "reported", "0", "housekeeping"]
