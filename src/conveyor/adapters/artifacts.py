"""A content-addressed artifact store on the local filesystem, and safe archive unpacking.

Layout under the store root::

    sha256/<first 2 hex>/<remaining 62 hex>    one read-only (0444) blob per digest
    tmp/<random>.part                          blobs being written (unique names)

Guarantees:

* A digest is ``sha256:<64 lowercase hex>`` of the blob's bytes; digest strings are checked
  strictly before they are used in a path.
* A blob appears all at once: it is written to ``tmp/``, fsynced and renamed into place, so
  concurrent writers of the same bytes both succeed and readers never see a partial blob.
* ``publish`` reads only inside the job's workspace: the output path may not be absolute,
  contain ``..`` or resolve (through symlinks) outside it, and files are opened component by
  component with ``O_NOFOLLOW``, so a path swapped for a symlink meanwhile is refused.
* A directory is stored as a canonical tar (PAX, uncompressed): entries sorted by name, mtime
  0, owner 0/0 without names, modes 0755 (directories, executables) or 0644, so equal trees
  have equal digests whatever their times, owners or creation order. Symlinks are kept only if
  relative and leading inside the directory; special files and setuid, setgid or sticky bits
  are refused. Hard links are stored as separate regular files.
* ``export`` verifies the bytes against the digest; nothing is written outside the store root
  and the destination (a file is staged next to its destination and renamed).
* ``safe_extract`` validates every member of an archive before extracting any, refusing the
  whole archive when one member could write outside the destination, is a special file or
  carries setuid/setgid bits; it then extracts with ``tarfile``'s ``data`` filter as a second
  guard and removes what it wrote if extraction fails.

Every refusal is an ``ArtifactError`` naming the entry and saying how to fix it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from conveyor.domain.delivery import StoredBlob
from conveyor.errors import ArtifactError
from conveyor.spec.models import ARTIFACT_KINDS

MAX_EXTRACT_BYTES = 10 * 1024**3
"""The most bytes ``safe_extract`` writes from one archive (tar bomb guard)."""
MAX_EXTRACT_MEMBERS = 1_000_000
"""The most members ``safe_extract`` accepts in one archive (tar bomb guard)."""

_DIGEST = re.compile(r"sha256:([0-9a-f]{2})([0-9a-f]{62})")
_CHUNK = 1024 * 1024
_MAX_LINK_HOPS = 40
_SPECIAL_BITS = ((stat.S_ISUID, "setuid"), (stat.S_ISGID, "setgid"))
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

StrPath = str | os.PathLike[str]


class FileArtifactStore:
    """``ArtifactStore`` in a directory: blobs at ``sha256/<2 hex>/<62 hex>`` under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- reading -------------------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        """Whether the store holds ``digest`` (a malformed digest is an error)."""
        return self._find(digest) is not None

    def path_of(self, digest: str) -> Path:
        """The blob file of ``digest``; raises ``ArtifactError`` if the store does not hold it."""
        path = self._find(digest)
        if path is None:
            raise ArtifactError(
                f"the artifact store at {self.root} has no blob {digest}",
                hint="it was never published here, or the store was cleaned; re-run the job "
                "that produces it",
            )
        return path

    def verify(self, digest: str) -> None:
        """Re-hash the blob; raises ``ArtifactError`` if its bytes no longer match ``digest``."""
        path = self.path_of(digest)
        sha = hashlib.sha256()
        try:
            with open(path, "rb") as blob:
                while chunk := blob.read(_CHUNK):
                    sha.update(chunk)
        except OSError as exc:
            raise self._io_error(f"cannot read blob {digest}", exc) from exc
        actual = "sha256:" + sha.hexdigest()
        if actual != digest:
            raise self._corrupted(digest, actual)

    def blobs(self) -> Iterator[StoredBlob]:
        """Every blob in the store, by digest."""
        top = self.root / "sha256"
        if not top.is_dir():
            return
        for prefix in sorted(top.iterdir()):
            if not prefix.is_dir() or prefix.is_symlink():
                continue
            for blob in sorted(prefix.iterdir()):
                digest = f"sha256:{prefix.name}{blob.name}"
                if _DIGEST.fullmatch(digest) and blob.is_file():
                    yield StoredBlob(digest, blob.stat().st_size)

    # -- writing -------------------------------------------------------------------------------

    def publish(self, root: StrPath, rel_path: str, kind: str) -> StoredBlob:
        """Store the file or directory at ``rel_path`` inside the workspace ``root``.

        Raises ``ArtifactError`` if the path leaves the workspace, is missing, is not of
        ``kind``, or (for a directory) contains an entry that cannot be stored safely.
        """
        _check_kind(kind)
        base, parts = _locate_output(root, rel_path)
        label = f"declared output {rel_path!r}"
        try:
            base_fd = _open_dir(base, -1, label)
        except OSError as exc:
            raise ArtifactError(
                f"cannot open the job's workspace {base}: {exc.strerror or exc}",
                hint="the workspace must be an existing directory",
            ) from exc
        try:
            fd = _open_output(base_fd, parts, kind, rel_path, base)
        finally:
            os.close(base_fd)
        try:
            if kind == "file":
                return self._store(lambda sink: _copy_fd(fd, sink, label))
            refuse = _Refusal(label, "entry", "directory", _PUBLISH_HINT)
            entries = _scan_tree(fd, refuse, label)
            return self._store(lambda sink: _write_tar(fd, entries, sink, label))
        finally:
            os.close(fd)

    def export(self, digest: str, kind: str, dest: StrPath) -> None:
        """Write the verified blob to ``dest``: the file itself, or the directory's contents.

        A file replaces ``dest`` atomically (parent folders are created); a directory is
        unpacked into ``dest``, which must not exist or be empty.
        """
        _check_kind(kind)
        target = Path(dest)
        if kind == "dir":
            _check_empty_dest(target)
            self.verify(digest)
            safe_extract(self.path_of(digest), target)
            return
        source = self.path_of(digest)
        if target.is_dir() and not target.is_symlink():
            raise ArtifactError(
                f"cannot export {digest} to {target}: it is a directory",
                hint="give the path of the file to write, or export the artifact as a dir",
            )
        staged = target.parent / f".conveyor-{secrets.token_hex(8)}.part"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            sha = hashlib.sha256()
            with open(source, "rb") as blob, open(staged, "xb") as out:
                while chunk := blob.read(_CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = "sha256:" + sha.hexdigest()
            if actual != digest:
                raise self._corrupted(digest, actual)
            os.replace(staged, target)
        except OSError as exc:
            raise ArtifactError(
                f"cannot export {digest} to {target}: {exc.strerror or exc}",
                hint="check that the destination folder is writable and has free space",
            ) from exc
        finally:
            staged.unlink(missing_ok=True)

    # -- internals -----------------------------------------------------------------------------

    def _find(self, digest: str) -> Path | None:
        path = self._blob_path(digest)
        try:
            return path if stat.S_ISREG(os.lstat(path).st_mode) else None
        except OSError:
            return None

    def _blob_path(self, digest: str) -> Path:
        match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
        if match is None:
            raise ArtifactError(
                f"{digest!r} is not a valid artifact digest",
                hint="a digest is 'sha256:' followed by 64 lowercase hexadecimal digits",
            )
        return self.root / "sha256" / match.group(1) / match.group(2)

    def _store(self, fill: Callable[[_Sink], None]) -> StoredBlob:
        """Write a blob through ``fill`` into ``tmp/``, then move it into place (or dedup)."""
        staged: Path | None = None
        try:
            tmp_dir = self.root / "tmp"
            tmp_dir.mkdir(parents=True, exist_ok=True)
            staged = tmp_dir / f"{secrets.token_hex(16)}.part"
            with open(staged, "xb") as out:
                sink = _Sink(out)
                fill(sink)
                out.flush()
                os.fchmod(out.fileno(), 0o444)
                os.fsync(out.fileno())
            blob = StoredBlob(sink.digest, sink.size)
            path = self._blob_path(blob.digest)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                existing = os.lstat(path)
            except FileNotFoundError:
                existing = None
            if existing is None or not (
                stat.S_ISREG(existing.st_mode) and existing.st_size == blob.size
            ):
                os.replace(staged, path)
                _fsync_dir(path.parent)
            return blob
        except _StoreWriteError as exc:
            raise self._io_error("cannot write to the artifact store", exc.cause) from exc
        except OSError as exc:
            raise self._io_error("cannot write to the artifact store", exc) from exc
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)

    def _corrupted(self, digest: str, actual: str) -> ArtifactError:
        return ArtifactError(
            f"blob {digest} is corrupted: its content hashes to {actual}; the store was altered",
            hint=f"delete {self._blob_path(digest)} and re-run the job that produces it",
        )

    def _io_error(self, what: str, exc: OSError) -> ArtifactError:
        return ArtifactError(
            f"{what} at {self.root}: {exc.strerror or exc}",
            hint="check that the store folder is writable and the disk has free space",
        )


def is_tar(path: StrPath) -> bool:
    """Whether ``path`` is a tar archive (plain or compressed) that ``tarfile`` can read."""
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def safe_extract(
    archive: StrPath,
    dest: StrPath,
    *,
    max_bytes: int = MAX_EXTRACT_BYTES,
    max_members: int = MAX_EXTRACT_MEMBERS,
) -> None:
    """Unpack the tar ``archive`` (plain, gz, bz2 or xz) into ``dest``, refusing hostile input.

    ``dest`` must not exist or be an empty directory. Every member is checked first; if one
    is unsafe (absolute or ``..`` path, link leaving ``dest``, device or fifo, setuid/setgid
    bit) or the archive is larger than ``max_bytes``/``max_members``, nothing is extracted.
    If extraction fails midway, what was written is removed.
    """
    source, target = Path(archive), Path(dest)
    _check_empty_dest(target)
    refuse = _Refusal(
        f"archive {source}", "member", "destination", _ARCHIVE_HINT, "; nothing was extracted"
    )
    created = False
    try:
        with tarfile.open(source, "r:*") as tar:
            members = _validated_members(tar, source, refuse, max_bytes, max_members)
            created = not target.exists()
            target.mkdir(parents=True, exist_ok=True)
            tar.errorlevel = 2
            try:
                tar.extractall(target, members=members, filter="data")
            except BaseException:
                _remove_contents(target, created)
                raise
    except tarfile.FilterError as exc:
        name = exc.tarinfo.name if exc.tarinfo is not None else "?"
        raise refuse(name, f"was refused while extracting ({exc})") from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ArtifactError(
            f"cannot extract archive {source}: {detail or type(exc).__name__}",
            hint="check that it is a complete tar archive (plain, .gz, .bz2 or .xz) and that "
            f"{target} is writable",
        ) from exc


# -- refusals --------------------------------------------------------------------------------

_PUBLISH_RULE = "only regular files, directories and relative symlinks can be stored"
_PUBLISH_HINT = (
    "an artifact directory may hold only regular files, directories and relative symlinks "
    "that stay inside it; change the job so it does not leave this entry in its output"
)
_ARCHIVE_HINT = (
    "the archive is unsafe to unpack: rebuild it with relative paths, links that stay inside "
    "it and no device files or setuid/setgid bits"
)
_BOMB_HINT = "nothing was extracted; if the archive is legitimate, split it into smaller ones"


@dataclass(frozen=True)
class _Refusal:
    """Builds the error for one refused entry, worded for where it was found."""

    subject: str
    noun: str
    scope: str
    hint: str
    tail: str = ""

    def __call__(self, name: str, problem: str, hint: str | None = None) -> ArtifactError:
        return ArtifactError(
            f"{self.subject}: {self.noun} {name!r} {problem}{self.tail}", hint=hint or self.hint
        )


def _special_bits_problem(mode: int) -> str | None:
    for bit, word in _SPECIAL_BITS:
        if mode & bit:
            return f"has the {word} bit; artifacts may not carry setuid or setgid files"
    return None


def _check_tree(kinds: Mapping[str, str], links: Mapping[str, str], refuse: _Refusal) -> None:
    """Refuse entries below a non-directory, and symlinks that lead outside the tree.

    ``kinds`` maps each entry name (``a/b``) to ``dir``, ``file``, ``symlink`` or ``hardlink``;
    ``links`` maps each symlink to its target.
    """
    for name in kinds:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            kind = kinds.get(prefix)
            if kind == "symlink":
                raise refuse(name, f"lies under {prefix!r}, which is a symlink")
            if kind is not None and kind != "dir":
                raise refuse(name, f"lies under {prefix!r}, which is not a directory")
    for name, target in links.items():
        problem = _link_problem(name, target, links, refuse.scope)
        if problem is not None:
            raise refuse(name, problem)


def _link_problem(name: str, target: str, links: Mapping[str, str], scope: str) -> str | None:
    """Why the symlink ``name -> target`` is unsafe, or None if it resolves inside the tree."""
    if not target or "\0" in target:
        return "is a symlink with an empty or invalid target"
    if target.startswith("/"):
        return (
            f"is a symlink to the absolute path {target!r}; only relative links that stay "
            f"inside the {scope} are allowed"
        )
    budget = [_MAX_LINK_HOPS]
    try:
        inside = _resolve(name.split("/")[:-1], target, links, budget) is not None
    except _TooManyLinks:
        return f"is a symlink to {target!r} that does not resolve within {_MAX_LINK_HOPS} links"
    if not inside:
        return f"is a symlink to {target!r}, which leads outside the {scope}"
    return None


class _TooManyLinks(Exception):
    pass


def _resolve(
    base: list[str], target: str, links: Mapping[str, str], budget: list[int]
) -> list[str] | None:
    """Resolve ``target`` from directory ``base`` as the kernel would, following the tree's own
    symlinks; None if the walk ever climbs above the tree's root or reaches an absolute link.
    """
    if target.startswith("/"):
        return None
    parts = list(base)
    for component in target.split("/"):
        if component in ("", "."):
            continue
        if component == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(component)
        link = links.get("/".join(parts))
        if link is not None:
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooManyLinks
            resolved = _resolve(parts[:-1], link, links, budget)
            if resolved is None:
                return None
            parts = resolved
    return parts


# -- publishing ------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in ARTIFACT_KINDS:
        raise ArtifactError(
            f"unknown artifact kind {kind!r}",
            hint="use 'file' for one file or 'dir' for a directory",
        )


def _locate_output(root: StrPath, rel_path: str) -> tuple[Path, tuple[str, ...]]:
    """The resolved workspace and the output's path components inside it (after symlinks)."""
    label = f"declared output {rel_path!r}"
    if not rel_path or "\0" in rel_path:
        raise ArtifactError(
            f"{label} is not a usable path", hint="name a file or directory in the workspace"
        )
    if rel_path.startswith("/") or os.path.isabs(rel_path):
        raise ArtifactError(
            f"{label} is an absolute path; artifact paths are relative to the job's workspace",
            hint="write it inside the workspace and declare it relative, e.g. dist/app.tar.gz",
        )
    if ".." in rel_path.split("/"):
        raise ArtifactError(
            f"{label} contains '..'; artifact paths must stay inside the job's workspace",
            hint="write the output inside the workspace and declare its path without '..'",
        )
    try:
        base = Path(root).resolve(strict=True)
    except OSError as exc:
        raise ArtifactError(
            f"the job's workspace {root} cannot be used: {exc.strerror or exc}",
            hint="the workspace must be an existing directory",
        ) from exc
    try:
        resolved = (base / rel_path).resolve()
    except (OSError, RuntimeError) as exc:
        raise ArtifactError(
            f"cannot resolve {label} in the workspace {base}: {exc}",
            hint="check that the path has no symlink loop",
        ) from exc
    if not resolved.is_relative_to(base):
        raise ArtifactError(
            f"{label} resolves to {resolved}, outside the job's workspace {base}",
            hint="an artifact must be something the job wrote in its workspace; copy it into "
            "the workspace instead of linking to it",
        )
    return base, resolved.relative_to(base).parts


def _open_dir(name: StrPath, dir_fd: int, label: str) -> int:
    """Open a directory (``name`` relative to ``dir_fd``, or absolute) without following links.

    Raises ``FileNotFoundError`` and ``NotADirectoryError`` as they are (the caller knows
    whether that means a missing output); anything else means the tree changed under us.
    """
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=None if dir_fd < 0 else dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as exc:
        raise _changed(label, exc) from exc


def _open_output(base_fd: int, parts: Sequence[str], kind: str, rel_path: str, base: Path) -> int:
    """Open the output (without following symlinks anywhere) and check its type."""
    label = f"declared output {rel_path!r}"
    where = base.joinpath(*parts)
    if not parts:
        seen = os.fstat(base_fd)
        _check_output_type(seen.st_mode, kind, label, where)
        return os.dup(base_fd)
    fd = os.dup(base_fd)
    try:
        try:
            for part in parts[:-1]:
                child = _open_dir(part, fd, label)
                os.close(fd)
                fd = child
            seen = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise _not_produced(rel_path, str(where)) from exc
        _check_output_type(seen.st_mode, kind, label, where)
        return _open_checked(fd, parts[-1], seen, label)
    finally:
        os.close(fd)


def _check_output_type(mode: int, kind: str, label: str, where: Path) -> None:
    if (kind == "file" and stat.S_ISREG(mode)) or (kind == "dir" and stat.S_ISDIR(mode)):
        return
    found = _describe_type(mode)
    wanted = "a regular file" if kind == "file" else "a directory"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        other = "dir" if kind == "file" else "file"
        hint = f"declare it with kind: {other}, or point the path at {wanted}"
    else:
        hint = f"only regular files and directories can be artifacts; write {wanted} there"
    raise ArtifactError(f"{label} at {where} is {found}, but it is declared as {wanted}", hint=hint)


def _describe_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a fifo (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a special file"


def _not_produced(rel_path: str, where: str) -> ArtifactError:
    return ArtifactError(
        f"declared output {rel_path!r} was not produced; the job must write it at {where}",
        hint="check that the job's script writes this path (relative to the workspace), or fix "
        "the artifact's path",
    )


def _changed(label: str, exc: OSError) -> ArtifactError:
    return ArtifactError(
        f"{label} changed while it was being published ({exc.strerror or exc})",
        hint="make sure no process started by the job still writes to its outputs",
    )


def _open_checked(dir_fd: int, name: str, seen: os.stat_result, label: str) -> int:
    """Open ``name`` in ``dir_fd`` without following a symlink; it must still be ``seen``."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if stat.S_ISDIR(seen.st_mode):
        flags |= os.O_DIRECTORY
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise _changed(label, exc) from exc
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        raise _changed(label, OSError(f"{name!r} was replaced"))
    return fd


class _StoreWriteError(Exception):
    """Writing to the store failed (kept apart from errors reading the job's output)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause)
        self.cause = cause


class _Sink:
    """A write-only file that hashes and counts what it writes (``tarfile`` wants a file)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._sha = hashlib.sha256()
        self.size = 0

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def write(self, data: bytes) -> int:
        try:
            self._out.write(data)
        except OSError as exc:
            raise _StoreWriteError(exc) from exc
        self._sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def read(self, size: int = -1) -> bytes:
        raise io.UnsupportedOperation("write-only")

    def seek(self, pos: int, whence: int = 0) -> int:
        raise io.UnsupportedOperation("not seekable")

    def close(self) -> None:
        """The underlying file is closed by its owner."""


def _copy_fd(fd: int, sink: _Sink, label: str) -> None:
    try:
        while chunk := os.read(fd, _CHUNK):
            sink.write(chunk)
    except OSError as exc:
        raise ArtifactError(
            f"cannot read {label}: {exc.strerror or exc}",
            hint="check that the job left the file readable",
        ) from exc


@dataclass(frozen=True)
class _Entry:
    """One entry of a directory being published; ``name`` is relative, ``/``-separated."""

    name: str
    kind: str
    mode: int
    stat: os.stat_result
    target: str = ""


def _scan_tree(root_fd: int, refuse: _Refusal, label: str) -> list[_Entry]:
    """Every entry under ``root_fd`` in canonical order, refusing what cannot be stored."""
    entries: list[_Entry] = []
    # A stack of open directories and the subdirectories still to visit in each.
    stack: list[tuple[int, str, Iterator[tuple[str, os.stat_result]]]] = []

    def enter(fd: int, prefix: str) -> None:
        subdirs: list[tuple[str, os.stat_result]] = []
        try:
            with os.scandir(fd) as listing:
                for item in listing:
                    name = prefix + item.name
                    st = item.stat(follow_symlinks=False)
                    entries.append(_classify(fd, item.name, name, st, refuse))
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append((item.name, st))
        except BaseException:
            os.close(fd)
            raise
        stack.append((fd, prefix, iter(subdirs)))

    try:
        enter(os.dup(root_fd), "")
        while stack:
            fd, prefix, todo = stack[-1]
            step = next(todo, None)
            if step is None:
                os.close(fd)
                stack.pop()
                continue
            name, seen = step
            enter(_open_checked(fd, name, seen, label), f"{prefix}{name}/")
    except OSError as exc:
        raise ArtifactError(
            f"cannot read {label}: {exc.strerror or exc}",
            hint="check that the job left its output readable",
        ) from exc
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    kinds = {entry.name: entry.kind for entry in entries}
    links = {entry.name: entry.target for entry in entries if entry.kind == "symlink"}
    _check_tree(kinds, links, refuse)
    entries.sort(key=lambda entry: os.fsencode(entry.name))
    return entries


def _classify(dir_fd: int, base: str, name: str, st: os.stat_result, refuse: _Refusal) -> _Entry:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return _Entry(name, "symlink", 0o777, st, os.readlink(base, dir_fd=dir_fd))
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise refuse(name, f"is {_describe_type(mode)}; {_PUBLISH_RULE}")
    if stat.S_ISDIR(mode):
        # A directory's setgid or sticky bit grants nothing to its files' users (setgid is
        # inherited from the parent on many systems): normalised away like the other bits.
        return _Entry(name, "dir", 0o755, st)
    problem = _special_bits_problem(mode)
    if problem is not None:
        raise refuse(name, problem, hint="clear them in the job before it ends: chmod ug-s")
    return _Entry(name, "file", 0o755 if mode & 0o111 else 0o644, st)


def _write_tar(root_fd: int, entries: Sequence[_Entry], sink: _Sink, label: str) -> None:
    """Write the canonical tar of ``entries`` (read again through ``root_fd``) to ``sink``."""
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = entry.mode
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target
                tar.addfile(info)
            else:
                info.type = tarfile.REGTYPE
                fd = _open_entry(root_fd, entry, label)
                with open(fd, "rb") as source:
                    info.size = os.fstat(fd).st_size
                    try:
                        tar.addfile(info, source)
                    except OSError as exc:
                        raise _changed(f"{label}: entry {entry.name!r}", exc) from exc


def _open_entry(root_fd: int, entry: _Entry, label: str) -> int:
    parts = entry.name.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                child = _open_dir(part, fd, label)
            except OSError as exc:
                raise _changed(label, exc) from exc
            os.close(fd)
            fd = child
        return _open_checked(fd, parts[-1], entry.stat, label)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- extracting ------------------------------------------------------------------------------


def _check_empty_dest(dest: Path) -> None:
    if not os.path.lexists(dest):
        return
    if not dest.is_dir():
        raise ArtifactError(
            f"cannot unpack into {dest}: it exists and is not a directory",
            hint="choose a new folder, or remove what is there",
        )
    if any(dest.iterdir()):
        raise ArtifactError(
            f"cannot unpack into {dest}: the folder is not empty",
            hint="unpack into a new or empty folder so no existing file is overwritten",
        )


def _validated_members(
    tar: tarfile.TarFile, source: Path, refuse: _Refusal, max_bytes: int, max_members: int
) -> list[tarfile.TarInfo]:
    """Every member of ``tar``, after checking that each one is safe to extract."""
    members: list[tarfile.TarInfo] = []
    kinds: dict[str, str] = {}
    links: dict[str, str] = {}
    total = 0
    for member in tar:
        if len(members) >= max_members:
            raise ArtifactError(
                f"archive {source} has more than {max_members:,} members; refusing it as a "
                "possible archive bomb",
                hint=_BOMB_HINT,
            )
        name = _member_name(member.name, member.name, refuse)
        kind = _member_kind(member, refuse)
        if member.mode & (stat.S_ISUID | stat.S_ISGID):
            word = "setuid" if member.mode & stat.S_ISUID else "setgid"
            raise refuse(
                member.name, f"has the {word} bit; artifacts may not carry setuid/setgid bits"
            )
        if kind == "file":
            total += member.size
            if total > max_bytes:
                raise ArtifactError(
                    f"archive {source} would unpack to more than {max_bytes:,} bytes; refusing "
                    "it as a possible archive bomb",
                    hint=_BOMB_HINT,
                )
        members.append(member)
        if not name:
            if kind != "dir":
                raise refuse(member.name, "has an empty path")
            continue
        if name in kinds and not kind == kinds[name] == "dir":
            raise refuse(member.name, "appears more than once; a later copy would replace it")
        if kind == "hardlink":
            target = _member_name(member.linkname, member.name, refuse)
            if kinds.get(target) not in ("file", "hardlink"):
                raise refuse(
                    member.name,
                    f"is a hard link to {member.linkname!r}, which is not a regular file "
                    "stored earlier in the archive",
                )
        elif kind == "symlink":
            links[name] = member.linkname
        kinds[name] = kind
    _check_tree(kinds, links, refuse)
    return members


def _member_name(path: str, member: str, refuse: _Refusal) -> str:
    """``path`` normalised (no ``.`` or empty components), or a refusal if it is unsafe."""
    where = "" if path == member else f" in its link target {path!r}"
    if "\0" in path:
        raise refuse(member, f"has a NUL character{where}")
    if path.startswith("/"):
        raise refuse(member, f"has an absolute path{where}")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise refuse(member, f"has a '..' component{where}, which would leave the destination")
    return "/".join(parts)


def _member_kind(member: tarfile.TarInfo, refuse: _Refusal) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr():
        found = "a character device"
    elif member.isblk():
        found = "a block device"
    elif member.isfifo():
        found = "a fifo (named pipe)"
    else:
        found = f"of unsupported type {member.type!r}"
    raise refuse(member.name, f"is {found}; only files, directories and links can be unpacked")


def _remove_contents(dest: Path, created: bool) -> None:
    """Undo a failed extraction: remove ``dest`` if it was created, else empty it again."""
    try:
        if created:
            shutil.rmtree(dest)
            return
        with os.scandir(dest) as listing:
            for item in listing:
                if item.is_dir(follow_symlinks=False):
                    shutil.rmtree(item.path)
                else:
                    os.unlink(item.path)
    except OSError:
        pass
