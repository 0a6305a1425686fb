"""The git repository a run comes from, and the clean workspace it runs in.

A run works on a clean checkout of a committed revision (a shared clone, so no object is
copied); with ``--dirty`` it works on a copy of the working tree's
tracked and untracked, not-ignored files instead. The pipeline file is read from the same revision.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from conveyor.errors import SourceError

if TYPE_CHECKING:
    from types import ModuleType

    from conveyor.domain.ports import SourceSnapshot


def _shutil() -> ModuleType:
    """``shutil`` on first use: importing it costs 2 ms (zlib, bz2 and lzma) at every start."""
    import shutil

    return shutil


def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError as exc:
        raise SourceError("git is not installed", hint="install git and try again") from exc
    if check and proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SourceError(f"git {args[0]} failed: {message[-1] if message else proc.returncode}")
    return proc


def find_repo_root(start: Path) -> Path | None:
    """The top of the git work tree containing ``start``, or ``None``."""
    proc = _git(start, "rev-parse", "--show-toplevel", check=False)
    if proc.returncode != 0:
        return None
    return Path(proc.stdout.decode().strip())


def discover(cwd: Path, rev: str, rel_path: str) -> tuple[GitSource, str, str, str, str] | None:
    """In one git call: the repository, the path of ``rel_path`` (relative to ``cwd``) from its
    root, and the commit, tree and blob ids at ``rev`` (and, for its checkout, the repository's
    layout). ``None`` if anything is missing (the caller then asks step by step, to explain
    what is wrong).

    This module imports little, so that a run can start its checkout before the rest of
    Conveyor is loaded."""
    if rev.startswith("-") or rel_path.startswith("/"):
        return None
    proc = _git(
        cwd,
        "rev-parse",
        "--show-toplevel",
        "--show-prefix",
        "--git-common-dir",
        "--show-object-format",
        f"{rev}^{{commit}}",
        f"{rev}^{{tree}}",
        f"{rev}:./{rel_path}",
        "--symbolic-full-name",
        "HEAD",
        check=False,
    )
    lines = proc.stdout.decode("utf-8", "surrogateescape").split("\n")
    # 9 lines; 8 when HEAD is ambiguous (a tag named HEAD: said on stderr, exit 0).
    if proc.returncode != 0 or len(lines) not in (8, 9) or not all(map(_is_object_id, lines[4:7])):
        return None  # e.g. a newline in the repository's path: asked step by step instead
    root, prefix, common, object_format, commit, tree, blob = lines[:7]
    source = GitSource(Path(root))
    source.layout = _layout(cwd, common, object_format, lines[7] if len(lines) == 9 else "?")
    return source, prefix + rel_path, commit, tree, blob


def _layout(cwd: Path, common: str, object_format: str, head: str) -> _Layout:
    """The layout from ``rev-parse``'s answers, run in ``cwd`` (``head``: ``HEAD`` when
    detached, ``?`` when not known)."""
    # Relative from a subfolder (``../../.git``): resolved, so that the checkout's alternates
    # still lead to the objects once that subfolder is gone (moved, another branch).
    common_dir = os.path.realpath(os.path.join(cwd, common))
    # A git without ``--show-object-format`` (before 2.25) echoes the option: only sha1 then.
    return _Layout(
        common_dir,
        object_format if object_format in ("sha1", "sha256") else "sha1",
        head if head.startswith("refs/heads/") else ("" if head == "HEAD" else "?"),
    )


def _is_object_id(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)


REPOSITORY_ENV = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_PREFIX",
        "GIT_IMPLICIT_WORK_TREE",
        "GIT_GRAFT_FILE",
        "GIT_SHALLOW_FILE",
        "GIT_INTERNAL_SUPER_PREFIX",
    }
)
"""The variables of ``git rev-parse --local-env-vars`` that point git at one repository, as git
sets them for hooks. A workspace is a repository of its own: neither its checkout nor the
jobs in it may see them (``git checkout`` would move the user's own repository). The
configuration ones (``GIT_CONFIG*``, ``git -c``) are the user's settings and are kept."""


def without_repository_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the variables that point git at a repository."""
    return {k: v for k, v in env.items() if k not in REPOSITORY_ENV}


class _Layout(NamedTuple):
    """What a checkout needs to know of the repository it borrows from."""

    common_dir: str
    """Its object database and shared files (``.git``; the main one for a linked worktree)."""
    object_format: str
    """``sha1`` or ``sha256``."""
    head: str
    """The current branch (``refs/heads/BRANCH``), ``""`` when detached, ``?`` when not known
    (a branch not born yet, a ``HEAD`` that names a tag as well)."""


class GitSource:
    """Reads revisions, files and trees of one repository."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout: _Layout | None = None
        """Found together with the revision (``discover``), else on first use."""

    def checkout_layout(self) -> _Layout:
        """The repository's layout (two git calls, unless ``discover`` found it already)."""
        if self.layout is None:
            proc = _git(self.root, "rev-parse", "--git-common-dir", "--show-object-format")
            lines = proc.stdout.decode("utf-8", "surrogateescape").split("\n")
            if len(lines) != 3:
                raise SourceError(f"cannot read the layout of the repository {self.root}")
            # The current branch, if it has a commit (not an orphan branch just begun): else "?".
            head = _git(
                self.root,
                "rev-parse",
                "--verify",
                "--quiet",
                "--symbolic-full-name",
                "HEAD",
                check=False,
            )
            name = head.stdout.decode("utf-8", "surrogateescape").strip() or "?"
            self.layout = _layout(self.root, lines[0], lines[1], name)
        return self.layout

    def repository_uri(self) -> str:
        """Where the code comes from, for provenance: the ``origin`` remote's URL if there is
        one, else ``file://`` and the repository's path."""
        proc = _git(self.root, "config", "--get", "remote.origin.url", check=False)
        url = proc.stdout.decode("utf-8", "replace").strip()
        return url if proc.returncode == 0 and url else self.root.resolve().as_uri()

    def commits_since(self, revision: str, known: Sequence[str]) -> list[tuple[str, float]]:
        """Commits in ``revision`` and in none of ``known``, with their commit times (epoch)."""
        args = ["log", "--format=%H %ct", revision, "--not", *[k for k in known if k]]
        proc = _git(self.root, *args, check=False)
        if proc.returncode != 0:
            proc = _git(self.root, "log", "-1", "--format=%H %ct", revision, check=False)
            if proc.returncode != 0:
                raise SourceError(f"cannot list the commits of {revision[:12]}")
        result = []
        for line in proc.stdout.decode().splitlines():
            sha, _, when = line.partition(" ")
            if sha and when.isdigit():
                result.append((sha, float(when)))
        return result

    def authors_of(self, revision: str, shipped: Sequence[str] = ()) -> list[str]:
        """The author and committer e-mails of the commits ``revision`` brings: those not in
        any of ``shipped`` (revisions already deployed) or, without any, the commits a merge
        brought in (``revision`` and what its first parent lacks; at most 1,000)."""
        fmt = "--format=%ae%n%ce"
        known = [k for k in shipped if k]
        exclude = known or [f"{revision}^1"]
        proc = _git(self.root, "log", "-n", "1000", fmt, revision, "--not", *exclude, check=False)
        if proc.returncode != 0:  # a root commit, or a revision the repository lost
            proc = _git(self.root, "log", "-1", fmt, revision, check=False)
        return sorted({line.strip() for line in proc.stdout.decode().splitlines() if line.strip()})

    def branch_of(self, rev: str) -> str:
        """The branch ``rev`` names (``HEAD`` on a branch counts), or ``""``."""
        if rev.startswith("-"):
            return ""
        proc = _git(self.root, "rev-parse", "--symbolic-full-name", rev, check=False)
        name = proc.stdout.decode("utf-8", "replace").strip()
        return name.removeprefix("refs/heads/") if name.startswith("refs/heads/") else ""

    def resolve(self, rev: str) -> str:
        """The full commit id of ``rev``."""
        if rev.startswith("-"):
            raise SourceError(f"'{rev}' is not a revision")
        proc = _git(self.root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
        commit = proc.stdout.decode("ascii", "replace").strip()
        if proc.returncode != 0 or not _is_object_id(commit):
            if rev == "HEAD":
                raise SourceError(
                    "the repository has no commits yet",
                    hint="commit your files (git add -A && git commit), or run with --dirty",
                )
            raise SourceError(
                f"'{rev}' is not a commit of this repository",
                hint="give a branch, a tag or a commit id (git log shows them)",
            )
        return commit

    def resolve_file(self, rev: str, rel_path: str) -> tuple[str, str, str | None]:
        """Commit id, tree id and the blob id of ``rel_path`` at ``rev`` (one git call).

        The blob id is ``None`` when the file is not in that commit.
        """
        if rev.startswith("-"):
            raise SourceError(f"'{rev}' is not a revision")
        proc = _git(
            self.root,
            "rev-parse",
            f"{rev}^{{commit}}",
            f"{rev}^{{tree}}",
            f"{rev}:{rel_path}",
            check=False,
        )
        lines = proc.stdout.decode("ascii", "replace").split()
        # rev-parse echoes what it does not read as a revision (a '^HEAD', a path with '*'):
        # only object ids count.
        if proc.returncode == 0 and len(lines) == 3 and all(map(_is_object_id, lines)):
            return lines[0], lines[1], lines[2]
        commit = self.resolve(rev)
        tree = _git(self.root, "rev-parse", f"{commit}^{{tree}}").stdout.decode().strip()
        return commit, tree, None

    def tree_entry(self, commit: str, rel_path: str) -> tuple[str, str, int | None] | None:
        """The mode (``100644``, ``120000`` for a symbolic link...), the type (``blob``,
        ``tree``, ``commit``) and the size (``None`` but for a blob) of ``rel_path`` in
        ``commit``, without reading it; ``None`` if it is not there."""
        proc = _git(
            self.root,
            "--literal-pathspecs",
            "ls-tree",
            "-l",
            "-z",
            "--full-tree",
            commit,
            "--",
            rel_path,
            check=False,
        )
        wanted = os.fsencode(rel_path)
        for entry in proc.stdout.split(b"\0"):
            meta, _, path = entry.partition(b"\t")
            fields = meta.split()
            if path == wanted and len(fields) == 4:
                size = fields[3].decode()
                return fields[0].decode(), fields[1].decode(), int(size) if size.isdigit() else None
        return None

    def read_blob(self, blob: str) -> bytes:
        """The bytes of a blob."""
        return _git(self.root, "cat-file", "blob", blob).stdout

    def snapshot(self, commit: str, with_files: bool, tree: str | None = None) -> SourceSnapshot:
        """Tree id and (if asked) the blob id of every file, for cache keys."""
        from conveyor.domain.ports import SourceSnapshot

        if tree is None:
            tree = _git(self.root, "rev-parse", f"{commit}^{{tree}}").stdout.decode().strip()
        files: dict[str, str] = {}
        if with_files:
            out = _git(self.root, "ls-tree", "-r", "-z", "--full-tree", commit).stdout
            for entry in out.split(b"\0"):
                if not entry:
                    continue
                meta, _, path = entry.partition(b"\t")
                mode, _, blob = meta.split()
                # The mode too: a script that loses its executable bit does something else.
                files[path.decode("utf-8", "surrogateescape")] = f"{mode.decode()}:{blob.decode()}"
        return SourceSnapshot(revision=commit, tree_id=tree, files=files)

    def dirty_files(self) -> list[str]:
        """Tracked and untracked, not-ignored files of the working tree."""
        out = _git(self.root, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
        return sorted({p.decode("utf-8", "surrogateescape") for p in out.split(b"\0") if p})

    def dirty_snapshot(self) -> SourceSnapshot:
        """A snapshot of the working tree as it is now (content sha256 per file)."""
        import hashlib

        from conveyor.domain.ports import SourceSnapshot

        head = _git(self.root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
        revision = head.stdout.decode().strip() if head.returncode == 0 else "0" * 40
        files: dict[str, str] = {}
        for rel in self.dirty_files():
            path = self.root / rel
            if path.is_symlink():
                files[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                mode = "100755" if os.access(path, os.X_OK) else "100644"
                files[rel] = f"{mode}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
        tree = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()
        return SourceSnapshot(revision=revision, tree_id="dirty:" + tree, files=files, dirty=True)


class GitWorkspace:
    """A clean checkout of one commit: a repository of its own that borrows the objects of
    the user's (``objects/info/alternates``, none copied), with what ``git clone --shared``
    would give it: the branches as ``origin/*`` (and ``origin/HEAD``), the current branch, the
    tags, the ``origin`` remote and a shallow history's boundary; checked out detached.

    It is built by hand rather than cloned: a clone runs ``git-upload-pack`` through a shell
    and copies the hook templates, twice the time (≈ 27 against 15 ms), and a short run waits
    for its checkout. ``start`` begins the checkout in the background so that it overlaps with
    the rest of the run's set-up; ``path`` waits for it (or does it) the first time a job
    needs it.
    """

    _SCRIPT = r"""
set -e
git init --quiet --template= ${5:+"--object-format=$5"} -- "$2"
printf '%s/objects\n' "$4" > "$2/.git/objects/info/alternates"
git -C "$1" for-each-ref --format="$6" refs/heads refs/tags > "$2/.git/packed-refs"
printf '%s' "$7" >> "$2/.git/config"
[ ! -f "$4/shallow" ] || cat -- "$4/shallow" > "$2/.git/shallow"
branch=${8#\?}
if [ "$8" = "" ]; then
    # A detached HEAD: as a clone guesses, a branch at the same commit (main or master first),
    # which the checkout gets as a branch of its own too.
    while read -r object ref; do
        case $ref in
        refs/heads/main | refs/heads/master) branch=$ref found=$object; break ;;
        esac
        [ -n "$branch" ] || { branch=$ref found=$object; }
    done <<EOF
$(git -C "$1" for-each-ref --points-at=HEAD --format='%(objectname) %(refname)' refs/heads)
EOF
    [ -z "$branch" ] || printf '%s %s\n' "$found" "$branch" >> "$2/.git/packed-refs"
fi
if [ -n "$branch" ]; then
    name=${branch#refs/heads/}
    printf 'ref: refs/remotes/origin/%s\n' "$name" > "$2/.git/refs/remotes/origin/HEAD"
    case $name in
    *'"'*) ;;  # not quoted here: left without an upstream
    *) printf '[branch "%s"]\n\tremote = origin\n\tmerge = "%s"\n' "$name" "$branch" \
        >> "$2/.git/config" ;;
    esac
fi
git -C "$2" -c advice.detachedHead=false checkout --quiet --detach "$3"
"""
    _REFS = (
        # A branch B becomes origin/B (and stays B too if it is the current one); a tag stays.
        "%(objectname) %(if:equals=refs/heads)%(refname:rstrip=-2)%(then)"
        "refs/remotes/origin/%(refname:lstrip=2)"
        "%(if:equals=*)%(HEAD)%(then)%0a%(objectname) %(refname)%(end)"
        "%(else)%(refname)%(end)"
    )

    def __init__(self, source: GitSource, commit: str, directory: Path) -> None:
        self.source = source
        self.commit = commit
        self.directory = directory
        self.final_directory = directory
        """Where the checkout ends up (a checkout may start before the run id is known)."""
        self._ready = False
        self._proc: subprocess.Popen[bytes] | None = None
        self.cancelled: Callable[[], bool] = lambda: False
        """Checked while ``path`` waits for the checkout: true stops and discards it."""

    def start(self) -> None:
        """Begin the checkout in the background."""
        if self._ready or self._proc is not None:
            return
        if "\n" in str(self.source.root):
            raise SourceError(
                f"cannot check out from {str(self.source.root)!r}: git cannot share the objects"
                " of a repository whose path contains a newline",
                hint="rename or move the repository",
            )
        layout = self.source.checkout_layout()
        try:
            if self.directory.exists():
                _shutil().rmtree(self.directory)
            # ``git init`` keeps what is there: origin/HEAD then needs no process of its own.
            (self.directory / ".git" / "refs" / "remotes" / "origin").mkdir(parents=True)
        except OSError as exc:
            raise SourceError(
                f"cannot prepare the workspace {self.directory}: {exc.strerror or exc}"
            ) from exc
        self._proc = subprocess.Popen(
            [
                "sh",
                "-c",
                self._SCRIPT,
                "sh",
                str(self.source.root),
                str(self.directory),
                self.commit,
                layout.common_dir,
                "" if layout.object_format == "sha1" else layout.object_format,  # older gits
                self._REFS,
                _remote_config(str(self.source.root)),
                layout.head,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=without_repository_env(os.environ),
            start_new_session=True,  # a terminal's Ctrl-C cancels the run, not git half-way
        )

    def path(self) -> str:
        """The checkout directory, once the checkout is complete."""
        if not self._ready:
            self.start()
            assert self._proc is not None
            while True:
                try:
                    _, err = self._proc.communicate(timeout=_CANCEL_CHECK_S)
                    break
                except subprocess.TimeoutExpired:
                    if self.cancelled():
                        self.close()
                        raise SourceError("the checkout was cancelled") from None
            code, self._proc = self._proc.returncode, None
            if code != 0:
                message = err.decode("utf-8", "replace").strip().splitlines()
                raise SourceError(
                    f"cannot check out {self.commit[:12]} into {self.directory}: "
                    + (message[-1] if message else f"exit {code}")
                )
            try:
                # Where jobs receive artifacts: not part of the tree, so `git status` stays clean.
                info = self.directory / ".git" / "info"
                info.mkdir(exist_ok=True)
                with open(info / "exclude", "a", encoding="utf-8") as exclude:
                    exclude.write("/.conveyor-artifacts/\n")
                if self.final_directory != self.directory:
                    if self.final_directory.exists():
                        _shutil().rmtree(self.final_directory)
                    os.replace(self.directory, self.final_directory)
                    self.directory = self.final_directory
            except OSError as exc:
                raise SourceError(
                    f"cannot prepare the workspace {self.final_directory}: {exc.strerror or exc}"
                ) from exc
            self._ready = True
        return str(self.directory)

    def close(self) -> None:
        """Stop and discard a background checkout that no job needed (every job was cached,
        or the command failed before one started)."""
        if self._proc is not None:
            if not self._ready and self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._proc.pid, signal.SIGKILL)  # its own session: git included
            self._proc.communicate()
            self._proc = None
        if not self._ready:
            _shutil().rmtree(self.directory, ignore_errors=True)


def _remote_config(url: str) -> str:
    """The ``origin`` remote, as a clone writes it."""
    return (
        f'[remote "origin"]\n\turl = {_quoted(url)}\n'
        "\tfetch = +refs/heads/*:refs/remotes/origin/*\n"
    )


def _quoted(value: str) -> str:
    """A git configuration value or subsection name, quoted (no newline can be in one)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_CANCEL_CHECK_S = 0.1
"""How often a checkout in progress checks whether the run was cancelled."""


class DirtyWorkspace:
    """A copy of the working tree (``--dirty``), made on first use: a checkout of ``HEAD``
    with the working tree's files laid over it, so that its changes show as uncommitted.

    It is a repository of its own, as a clean checkout is: a job's ``git`` commands must never
    reach the user's repository (which encloses the default home).
    """

    def start(self) -> None:
        """Nothing to do ahead of time: the copy is made by ``path``."""

    def close(self) -> None:
        """Nothing to release."""

    def __init__(self, source: GitSource, directory: Path) -> None:
        self.source = source
        self.directory = directory
        self._ready = False
        self.cancelled: Callable[[], bool] = lambda: False

    def path(self) -> str:
        """The copy's directory."""
        if self._ready:
            return str(self.directory)
        head = _git(
            self.source.root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False
        )
        wanted = self.source.dirty_files()
        try:
            if head.returncode == 0:
                GitWorkspace(self.source, head.stdout.decode().strip(), self.directory).path()
                tracked = _git(self.directory, "ls-files", "-z").stdout
                for entry in tracked.split(b"\0"):
                    rel = entry.decode("utf-8", "surrogateescape")
                    if rel and not os.path.lexists(self.source.root / rel):  # deleted since
                        with contextlib.suppress(FileNotFoundError):
                            (self.directory / rel).unlink()
            else:  # no commit yet: an empty repository of its own
                if self.directory.exists():
                    _shutil().rmtree(self.directory)
                self.directory.mkdir(parents=True)
                _git(self.directory, "init", "--quiet")
            for rel in wanted:
                self._copy(rel)
        except OSError as exc:
            raise SourceError(
                f"cannot copy the working tree to {self.directory}: {exc.strerror or exc}"
            ) from exc
        self._ready = True
        return str(self.directory)

    def _copy(self, rel: str) -> None:
        src = self.source.root / rel
        dst = self.directory / rel
        if not (src.is_symlink() or src.is_file()):
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir() and not dst.is_symlink():
            _shutil().rmtree(dst)
        elif dst.is_symlink() or dst.exists():
            dst.unlink()
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            _shutil().copy2(src, dst)
