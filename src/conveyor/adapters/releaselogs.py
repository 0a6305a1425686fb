"""Reads a release's kept log (``<env>/logs/<deployment>.log`` and its rotated files, see
``adapters.logkeeper``): the files in order, their last lines, and new output as it comes,
across rotations, as ``tail -F`` does.

Only regular files are read, never through a link: a log is a file Conveyor wrote.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from conveyor.errors import ConveyorError

_BLOCK = 64 * 1024


def kept_files(path: Path) -> list[Path]:
    """``path`` and its rotated files that exist, oldest first (``N.log.3``, ``.2``, ``.1``,
    ``N.log``)."""
    found: list[Path] = []
    index = 1
    while _exists(older := path.with_name(f"{path.name}.{index}")):
        found.append(older)
        index += 1
    found.reverse()
    if _exists(path):
        found.append(path)
    return found


def _exists(path: Path) -> bool:
    """Whether ``path`` exists (a link too); ``ConveyorError`` if that cannot be known."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    except OSError as exc:
        raise ConveyorError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return True


class ReleaseLog:
    """The kept output of one release; ``kept()`` first, then ``new()`` again and again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self.gap = False
        """Set when output may have been rotated away before it could be read."""
        self._line_open = False
        self._fresh_file = False

    def kept(self, lines: int | None = None) -> Iterator[bytes]:
        """What the files hold, oldest first, in chunks (a file that does not end a line is
        followed by a line end); only the last ``lines`` lines if given. Leaves the newest
        file open at its end for ``new``."""
        opened: list[int] = []
        try:
            for path in kept_files(self.path):
                fd = _open(path)
                if fd is not None:
                    opened.append(fd)
            first, offset = (0, 0) if lines is None else _tail_start(opened, lines)
            end: int | None = None
            for index in range(first, len(opened)):
                position = offset if index == first else 0
                self._fresh_file = True
                while data := os.pread(opened[index], _BLOCK, position):
                    position += len(data)
                    yield from self._emit(data)
                end = position
            if opened:
                newest = opened.pop()
                os.lseek(newest, os.fstat(newest).st_size if end is None else end, os.SEEK_SET)
                self._adopt(newest)
        finally:
            for fd in opened:
                os.close(fd)

    def new(self) -> bytes:
        """Output written since the last call. After a rotation, the rest of the file being
        read, then the next newer kept file, and so on (``gap`` is set when the file being
        read was rotated away with others: some output may have gone before it was read)."""
        if self._fd is not None:
            data = os.read(self._fd, _BLOCK)
            if data:
                return b"".join(self._emit(data))
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return b""
        if (info.st_dev, info.st_ino) == self._identity:
            return b""
        if self._fd is not None and (data := os.read(self._fd, _BLOCK)):
            return b"".join(self._emit(data))  # written just before the rotation
        files = kept_files(self.path)
        identities = [_identity(path) for path in files]
        if self._identity is None or self._identity not in identities:
            # Ours was dropped: the oldest kept file follows it, unless more files went too.
            self.gap = self._identity is not None and len(files) > 1
            following = files
        else:
            following = files[identities.index(self._identity) + 1 :]
        for path in following:
            fd = _open(path)
            if fd is not None:
                self._close()
                self._adopt(fd)
                return b"".join(self._emit(os.read(fd, _BLOCK), new_file=True))
        return b""

    def _emit(self, data: bytes, new_file: bool = False) -> Iterator[bytes]:
        """``data``, after a line end if it begins another file and the last did not end one."""
        if not data:
            return
        if self._line_open and (new_file or self._fresh_file):
            yield b"\n"
        self._fresh_file = False
        self._line_open = not data.endswith(b"\n")
        yield data

    def close(self) -> None:
        self._close()

    def _adopt(self, fd: int) -> None:
        info = os.fstat(fd)
        self._fd, self._identity = fd, (info.st_dev, info.st_ino)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _open(path: Path) -> int | None:
    """A read-only descriptor of the regular file ``path``; ``None`` if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConveyorError(
                f"cannot read {path}: it is a link", hint="a release's log is a regular file"
            ) from exc
        raise ConveyorError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConveyorError(
            f"cannot read {path}: it is not a regular file", hint="a release's log is a file"
        )
    return fd


def _tail_start(fds: list[int], lines: int) -> tuple[int, int]:
    """Where the last ``lines`` lines of the files (oldest first) begin: (file, offset). A
    file that does not end a line ends one all the same (``kept`` adds the line end)."""
    if lines == 0:
        return (len(fds), 0)
    needed = lines
    seen = False  # a byte was passed, from the end
    for index in range(len(fds) - 1, -1, -1):
        end = os.fstat(fds[index]).st_size
        if end and seen and os.pread(fds[index], 1, end - 1) != b"\n":
            needed -= 1
            if needed == 0:
                return index + 1, 0
        position = end
        while position > 0:
            size = min(_BLOCK, position)
            position -= size
            block = os.pread(fds[index], size, position)
            if not seen and block:
                seen = True
                if block.endswith(b"\n"):
                    block = block[:-1]  # the last line's own end
            cut = len(block)
            while (cut := block.rfind(b"\n", 0, cut)) >= 0:
                needed -= 1
                if needed == 0:
                    return index, position + cut + 1
    return 0, 0
