"""Secret masking across chunk boundaries, escape neutralisation, cache keys (pure)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from conveyor.domain.cachekey import glob_regex, inputs_digest, job_cache_key
from conveyor.domain.masking import Masker
from conveyor.domain.text import inline, neutralise


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


def test_a_secret_split_by_escape_sequences_or_controls_is_masked_as_shown() -> None:
    """Showing output removes escapes and controls, which would join a secret's parts."""
    masker = Masker(["hunter2pass"])
    cases = [
        b"TOK=hunter2\x1b[01;31m\x1b[Kpass\x1b[m\x1b[K end",  # grep --color
        b"hunter2\x00pass\n",
        b"a \x1b]0;title\x07hunter2\x1b]8;;http://x\x1b\\pass z",
        b"hunter2\xc2\x85pass",  # a C1 control
    ]
    for data in cases:
        for size in (1, 2, 3, 5, len(data)):
            chunks = [data[i : i + size] for i in range(0, len(data), size)]
            out = stream(masker, chunks)
            shown = neutralise(out.decode("utf-8", "replace"))
            assert "hunter2" not in shown and "pass" not in shown.replace("***", ""), (data, size)
            assert "***" in shown
        assert "hunter2" not in neutralise(masker.mask_text(data.decode("utf-8", "replace")))
    plain = b"no secret \x1b[31mred\x1b[0m here \x1b]0;t\x07"
    assert stream(masker, [plain[:12], plain[12:]]) == plain


def test_quoted_and_trimmed_forms_of_a_secret_are_masked() -> None:
    masker = Masker(["hunter2pass\n", 'pa$s"w\\ord1'])
    assert masker.mask_text("printf: hunter2pass|") == "printf: ***|"
    assert masker.mask_text('declare -x B="pa\\$s\\"w\\\\ord1"') == 'declare -x B="***"'
    assert masker.mask_text('{"B": "pa$s\\"w\\\\ord1"}') == '{"B": "***"}'
    assert masker.mask_text("{'B': 'pa$s\"w\\\\ord1'}") == "{'B': '***'}"


def test_mask_value_masks_every_string_inside() -> None:
    masker = Masker(["hunter2pass"])
    value = {"hunter2pass": ["x hunter2pass", ("hunter2pass", 3)], "n": None}
    assert masker.mask_value(value) == {"***": ["x ***", ("***", 3)], "n": None}


def test_a_text_cut_inside_a_secret_does_not_keep_its_beginning() -> None:
    masker = Masker(["superSecret1"])
    assert masker.mask_cut("x" * 10 + "superSec") == "x" * 10 + "***"
    assert masker.mask_cut("ends with sup") == "ends with sup"  # under 4 characters: kept
    assert masker.mask_cut("a superSecret1 b") == "a *** b"


def test_inline_leaves_no_control_character_at_all() -> None:
    assert inline("ev\x1b]0;PWNED\x07il") == "evil"
    assert inline("a\nb\tc\rd\x00e\u202e") == "a b c de<U+202E>"
    assert all(ord(c) >= 32 and c != "\x7f" for c in inline("".join(map(chr, range(160)))))


def test_secrets_are_masked_in_the_forms_urls_and_json_give_them() -> None:
    import json
    from urllib.parse import quote, quote_plus

    for secret in ("my secret/val+1", "pässwörd1"):
        masker = Masker([secret])
        forms = [
            quote(secret),  # keeps '/'
            quote(secret, safe=""),
            quote_plus(secret),
            re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), quote(secret, safe="")),
            json.dumps(secret)[1:-1],  # non-ASCII as \uXXXX
            base64.urlsafe_b64encode(secret.encode()).decode(),
        ]
        for form in forms:
            assert masker.mask_text(f"x {form} y") == "x *** y", form


@pytest.mark.parametrize(
    "value",
    [
        {"b": 1, "a": [None, True, False, 1.5, -0.0, 10**30], "é": 'ünï\u2028\x00"\\'},
        {"attempt": {"z": 1, "a": {"y": [], "x": {}}}, "s": "sha256:" + "e" * 64},
        "top level",
        3,
        1e16,
        [],
    ],
)
def test_canonical_json_is_sorted_compact_utf8_json(value: object) -> None:
    """The reused C encoder writes exactly what ``json.dumps`` writes with these options."""
    from conveyor.domain.canonical import canonical_json

    expected = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    assert canonical_json(value) == expected
    assert canonical_json(value) == expected  # the encoder keeps no state between calls


def test_canonical_json_refuses_what_json_cannot_say() -> None:
    from conveyor.domain.canonical import canonical_json

    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    with pytest.raises(TypeError):
        canonical_json({"x": object()})
    with pytest.raises(TypeError):
        canonical_json({("t",): 1})
