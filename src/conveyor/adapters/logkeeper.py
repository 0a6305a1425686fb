"""Keeps what a deployed release prints in a size-capped, rotated log file.

A release's service (and a ``command`` target's scripts) write into a pipe; a keeper process
reads it and appends to ``<env>/logs/<deployment>.log``. When the file would pass ``max_bytes``
it is rotated as ``logrotate`` and Docker's ``json-file`` driver do: ``N.log.1`` becomes
``N.log.2`` and so on, ``N.log`` becomes ``N.log.1``, and a new ``N.log`` begins with a line
saying so; at most ``files`` files are kept in all (with ``files: 1`` the old output is
dropped). A cut falls between two lines: a line begun in a file is finished there (up to
``LINE_SLACK`` bytes past the cap), and only a line longer than a whole file is cut.

The keeper runs in a session of its own, ignores SIGTERM, SIGINT and SIGHUP, and ends when
every writer has closed the pipe: a service's last words on its way down are kept, and
stopping the service's process group does not stop the keeper first. A write that fails (a
full disk, a folder that cannot be written) drops that output, never blocks the service, and
one line in the log says how much was lost once writing works again; while a file cannot be
rotated, output is dropped rather than written past the cap. A log removed or replaced by
hand is begun again at its path. If the keeper itself is killed, a service that writes gets
SIGPIPE, as with any pipe.

This module uses the standard library only: it runs as a script (``python -I -S``), apart from
the package and whatever ``PYTHONPATH`` says.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

_CHUNK = 64 * 1024
LINE_SLACK = 4096
"""How far past the cap a file may go to finish the line it holds the beginning of."""
_READY = b"ready\n"
_MARK = b"\0==> conveyor "
"""How Conveyor's own lines come through the pipe (``say``): written as ``==> conveyor ...``
at the start of a line."""
_READY_TIMEOUT_S = 30.0
_HOLD_S = 0.2
"""How long the end of a read that may begin Conveyor's mark waits for the rest of it."""


def start_keeper(
    path: Path, max_bytes: int, files: int, env: Mapping[str, str]
) -> tuple[int, subprocess.Popen[bytes]]:
    """Start a keeper appending to ``path`` and wait until it reads; returns the pipe's write
    end (for the caller to give its processes, then close) and the keeper's process.

    What the keeper says if it cannot start (a Python error) is appended to ``path``.

    Raises ``OSError`` when it cannot be started (the message says why).
    """
    path = Path(os.path.abspath(path))
    errors = open_log(str(path))
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        keeper = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, str(path), str(max_bytes), str(files)],
            stdin=read_fd,
            stdout=ready_w,
            stderr=errors,
            cwd="/",
            env=dict(env),
            start_new_session=True,
        )
    except BaseException:
        os.close(write_fd)
        os.close(ready_r)
        raise
    finally:
        os.close(errors)
        os.close(read_fd)
        os.close(ready_w)
    try:
        said = _read_ready(ready_r)
    finally:
        os.close(ready_r)
    if said != _READY:
        os.close(write_fd)
        with contextlib.suppress(OSError):
            keeper.kill()
        keeper.wait()
        raise OSError(f"the log keeper did not start (exit code {keeper.returncode}; see {path})")
    return write_fd, keeper


def open_log(path: str) -> int:
    """A descriptor appending to the regular file ``path`` (created if need be). Never
    blocks and never follows a link: ``OSError`` for a link, a FIFO, a folder..."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def say(out: int, text: str, timeout_s: float = 1.0) -> None:
    """Write one of Conveyor's own lines into a keeper's pipe: it begins a line of its own in
    the log. Dropped rather than wait longer than ``timeout_s`` for room in the pipe (a keeper
    that stopped reading never blocks Conveyor)."""
    line = (_MARK + text.encode("utf-8", "replace"))[: select.PIPE_BUF - 1] + b"\n"
    try:
        poller = select.poll()
        poller.register(out, select.POLLOUT)
        if poller.poll(timeout_s * 1000):  # room for PIPE_BUF bytes: the write does not block
            os.write(out, line)
    except OSError:
        pass


def _read_ready(fd: int) -> bytes:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    said = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(said) < len(_READY) and (left := deadline - time.monotonic()) > 0:
        if not poller.poll(left * 1000):
            break
        data = os.read(fd, len(_READY))
        if not data:
            break
        said += data
    return said


class Keeper:
    """Appends chunks to ``path``, rotating it at ``max_bytes`` (at most ``files`` files)."""

    def __init__(self, path: str, max_bytes: int, files: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.files = files
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._size = 0
        self._line_open = False
        """The file ends in the middle of a line."""
        self._fresh = False
        """Nothing but the rotation's line in the file yet: a line too long is cut here."""
        self._lost = 0
        self._lost_why = ""

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating as needed; on a failure drop the rest and count it."""
        view = memoryview(data)
        try:
            self._ensure_open()
            if self._lost:
                self._mark_lost()
            while view:
                room = self.max_bytes - self._size
                cut = len(view)
                if cut > room:
                    cut = _last_line_end(view, room)
                    if cut == 0 and self._line_open:  # finish the line this file holds
                        cut = _first_line_end(view, room + LINE_SLACK)
                    if cut == 0:
                        if not self._fresh and self._size > 0:
                            self._rotate()  # the line may fit whole in the next file
                            if self._lost:
                                self._mark_lost()
                            continue
                        cut = _char_start(view, max(room, 1))  # a line longer than a file
                while cut:
                    written = os.write(self._fd, view[:cut])  # type: ignore[arg-type]
                    self._size += written
                    self._line_open = view[written - 1] != ord("\n")
                    self._fresh = False
                    view, cut = view[written:], cut - written
        except OSError as exc:
            self._lost += len(view)
            self._lost_why = exc.strerror or str(exc)
            self._close()  # opened again at the next write (and rotated, if it can be then)

    def new_line(self) -> None:
        """End the line the file ends in, if it does (before a line of Conveyor's)."""
        try:
            self._ensure_open()
        except OSError:
            return
        if self._line_open:
            self.write(b"\n")

    def close(self) -> None:
        self._close()

    def _ensure_open(self) -> None:
        """Open the file, again if it was removed or replaced at its path since."""
        if self._fd is not None:
            try:
                info = os.stat(self.path, follow_symlinks=False)
                if (info.st_dev, info.st_ino) == self._identity:
                    return
            except FileNotFoundError:
                pass
            self._close()
        fd = open_log(self.path)
        info = os.fstat(fd)
        self._fd, self._identity, self._size = fd, (info.st_dev, info.st_ino), info.st_size
        self._line_open = self._size > 0 and os.pread(fd, 1, self._size - 1) != b"\n"

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _rotate(self) -> None:
        """Shift the kept files by one and begin a new one (``OSError`` if it cannot be done:
        then nothing was renamed or the shift is only partly done, and output is dropped)."""
        self._close()
        index = self.files
        while os.path.lexists(f"{self.path}.{index}"):  # beyond the count (files was lowered)
            os.unlink(f"{self.path}.{index}")
            index += 1
        for index in range(self.files - 1, 1, -1):
            older = f"{self.path}.{index - 1}"
            if os.path.lexists(older):
                os.replace(older, f"{self.path}.{index}")
        with contextlib.suppress(FileNotFoundError):  # removed by hand: nothing to keep
            if self.files > 1:
                os.replace(self.path, f"{self.path}.1")
            else:
                os.unlink(self.path)
        self._ensure_open()
        older = "older output is in the rotated files" if self.files > 1 else "it was dropped"
        self._note(f"the log reached {self.max_bytes} bytes: {older}")
        self._fresh = True

    def _mark_lost(self) -> None:
        """Say how much was lost, when the file has room for it."""
        if self._size + 200 > self.max_bytes:
            return  # said once the file is rotated
        self._note(f"{self._lost} bytes of output were lost ({self._lost_why})")
        self._lost = 0

    def _note(self, text: str) -> None:
        assert self._fd is not None
        line = f"==> conveyor {_now()}: {text}\n".encode()
        if self._line_open:
            line = b"\n" + line
        self._size += os.write(self._fd, line)
        self._line_open = False


def _char_start(view: memoryview, cut: int) -> int:
    """``cut`` moved back to the start of the UTF-8 character it falls in (if it is one)."""
    back = cut
    while back > 0 and cut - back < 4 and view[back] & 0xC0 == 0x80:
        back -= 1
    return back if back > 0 and cut - back < 4 else cut


def _last_line_end(view: memoryview, limit: int) -> int:
    """Bytes up to and including the last newline within the first ``limit`` (0: none)."""
    return bytes(view[: max(limit, 0)]).rfind(b"\n") + 1


def _first_line_end(view: memoryview, limit: int) -> int:
    """Bytes up to and including the first newline within the first ``limit`` (0: none)."""
    return bytes(view[: max(limit, 0)]).find(b"\n") + 1


def _hold_mark_prefix(data: bytes) -> tuple[bytes, bytes]:
    """``data`` split before a tail that could begin ``_MARK`` (kept for the next read)."""
    for size in range(min(len(_MARK) - 1, len(data)), 0, -1):
        if data.endswith(_MARK[:size]):
            return data[:-size], data[-size:]
    return data, b""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main(argv: list[str]) -> int:
    """``PATH MAX_BYTES FILES``: copy stdin to the kept log until every writer is gone."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path, max_bytes, files = argv[0], int(argv[1]), int(argv[2])
    if max_bytes < 1 or files < 1:
        print(f"logkeeper: bad limits: {max_bytes} bytes, {files} files", file=sys.stderr)
        return 2
    keeper = Keeper(path, max_bytes, files)
    # Ready: the signals are ignored. Then stdout and stderr go nowhere, not to a file that
    # may be rotated away (and kept on disk, deleted, while we hold it).
    os.write(1, _READY)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    held = b""  # the end of a read that may be the beginning of a mark
    stdin = select.poll()
    stdin.register(0, select.POLLIN)
    while True:
        if held and not stdin.poll(_HOLD_S * 1000):
            keeper.write(held)  # no mark came: it was the service's own output
            held = b""
        try:
            data = os.read(0, _CHUNK)
        except InterruptedError:
            continue
        if not data:
            keeper.write(held)
            break
        data, held = _hold_mark_prefix(held + data)
        first, *marked = data.split(_MARK)
        keeper.write(first)
        for part in marked:  # Conveyor's own lines, each on a line of its own
            keeper.new_line()
            keeper.write(b"==> conveyor " + part)
    keeper.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
