"""The cache of parsed pipeline files: reused, repaired, and bounded."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import bootstrap
from conveyor.adapters.home import Home
from conveyor.errors import SpecError

PIPELINE = "pipeline: p{n}\nstages:\n  - name: s\n    jobs:\n      j: {{run: 'true'}}\n"


class _Source:
    """Stands in for the git source: blob id -> bytes, counting reads."""

    def __init__(self) -> None:
        self.reads = 0

    def read_blob(self, blob: str) -> bytes:
        self.reads += 1
        return PIPELINE.format(n=blob).encode()


def _load(source: Any, blob: str, home: Home) -> Any:
    return bootstrap.load_committed_spec(source, blob, "conveyor.yml", home)


def test_a_file_is_parsed_once_then_read_from_the_cache(tmp_path: Path) -> None:
    source, home = _Source(), Home(tmp_path)
    first = _load(source, "1", home)
    again = _load(source, "1", home)
    assert source.reads == 1
    assert again == first and again.name == "p1"


def test_a_damaged_entry_is_parsed_again(tmp_path: Path) -> None:
    source, home = _Source(), Home(tmp_path)
    _load(source, "1", home)
    for entry in (tmp_path / "cache" / "specs").glob("*.json"):
        entry.write_text("{not json")
    assert _load(source, "1", home).name == "p1"
    assert source.reads == 2


def test_the_cache_keeps_the_most_recently_used_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootstrap, "SPEC_CACHE_KEEP", 3)
    source, home = _Source(), Home(tmp_path)
    folder = tmp_path / "cache" / "specs"
    seen: set[Path] = set()
    for n in range(3):  # used 100, 99 and 98 seconds ago
        _load(source, str(n), home)
        (entry,) = set(folder.glob("*.json")) - seen
        seen.add(entry)
        os.utime(entry, (time.time() - 100 + n, time.time() - 100 + n))
    stale_tmp = folder / "dead-writer.123.tmp"
    stale_tmp.write_text("{}")
    os.utime(stale_tmp, (time.time() - 3600, time.time() - 3600))
    _load(source, "0", home)  # a hit: "0" becomes the most recently used
    _load(source, "3", home)  # a miss: the oldest entry ("1") goes
    assert len(list(folder.glob("*.json"))) == 3
    assert not stale_tmp.exists()
    reads = source.reads
    _load(source, "0", home)
    _load(source, "2", home)
    _load(source, "3", home)
    assert source.reads == reads  # all still cached
    _load(source, "1", home)
    assert source.reads == reads + 1  # evicted, parsed again


class _Tree(_Source):
    """A source whose committed pipeline file is the entry ``(mode, type, size)``."""

    def __init__(self, entry: tuple[str, str, int | None]) -> None:
        super().__init__()
        self.entry = entry

    def tree_entry(self, commit: str, rel_path: str) -> tuple[str, str, int | None]:
        assert (commit, rel_path) == ("c" * 40, "ci/conveyor.yml")
        return self.entry


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (("100644", "blob", 300_000_000), "the file is too large: 300,000,000 bytes"),
        (("040000", "tree", None), "ci/conveyor.yml is a directory in commit cccccccccccc"),
        (("120000", "blob", 12), "ci/conveyor.yml is a symbolic link in commit cccccccccccc"),
    ],
)
def test_a_committed_entry_that_is_not_a_small_file_is_refused_unread(
    tmp_path: Path, entry: tuple[str, str, int | None], message: str
) -> None:
    source = _Tree(entry)
    with pytest.raises(SpecError) as info:
        bootstrap.load_committed_spec(
            source, "1", "ci.yml", Home(tmp_path), commit="c" * 40, rel_path="./ci/conveyor.yml"
        )
    assert source.reads == 0
    assert info.value.problems[0].message.startswith(message)


def test_a_committed_regular_file_is_read(tmp_path: Path) -> None:
    source = _Tree(("100755", "blob", 70))
    spec = bootstrap.load_committed_spec(
        source, "1", "ci.yml", Home(tmp_path), commit="c" * 40, rel_path="ci/conveyor.yml"
    )
    assert (spec.name, source.reads) == ("p1", 1)
