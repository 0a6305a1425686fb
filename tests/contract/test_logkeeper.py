"""The log keeper of deployed releases, as a real process behind a real pipe."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conveyor.adapters.logkeeper import Keeper, say, start_keeper
from conveyor.adapters.releaselogs import ReleaseLog, kept_files
from conveyor.adapters.targets.process import (
    forget_keeper,
    process_start_time,
    record_keeper,
    recorded_writers,
)
from conveyor.errors import ConveyorError


def feed(path: Path, chunks: list[bytes], max_bytes: int = 1000, files: int = 2) -> int:
    """Run a keeper on ``path``, write ``chunks`` into its pipe, close it; its exit code."""
    write_fd, keeper = start_keeper(path, max_bytes, files, {})
    try:
        for chunk in chunks:
            os.write(write_fd, chunk)
    finally:
        os.close(write_fd)
    return keeper.wait(timeout=10)


def test_output_is_appended_and_rotated_at_the_cap_between_lines(tmp_path: Path) -> None:
    log = tmp_path / "7.log"
    log.write_bytes(b"==> header\n")
    lines = [f"line {i:04d} {'x' * 40}\n".encode() for i in range(200)]
    assert feed(log, [b"".join(lines)], max_bytes=1000, files=3) == 0

    kept = [log, tmp_path / "7.log.1", tmp_path / "7.log.2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7.log", "7.log.1", "7.log.2"]
    for path in kept:
        data = path.read_bytes()
        assert len(data) <= 1000 + 120  # the rotation's own line may pass the cap
        assert data.endswith(b"\n")
    newest = log.read_bytes().splitlines()
    assert newest[0].startswith(b"==> conveyor ") and b"older output is in the rotated" in newest[0]
    assert newest[-1] == lines[-1].rstrip(b"\n")  # nothing lost at the end, no line split
    text = b"".join(p.read_bytes() for p in reversed(kept))
    body = [line for line in text.splitlines() if line.startswith(b"line ")]
    numbers = [int(line.split()[1]) for line in body]
    assert numbers == list(range(numbers[0], 200))  # the newest lines, whole, in order


def test_one_file_only_drops_the_old_output(tmp_path: Path) -> None:
    log = tmp_path / "1.log"
    assert feed(log, [b"a" * 999 + b"\n", b"b" * 10 + b"\n"], max_bytes=1000, files=1) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["1.log"]
    data = log.read_bytes()
    assert b"1000 bytes: it was dropped" in data and data.endswith(b"b" * 10 + b"\n")
    assert b"a" * 10 not in data


def test_a_line_longer_than_a_file_is_cut(tmp_path: Path) -> None:
    log = tmp_path / "2.log"
    assert feed(log, [b"z" * 2500], max_bytes=1000, files=5) == 0
    sizes = sorted(len(p.read_bytes()) for p in tmp_path.iterdir())
    assert sum(p.read_bytes().count(b"z") for p in tmp_path.iterdir()) == 2500
    assert max(sizes) <= 1000 + 120


def test_it_outlives_sigterm_until_every_writer_is_gone(tmp_path: Path) -> None:
    log = tmp_path / "3.log"
    write_fd, keeper = start_keeper(log, 10_000, 2, {})
    try:
        os.write(write_fd, b"before\n")
        deadline = time.monotonic() + 10
        while not log.read_bytes() and time.monotonic() < deadline:  # its handlers are set
            time.sleep(0.01)
        keeper.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            keeper.wait(timeout=0.3)
        os.write(write_fd, b"last words\n")
    finally:
        os.close(write_fd)
    assert keeper.wait(timeout=10) == 0
    assert log.read_bytes() == b"before\nlast words\n"


def test_a_failed_write_drops_output_and_says_so_later(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    keeper = Keeper(str(folder / "4.log"), 10_000, 2)
    keeper.write(b"kept\n")
    keeper.close()
    (folder / "4.log").rename(tmp_path / "moved.log")
    folder.rmdir()  # the folder is gone: opening fails
    keeper.write(b"lost " * 10)
    folder.mkdir()
    keeper.write(b"again\n")
    keeper.close()
    lines = (folder / "4.log").read_bytes().splitlines()
    assert b"50 bytes of output were lost (No such file or directory)" in lines[0]
    assert lines[1:] == [b"again"]


def test_it_starts_without_the_package_on_its_path(tmp_path: Path) -> None:
    """It runs as a script with ``-I -S``: a hostile ``PYTHONPATH`` cannot break it."""
    (tmp_path / "signal.py").write_text("raise SystemExit('shadowed')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    log = tmp_path / "5.log"
    write_fd, keeper = start_keeper(log, 10_000, 2, env)
    os.write(write_fd, b"ok\n")
    os.close(write_fd)
    assert keeper.wait(timeout=10) == 0
    assert log.read_bytes() == b"ok\n"


def test_the_last_lines_are_found_across_rotated_files(tmp_path: Path) -> None:
    log = tmp_path / "8.log"
    (tmp_path / "8.log.2").write_bytes(b"one\ntwo\n")
    (tmp_path / "8.log.1").write_bytes(b"three\nfour\n")
    log.write_bytes(b"five\n")
    assert kept_files(log) == [tmp_path / "8.log.2", tmp_path / "8.log.1", log]
    for lines, expected in [
        (None, b"one\ntwo\nthree\nfour\nfive\n"),
        (0, b""),
        (1, b"five\n"),
        (2, b"four\nfive\n"),
        (4, b"two\nthree\nfour\nfive\n"),
        (99, b"one\ntwo\nthree\nfour\nfive\n"),
    ]:
        reader = ReleaseLog(log)
        assert b"".join(reader.kept(lines)) == expected, lines
        assert reader.new() == b""
        reader.close()


def test_following_goes_on_in_the_next_file_after_rotations(tmp_path: Path) -> None:
    log = tmp_path / "9.log"
    keeper = Keeper(str(log), 1000, 3)
    reader = ReleaseLog(log)
    assert b"".join(reader.kept()) == b""
    keeper.write(b"a" * 600 + b"\n")
    assert reader.new() == b"a" * 600 + b"\n"
    keeper.write(b"b" * 600 + b"\n")  # rotates: the file read is now 9.log.1
    keeper.write(b"c" * 600 + b"\n")  # and again: 9.log.2, then 9.log.1
    got = b""
    while data := reader.new():
        got += data
    assert [line[:1] for line in got.splitlines() if not line.startswith(b"==>")] == [b"b", b"c"]
    assert not reader.gap
    for letter in b"defg":  # the file being read falls off the kept ones
        keeper.write(bytes([letter]) * 600 + b"\n")
    got = b""
    while data := reader.new():
        got += data
    assert reader.gap  # said, then it goes on from the oldest kept file
    assert [line[:1] for line in got.splitlines() if not line.startswith(b"==>")] == [
        b"e",
        b"f",
        b"g",
    ]
    keeper.close()
    reader.close()


def test_a_log_replaced_by_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("no\n")
    (tmp_path / "1.log").symlink_to(tmp_path / "secret")
    with pytest.raises(ConveyorError, match="it is a link"):
        b"".join(ReleaseLog(tmp_path / "1.log").kept())


def test_a_line_begun_near_the_cap_is_finished_in_its_file(tmp_path: Path) -> None:
    keeper = Keeper(str(tmp_path / "b.log"), 1000, 2)
    keeper.write(b"a" * 899 + b"\n")
    keeper.write(b"b" * 90)
    keeper.write(b"b" * 20 + b"\n" + b"c" * 10 + b"\n")
    keeper.close()
    assert (tmp_path / "b.log.1").read_bytes() == b"a" * 899 + b"\n" + b"b" * 110 + b"\n"
    assert (tmp_path / "b.log").read_bytes().endswith(b"\n" + b"c" * 10 + b"\n")


def test_while_rotation_fails_output_is_dropped_not_written_past_the_cap(tmp_path: Path) -> None:
    keeper = Keeper(str(tmp_path / "a.log"), 1000, 2)
    (tmp_path / "a.log.1").mkdir()  # a.log cannot become a.log.1
    (tmp_path / "a.log.1" / "x").write_text("")
    for _ in range(2000):
        keeper.write(b"x" * 50 + b"\n")
    assert len((tmp_path / "a.log").read_bytes()) <= 1000
    (tmp_path / "a.log.1" / "x").unlink()
    (tmp_path / "a.log.1").rmdir()
    keeper.write(b"back\n")  # in the room left
    keeper.write(b"z" * 100 + b"\n")  # rotates
    keeper.close()
    assert (tmp_path / "a.log.1").read_bytes().endswith(b"x\nback\n")
    lines = (tmp_path / "a.log").read_bytes().splitlines()
    assert len(lines) == 3 and lines[-1] == b"z" * 100
    assert b"bytes of output were lost (Is a directory)" in lines[1]  # said once, then


def test_a_log_removed_by_hand_is_begun_again_and_old_rotations_go(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    for index in range(2, 6):  # left by a larger 'files'
        (tmp_path / f"c.log.{index}").write_text("old\n")
    keeper = Keeper(str(log), 1000, 2)
    keeper.write(b"one\n")
    log.unlink()
    keeper.write(b"two\n")
    assert log.read_bytes() == b"two\n"
    keeper.write(b"z" * 999 + b"\n")  # rotates
    keeper.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.log", "c.log.1"]


def test_the_keeper_holds_no_log_file_but_the_one_it_writes(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    write_fd, keeper = start_keeper(log, 1000, 2, {})
    try:
        for _ in range(100):
            os.write(write_fd, b"y" * 99 + b"\n")
        deadline = time.monotonic() + 10
        while not (tmp_path / "d.log.1").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        targets = [os.readlink(f) for f in Path(f"/proc/{keeper.pid}/fd").iterdir()]
        assert not any("(deleted)" in t for t in targets), targets
        assert [t for t in targets if t.startswith(str(tmp_path))] in ([], [str(log)])
    finally:
        os.close(write_fd)
    assert keeper.wait(timeout=10) == 0


def test_a_keeper_that_cannot_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="the log keeper did not start"):
        start_keeper(tmp_path / "e.log", 1000, 0, {})  # files 0: its own check fails


def stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (``T`` in ``/proc/<pid>/stat``)."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rfind(b")") + 2 :].startswith(b"T")


def test_conveyors_lines_begin_a_line_and_never_block(tmp_path: Path) -> None:
    log = tmp_path / "f.log"
    write_fd, keeper = start_keeper(log, 1_000_000, 2, {})
    try:
        os.write(write_fd, b"no newline at end")
        say(write_fd, "health script for x")
        keeper.send_signal(signal.SIGSTOP)  # a keeper that stops reading
        deadline = time.monotonic() + 10
        while not stopped(keeper.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.set_blocking(write_fd, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write_fd, b"z" * 4096)
        os.set_blocking(write_fd, True)
        began = time.monotonic()
        say(write_fd, "dropped", timeout_s=0.2)
        assert time.monotonic() - began < 2
    finally:
        keeper.send_signal(signal.SIGCONT)
        os.close(write_fd)
    assert keeper.wait(timeout=10) == 0
    lines = log.read_bytes().splitlines()
    assert lines[0] == b"no newline at end"
    assert lines[1] == b"==> conveyor health script for x"
    assert b"dropped" not in log.read_bytes()


@pytest.mark.parametrize("kind", ["fifo", "folder", "link"])
def test_a_log_path_that_is_no_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    log = tmp_path / "g.log"
    if kind == "fifo":
        os.mkfifo(log)
    elif kind == "folder":
        log.mkdir()
    else:
        log.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        start_keeper(log, 10_000, 2, {})
    assert not (tmp_path / "elsewhere").exists()


def test_reading_goes_on_from_a_rotated_file_after_the_log_was_removed(tmp_path: Path) -> None:
    log = tmp_path / "h.log"
    (tmp_path / "h.log.1").write_bytes(b"old A\n")
    reader = ReleaseLog(log)
    assert b"".join(reader.kept()) == b"old A\n"
    log.write_bytes(b"new B\n")
    assert reader.new() == b"new B\n"
    assert reader.new() == b"" and not reader.gap


def test_one_kept_file_is_followed_without_a_false_gap(tmp_path: Path) -> None:
    log = tmp_path / "i.log"
    keeper = Keeper(str(log), 1000, 1)
    reader = ReleaseLog(log)
    assert b"".join(reader.kept()) == b""
    got = b""
    for index in range(60):
        keeper.write(f"tick {index:03d} {'x' * 40}\n".encode())
        while data := reader.new():
            got += data
    keeper.close()
    ticks = [line for line in got.splitlines() if line.startswith(b"tick")]
    assert len(ticks) == 60 and not reader.gap


def test_a_file_cut_mid_line_is_followed_by_a_line_end(tmp_path: Path) -> None:
    log = tmp_path / "j.log"
    (tmp_path / "j.log.1").write_bytes(b"qqqq")  # a line longer than a file was cut here
    log.write_bytes(b"==> conveyor rotated\nqq\n")
    assert b"".join(ReleaseLog(log).kept()) == b"qqqq\n==> conveyor rotated\nqq\n"


def test_the_last_lines_count_a_file_that_ends_mid_line(tmp_path: Path) -> None:
    log = tmp_path / "k.log"
    (tmp_path / "k.log.1").write_bytes(b"a\nbbbb")  # cut past the cap
    log.write_bytes(b"==> note\ncc\n")
    assert b"".join(ReleaseLog(log).kept(2)) == b"==> note\ncc\n"
    assert b"".join(ReleaseLog(log).kept(3)) == b"bbbb\n==> note\ncc\n"


def test_a_line_longer_than_a_file_is_cut_between_characters(tmp_path: Path) -> None:
    log = tmp_path / "l.log"
    for max_bytes in (1001, 1002):
        keeper = Keeper(str(log), max_bytes, 100)
        keeper.write("€".encode() * 10_000 + b"\n")
        keeper.close()
        text = b"".join(ReleaseLog(log).kept()).decode("utf-8", "replace")
        assert "\ufffd" not in text and text.count("€") == 10_000
        for path in kept_files(log):
            path.unlink()


def test_an_empty_file_is_not_rotated_away(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    log.write_bytes(b"")
    keeper = Keeper(str(log), 1000, 3)
    keeper.write(b"z" * 1500 + b"\n")
    keeper.close()
    assert all(path.stat().st_size > 0 for path in kept_files(log))
    assert b"".join(ReleaseLog(log).kept()).count(b"z") == 1500


def test_a_mark_split_between_two_reads_still_begins_a_line(tmp_path: Path) -> None:
    log = tmp_path / "n.log"
    write_fd, keeper = start_keeper(log, 1_000_000, 2, {})
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # more than one read of the keeper
        keeper.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not stopped(keeper.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(write_fd, b"x" * 65531)
        say(write_fd, "hello there")
    finally:
        keeper.send_signal(signal.SIGCONT)
        os.close(write_fd)
    assert keeper.wait(timeout=10) == 0
    data = log.read_bytes()
    assert b"\0" not in data and data.endswith(b"x\n==> conveyor hello there\n")


def test_output_ending_like_the_start_of_a_mark_is_not_held_back(tmp_path: Path) -> None:
    log = tmp_path / "o.log"
    write_fd, keeper = start_keeper(log, 1_000_000, 2, {})
    try:
        os.write(write_fd, b"x\0==> conv")
        deadline = time.monotonic() + 10
        while log.read_bytes() != b"x\0==> conv" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log.read_bytes() == b"x\0==> conv"  # written while the pipe stays open
    finally:
        os.close(write_fd)
    assert keeper.wait(timeout=10) == 0


def test_a_released_keeper_forgets_only_its_own_record(tmp_path: Path) -> None:
    """Two keepers of one deployment's log (a rollback's check after a leftover kept the
    first alive): the one released leaves the other recorded, for ``env logs -F``; a keeper
    that ended unrecorded (after the command that started it) is dropped with the next."""
    procs = [subprocess.Popen(["sleep", "1041"]) for _ in range(3)]
    try:
        one, two, three = ((p.pid, process_start_time(p.pid) or 0) for p in procs)
        record_keeper(tmp_path, 1, *one)
        record_keeper(tmp_path, 1, *two)
        assert recorded_writers(tmp_path, 1) == {one, two}
        forget_keeper(tmp_path, 1, *two)
        assert recorded_writers(tmp_path, 1) == {one}
        forget_keeper(tmp_path, 1, *one)
        assert recorded_writers(tmp_path, 1) == set()
        assert not (tmp_path / "run" / "1.keeper").exists()
        record_keeper(tmp_path, 1, *one)
        procs[0].kill()
        procs[0].wait()  # ended, and its line was never removed
        record_keeper(tmp_path, 1, *three)
        assert recorded_writers(tmp_path, 1) == {three}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
