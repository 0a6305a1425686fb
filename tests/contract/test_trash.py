"""Discarding trees: moved aside at once, deleted by a detached rm (and what one left)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conveyor.adapters import trash as trash_module
from conveyor.adapters.trash import discard


def _emptied(trash: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(trash.iterdir()):
            return True
        time.sleep(0.02)
    return False


def _tree(root: Path) -> Path:
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "file").write_text("x")
    return root


def test_entries_leave_at_once_and_are_deleted_in_the_background(tmp_path: Path) -> None:
    folder = tmp_path / "releases"
    folder.mkdir()
    doomed = [_tree(folder / "1"), folder / "1.path", _tree(folder / "2")]
    doomed[1].write_text("p")
    kept = _tree(folder / "3")
    trash = tmp_path / ".trash"
    discard(doomed, trash)
    assert sorted(p.name for p in folder.iterdir()) == ["3"]  # gone from sight at once
    assert kept.is_dir() and (kept / "deep" / "er" / "file").read_text() == "x"
    assert _emptied(trash)


def test_a_link_is_removed_not_what_it_points_to(tmp_path: Path) -> None:
    target = _tree(tmp_path / "elsewhere")
    link = tmp_path / "4"
    link.symlink_to(target)
    trash = tmp_path / ".trash"
    discard([link], trash)
    assert _emptied(trash)
    assert (target / "deep" / "er" / "file").read_text() == "x"


def test_what_an_earlier_rm_left_is_deleted_with_the_next_discard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trash = tmp_path / ".trash"
    _tree(trash / "5.999.0")  # moved in just now: another rm's, still deleting it
    discard([], trash)
    time.sleep(0.3)
    assert (trash / "5.999.0").exists()
    monkeypatch.setattr(trash_module, "_LEFT_AFTER_S", 0.0)  # long ago: the machine stopped
    discard([], trash)
    assert _emptied(trash)


def test_missing_entries_and_a_missing_trash_are_fine(tmp_path: Path) -> None:
    discard([tmp_path / "never"], tmp_path / ".trash")
    assert not (tmp_path / ".trash").exists() or not any((tmp_path / ".trash").iterdir())


def test_two_discards_of_the_same_name_do_not_collide(tmp_path: Path) -> None:
    trash = tmp_path / ".trash"
    for _ in range(2):
        _tree(tmp_path / "6")
        discard([tmp_path / "6"], trash)
        assert not (tmp_path / "6").exists()
    assert _emptied(trash)


def test_without_rm_on_path_they_are_deleted_here_and_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    folder = _tree(tmp_path / "7")
    trash = tmp_path / ".trash"
    discard([folder], trash)
    assert not folder.exists() and not any(trash.iterdir())  # no wait needed


def test_an_entry_that_cannot_be_moved_is_deleted_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _tree(tmp_path / "8")

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(trash_module.os, "replace", refuse)
    discard([folder], tmp_path / ".trash")
    assert not folder.exists()


def test_a_link_in_place_of_the_trash_does_not_lead_the_rm_elsewhere(tmp_path: Path) -> None:
    precious = _tree(tmp_path / "precious")
    trash = tmp_path / ".trash"
    trash.symlink_to(precious)
    doomed = _tree(tmp_path / "9")
    discard([doomed], trash)
    assert (precious / "deep" / "er" / "file").read_text() == "x"
    assert trash.is_dir() and not trash.is_symlink() and _emptied(trash)
    assert not doomed.exists()


def test_the_rm_is_marked_for_the_orphan_killer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "env.txt"
    fake = bin_dir / "rm"
    fake.write_text(f'#!/bin/sh\nenv > {seen}\nexec /bin/rm "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    trash = tmp_path / ".trash"
    discard([_tree(tmp_path / "10")], trash)
    assert _emptied(trash)
    deadline = time.monotonic() + 10
    while not seen.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "CONVEYOR_TRASH=1" in seen.read_text().split("\n")
