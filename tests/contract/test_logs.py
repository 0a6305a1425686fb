"""Attempt log files: created exclusively, capped between two UTF-8 characters."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conveyor.adapters.logs import FileLogStore, incomplete_tail


def _stored(home: Path, text_chunks: list[bytes], cap: int) -> bytes:
    log = FileLogStore(home, cap).open_attempt(1, "unit", 1)
    for chunk in text_chunks:
        log.write(chunk)
    summary = log.close()
    data = (home / summary.path).read_bytes()
    assert summary.size == len(data)
    assert summary.sha256 == hashlib.sha256(data).hexdigest()
    return data


@pytest.mark.parametrize(
    ("data", "tail"),
    [(b"", 0), (b"abc", 0), (b"a\xe2", 1), (b"a\xe2\x82", 2), (b"a\xe2\x82\xac", 0),
     (b"\xf0\x9f\x98", 3), (b"\xf0\x9f\x98\x80", 0), (b"\xc3", 1), (b"\xc3\xa9", 0)],
)  # fmt: skip
def test_incomplete_tail(data: bytes, tail: int) -> None:
    assert incomplete_tail(data) == tail


def test_the_cap_never_splits_a_character(tmp_path: Path) -> None:
    data = _stored(tmp_path, ["aaaaaaaa€€".encode()], cap=10)  # the first € would end at 11
    body, _, mark = data.partition(b"\n[conveyor: log truncated")
    assert body == b"aaaaaaaa"
    assert mark.decode() == " at 8 bytes; 6 more bytes were not stored]\n"  # the bytes kept
    data.decode("utf-8")


def test_a_character_split_across_writes_at_the_cap_is_dropped_whole(tmp_path: Path) -> None:
    data = _stored(tmp_path, [b"aaaaaaaaa\xe2", b"\x82\xacbbb"], cap=10)
    assert data.startswith(b"aaaaaaaaa\n[conveyor: log truncated at 9 bytes; 6 more bytes")
    data.decode("utf-8")


def test_characters_split_across_writes_below_the_cap_are_kept(tmp_path: Path) -> None:
    data = _stored(tmp_path, [b"a\xe2", b"\x82", b"\xacb", b"\xff\xc3"], cap=100)
    assert data == b"a\xe2\x82\xacb\xff\xc3"  # an unfinished sequence is stored as it came


def test_an_existing_log_file_is_never_appended_to(tmp_path: Path) -> None:
    old = tmp_path / "logs" / "1" / "unit.1.log"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an earlier run's log\n")
    log = FileLogStore(tmp_path).open_attempt(1, "unit", 1)
    assert "logs/1/unit.1.log exists already" in log.problem
    log.write(b"new output\n")
    summary = log.close()
    assert summary.problem == log.problem
    assert (summary.size, summary.truncated) == (0, False)
    assert old.read_bytes() == b"an earlier run's log\n"


def test_an_empty_log_has_the_digest_of_no_bytes_and_no_file(tmp_path: Path) -> None:
    summary = FileLogStore(tmp_path).open_attempt(1, "quiet", 1).close()
    assert (summary.size, summary.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert not (tmp_path / summary.path).exists()


def test_every_attempt_of_a_run_whose_log_folder_existed_is_checked(tmp_path: Path) -> None:
    # A restored record reuses run 1: its folder exists with other files than the first
    # attempt's; a later attempt's file is found too (not only the first attempt's).
    (tmp_path / "logs" / "1").mkdir(parents=True)
    (tmp_path / "logs" / "1" / "deploy.2.log").write_bytes(b"an earlier run's log\n")
    store = FileLogStore(tmp_path)
    assert store.open_attempt(1, "unit", 1).problem == ""
    assert "logs/1/deploy.2.log exists already" in store.open_attempt(1, "deploy", 2).problem
    assert store.open_attempt(2, "unit", 1).problem == ""  # a new run's folder: no check


def test_a_log_file_created_meanwhile_is_not_appended_to(tmp_path: Path) -> None:
    log = FileLogStore(tmp_path).open_attempt(1, "unit", 1)
    assert log.problem == ""
    old = tmp_path / "logs" / "1" / "unit.1.log"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"someone else's\n")
    log.write(b"new output\n")
    assert "exists already" in log.close().problem
    assert old.read_bytes() == b"someone else's\n"


def test_a_full_disk_ends_the_log_with_a_problem_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    import conveyor.adapters.logs as logs

    log = FileLogStore(tmp_path, 1_000_000).open_attempt(1, "unit", 1)
    log.write(b"stored\n")
    real_write = os.write

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logs.os, "write", full)
    log.write(b"lost\n")
    log.write(b"lost too\n")
    monkeypatch.setattr(logs.os, "write", real_write)
    summary = log.close()
    assert "No space left on device" in summary.problem
    data = (tmp_path / summary.path).read_bytes()
    assert data == b"stored\n"
    assert summary.size == len(data) and summary.sha256 == hashlib.sha256(data).hexdigest()
