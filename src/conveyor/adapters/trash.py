"""Deleting large trees without waiting for them: move aside at once, delete in the background.

A rename into a ``.trash`` folder beside them is instant, so the caller (a run's start, a
deployment under its environment's lease) does not wait for a ``node_modules`` or a release
folder to be deleted; a detached ``rm -rf`` does that. What an ``rm`` left behind (the machine
stopped) is deleted with the next discard into the same folder.
"""

from __future__ import annotations

import itertools
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path

TRASH = ".trash"
"""The folder, beside the discarded entries, they are moved into."""
TRASH_MARK = "CONVEYOR_TRASH"
"""In the ``rm``'s environment: a run's orphan killer spares it (a ``conveyor promote`` in a
job leaves it behind, deleting, when it ends)."""

_LEFT_AFTER_S = 600.0
"""An entry moved into the trash longer ago than this is taken for one an rm left."""
_numbers = itertools.count()
"""Makes the names in the trash unique within this process (the pid, across processes)."""


def discard(paths: Iterable[Path], trash: Path) -> None:
    """Move ``paths`` into ``trash`` and delete them, and whatever ``trash`` still held, with a
    detached ``rm -rf``. An entry that cannot be moved (permissions, another filesystem) is
    deleted here and now; one that cannot be deleted either is left as it is."""
    if not _real_folder(trash):
        for path in paths:
            _delete_now(path)
        return
    moved: set[str] = set()
    for path in paths:
        name = f"{path.name}.{os.getpid()}.{next(_numbers)}"
        try:
            os.replace(path, trash / name)
        except FileNotFoundError:
            continue
        except OSError:
            _delete_now(path)
            continue
        moved.add(name)
    try:
        doomed = [str(entry) for entry in trash.iterdir() if _not_being_deleted(entry, moved)]
    except OSError:
        return
    if doomed:
        delete_in_background(doomed)


def _not_being_deleted(entry: Path, moved: set[str]) -> bool:
    """Moved in just now, or left by an rm that did not finish (the machine stopped): moved in
    over ``_LEFT_AFTER_S`` ago (a rename sets the change time). A younger one is another rm's."""
    if entry.name in moved:
        return True
    try:
        return time.time() - os.lstat(entry).st_ctime > _LEFT_AFTER_S
    except OSError:
        return False


def _real_folder(trash: Path) -> bool:
    """Make ``trash`` a folder of its own if it is not one (a link there would have what it
    points to deleted: it is removed); whether it is one now."""
    try:
        if not stat.S_ISDIR(os.lstat(trash).st_mode):
            os.unlink(trash)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        os.mkdir(trash, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        return stat.S_ISDIR(os.lstat(trash).st_mode)
    except OSError:
        return False


def delete_in_background(paths: list[str]) -> None:
    """``rm -rf`` in its own session, not waited for; synchronously if it cannot start."""
    try:
        os.posix_spawnp(
            "rm",
            ["rm", "-rf", "--", *paths],
            {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", TRASH_MARK: "1"},
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,
        )
    except OSError:
        for path in paths:
            _delete_now(Path(path))


def _delete_now(path: Path) -> None:
    import shutil

    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass
