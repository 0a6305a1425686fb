"""The YAML loader: node tree, scalar resolution and hostile input."""

from __future__ import annotations

import math

import pytest

from conveyor.errors import SpecError, SpecProblem
from conveyor.spec import loader
from conveyor.spec.loader import (
    MAX_DEPTH,
    MapNode,
    Node,
    ScalarNode,
    SeqNode,
    load_document,
    resolve_plain,
)

pytestmark = pytest.mark.timeout(20)

SOURCE = "conveyor.yml"


def load(text: str | bytes) -> Node:
    data = text.encode() if isinstance(text, str) else text
    return load_document(data, SOURCE)


def problems_of(text: str | bytes) -> list[SpecProblem]:
    with pytest.raises(SpecError) as info:
        load(text)
    return info.value.problems


def only_problem(text: str | bytes) -> SpecProblem:
    problems = problems_of(text)
    assert len(problems) == 1, [p.render() for p in problems]
    return problems[0]


def as_python(node: Node) -> object:
    if isinstance(node, MapNode):
        return {key.value: as_python(value) for key, value in node.items}
    if isinstance(node, SeqNode):
        return [as_python(item) for item in node.items]
    return node.value


def timed_failure(data: bytes) -> tuple[SpecProblem, None]:
    """The last problem of a rejected document (its speed is in the benchmark notes, and the
    module's timeout guards against a hang)."""
    with pytest.raises(SpecError) as info:
        load_document(data, SOURCE)
    return info.value.problems[-1], None


# -- the tree --------------------------------------------------------------------------------


def test_builds_a_position_aware_tree() -> None:
    root = load("a: 1\nb:\n  - x\n  - {c: 'd'}\n")
    assert isinstance(root, MapNode)
    assert (root.line, root.column) == (1, 1)
    (key_a, one), (key_b, seq) = root.items
    assert key_a == ScalarNode("a", "a", 1, 1)
    assert one == ScalarNode(1, "1", 1, 4)
    assert isinstance(seq, SeqNode)
    assert (key_b.line, seq.line, seq.column) == (2, 3, 3)
    flow = seq.items[1]
    assert isinstance(flow, MapNode)
    assert (flow.line, flow.column) == (4, 5)
    assert flow.items[0][1] == ScalarNode("d", "d", 4, 9, quoted=True)


def test_block_scalars_are_quoted_strings() -> None:
    root = load("run: |\n  make\n  make test\n")
    assert isinstance(root, MapNode)
    value = root.items[0][1]
    assert value == ScalarNode("make\nmake test\n", "make\nmake test\n", 1, 6, quoted=True)


def test_alias_shares_the_anchored_node() -> None:
    root = load("a: &x {k: v}\nb: *x\n")
    assert isinstance(root, MapNode)
    assert root.items[0][1] is root.items[1][1]


def test_utf8_bom_is_accepted() -> None:
    root = load(b"\xef\xbb\xbfa: caf\xc3\xa9\n")
    assert as_python(root) == {"a": "café"}
    assert isinstance(root, MapNode)
    assert (root.items[0][0].line, root.items[0][0].column) == (1, 1)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("", None),
        ("~", None),
        ("null", None),
        ("NULL", None),
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("false", False),
        ("yes", "yes"),
        ("no", "no"),
        ("on", "on"),
        ("off", "off"),
        ("y", "y"),
        ("n", "n"),
        ("0", 0),
        ("-12", -12),
        ("+7", 7),
        ("0x1F", 31),
        ("0o17", 15),
        ("1.5", 1.5),
        ("-2e3", -2000.0),
        (".5", 0.5),
        (".inf", math.inf),
        ("-.Inf", -math.inf),
        ("1_000", "1_000"),
        ("0b101", "0b101"),
        ("12:30", "12:30"),
        ("2024-01-01", "2024-01-01"),
        ("hello", "hello"),
    ],
)
def test_plain_scalars_use_the_yaml_1_2_core_schema(text: str, value: object) -> None:
    assert resolve_plain(text) == value
    assert type(resolve_plain(text)) is type(value)


def test_nan_resolves_to_nan() -> None:
    value = resolve_plain(".nan")
    assert isinstance(value, float) and math.isnan(value)


def test_quoted_scalars_are_always_strings() -> None:
    assert as_python(load("a: 'true'\nb: \"1\"\nc: '~'\nd: ''\n")) == {
        "a": "true",
        "b": "1",
        "c": "~",
        "d": "",
    }


def test_standard_tags_are_applied() -> None:
    text = "a: !!str 1\nb: !!int '12'\nc: !!float 3\nd: !!bool true\ne: !!null ''\nf: !!map {}\n"
    assert as_python(load(text)) == {"a": "1", "b": 12, "c": 3.0, "d": True, "e": None, "f": {}}


# -- problems --------------------------------------------------------------------------------


def test_empty_file() -> None:
    for text in ("", "# just a comment\n", "---\n"):
        problem = only_problem(text)
        assert (problem.line, problem.column) == (1, 1)
        assert problem.message == "the pipeline file is empty"
        assert problem.hint is not None and "conveyor init" in problem.hint


def test_multiple_documents() -> None:
    problem = only_problem("a: 1\n---\nb: 2\n")
    assert (problem.line, problem.column, problem.message) == (
        2,
        1,
        "a pipeline file holds one YAML document",
    )


def test_duplicate_keys_are_reported_at_the_second_key() -> None:
    problem = only_problem("a: 1\nb:\n  c: 1\n  c: 2\n")
    assert (problem.line, problem.column) == (4, 3)
    assert problem.message == "duplicate key 'c' (first defined at line 3)"


def test_all_duplicate_keys_are_reported() -> None:
    problems = problems_of("a: 1\nb: 2\na: 3\nb: 4\n")
    assert [(p.line, p.message) for p in problems] == [
        (3, "duplicate key 'a' (first defined at line 1)"),
        (4, "duplicate key 'b' (first defined at line 2)"),
    ]


def test_keys_written_differently_but_equal_say_why_they_are_duplicates() -> None:
    problem = only_problem("1.0: a\n1.00: b\n")
    assert problem.message == "duplicate key '1.00' (first defined at line 1)"
    assert problem.hint is not None and "'1.0' and '1.00'" in problem.hint
    assert "quote the keys" in problem.hint
    assert only_problem("c: 1\nc: 2\n").hint == "a key may appear only once in a mapping"


def test_keys_of_different_types_are_not_duplicates() -> None:
    assert as_python(load("1: a\n'1': b\n")) == {1: "a", "1": "b"}


def test_python_tags_are_refused() -> None:
    problem = only_problem('run: !!python/object/apply:os.system ["echo hi"]\n')
    assert (problem.line, problem.column) == (1, 6)
    assert problem.message == (
        "tag '!!python/object/apply:os.system' is not allowed: Conveyor reads plain YAML only"
    )


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("a: !custom x\n", "!custom"),
        ("a: ! x\n", "!"),
        ("a: !!set {x}\n", "!!set"),
        ("a: !!timestamp 2024-01-01\n", "!!timestamp"),
        ("a: !<tag:example.com:x> x\n", "!<tag:example.com:x>"),
        ("%TAG !e! tag:example.com,2000:\n---\na: !e!thing x\n", "!e!thing"),
        ("%TAG !! tag:evil.com,2000:\n---\na: !!str x\n", "!!str"),
    ],
)
def test_non_standard_tags_are_refused(text: str, tag: str) -> None:
    assert only_problem(text).message.startswith(f"tag '{tag}' is not allowed")


def test_tag_that_does_not_fit() -> None:
    problems = problems_of("a: !!int abc\nb: !!map [1]\n")
    assert [(p.line, p.column, p.message) for p in problems] == [
        (1, 4, "'abc' cannot be read as !!int"),
        (2, 4, "tag '!!map' does not fit this kind of value"),
    ]


def test_non_utf8_bytes_are_located() -> None:
    problem = only_problem(b"pipeline: caf\xe9\n")
    assert (problem.line, problem.column) == (1, 14)
    assert "not valid UTF-8" in problem.message
    problem = only_problem("a: 1\nb: caf\u00e9 \u00e9".encode() + b"\xff\n")
    assert (problem.line, problem.column) == (2, 10)  # characters, not bytes


def test_control_characters_are_located() -> None:
    problem = only_problem("a: b\nc: d\x07\n")
    assert (problem.line, problem.column) == (2, 5)
    assert "U+0007" in problem.message


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ('env: {A: "a\\x00b"}\n', (1, 10), "NUL character"),
        ('env: {A: "a\\0b"}\n', (1, 10), "NUL character"),
        ('run: "echo \\ud800"\n', (1, 6), "U+D800, a lone surrogate"),
        ('jobs:\n  "a\\udfff": 1\n', (2, 3), "U+DFFF, a lone surrogate"),  # a key
        ("- 'x'\n- \"\\U0000DC00\"\n", (2, 3), "U+DC00, a lone surrogate"),
    ],
)
def test_escaped_characters_no_process_can_receive_are_located(
    text: str, where: tuple[int, int], what: str
) -> None:
    problem = only_problem(text)
    assert (problem.line, problem.column) == where
    assert what in problem.message
    assert problem.hint


def test_problems_show_unprintable_characters_as_escapes() -> None:
    problems = problems_of('{"a\\ud800": 1, "a\\ud800": 2}\n')  # also a duplicate key
    assert "duplicate key 'a\\ud800'" in [p.message for p in problems][-1]
    for problem in problems:
        problem.render().encode("utf-8")  # printable
    assert SpecProblem("f\udcfe.yml", 1, 1, "x\0").render() == "f\\udcfe.yml:1:1: x\\0"


@pytest.mark.parametrize(
    ("text", "column"), [("a:\tb\n", 3), ("a:\t[1]\n", 3), ("a:\n  -\tb\n", 4)]
)
def test_a_tab_after_text_is_a_separator_not_an_indentation(text: str, column: int) -> None:
    problem = only_problem(text)
    assert problem.column == column, problem
    assert problem.hint is not None and problem.hint.startswith("replace the tab with a space")


def test_tabs_for_indentation() -> None:
    problem = only_problem("a:\n\tb: 1\n")
    assert (problem.line, problem.column) == (2, 1)
    assert problem.message.startswith("invalid YAML: found character")
    assert problem.hint is not None and "tabs" in problem.hint


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ("a: b: c\n", 1, 5, "mapping values are not allowed here"),
        ("a: [1, 2\n", 2, 1, "while parsing a flow sequence at line 1, column 4"),
        ("a:\n  b: 1\n c: 2\n", 3, 2, "expected <block end>"),
        ("a: 'x\n", 2, 1, "found unexpected end of stream"),
        ('a: "\\q"\n', 1, 6, "found unknown escape character"),
    ],
)
def test_parser_errors_are_one_line_problems(
    text: str, line: int, column: int, fragment: str
) -> None:
    problem = only_problem(text)
    assert (problem.line, problem.column) == (line, column)
    assert fragment in problem.message
    assert "\n" not in problem.message


def test_merge_keys_are_refused() -> None:
    problem = only_problem("a: &x {q: 1}\nb:\n  <<: *x\n")
    assert (problem.line, problem.column) == (3, 3)
    assert "merge keys" in problem.message


def test_unknown_and_recursive_aliases() -> None:
    assert only_problem("a: *nope\n").message.startswith("unknown alias '*nope'")
    assert "inside the value it refers to" in only_problem("a: &x [1, *x]\n").message


def test_complex_keys_are_refused() -> None:
    problem = only_problem("? [a, b]\n: 1\n")
    assert problem.message.startswith("a mapping key must be a plain value")


def test_reading_stops_after_too_many_problems() -> None:
    text = "{" + "a: 1, " * 500 + "}"
    with pytest.raises(SpecError) as info:
        load(text)
    error = info.value
    assert len(error.problems) == 100
    assert all(p.message.startswith("duplicate key 'a'") for p in error.problems)
    assert (error.count, error.omitted, error.complete) == (101, 1, False)
    assert error.render().endswith(
        "... too many problems: reading stopped at line 1\n"
        "more than 100 problems in the pipeline file"
    )


# -- hostile input ---------------------------------------------------------------------------


def test_billion_laughs_fails_fast() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for index in range(1, 9):
        name, previous = chr(ord("a") + index), chr(ord("a") + index - 1)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    problem, _ = timed_failure("\n".join(lines).encode())
    assert "after expanding aliases (YAML alias bomb?)" in problem.message


def test_twenty_megabyte_file_is_refused_before_parsing() -> None:
    problem, _ = timed_failure(b"a: " + b"x" * 20_000_000 + b"\n")
    assert (problem.line, problem.column) == (1, 1)
    assert "20,000,004 bytes" in problem.message and "512 KiB" in problem.message


def test_deep_flow_nesting_fails_fast() -> None:
    problem, _ = timed_failure(b"[" * 10_000 + b"]" * 10_000)
    assert problem.message.startswith("nesting too deep")
    assert (problem.line, problem.column) == (1, MAX_DEPTH + 1)


def test_deep_flow_mapping_nesting_fails_fast() -> None:
    problem, _ = timed_failure(b"{a: " * 10_000 + b"}" * 10_000)
    assert problem.message.startswith("nesting too deep")


def test_deep_block_sequence_nesting_fails_fast() -> None:
    problem, _ = timed_failure(b"- " * 10_000 + b"x\n")
    assert problem.message.startswith("nesting too deep")
    assert (problem.line, problem.column) == (1, 2 * MAX_DEPTH + 1)


def test_deep_block_mapping_nesting_fails_fast() -> None:
    text = "".join(" " * depth + "a:\n" for depth in range(10_000))
    problem, _ = timed_failure(text.encode())
    # 50 MB of indentation: refused by size before nesting is even looked at
    assert "too large" in problem.message
    text = "".join(" " * depth + "a:\n" for depth in range(1_000))
    problem, _ = timed_failure(text.encode())
    assert problem.message.startswith("nesting too deep")
    assert (problem.line, problem.column) == (MAX_DEPTH + 1, MAX_DEPTH + 1)


def test_nesting_up_to_the_limit_is_fine() -> None:
    node = load("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    for _ in range(MAX_DEPTH - 1):
        assert isinstance(node, SeqNode)
        node = node.items[0]
    assert node == SeqNode([], 1, MAX_DEPTH)


def test_too_many_values_without_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_NODES", 1_000)
    problem, _ = timed_failure(b"[" + b"1," * 1_000 + b"1]")
    assert problem.message.startswith("document too large: more than 1,000 values")
    assert (problem.line, problem.column) == (1, 2 * 1_000)


def test_alias_budget_counts_expanded_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_NODES", 100)
    text = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\nb: [" + ", ".join(["*a"] * 10) + "]\n"
    problem = only_problem(text)
    assert "after expanding aliases" in problem.message
    assert (problem.line, problem.column) == (2, 37)  # the 9th alias: 13 + 9 * 10 > 100
