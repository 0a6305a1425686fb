"""The checkpoint shipping command: its input, its outcome, and what is said of a failure."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conveyor.adapters.shipper import OUTPUT_SHOWN, ship
from tests.contract.test_executor_orphans import _alive as alive


def test_the_checkpoint_is_on_its_standard_input_and_exit_0_is_success(tmp_path: Path) -> None:
    out = tmp_path / "kept.json"
    env = {"PATH": os.environ["PATH"], "OUT": str(out)}
    assert ship('cat > "$OUT"', b'{"seq": 1}\n', env, 10) is None
    assert out.read_bytes() == b'{"seq": 1}\n'


def test_a_failure_says_how_with_the_end_of_its_output_on_one_safe_line() -> None:
    env = {"PATH": os.environ["PATH"]}
    said = ship("printf 'a\\033[31mred\\nline two\\n' >&2; exit 4", b"", env, 10)
    assert said == "exited with status 4: ared line two"
    assert ship("kill -9 $$", b"", env, 10) == "was killed by signal 9"
    long = ship("head -c 100000 /dev/zero | tr '\\0' x; exit 1", b"", env, 10)
    assert long is not None and len(long) <= len("exited with status 1: ") + OUTPUT_SHOWN


def test_a_command_that_runs_too_long_is_stopped_with_its_group() -> None:
    env = {"PATH": os.environ["PATH"]}
    began = time.monotonic()
    said = ship("sleep 30 & echo started; wait", b"", env, 0.5)
    assert said == "did not finish within 0.5 s and was stopped: started"
    assert time.monotonic() - began < 10


def test_a_command_that_does_not_read_its_input_is_fine() -> None:
    env = {"PATH": os.environ["PATH"]}
    assert ship("true", b"x" * 1_000_000, env, 10) is None


def test_what_it_leaves_in_its_group_is_killed_and_does_not_hold_us(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"]}
    pid_file = tmp_path / "pid"
    began = time.monotonic()
    said = ship(f"sleep 1033 & echo $! > {pid_file}; cat > /dev/null", b"{}", env, 30)
    assert said is None and time.monotonic() - began < 10  # not until the sleep ends
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # killed; reaped by init (it was not our child)
    assert not alive(pid)


def test_only_the_end_of_a_huge_output_is_kept() -> None:
    env = {"PATH": os.environ["PATH"]}
    said = ship("head -c 50000000 /dev/zero | tr '\\0' x; echo END; exit 2", b"", env, 30)
    assert said is not None and said.startswith("exited with status 2: x") and said.endswith("END")


def test_a_lost_exit_status_is_not_taken_for_success() -> None:
    """SIGCHLD inherited as ignored: the kernel reaps the command, its status is lost."""
    env = {"PATH": os.environ["PATH"]}
    before = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        said = ship("sleep 0.2; exit 3", b"{}", env, 10)
    finally:
        signal.signal(signal.SIGCHLD, before)
    assert said is not None and "exit status was lost" in said
