"""The local executor finds what attempts orphaned by ancestry (it is their child subreaper)."""

from __future__ import annotations

import os
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
    executor = LocalExecutor()
    env = {"PATH": os.environ["PATH"], "CONVEYOR_RUN_TOKEN": "t-orphans"}
    try:
        first = tmp_path / "first.pid"
        executor.start(JobLaunch("a#1", DAEMON.format(pid=first), env, str(tmp_path)))
        executor.start(JobLaunch("hang#1", "sleep 1018", env, str(tmp_path)))
        _wait_exit(executor, "a#1")
        orphan = int(first.read_text())
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
    finally:
        executor.close()
    assert not Path(f"/proc/{orphan}").exists()
    assert service.poll() is None
    service.kill()
    service.wait()
