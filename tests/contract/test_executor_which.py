"""The local executor finds commands on ``PATH`` exactly as ``shutil.which`` does."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conveyor.executors import local


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    local._WHICH.clear()


def _tool(folder: Path, name: str, mode: int = 0o755) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n")
    (folder / name).chmod(mode)


def test_which_agrees_with_shutil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, here = tmp_path / "a", tmp_path / "b", tmp_path / "here"
    _tool(a, "plain", 0o644)  # not executable: skipped
    _tool(b, "plain")
    (a / "dir-tool").mkdir()  # a directory: skipped
    _tool(b, "dir-tool")
    _tool(here, "local-tool")
    monkeypatch.chdir(here)
    for path in (
        f"{a}{os.pathsep}{b}",
        f"{b}{os.pathsep}{a}",
        "",  # finds nothing
        os.pathsep,  # an empty entry is the current directory
        f"{a}{os.pathsep}",
        str(tmp_path / "missing"),
    ):
        for name in ("plain", "dir-tool", "local-tool", "absent"):
            local._WHICH.clear()
            assert local._which(name, path) == shutil.which(name, path=path), (name, path)


def test_which_without_a_path_uses_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tool(tmp_path, "only-here")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert local._which("only-here", None) == str(tmp_path / "only-here")


def test_a_name_with_a_slash_is_checked_as_given(tmp_path: Path) -> None:
    _tool(tmp_path / "sub", "tool")
    _tool(tmp_path / "sub", "plain", 0o644)
    for name in (str(tmp_path / "sub" / "tool"), str(tmp_path / "sub" / "plain"), "/bin/sh"):
        for path in ("/usr/bin", ""):
            local._WHICH.clear()
            assert local._which(name, path) == shutil.which(name, path=path), (name, path)


def test_which_with_path_unset_uses_the_system_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATH", raising=False)
    assert local._which("sh", None) == shutil.which("sh")
