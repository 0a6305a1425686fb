"""The local executor finds what attempts orphaned by ancestry (it is their child subreaper)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from conveyor.domain.ports import Exited, JobLaunch
from conveyor.executors.local import LocalExecutor

DAEMON = (
    "env -i setsid -f sh -c 'echo $$ > {pid}; exec sleep 1016'; while [ ! -s {pid} ]; do :; done"
)


def _wait_exit(executor: LocalExecutor, key: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(isinstance(e, Exited) and e.key == key for e in executor.poll(0.5)):
            return
    raise AssertionError(f"{key} did not end")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_orphans_end_when_no_attempt_runs_and_earlier_children_are_spared(tmp_path: Path) -> None:
    service = subprocess.Popen(["sleep", "1017"], start_new_session=True)  # a deployed service
    leaked: list[int] = []
    executor = LocalExecutor()
    env = {"PATH": os.environ["PATH"], "CONVEYOR_RUN_TOKEN": "t-orphans"}
    try:
        first = tmp_path / "first.pid"
        executor.start(JobLaunch("a#1", DAEMON.format(pid=first), env, str(tmp_path)))
        executor.start(JobLaunch("hang#1", "sleep 1018", env, str(tmp_path)))
        _wait_exit(executor, "a#1")
        orphan = int(first.read_text())
        leaked.append(orphan)
        assert executor.sweep() == []  # an attempt runs: its orphans cannot be told apart
        assert _alive(orphan)
        executor.kill("hang#1", force=True)
        _wait_exit(executor, "hang#1")
        assert executor.sweep() == [orphan]
        assert not Path(f"/proc/{orphan}").exists()  # killed and reaped
        assert service.poll() is None

        second = tmp_path / "second.pid"  # the next stage adopts again
        executor.start(JobLaunch("b#1", DAEMON.format(pid=second), env, str(tmp_path)))
        _wait_exit(executor, "b#1")
        orphan = int(second.read_text())
        leaked.append(orphan)
        executor.close()
        assert not Path(f"/proc/{orphan}").exists()
        assert service.poll() is None
    finally:
        executor.close()
        service.kill()
        service.wait()
        _kill(leaked)


def test_a_deployed_service_a_job_started_is_spared_and_ended_orphans_are_reaped(
    tmp_path: Path,
) -> None:
    """A job may deploy (`conveyor promote` in a job): the service it leaves carries
    CONVEYOR_DEPLOYMENT_ID and outlives the stage. Orphans that end while attempts run do not
    stay zombies."""
    executor = LocalExecutor()
    env = {"PATH": os.environ["PATH"], "CONVEYOR_RUN_TOKEN": "t-services"}
    service_pid = tmp_path / "service.pid"
    deploy = (
        f"env -i CONVEYOR_DEPLOYMENT_ID=7 setsid -f sh -c 'echo $$ > {service_pid};"
        f" exec sleep 1019'; while [ ! -s {service_pid} ]; do :; done;"
        " for i in 1 2 3 4 5; do (true &); done"
    )
    leaked: list[int] = []
    before = set(_zombie_children())  # other tests' (not this executor's to reap)
    try:
        executor.start(JobLaunch("deploy#1", deploy, env, str(tmp_path)))
        executor.start(JobLaunch("hang#1", "sleep 1018", env, str(tmp_path)))
        _wait_exit(executor, "deploy#1")
        service = int(service_pid.read_text())
        leaked.append(service)
        deadline = time.monotonic() + 10
        while set(_zombie_children()) - before and time.monotonic() < deadline:
            executor.poll(0.2)
        assert set(_zombie_children()) - before == set()
        executor.kill("hang#1", force=True)
        _wait_exit(executor, "hang#1")
        assert executor.sweep() == []
        assert _alive(service)
    finally:
        executor.close()
        _kill(leaked)


def test_the_rm_of_old_releases_a_job_left_is_spared(tmp_path: Path) -> None:
    """`conveyor promote` in a job moves old releases aside and leaves a detached rm deleting
    them (``adapters.trash``): the stage's orphan killer lets it finish."""
    executor = LocalExecutor()
    env = {"PATH": os.environ["PATH"], "CONVEYOR_RUN_TOKEN": "t-trash"}
    rm_pid, leave_rm = _marked_leftover(tmp_path, "sleep 1021")
    leaked: list[int] = []
    try:
        executor.start(JobLaunch("promote#1", leave_rm, env, str(tmp_path)))
        _wait_exit(executor, "promote#1")
        rm = int(rm_pid.read_text())
        leaked.append(rm)
        assert executor.sweep() == []
        assert _alive(rm)
    finally:
        executor.close()
        _kill(leaked)


def test_a_spared_process_that_ends_is_reaped_not_left_a_zombie(tmp_path: Path) -> None:
    executor = LocalExecutor()
    env = {"PATH": os.environ["PATH"], "CONVEYOR_RUN_TOKEN": "t-trash-reaped"}
    rm_pid, leave_rm = _marked_leftover(tmp_path, "sleep 1.6")
    try:
        executor.start(JobLaunch("promote#1", leave_rm, env, str(tmp_path)))
        executor.start(JobLaunch("hang#1", "sleep 1018", env, str(tmp_path)))
        _wait_exit(executor, "promote#1")
        rm = int(rm_pid.read_text())
        deadline = time.monotonic() + 10
        while Path(f"/proc/{rm}").exists() and time.monotonic() < deadline:
            executor.poll(0.2)  # while attempts run, ended orphans are reaped now and then
        assert not Path(f"/proc/{rm}").exists()
    finally:
        executor.close()


def test_a_process_spared_in_one_stage_is_reaped_when_it_ends_in_a_later_one(
    tmp_path: Path,
) -> None:
    executor = LocalExecutor()
    env = {"PATH": os.environ["PATH"], "CONVEYOR_RUN_TOKEN": "t-spared-later"}
    rm_pid, leave_rm = _marked_leftover(tmp_path, "sleep 1.6")
    try:
        executor.start(JobLaunch("promote#1", leave_rm, env, str(tmp_path)))
        _wait_exit(executor, "promote#1")
        rm = int(rm_pid.read_text())
        assert executor.sweep() == [] and _alive(rm)  # the stage ends: spared
        executor.start(JobLaunch("hang#1", "sleep 1018", env, str(tmp_path)))  # the next one
        deadline = time.monotonic() + 10
        while Path(f"/proc/{rm}").exists() and time.monotonic() < deadline:
            executor.poll(0.2)
        assert not Path(f"/proc/{rm}").exists()  # ended, and reaped: no zombie
    finally:
        executor.close()


def _marked_leftover(tmp_path: Path, command: str) -> tuple[Path, str]:
    """A job script that leaves ``command`` running as the rm of old releases is left (own
    session, marked ``CONVEYOR_TRASH``); where its pid is written."""
    pid_file = tmp_path / "rm.pid"
    script = (
        f"env -i CONVEYOR_TRASH=1 setsid -f sh -c 'echo $$ > {pid_file}; exec {command}';"
        f" while [ ! -s {pid_file} ]; do :; done"
    )
    return pid_file, script


def _zombie_children() -> list[int]:
    me = os.getpid()
    pids = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    zombies = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                zombies.append(int(pid))
        except OSError:
            continue
    return zombies


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_a_recorded_service_that_blanked_its_variables_is_spared_with_its_session(
    tmp_path: Path,
) -> None:
    """A server that rewrites its title may blank /proc/<pid>/environ: the services the
    record knows are spared by pid, and so are the processes of their sessions."""
    service_pid = tmp_path / "service.pid"
    member_pid = tmp_path / "member.pid"
    start = (
        f'env -i setsid -f sh -c \'(sh -c "echo \\$\\$ > {member_pid}; exec sleep 1022" &);'
        f" echo $$ > {service_pid}; exec sleep 1020';"
        f" while [ ! -s {service_pid} ] || [ ! -s {member_pid} ]; do :; done"
    )
    recorded: set[int] = set()
    executor = LocalExecutor(services=lambda: recorded)
    env = {"PATH": os.environ["PATH"], "CONVEYOR_RUN_TOKEN": "t-recorded"}
    leaked: list[int] = []
    try:
        executor.start(JobLaunch("deploy#1", start, env, str(tmp_path)))
        _wait_exit(executor, "deploy#1")
        service, member = int(service_pid.read_text()), int(member_pid.read_text())
        leaked += [service, member]
        recorded.add(service)
        assert str(member) in _children_of_this_process()  # orphaned, then adopted
        assert executor.sweep() == []
        assert _alive(service) and _alive(member)
    finally:
        executor.close()
        _kill(leaked)


def _children_of_this_process() -> list[str]:
    me = os.getpid()
    return Path(f"/proc/{me}/task/{me}/children").read_text().split()


def test_closing_uninstalls_its_signal_wakeup_pipe_and_leaves_anothers() -> None:
    """A signal after close must not write to the closed pipe's number (reused by then by a
    log or the database)."""
    executor = LocalExecutor()
    previous = signal.set_wakeup_fd(executor.wakeup_fd, warn_on_full_buffer=False)
    try:
        executor.close()
        assert signal.set_wakeup_fd(-1) == -1
        other_r, other_w = os.pipe2(os.O_NONBLOCK)
        try:
            another = LocalExecutor()
            signal.set_wakeup_fd(other_w)
            another.close()
            assert signal.set_wakeup_fd(-1) == other_w
        finally:
            os.close(other_r)
            os.close(other_w)
    finally:
        signal.set_wakeup_fd(previous)
