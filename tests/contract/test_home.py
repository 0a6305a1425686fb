"""The home folder: a path that cannot be one is a usage error, not a crash."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from conveyor.adapters.home import Home
from conveyor.errors import UsageError


def test_a_new_home_is_created_with_its_gitignore(tmp_path: Path) -> None:
    Home(tmp_path / "a" / "home").ensure()
    assert (tmp_path / "a" / "home" / ".gitignore").read_text().endswith("*\n")


def test_a_file_is_not_a_home(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"cannot be used: it is not a folder") as info:
        Home(tmp_path / "file").ensure()
    assert info.value.exit_code == 2 and info.value.hint and "--home" in info.value.hint
    with pytest.raises(UsageError, match=r"cannot be used: a part of its path is not a folder"):
        Home(tmp_path / "file" / "sub").ensure()
    with pytest.raises(UsageError, match=r"/dev/null cannot be used: it is not a folder"):
        Home(Path("/dev/null")).ensure()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_home_that_cannot_be_created_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UsageError, match=r"cannot be created or written: "):
        Home(tmp_path / "home").ensure()


@pytest.mark.parametrize("name", ["locks", "environments", "logs"])
def test_a_file_in_place_of_one_of_the_homes_folders_is_refused(tmp_path: Path, name: str) -> None:
    home = Home(tmp_path / "home")
    home.ensure()
    (home.root / name).write_text("not a folder")
    with pytest.raises(UsageError, match=f"the home's {name}/ is not a folder"):
        home.ensure()
    (home.root / name).unlink()
    (home.root / name).symlink_to(tmp_path / "nowhere")  # a dead link
    with pytest.raises(UsageError):
        home.ensure()
    (home.root / name).unlink()
    (tmp_path / "elsewhere").mkdir()
    (home.root / name).symlink_to(tmp_path / "elsewhere")  # a folder on another disk: fine
    home.ensure()
