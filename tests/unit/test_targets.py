"""Deployment targets with real processes: a local HTTP service, and user scripts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conveyor.adapters.targets import CommandTarget, ProcessTarget, allocate_port, process_alive
from conveyor.adapters.targets.process import CUT_SHORT, process_start_time
from conveyor.domain.delivery import Health, Release
from conveyor.errors import DeployCancelled, DeployError

SERVICE = textwrap.dedent(
    """
    import http.server, os

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz":
                body = b"ok"
            elif self.path == "/version":
                body = os.environ["CONVEYOR_ARTIFACT_DIGEST"].encode()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = int(os.environ["PORT"])
    print("listening on", port, flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)
PYTHON = shlex.quote(sys.executable)
SERVE = f"exec {PYTHON} service.py"
BASE_ENV = {**os.environ, "CONVEYOR_RUN_TOKEN": "run-secret"}

MakeRelease = Callable[..., Release]


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies."""
    members = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                data = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            fields = data[data.rfind(b")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                members.append(int(entry.name))
    return members


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def http_get(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


@pytest.fixture
def env_dir(tmp_path: Path) -> Iterator[Path]:
    """The environment folder; every process group still recorded in it is killed at the end."""
    path = tmp_path / "environments" / "staging"
    yield path
    for state_file in (path / "run").glob("*.json"):
        state = json.loads(state_file.read_text())
        for pid in live_group_members(state["pid"]):  # the service and anything it left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts itself; their groups are killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def make_release(tmp_path: Path) -> MakeRelease:
    def make(
        deployment_id: int, digest: str = "", *, files: dict[str, str] | None = None
    ) -> Release:
        folder = tmp_path / "releases" / str(deployment_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "service.py").write_text(SERVICE)
        for name, text in (files or {}).items():
            (folder / name).write_text(text)
        return Release(
            environment="staging",
            deployment_id=deployment_id,
            artifact="app",
            digest=digest or f"sha256:{deployment_id:064x}",
            folder=str(folder),
            artifact_path=str(folder),
            revision=f"rev{deployment_id}",
        )

    return make


def recorded_pid(env_dir: Path, release: Release) -> int:
    return int(json.loads((env_dir / "run" / f"{release.deployment_id}.json").read_text())["pid"])


# -- ProcessTarget ----------------------------------------------------------------------------


def test_service_is_started_checked_and_stopped_with_its_whole_group(
    env_dir: Path, make_release: MakeRelease
) -> None:
    port = allocate_port()
    command = f"sleep 300 & env > service.env; {SERVE}"
    target = ProcessTarget(env_dir, command, port=port, health_http="/healthz", base_env=BASE_ENV)
    release = make_release(1, "sha256:" + "ab" * 32)

    target.start(release, None)
    health = target.check(release, 10)

    assert health.ok, health.detail
    assert health.detail.startswith("GET /healthz answered 200 in ")
    assert http_get(port, "/version") == release.digest
    state = json.loads((env_dir / "run" / "1.json").read_text())
    assert state["port"] == port and state["digest"] == release.digest
    pid = state["pid"]
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid
    assert state["start_time"] == process_start_time(pid)
    described = target.describe(release)
    assert described == {
        "running": True,
        "pid": pid,
        "url": f"http://127.0.0.1:{port}/",
        "log": str(env_dir / "logs" / "1.log"),
    }
    seen = dict(
        line.split("=", 1)
        for line in (Path(release.folder) / "service.env").read_text().split("\n")
        if line.startswith(("PORT=", "CONVEYOR_"))
    )
    assert seen == {
        "PORT": str(port),
        "CONVEYOR_ARTIFACT_PATH": release.artifact_path,
        "CONVEYOR_ARTIFACT_DIGEST": release.digest,
        "CONVEYOR_ENVIRONMENT": "staging",
        "CONVEYOR_DEPLOYMENT_ID": "1",
        "CONVEYOR_REVISION": "rev1",
    }
    assert len(live_group_members(pid)) == 2  # the service and its background sleep

    began = time.monotonic()
    target.stop(release)

    assert time.monotonic() - began < 2  # SIGTERM reached the whole group, no SIGKILL needed
    assert live_group_members(pid) == []
    assert not (env_dir / "run" / "1.json").exists()
    assert target.describe(release)["running"] is False
    assert "listening on" in (env_dir / "logs" / "1.log").read_text()
    target.stop(release)  # idempotent


def test_release_that_exits_is_reported_at_once_and_previous_is_restored(
    env_dir: Path, make_release: MakeRelease
) -> None:
    port = allocate_port()
    # The broken release leaves a background process behind: it must not survive the check.
    broken = 'sleep 300 & echo "boom: \x1b[31mno config\x1b[0m" >&2; exit 3'
    command = f"if [ -e broken ]; then {broken}; fi; "
    target = ProcessTarget(env_dir, command + SERVE, port=port, health_http="/healthz")
    previous = make_release(1)
    failed = make_release(2, files={"broken": ""})
    target.start(previous, None)
    assert target.check(previous, 10).ok

    target.stop(previous)
    target.start(failed, previous)
    began = time.monotonic()
    health = target.check(failed, 30)

    assert time.monotonic() - began < 3
    assert not health.ok
    log = env_dir / "logs" / "2.log"
    assert health.detail.startswith(
        f"the process exited with code 3 before it was healthy; see {log}"
    )
    assert "  | boom: no config" in health.detail  # the log tail, without escape sequences
    assert "\x1b" not in health.detail
    assert wait_until(lambda: live_group_members(recorded_pid(env_dir, failed)) == [])

    target.stop(failed)
    target.restore(previous, failed)
    assert target.check(previous, 10).ok
    assert http_get(port, "/version") == previous.digest
    target.stop(previous)


def test_release_that_never_answers_fails_at_the_deadline(
    env_dir: Path, make_release: MakeRelease
) -> None:
    port = allocate_port()
    target = ProcessTarget(env_dir, "exec sleep 300", port=port, health_http="healthz")
    release = make_release(1)
    target.start(release, None)
    pid = recorded_pid(env_dir, release)

    began = time.monotonic()
    health = target.check(release, 0.5)

    assert 0.5 <= time.monotonic() - began < 2
    assert health == type(health)(
        False,
        f"no healthy answer from GET http://127.0.0.1:{port}/healthz within 0.5 s "
        "(last: connection refused)",
    )
    target.stop(release)
    assert live_group_members(pid) == []


def test_health_command_and_plain_liveness(env_dir: Path, make_release: MakeRelease) -> None:
    command = "sleep 0.3; touch ready; exec sleep 300"
    by_command = ProcessTarget(
        env_dir, command, port=allocate_port(), health_command="test -f ready"
    )
    release = make_release(1)
    by_command.start(release, None)
    health = by_command.check(release, 10)
    assert health.ok and health.detail.startswith("the health command succeeded in 0.")
    by_command.stop(release)

    failing = ProcessTarget(
        env_dir, "exec sleep 300", port=allocate_port(), health_command="echo not yet; exit 1"
    )
    failing.start(release, None)
    health = failing.check(release, 0.3)
    assert health.detail == (
        "no healthy answer from the health command within 0.3 s (last: exited with code 1: not yet)"
    )
    failing.stop(release)

    alive = ProcessTarget(env_dir, "exec sleep 300", port=allocate_port())
    alive.start(release, None)
    began = time.monotonic()
    health = alive.check(release, 5)
    assert health.ok and 0.9 < time.monotonic() - began < 2
    assert "running for 1." in health.detail
    alive.stop(release)


def test_service_outlives_the_process_that_started_it(
    env_dir: Path, make_release: MakeRelease
) -> None:
    port = allocate_port()
    release = make_release(1)
    starter = textwrap.dedent(
        f"""
        from pathlib import Path
        from conveyor.adapters.targets import ProcessTarget
        from conveyor.domain.delivery import Release
        release = Release("staging", 1, "app", {release.digest!r}, {release.folder!r},
                          {release.artifact_path!r}, "rev1")
        ProcessTarget(Path({str(env_dir)!r}), {SERVE!r}, port={port}).start(release, None)
        """
    )
    done = subprocess.run([sys.executable, "-c", starter], check=False, timeout=30)
    assert done.returncode == 0
    target = ProcessTarget(env_dir, SERVE, port=port, health_http="/healthz")

    health = target.check(release, 10)

    assert health.ok, health.detail
    assert http_get(port, "/version") == release.digest
    pid = recorded_pid(env_dir, release)
    assert os.getsid(pid) == pid != os.getsid(0)
    target.stop(release)
    assert live_group_members(pid) == []


def test_stop_escalates_to_sigkill(env_dir: Path, make_release: MakeRelease) -> None:
    trapped = env_dir / "trapped"
    command = f"trap '' TERM; : > {shlex.quote(str(trapped))}; exec sleep 300"
    target = ProcessTarget(env_dir, command, port=allocate_port(), stop_timeout_s=0.3)
    release = make_release(1)
    target.start(release, None)
    pid = recorded_pid(env_dir, release)
    assert wait_until(trapped.exists)  # from now on the service ignores SIGTERM

    target.stop(release)

    assert live_group_members(pid) == []  # so SIGKILL ended it


def test_stop_spares_a_recycled_pid(
    env_dir: Path, make_release: MakeRelease, spawned: list[subprocess.Popen[bytes]]
) -> None:
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    spawned.append(stranger)
    assert wait_until(lambda: process_start_time(stranger.pid) is not None)
    start_time = process_start_time(stranger.pid)
    assert start_time is not None
    assert process_alive(stranger.pid, start_time)
    assert not process_alive(stranger.pid, start_time + 1)
    release = make_release(1)
    state = {
        "pid": stranger.pid,
        "start_time": start_time + 1,
        "port": 1,
        "digest": release.digest,
        "started_at": "2020-01-01T00:00:00.000000Z",
    }
    (env_dir / "run").mkdir(parents=True)
    (env_dir / "run" / "1.json").write_text(json.dumps(state))
    target = ProcessTarget(env_dir, SERVE, port=allocate_port())

    assert target.describe(release)["running"] is False
    target.stop(release)

    assert stranger.poll() is None
    assert not (env_dir / "run" / "1.json").exists()


def test_start_refuses_a_busy_port_and_a_missing_folder(
    env_dir: Path, make_release: MakeRelease, tmp_path: Path
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        target = ProcessTarget(env_dir, SERVE, port=port)
        with pytest.raises(DeployError, match=f"port {port} on 127.0.0.1 is already in use"):
            target.start(make_release(1), None)

    release = make_release(2)
    missing = dataclasses.replace(release, folder=str(tmp_path / "gone"))
    target = ProcessTarget(env_dir, SERVE, port=allocate_port())
    with pytest.raises(DeployError, match=r"cannot start release 2 of staging in .*gone"):
        target.start(missing, None)
    assert not (env_dir / "run" / "2.json").exists()


# -- CommandTarget ----------------------------------------------------------------------------

DUMP = 'env | grep "^CONVEYOR_" | sort > "$1-$CONVEYOR_DEPLOYMENT_ID.env"'


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def scripted(env_dir: Path, workdir: Path, **kwargs: object) -> CommandTarget:
    options: dict[str, object] = {
        "deploy": f"set -- deploy; {DUMP}; echo deployed",
        "health": None,
        "rollback": None,
        "workdir": workdir,
        "base_env": BASE_ENV,
        "health_interval_s": 0.05,
    }
    options.update(kwargs)
    return CommandTarget(env_dir, **options)  # type: ignore[arg-type]


def test_scripts_get_the_release_and_its_neighbours(
    env_dir: Path, make_release: MakeRelease, tmp_path: Path
) -> None:
    health = 'n=$(cat tries 2>/dev/null || echo 0); echo $((n + 1)) > tries; [ "$n" -ge 2 ]'
    rollback = f"set -- rollback; {DUMP}"
    target = scripted(env_dir, tmp_path, health=health, rollback=rollback)
    previous, new = make_release(1), make_release(2)

    target.start(new, previous)
    checked = target.check(new, 10)
    target.stop(new)
    target.restore(previous, new)

    assert read_env(tmp_path / "deploy-2.env") == {
        "CONVEYOR_ARTIFACT_DIGEST": new.digest,
        "CONVEYOR_ARTIFACT_PATH": new.artifact_path,
        "CONVEYOR_DEPLOYMENT_ID": "2",
        "CONVEYOR_ENVIRONMENT": "staging",
        "CONVEYOR_FAILED_DIGEST": "",
        "CONVEYOR_PREVIOUS_ARTIFACT_PATH": previous.artifact_path,
        "CONVEYOR_PREVIOUS_DIGEST": previous.digest,
        "CONVEYOR_REVISION": "rev2",
    }
    assert checked.ok and checked.detail.startswith("the health script succeeded (try 3, ")
    assert read_env(tmp_path / "rollback-1.env") == {
        "CONVEYOR_ARTIFACT_DIGEST": previous.digest,
        "CONVEYOR_ARTIFACT_PATH": previous.artifact_path,
        "CONVEYOR_DEPLOYMENT_ID": "1",
        "CONVEYOR_ENVIRONMENT": "staging",
        "CONVEYOR_FAILED_DIGEST": new.digest,
        "CONVEYOR_PREVIOUS_ARTIFACT_PATH": "",
        "CONVEYOR_PREVIOUS_DIGEST": "",
        "CONVEYOR_REVISION": "rev1",
    }
    log = env_dir / "logs" / "2.log"  # written by the log keeper: a moment later
    assert wait_until(lambda: "rollback script for " + previous.digest in log.read_text())
    assert "deployed" in log.read_text()
    assert target.describe(new) == {"running": None, "log": str(env_dir / "logs" / "2.log")}


def test_without_rollback_script_deploy_runs_again_with_previous(
    env_dir: Path, make_release: MakeRelease, tmp_path: Path
) -> None:
    target = scripted(env_dir, tmp_path)
    previous, failed = make_release(1), make_release(2)

    assert target.check(failed, 1).detail == "no health script; the deploy script succeeded"
    target.restore(previous, failed)

    seen = read_env(tmp_path / "deploy-1.env")
    assert seen["CONVEYOR_ARTIFACT_DIGEST"] == previous.digest
    assert seen["CONVEYOR_FAILED_DIGEST"] == failed.digest


def test_failing_scripts_are_reported_with_the_log(
    env_dir: Path, make_release: MakeRelease, tmp_path: Path
) -> None:
    release = make_release(1)
    log = env_dir / "logs" / "1.log"
    target = scripted(env_dir, tmp_path, deploy="echo 'cannot reach host'; false; echo unreached")
    with pytest.raises(DeployError) as raised:
        target.start(release, None)
    assert raised.value.message == f"deploy script exited with code 1; see {log}"
    assert wait_until(lambda: "cannot reach host" in log.read_text())
    assert "unreached" not in log.read_text()

    target = scripted(env_dir, tmp_path, health="echo down; exit 4")
    began = time.monotonic()
    health = target.check(release, 0.3)
    assert time.monotonic() - began < 2
    assert not health.ok
    assert health.detail.startswith("the health script did not succeed within 0.3 s (")
    assert health.detail.endswith(f"; last: exited with code 4); see {log}")

    target = scripted(env_dir, tmp_path, rollback="exit 9")
    with pytest.raises(DeployError, match="rollback script exited with code 9"):
        target.restore(release, make_release(2))

    target = scripted(env_dir, tmp_path / "missing")
    with pytest.raises(DeployError, match=r"cannot run the deploy script in .*missing"):
        target.start(release, None)


def test_script_past_its_timeout_is_killed_with_its_group(
    env_dir: Path, make_release: MakeRelease, tmp_path: Path
) -> None:
    hang = "echo $$ > pid; sleep 300 & sleep 300"
    target = scripted(env_dir, tmp_path, deploy=hang, timeout_s=0.3)

    began = time.monotonic()
    with pytest.raises(DeployError, match=r"deploy script did not finish within 0\.3 s"):
        target.start(make_release(1), None)

    assert time.monotonic() - began < 3
    pgid = int((tmp_path / "pid").read_text())
    assert wait_until(lambda: live_group_members(pgid) == [])


def test_a_cancel_stops_a_running_script_with_its_group(
    env_dir: Path, make_release: MakeRelease, tmp_path: Path
) -> None:
    """Ctrl-C reaches a script in its own session only through the flag: it is terminated at
    once (not after its 10-minute timeout), the log says so, and a health check ends."""
    pid_file = tmp_path / "pid"
    armed: list[float] = []

    def cancelled() -> bool:  # once the script runs (it wrote its pid)
        if not armed and pid_file.exists():
            armed.append(time.monotonic())
        return bool(armed)

    hang = "echo $$ > pid; sleep 300 & sleep 300"
    target = scripted(env_dir, tmp_path, deploy=hang, health=hang, cancelled=cancelled)
    release = make_release(1)
    stopped = r"deploy script was stopped partway \(see .*1\.log\)"
    with pytest.raises(DeployCancelled, match=stopped):
        target.start(release, None)
    assert time.monotonic() - armed[0] < 4
    pgid = int(pid_file.read_text())
    assert wait_until(lambda: live_group_members(pgid) == [])
    log = env_dir / "logs" / "1.log"
    assert wait_until(
        lambda: "deploy script stopped: the deployment was cancelled" in log.read_text()
    )

    pid_file.unlink()
    armed.clear()
    health = target.check(release, 60)
    assert health == Health(False, CUT_SHORT, cut_short=True)
    pgid = int(pid_file.read_text())
    assert wait_until(lambda: live_group_members(pgid) == [])
    assert target.stops_releases is False


def test_once_cancelled_no_script_starts_but_a_restore_runs(
    env_dir: Path, make_release: MakeRelease, tmp_path: Path
) -> None:
    target = scripted(
        env_dir,
        tmp_path,
        deploy="touch deployed",
        rollback="touch restored",
        cancelled=lambda: True,
    )
    with pytest.raises(DeployCancelled, match="deploy script was not started"):
        target.start(make_release(2), make_release(1))
    assert not (tmp_path / "deployed").exists()
    target.restore(make_release(1), make_release(2))  # the recovery is not cancelled
    assert (tmp_path / "restored").exists()


def test_token_is_not_passed_and_stop_does_nothing(
    env_dir: Path, make_release: MakeRelease, tmp_path: Path
) -> None:
    target = scripted(env_dir, tmp_path, deploy='echo "${CONVEYOR_RUN_TOKEN-unset}" > token')
    release = make_release(1)
    target.start(release, None)
    target.stop(release)
    assert (tmp_path / "token").read_text() == "unset\n"


def test_an_environment_port_is_outside_the_ephemeral_range() -> None:
    """An outgoing connection cannot take it while the service restarts."""
    low, high = (int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    if low - 10000 < 100 and 65535 - high < 100:
        pytest.skip("the ephemeral range leaves no room")
    taken = {allocate_port() for _ in range(5)}
    for _ in range(20):
        port = allocate_port(avoid=taken)
        assert not low <= port <= high and port not in taken
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_a_new_environment_port_is_neither_declared_nor_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a port the pipeline declares for an environment, nor one another keeps: those
    are free only while their service is stopped."""
    import random

    from conveyor.bootstrap import environment_port

    low, high = (int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    if low - 10000 < 100 and 65535 - high < 100:
        pytest.skip("the ephemeral range leaves no room")
    declared, kept, fresh = (allocate_port() for _ in range(3))
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "port").write_text(f"{kept}\n")
    offered = iter([declared, kept, fresh])
    monkeypatch.setattr(random, "randint", lambda lo, hi: next(offered))
    production = tmp_path / "production"
    assert environment_port(production, None, reserved={declared}) == fresh
    assert (production / "port").read_text() == f"{fresh}\n"
    assert environment_port(production, None, reserved={declared}) == fresh  # kept
    assert environment_port(tmp_path / "qa", declared, reserved={declared}) == declared


def test_recorded_services_are_those_that_still_run(tmp_path: Path) -> None:
    """A dead service leaves its record: a recycled pid must not be taken for it."""
    from conveyor.adapters.targets.process import recorded_services

    proc = subprocess.Popen(["sleep", "30"])
    try:
        start = process_start_time(proc.pid)
        runs = tmp_path / "staging" / "run"
        runs.mkdir(parents=True)
        (runs / "1.json").write_text(json.dumps({"pid": proc.pid, "start_time": start}))
        (runs / "2.json").write_text(json.dumps({"pid": os.getppid(), "start_time": 1}))
        (runs / "3.json").write_text("{not json")
        assert recorded_services(tmp_path) == {proc.pid}
    finally:
        proc.kill()
        proc.wait()
    assert recorded_services(tmp_path) == set()
