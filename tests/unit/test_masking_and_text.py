"""Secret masking across chunk boundaries, escape neutralisation, cache keys (pure)."""

from __future__ import annotations

import base64

from conveyor.domain.cachekey import glob_regex, inputs_digest, job_cache_key
from conveyor.domain.masking import Masker
from conveyor.domain.text import neutralise


def stream(masker: Masker, chunks: list[bytes]) -> bytes:
    s = masker.stream()
    return b"".join(s.feed(c) for c in chunks) + s.flush()


def test_a_secret_split_across_every_boundary_is_masked() -> None:
    masker = Masker(["hunter2-secret"])
    data = b"before hunter2-secret after"
    for cut in range(len(data) + 1):
        assert stream(masker, [data[:cut], data[cut:]]) == b"before *** after"
    one_byte_chunks = [bytes([b]) for b in data]
    assert stream(masker, one_byte_chunks) == b"before *** after"


def test_encodings_and_multiline_secrets() -> None:
    pem = "-----BEGIN KEY-----\nAAAABBBBCCCC\nDDDDEEEE\n-----END KEY-----"
    masker = Masker(["p@ss word/1", pem])
    assert masker.mask_text("url p%40ss%20word%2F1") == "url ***"
    b64 = base64.b64encode(b"p@ss word/1").decode()
    assert masker.mask_text(f"b64 {b64}") == "b64 ***"
    assert "AAAABBBBCCCC" not in masker.mask_text("line: AAAABBBBCCCC")


def test_no_secrets_passes_through() -> None:
    masker = Masker([])
    assert not masker
    assert stream(masker, [b"a", b"b"]) == b"ab"


def test_text_without_a_secret_prefix_is_not_held_back() -> None:
    s = Masker(["zzzz-secret"]).stream()
    assert s.feed(b"hello\n") == b"hello\n"
    assert s.feed(b"tail zz") == b"tail "  # 'zz' could start the secret
    assert s.flush() == b"zz"


def test_neutralise_escapes_controls_and_bidi() -> None:
    raw = "a\x1b[31mred\x1b[0m \x1b]0;title\x07\x1b]52;c;aGk=\x07b \x1b[2J\x07c\r\nd\u202ee"
    assert neutralise(raw) == "ared b c\nd<U+202E>e"
    assert neutralise("progress 10%\rprogress 20%") == "progress 10%\nprogress 20%"
    assert neutralise("tab\tok\n") == "tab\tok\n"


def test_glob_semantics() -> None:
    assert glob_regex("src/**").match("src/a/b.py")
    assert glob_regex("src/").match("src/x")
    assert glob_regex("*.py").match("a.py")
    assert not glob_regex("*.py").match("dir/a.py")
    assert glob_regex("**/*.py").match("a.py")
    assert glob_regex("**/*.py").match("d/e/a.py")
    assert not glob_regex("src/?.py").match("src/ab.py")


def test_inputs_digest_covers_only_matching_files() -> None:
    files = {"src/a.py": "1", "docs/x.md": "2"}
    base = inputs_digest(files, ["src/**"], "t")
    assert inputs_digest({**files, "docs/x.md": "3"}, ["src/**"], "t") == base
    assert inputs_digest({**files, "src/a.py": "9"}, ["src/**"], "t") != base
    assert inputs_digest(files, ["./src/**"], "t") == base
    assert inputs_digest(files, None, "t") == "tree:t"


def test_cache_key_changes_with_each_part() -> None:
    parts = {
        "script": "make",
        "env": {"A": "1"},
        "secret_digests": {"S": "d"},
        "needs_keys": {"b": "k"},
        "inputs": "tree:t",
    }
    key = job_cache_key(**parts)  # type: ignore[arg-type]
    for name, other in [
        ("script", "make all"),
        ("env", {"A": "2"}),
        ("secret_digests", {"S": "e"}),
        ("needs_keys", {"b": "k2"}),
        ("inputs", "tree:u"),
    ]:
        assert job_cache_key(**{**parts, name: other}) != key  # type: ignore[arg-type]
