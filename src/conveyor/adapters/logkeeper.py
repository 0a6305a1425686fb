"""Keeps what a deployed release prints in a size-capped, rotated log file.

A release's service (and a ``command`` target's scripts) write into a pipe; a keeper process
reads it and appends to ``<env>/logs/<deployment>.log``. When the file would pass ``max_bytes``
it is rotated as ``logrotate`` and Docker's ``json-file`` driver do: ``N.log.1`` becomes
``N.log.2`` and so on, ``N.log`` becomes ``N.log.1``, and a new ``N.log`` begins; at most
``files`` files are kept in all (with ``files: 1`` the old output is dropped). A cut falls
after a line's end when the line fits in a file.

The keeper runs in a session of its own, ignores SIGTERM, SIGINT and SIGHUP, and ends when
every writer has closed the pipe: a service's last words on its way down are kept, and
stopping the service's process group does not stop the keeper first. A write that fails (a
full disk, the folder removed) drops that output, never blocks the service nor kills it with
SIGPIPE, and a line in the log says how much was lost once writing works again.

This module uses the standard library only: it runs as a script (``python -I -S``, a few
milliseconds to start), apart from the package and whatever ``PYTHONPATH`` says.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

_CHUNK = 64 * 1024


def start_keeper(
    path: Path, max_bytes: int, files: int, env: Mapping[str, str]
) -> tuple[int, subprocess.Popen[bytes]]:
    """Start a keeper appending to ``path``; returns the pipe's write end (ours to close once
    the writers are started) and the keeper's process. The keeper's own errors go to ``path``.

    Raises ``OSError`` when it cannot be started.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        with open(path, "ab") as errors:
            keeper = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, str(path), str(max_bytes), str(files)],
                stdin=read_fd,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                cwd="/",
                env=dict(env),
                start_new_session=True,
            )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return write_fd, keeper


class Keeper:
    """Appends chunks to ``path``, rotating it at ``max_bytes`` (at most ``files`` files)."""

    def __init__(self, path: str, max_bytes: int, files: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.files = files
        self._fd: int | None = None
        self._size = 0
        self._lost = 0
        self._lost_why = ""
        self._fresh = False
        """Nothing but the rotation's line in the file yet: a line too long is cut here."""

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating as needed; on a failure drop it and remember how much."""
        try:
            if self._fd is None:
                self._open()
            if self._lost:
                self._mark_lost()
            while data:
                room = self.max_bytes - self._size
                if room <= 0:
                    self._rotate()
                    continue
                if len(data) <= room:
                    piece = data
                else:
                    cut = data.rfind(b"\n", 0, room) + 1
                    if cut == 0 and not self._fresh:
                        self._rotate()  # the line may fit whole in the next file
                        continue
                    piece = data[: cut or room]
                self._write_all(piece)
                self._fresh = False
                data = data[len(piece) :]
        except OSError as exc:
            self._lost += len(data)
            self._lost_why = exc.strerror or str(exc)
            self._close()

    def close(self) -> None:
        self._close()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        self._close()
        for index in range(self.files - 1, 1, -1):
            older = f"{self.path}.{index - 1}"
            if os.path.lexists(older):
                os.replace(older, f"{self.path}.{index}")
        with contextlib.suppress(FileNotFoundError):  # removed by hand: nothing to keep
            if self.files > 1:
                os.replace(self.path, f"{self.path}.1")
            else:
                os.unlink(self.path)
        self._open()
        what = f"is in {os.path.basename(self.path)}.1" if self.files > 1 else "was dropped"
        self._write_all(
            f"==> conveyor {_now()}: the log reached {self.max_bytes} bytes;"
            f" what came before {what}\n".encode()
        )
        self._fresh = True

    def _mark_lost(self) -> None:
        self._write_all(
            f"==> conveyor {_now()}: {self._lost} bytes of output were lost"
            f" ({self._lost_why})\n".encode()
        )
        self._lost = 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main(argv: list[str]) -> int:
    """``PATH MAX_BYTES FILES``: copy stdin to the kept log until every writer is gone."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path, max_bytes, files = argv[0], int(argv[1]), int(argv[2])
    keeper = Keeper(path, max_bytes, files)
    while True:
        try:
            data = os.read(0, _CHUNK)
        except InterruptedError:
            continue
        if not data:
            break
        keeper.write(data)
    keeper.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
