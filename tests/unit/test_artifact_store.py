"""The filesystem artifact store and safe archive extraction, on a real filesystem."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor.adapters.artifacts import FileArtifactStore, is_tar, safe_extract
from conveyor.errors import ArtifactError


@pytest.fixture
def store(tmp_path: Path) -> FileArtifactStore:
    return FileArtifactStore(tmp_path / "store")


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    return workspace


def write(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def stored_files(store: FileArtifactStore) -> list[Path]:
    """Every file in the store except the staging folder (which must be empty anyway)."""
    tmp = store.root / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), "a temp file was left behind"
    return sorted(p for p in store.root.rglob("*") if p.is_file() and tmp not in p.parents)


def listing(root: Path) -> dict[str, tuple[str, str | bytes]]:
    """A tree as {relative path: (kind, content or link target)}, plus exec bits for files."""
    result: dict[str, tuple[str, str | bytes]] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            result[name] = ("link", os.readlink(path))
        elif path.is_dir():
            result[name] = ("dir", "")
        else:
            kind = "exec" if path.stat().st_mode & 0o100 else "file"
            result[name] = (kind, path.read_bytes())
    return result


# -- files -----------------------------------------------------------------------------------


def test_file_digest_is_the_sha256_of_its_bytes(store: FileArtifactStore, ws: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # crosses the copy chunk size
    write(ws / "dist" / "app.bin", data)

    blob = store.publish(str(ws), "dist/app.bin", "file")

    hexdigest = hashlib.sha256(data).hexdigest()
    assert blob.digest == f"sha256:{hexdigest}"
    assert blob.size == len(data)
    assert store.has(blob.digest)
    path = store.path_of(blob.digest)
    assert path == store.root / "sha256" / hexdigest[:2] / hexdigest[2:]
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    store.verify(blob.digest)


def test_same_bytes_are_stored_once(store: FileArtifactStore, ws: Path) -> None:
    write(ws / "a.txt", "same bytes")
    write(ws / "other" / "b.txt", "same bytes", mode=0o755)

    first = store.publish(str(ws), "a.txt", "file")
    second = store.publish(str(ws), "other/b.txt", "file")
    again = store.publish(str(ws), "a.txt", "file")

    assert first == second == again
    assert stored_files(store) == [store.path_of(first.digest)]
    assert [b.digest for b in store.blobs()] == [first.digest]


def test_file_export_roundtrip(store: FileArtifactStore, ws: Path, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    blob = store.publish(str(ws), str(write(ws / "app.bin", data).relative_to(ws)), "file")
    dest = tmp_path / "deploy" / "nested" / "app.bin"

    store.export(blob.digest, "file", str(dest))
    assert dest.read_bytes() == data

    write(dest, "old content")  # an existing file is replaced
    store.export(blob.digest, "file", str(dest))
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["app.bin"]


def test_publish_follows_a_symlink_that_stays_inside(store: FileArtifactStore, ws: Path) -> None:
    write(ws / "build" / "real.txt", "payload")
    (ws / "latest.txt").symlink_to("build/real.txt")

    blob = store.publish(str(ws), "latest.txt", "file")

    assert store.path_of(blob.digest).read_bytes() == b"payload"


def test_unknown_and_malformed_digests(store: FileArtifactStore) -> None:
    missing = "sha256:" + "0" * 64
    assert not store.has(missing)
    with pytest.raises(ArtifactError, match="has no blob"):
        store.path_of(missing)
    for bad in ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "0" * 32, "0" * 64]:
        with pytest.raises(ArtifactError, match="not a valid artifact digest"):
            store.has(bad)
    with pytest.raises(ArtifactError, match="not a valid artifact digest"):
        store.has("sha256:" + "0" * 64 + "\n")


# -- directories -----------------------------------------------------------------------------


def build_site(root: Path, *, reverse: bool, file_mode: int, mtime: int, owner: int) -> Path:
    """The same tree, created in a different order and with different metadata."""
    files: list[tuple[str, str, int]] = [
        ("index.html", "<h1>hi</h1>", file_mode),
        ("assets/app.js", "console.log(1)", file_mode),
        ("assets/img/logo.svg", "<svg/>", file_mode),
        ("bin/run", "#!/bin/sh\necho run\n", 0o755 if file_mode == 0o644 else 0o700),
        ("zz-last", "", file_mode),
    ]
    for rel, content, mode in reversed(files) if reverse else files:
        write(root / rel, content, mode)
    (root / "empty").mkdir()
    (root / "current.js").symlink_to("assets/app.js")
    for path in sorted(root.rglob("*"), reverse=True):
        os.chown(path, owner, owner, follow_symlinks=False)
        if not path.is_symlink():
            os.utime(path, (mtime, mtime))
    return root


def test_equal_trees_have_equal_digests(store: FileArtifactStore, ws: Path) -> None:
    build_site(ws / "one", reverse=False, file_mode=0o600, mtime=1_000_000, owner=0)
    build_site(ws / "two", reverse=True, file_mode=0o644, mtime=1_700_000_000, owner=4321)

    one = store.publish(str(ws), "one", "dir")
    two = store.publish(str(ws), "two/", "dir")

    assert one == two
    assert len(stored_files(store)) == 1


def test_directory_tar_is_canonical(store: FileArtifactStore, ws: Path) -> None:
    build_site(ws / "site", reverse=True, file_mode=0o640, mtime=123_456, owner=4321)

    blob = store.publish(str(ws), "site", "dir")

    with tarfile.open(store.path_of(blob.digest)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names == [
        "assets",
        "assets/app.js",
        "assets/img",
        "assets/img/logo.svg",
        "bin",
        "bin/run",
        "current.js",
        "empty",
        "index.html",
        "zz-last",
    ]
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
            0,
            0,
            0,
            "",
            "",
        )
    modes = {m.name: stat.S_IMODE(m.mode) for m in members if not m.issym()}
    assert modes["assets"] == modes["bin/run"] == 0o755
    assert modes["index.html"] == modes["assets/img/logo.svg"] == 0o644
    assert blob.size == store.path_of(blob.digest).stat().st_size


@pytest.mark.parametrize(
    "change",
    [
        lambda site: (site / "index.html").write_text("<h1>ho</h1>"),
        lambda site: (site / "index.html").rename(site / "home.html"),
        lambda site: (site / "index.html").chmod(0o755),
        lambda site: (site / "extra").mkdir(),
        lambda site: (site / "current.js").unlink(),
    ],
    ids=["content", "rename", "exec-bit", "new-empty-dir", "removed-link"],
)
def test_any_change_changes_the_digest(
    store: FileArtifactStore, ws: Path, change: Callable[[Path], object]
) -> None:
    site = build_site(ws / "site", reverse=False, file_mode=0o644, mtime=0, owner=0)
    before = store.publish(str(ws), "site", "dir")

    change(site)

    assert store.publish(str(ws), "site", "dir").digest != before.digest


def test_directory_export_roundtrip(store: FileArtifactStore, ws: Path, tmp_path: Path) -> None:
    site = build_site(ws / "site", reverse=False, file_mode=0o644, mtime=0, owner=0)
    (site / "assets" / "img" / "up").symlink_to("../app.js")
    blob = store.publish(str(ws), "site", "dir")

    dest = tmp_path / "release" / "site"
    store.export(blob.digest, "dir", str(dest))

    assert listing(dest) == listing(site)
    assert listing(dest)["bin/run"][0] == "exec"
    assert listing(dest)["index.html"][0] == "file"
    assert (dest / "current.js").read_text() == "console.log(1)"
    assert (dest / "assets" / "img" / "up").read_text() == "console.log(1)"

    empty = tmp_path / "empty-dest"
    empty.mkdir()
    store.export(blob.digest, "dir", str(empty))
    assert listing(empty) == listing(site)


def test_hard_links_are_stored_as_files(store: FileArtifactStore, ws: Path, tmp_path: Path) -> None:
    write(ws / "out" / "a", "shared")
    os.link(ws / "out" / "a", ws / "out" / "b")
    blob = store.publish(str(ws), "out", "dir")

    with tarfile.open(store.path_of(blob.digest)) as tar:
        assert all(m.isreg() for m in tar.getmembers())
    store.export(blob.digest, "dir", str(tmp_path / "x"))
    assert (tmp_path / "x" / "b").read_text() == "shared"


def test_export_refuses_a_non_empty_directory(
    store: FileArtifactStore, ws: Path, tmp_path: Path
) -> None:
    write(ws / "out" / "a", "new")
    blob = store.publish(str(ws), "out", "dir")
    dest = write(tmp_path / "dest" / "keep.txt", "mine").parent

    with pytest.raises(ArtifactError, match="not empty"):
        store.export(blob.digest, "dir", str(dest))
    assert listing(dest) == {"keep.txt": ("file", b"mine")}


# -- refused outputs -------------------------------------------------------------------------


def refused(store: FileArtifactStore, ws: Path, rel: str, kind: str, match: str) -> ArtifactError:
    with pytest.raises(ArtifactError, match=match) as caught:
        store.publish(str(ws), rel, kind)
    assert stored_files(store) == []
    assert caught.value.hint
    return caught.value


def test_paths_leaving_the_workspace_are_refused(
    store: FileArtifactStore, ws: Path, tmp_path: Path
) -> None:
    secret = write(tmp_path / "secret.txt", "top secret")
    (tmp_path / "secrets").mkdir()
    write(ws / "dist" / "ok.txt", "ok")
    (ws / "dist" / "leak.txt").symlink_to(secret)
    (ws / "dist" / "leak-dir").symlink_to(tmp_path / "secrets")
    (ws / "up").symlink_to("..")

    refused(store, ws, "../secret.txt", "file", r"contains '\.\.'")
    refused(store, ws, "dist/../../secret.txt", "file", r"contains '\.\.'")
    refused(store, ws, str(secret), "file", "is an absolute path")
    refused(store, ws, "dist/leak.txt", "file", "outside the job's workspace")
    refused(store, ws, "dist/leak-dir", "dir", "outside the job's workspace")
    refused(store, ws, "up/secret.txt", "file", "outside the job's workspace")


def test_missing_output_is_explained(store: FileArtifactStore, ws: Path) -> None:
    error = refused(store, ws, "dist/app.tar.gz", "file", "was not produced")
    assert str(ws / "dist" / "app.tar.gz") in error.message
    (ws / "dangling").symlink_to("nowhere")
    refused(store, ws, "dangling", "file", "was not produced")


def test_unusable_workspace_is_explained(store: FileArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"workspace .* cannot be used"):
        store.publish(str(tmp_path / "gone"), "out", "dir")
    with pytest.raises(ArtifactError, match=r"workspace .* Not a directory") as caught:
        store.publish(str(write(tmp_path / "file", "x")), "out", "dir")
    assert caught.value.hint == "the workspace must be an existing directory"


def test_wrong_kind_is_refused(store: FileArtifactStore, ws: Path) -> None:
    write(ws / "dist" / "app.bin", "x")
    os.mkfifo(ws / "pipe")

    refused(store, ws, "dist", "file", "is a directory, but it is declared as a regular file")
    refused(store, ws, "dist/app.bin", "dir", "is a regular file, but it is declared as a dir")
    refused(store, ws, "pipe", "file", "is a fifo")
    refused(store, ws, "dist/app.bin", "tarball", "unknown artifact kind")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: (d / "evil").symlink_to("../../secret.txt"), "leads outside the directory"),
        (lambda d: (d / "sub" / "evil").symlink_to("../.."), "leads outside the directory"),
        (lambda d: (d / "passwd").symlink_to("/etc/passwd"), "absolute path '/etc/passwd'"),
        (lambda d: os.mkfifo(d / "sub" / "pipe"), "'sub/pipe' is a fifo"),
        (lambda d: os.chmod(write(d / "tool", "x"), 0o4755), "'tool' has the setuid bit"),
        (lambda d: os.chmod(write(d / "tool", "x"), 0o2755), "'tool' has the setgid bit"),
    ],
    ids=[
        "escaping-link",
        "escaping-link-deep",
        "absolute-link",
        "fifo",
        "setuid",
        "setgid",
    ],
)
def test_unsafe_directory_entries_are_refused(
    store: FileArtifactStore, ws: Path, make: Callable[[Path], object], match: str
) -> None:
    write(ws / "out" / "sub" / "fine.txt", "fine")
    make(ws / "out")

    refused(store, ws, "out", "dir", match)


def test_directory_setgid_and_sticky_bits_are_normalised_away(
    store: FileArtifactStore, ws: Path
) -> None:
    write(ws / "plain" / "sub" / "fine.txt", "fine")
    write(ws / "special" / "sub" / "fine.txt", "fine")
    os.chmod(ws / "special" / "sub", 0o3775)
    assert store.publish(ws, "special", "dir") == store.publish(ws, "plain", "dir")


def test_link_escaping_only_through_another_link_is_refused(
    store: FileArtifactStore, ws: Path
) -> None:
    # 'sub/top' points at the directory itself (fine); 'x' -> 'sub/top/..' looks like 'sub'
    # when read as text but really resolves to the directory's parent.
    write(ws / "out" / "sub" / "f", "f")
    (ws / "out" / "sub" / "top").symlink_to("..")
    blob = store.publish(str(ws), "out", "dir")
    (ws / "out" / "x").symlink_to("sub/top/..")

    with pytest.raises(
        ArtifactError, match=r"'x' is a symlink to 'sub/top/\.\.', which leads outside"
    ):
        store.publish(str(ws), "out", "dir")
    assert [b.digest for b in store.blobs()] == [blob.digest]


# -- corruption ------------------------------------------------------------------------------


def tamper(store: FileArtifactStore, digest: str, data: bytes | None = None) -> None:
    path = store.path_of(digest)
    path.chmod(0o644)
    content = path.read_bytes()
    path.write_bytes(data if data is not None else content[:-1] + bytes([content[-1] ^ 1]))


def test_corrupted_file_blob_is_detected(
    store: FileArtifactStore, ws: Path, tmp_path: Path
) -> None:
    blob = store.publish(str(ws), str(write(ws / "app", "genuine").relative_to(ws)), "file")
    tamper(store, blob.digest, b"forged!")
    forged = "sha256:" + hashlib.sha256(b"forged!").hexdigest()

    with pytest.raises(ArtifactError, match=f"is corrupted: its content hashes to {forged}"):
        store.verify(blob.digest)
    dest = tmp_path / "deploy" / "app"
    with pytest.raises(ArtifactError, match="is corrupted"):
        store.export(blob.digest, "file", str(dest))
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_corrupted_directory_blob_is_not_unpacked(
    store: FileArtifactStore, ws: Path, tmp_path: Path
) -> None:
    write(ws / "out" / "a.txt", "a")
    blob = store.publish(str(ws), "out", "dir")
    tamper(store, blob.digest)

    dest = tmp_path / "dest"
    with pytest.raises(ArtifactError, match="is corrupted"):
        store.export(blob.digest, "dir", str(dest))
    assert not dest.exists()


# -- safe_extract ----------------------------------------------------------------------------


def member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def make_tar(path: Path, *members: tuple[tarfile.TarInfo, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


HOSTILE = {
    "parent": [member("../evil", data=b"x")],
    "parent-inside": [member("ok/../../evil", data=b"x")],
    "absolute": [member("/tmp/abs-evil", data=b"x")],
    "absolute-link": [member("passwd", tarfile.SYMTYPE, linkname="/etc/passwd")],
    "escaping-link": [member("a", tarfile.SYMTYPE, linkname="../../x")],
    "link-through-link": [
        member("d", tarfile.DIRTYPE),
        member("d/top", tarfile.SYMTYPE, linkname=".."),
        member("x", tarfile.SYMTYPE, linkname="d/top/.."),
    ],
    "write-through-link": [
        member("d", tarfile.DIRTYPE),
        member("l", tarfile.SYMTYPE, linkname="d"),
        member("l/f", data=b"x"),
    ],
    "hardlink-outside": [member("h", tarfile.LNKTYPE, linkname="../outside")],
    "hardlink-absolute": [member("h", tarfile.LNKTYPE, linkname="/etc/passwd")],
    "hardlink-unknown": [member("h", tarfile.LNKTYPE, linkname="not-in-archive")],
    "hardlink-to-link": [
        member("s", tarfile.SYMTYPE, linkname="good.txt"),
        member("h", tarfile.LNKTYPE, linkname="s"),
    ],
    "char-device": [member("tty", tarfile.CHRTYPE, devmajor=5, devminor=0)],
    "block-device": [member("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)],
    "fifo": [member("pipe", tarfile.FIFOTYPE)],
    "setuid": [member("tool", data=b"x", mode=0o4755)],
    "setgid": [member("tool", data=b"x", mode=0o2755)],
    "duplicate": [member("good.txt", data=b"again")],
}
HOSTILE_ERRORS = {
    "parent": r"'\.\./evil' has a '\.\.' component",
    "parent-inside": r"'ok/\.\./\.\./evil' has a '\.\.' component",
    "absolute": "'/tmp/abs-evil' has an absolute path",
    "absolute-link": "'passwd' is a symlink to the absolute path '/etc/passwd'",
    "escaping-link": r"'a' is a symlink to '\.\./\.\./x', which leads outside the destination",
    "link-through-link": "'x' is a symlink to 'd/top/..', which leads outside",
    "write-through-link": "'l/f' lies under 'l', which is a symlink",
    "hardlink-outside": r"'h' has a '\.\.' component in its link target '\.\./outside'",
    "hardlink-absolute": "'h' has an absolute path in its link target '/etc/passwd'",
    "hardlink-unknown": "'h' is a hard link to 'not-in-archive', which is not a regular file",
    "hardlink-to-link": "'h' is a hard link to 's', which is not a regular file",
    "char-device": "'tty' is a character device",
    "block-device": "'sda' is a block device",
    "fifo": "'pipe' is a fifo",
    "setuid": "'tool' has the setuid bit",
    "setgid": "'tool' has the setgid bit",
    "duplicate": "'good.txt' appears more than once",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("dest_exists", [False, True], ids=["new-dest", "empty-dest"])
def test_hostile_archives_are_refused_whole(tmp_path: Path, case: str, dest_exists: bool) -> None:
    # A harmless member first: it must not be written either.
    archive = make_tar(tmp_path / "hostile.tar", member("good.txt", data=b"good"), *HOSTILE[case])
    dest = tmp_path / "work" / "dest"
    if dest_exists:
        dest.mkdir(parents=True)

    with pytest.raises(ArtifactError, match=HOSTILE_ERRORS[case]) as caught:
        safe_extract(archive, dest)

    assert caught.value.message.endswith("; nothing was extracted")
    if dest_exists:
        assert list(dest.iterdir()) == []
    else:
        assert not dest.exists()
    expected = ["dest", "hostile.tar", "work"] if dest_exists else ["hostile.tar"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == expected


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", ""])
def test_benign_archive_is_extracted(tmp_path: Path, compression: str) -> None:
    archive = make_tar(
        tmp_path / ("release.tar" + (f".{compression}" if compression else "")),
        member("./", tarfile.DIRTYPE, mode=0o755),
        member("./bin", tarfile.DIRTYPE, mode=0o755),
        member("./bin/app", data=b"#!/bin/sh\n", mode=0o755),
        member("./README", data=b"read me", mode=0o644),
        member("./bin/readme", tarfile.SYMTYPE, linkname="../README"),
        member("./README.copy", tarfile.LNKTYPE, linkname="./README"),
        mode=f"w:{compression}" if compression else "w",
    )
    assert is_tar(archive)

    safe_extract(archive, tmp_path / "out")

    assert listing(tmp_path / "out") == {
        "README": ("file", b"read me"),
        "README.copy": ("file", b"read me"),
        "bin": ("dir", ""),
        "bin/app": ("exec", b"#!/bin/sh\n"),
        "bin/readme": ("link", "../README"),
    }


def test_archive_bombs_are_refused(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "big.tar", *(member(f"f{i}", data=b"0123456789") for i in range(5))
    )
    dest = tmp_path / "dest"

    with pytest.raises(ArtifactError, match="more than 4 members"):
        safe_extract(archive, dest, max_members=4)
    with pytest.raises(ArtifactError, match="more than 49 bytes"):
        safe_extract(archive, dest, max_bytes=49)
    assert not dest.exists()
    safe_extract(archive, dest, max_members=5, max_bytes=50)
    assert len(list(dest.iterdir())) == 5


def test_unusable_archives_and_destinations(tmp_path: Path) -> None:
    not_tar = write(tmp_path / "notes.txt", "just text")
    assert not is_tar(not_tar)
    assert not is_tar(tmp_path / "missing.tar")
    with pytest.raises(ArtifactError, match="cannot extract archive"):
        safe_extract(not_tar, tmp_path / "a")
    with pytest.raises(ArtifactError, match="cannot extract archive"):
        safe_extract(tmp_path / "missing.tar", tmp_path / "b")
    archive = make_tar(tmp_path / "ok.tar", member("f", data=b"f"))
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        safe_extract(archive, not_tar)
    full = write(tmp_path / "full" / "keep", "keep").parent
    with pytest.raises(ArtifactError, match="not empty"):
        safe_extract(archive, full)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- concurrency -----------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from conveyor.adapters.artifacts import FileArtifactStore

    store, ws, go, ready = (Path(a) for a in sys.argv[1:5])
    ready.touch()
    while not go.exists():
        time.sleep(0.001)
    s = FileArtifactStore(store)
    digests = {s.publish(str(ws), "big.bin", "file").digest for _ in range(10)}
    digests |= {s.publish(str(ws), "site", "dir").digest for _ in range(5)}
    print(" ".join(sorted(digests)))
    """
)


def test_concurrent_publishers_of_the_same_bytes_both_succeed(
    store: FileArtifactStore, ws: Path, tmp_path: Path
) -> None:
    data = os.urandom(4 * 1024 * 1024)
    write(ws / "big.bin", data)
    for i in range(50):
        write(ws / "site" / f"d{i % 5}" / f"f{i}", os.urandom(20_000))
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(store.root),
                str(ws),
                str(go),
                str(tmp_path / f"r{n}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"r{n}").exists() for n in range(3)):
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    go.touch()
    results = [w.communicate(timeout=60) for w in workers]

    assert [w.returncode for w in workers] == [0, 0, 0], [err for _, err in results]
    outputs = {out.strip() for out, _ in results}
    assert len(outputs) == 1
    digests = outputs.pop().split()
    assert len(digests) == 2
    assert "sha256:" + hashlib.sha256(data).hexdigest() in digests
    assert stored_files(store) == sorted(store.path_of(d) for d in digests)
    for digest in digests:
        store.verify(digest)
