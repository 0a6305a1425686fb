"""YAML text to a small, position-aware node tree, safe against hostile input.

The tree is built iteratively from the *events* of ruamel.yaml's parser (a state machine), never
with ruamel's recursive composer or constructor, so no input can exhaust the Python stack and no
tag can construct an object. Every problem becomes a :class:`~conveyor.errors.SpecProblem`
with a 1-based ``line:column``; all of them are raised together as one
:class:`~conveyor.errors.SpecError`.

Limits: the file is at most :data:`MAX_FILE_BYTES`, collections nest at most :data:`MAX_DEPTH`
levels and the document, once aliases are expanded, has at most :data:`MAX_NODES` nodes.

Plain scalars are resolved with the YAML 1.2 core schema: ``yes``/``no``/``on``/``off`` stay
strings and quoted or block scalars are always strings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from ruamel.yaml.parser import Parser
from ruamel.yaml.reader import Reader, ReaderError
from ruamel.yaml.scanner import Scanner

from conveyor.errors import MAX_SHOWN_PROBLEMS, SpecError, SpecProblem
from conveyor.spec import MAX_FILE_BYTES, too_large

MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences."""
MAX_NODES = 20_000
"""Most nodes in the document once every alias is expanded: thousands of jobs, and read in
well under 1 s (about 22 µs a value in pure Python)."""

Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class ScalarNode:
    """A scalar: its resolved ``value``, its text ``raw`` and whether it was written plain.

    ``quoted`` is true for every non-plain scalar (single- or double-quoted, literal or folded
    block); such scalars are always strings.
    """

    value: Scalar
    raw: str
    line: int
    column: int
    quoted: bool = False


@dataclass(frozen=True, slots=True)
class SeqNode:
    """A sequence (block ``- item`` or flow ``[a, b]``)."""

    items: list[Node]
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class MapNode:
    """A mapping, keys in file order (keys are always scalars and unique)."""

    items: list[tuple[ScalarNode, Node]]
    line: int
    column: int


Node = MapNode | SeqNode | ScalarNode

_CORE = "tag:yaml.org,2002:"
_ALLOWED_TAGS = frozenset(
    _CORE + name for name in ("str", "int", "float", "bool", "null", "map", "seq")
)
_NULL = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE = frozenset({"true", "True", "TRUE"})
_FALSE = frozenset({"false", "False", "FALSE"})
_INT_DEC = re.compile(r"[-+]?[0-9]+")
_INT_OCT = re.compile(r"0o[0-7]+")
_INT_HEX = re.compile(r"0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(?:inf|Inf|INF)")
_NAN = frozenset({".nan", ".NaN", ".NAN"})
_MAX_INT_DIGITS = 1000
_UNUSABLE = re.compile("[\x00\ud800-\udfff]")
"""Characters an escape can put in a string that no process can receive: NUL ends a C string
(``execve`` refuses it in an argument or a variable) and a lone surrogate has no UTF-8 form."""

_INIT_HINT = "run `conveyor init` to write a starter conveyor.yml"


def resolve_plain(text: str) -> Scalar:
    """The value of a plain (unquoted) scalar under the YAML 1.2 core schema.

    Args:
        text: The scalar exactly as written.

    Returns:
        ``None``, a bool, an int, a float or, for anything else, ``text`` itself.
    """
    if text in _NULL:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if not text or text[0] not in "0123456789+-.":
        return text
    if _INT_DEC.fullmatch(text):
        if len(text) > _MAX_INT_DIGITS:  # int() refuses such strings; keep the text
            return text
        return int(text)
    if len(text) > _MAX_INT_DIGITS:
        return text
    if _INT_OCT.fullmatch(text):
        return int(text[2:], 8)
    if _INT_HEX.fullmatch(text):
        return int(text[2:], 16)
    if _FLOAT.fullmatch(text):
        return float(text)
    if _INF.fullmatch(text):
        return -math.inf if text.startswith("-") else math.inf
    if text in _NAN:
        return math.nan
    return text


def _resolve_tagged(tag: str, text: str) -> Scalar:
    """The value of a scalar with an explicit standard tag (``ValueError`` if it does not fit)."""
    kind = tag[len(_CORE) :]
    if kind == "str":
        return text
    value = resolve_plain(text)
    if kind == "null" and value is None:
        return None
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{text!r} cannot be read as !!{kind}")


class _Fatal(Exception):
    """Stops reading at once (a resource limit or an unreadable stream)."""

    def __init__(self, problem: SpecProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _TooMany(Exception):
    """Stops reading: more problems than a :class:`~conveyor.errors.SpecError` lists."""


class _DocInfo:
    doc_version: Any = None


_TOO_DEEP = f"nesting too deep: more than {MAX_DEPTH} levels of mappings and lists"
_TOO_DEEP_HINT = "a pipeline file needs only a few levels; check the brackets and the indentation"


class _TooDeep(Exception):
    """Raised by the scanner at a flow collection that passes the depth limit."""

    def __init__(self, mark: Any) -> None:
        super().__init__(_TOO_DEEP)
        self.mark = mark


class _Scanner(Scanner):
    """ruamel's scanner, failing fast on deep flow nesting.

    The scanner looks up to 1024 characters ahead for simple keys, with a cost that grows with
    the number of open flow collections; stopping at the limit keeps ``[[[[...`` cheap.
    """

    def fetch_flow_collection_start(self, TokenClass: Any, to_push: str) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise _TooDeep(self.reader.get_mark())
        super().fetch_flow_collection_start(TokenClass, to_push)


class _Context:
    """The minimal "loader" object ruamel's Reader, Scanner and Parser hook themselves onto."""

    comment_handling = None
    processing_version = (1, 2)

    def __init__(self, text: str) -> None:
        self.doc_infos = [_DocInfo()]
        self._resolver = self
        self._reader: Any = None
        self._scanner: Any = None
        self._parser: Any = None
        Reader(text, loader=self)
        _Scanner(loader=self)
        Parser(loader=self)


class _Frame:
    """An open collection while its events are read."""

    __slots__ = ("anchor", "expect_key", "key", "node", "seen", "skip_value", "start_count")

    def __init__(self, node: MapNode | SeqNode, anchor: str | None, start_count: int) -> None:
        self.node = node
        self.anchor = anchor
        self.start_count = start_count
        self.expect_key = True
        self.key: ScalarNode | None = None
        self.skip_value = False
        self.seen: dict[tuple[type, Scalar], tuple[int, str]] = {}
        """Keys met so far: (line, text as written)."""


def _tag_text(event: Any) -> str:
    """The tag as the user wrote it (``!!python/object:x``, ``!foo``, ``!<uri>``)."""
    ctag = getattr(event, "ctag", None)
    handle = getattr(ctag, "handle", None)
    suffix = getattr(ctag, "suffix", None)
    if handle is None:
        if suffix == "!":
            return "!"
        return f"!<{suffix}>" if suffix is not None else str(event.tag)
    return f"{handle}{suffix or ''}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_PARSE_HINTS = (
    ("'\\t'", "indent with spaces: YAML does not allow tabs for indentation"),
    (
        "mapping values are not allowed here",
        "a plain value cannot contain ': '; quote the value, or check the indentation",
    ),
    ("expected <block end>", "check the indentation of this line against the lines above it"),
    ("could not find expected ':'", "add the ':' after the key, or check the indentation"),
    (
        "expected '<document start>'",
        "check the indentation of this line; text after the document's end is not allowed",
    ),
    (
        "unknown escape character",
        "in double quotes write a backslash as \\\\, or use single quotes",
    ),
    ("that cannot start any token", "quote a value that starts with this character"),
    ("found unexpected end of stream", "a quote or bracket is not closed"),
)


_TAB_AFTER_TEXT = "replace the tab with a space: YAML separates a key, a '-' or a value with spaces"


def _parse_problem(source: str, exc: MarkedYAMLError, text: str = "") -> SpecProblem:
    """A ruamel scanner/parser error as a problem at its mark."""
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = _one_line(exc.problem or exc.context or "invalid YAML")
    context, cmark = exc.context, exc.context_mark
    if context and cmark is not None and (cmark.line, cmark.column) != (line - 1, column - 1):
        problem += f" ({_one_line(context)} at line {cmark.line + 1}, column {cmark.column + 1})"
    hint = next((h for needle, h in _PARSE_HINTS if needle in problem), None)
    if "'\\t'" in problem and mark is not None:
        lines = text.split("\n")
        before = lines[mark.line][: mark.column] if mark.line < len(lines) else ""
        if before.strip():  # the tab follows text on its line: it separates, not indents
            hint = _TAB_AFTER_TEXT
    return SpecProblem(source, line, column, f"invalid YAML: {problem}", hint=hint)


def _unusable_character(text: str) -> tuple[str, str] | None:
    """A message and a hint for the first NUL or lone surrogate in ``text``, if there is one."""
    match = _UNUSABLE.search(text)
    if match is None:
        return None
    if match.group() == "\0":
        return (
            "this string contains a NUL character (\\0), which no job or command can receive",
            "remove the \\0 or \\x00 escape",
        )
    return (
        f"this string contains U+{ord(match.group()):04X}, a lone surrogate, which is not a"
        " character",
        "write the character itself, or escape it with 8 hex digits (\\U0001F600),"
        " not as a pair of \\u escapes",
    )


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of character ``index`` of ``text``."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _decode(data: bytes, source: str) -> str:
    """``data`` as text, or a problem at the first byte that is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
        raise _Fatal(
            SpecProblem(
                source,
                line,
                column,
                f"the file is not valid UTF-8 (byte 0x{data[exc.start]:02x})",
                hint="save the pipeline file with UTF-8 encoding",
            )
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


class _Builder:
    """Turns the event stream into a node tree, checking tags, keys, depth and size."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[SpecProblem] = []
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Node, int] | None] = {}
        self.count = 0
        self.aliases_used = False
        self.root: Node | None = None
        self.documents = 0
        self.previous_end: Any = None
        """Where the previous event ended (an empty value is placed just after it)."""

    def problem(self, mark: Any, message: str, hint: str | None = None) -> SpecProblem:
        return SpecProblem(self.source, mark.line + 1, mark.column + 1, message, hint)

    def add(self, mark: Any, message: str, hint: str | None = None) -> None:
        self.report(self.problem(mark, message, hint))

    def report(self, problem: SpecProblem) -> None:
        """Record a problem; stop reading once there are more than can be shown (reading on
        would only make a hostile file slower to refuse)."""
        self.problems.append(problem)
        if len(self.problems) > MAX_SHOWN_PROBLEMS:
            raise _TooMany

    def grow(self, mark: Any, amount: int, alias: bool) -> None:
        self.count += amount
        if self.count <= MAX_NODES:
            return
        if alias or self.aliases_used:
            message = "document too large after expanding aliases (YAML alias bomb?)"
            hint = "a pipeline file needs far fewer values; check the anchors and aliases"
        else:
            message = "document too large"
            hint = "a pipeline file needs far fewer values; is this the right file?"
        raise _Fatal(self.problem(mark, f"{message}: more than {MAX_NODES:,} values", hint=hint))

    def check_tag(self, event: Any, allowed: set[str] | None = None) -> str | None:
        """The event's tag if it is standard and fits the node, else record a problem."""
        tag: str | None = event.tag
        if tag is None:
            return None
        if tag not in _ALLOWED_TAGS:
            self.add(
                event.start_mark,
                f"tag '{_tag_text(event)}' is not allowed: Conveyor reads plain YAML only",
                hint="remove the tag; standard tags such as !!str are the only ones accepted",
            )
            return None
        if allowed is not None and tag not in allowed:
            self.add(event.start_mark, f"tag '{_tag_text(event)}' does not fit this kind of value")
            return None
        return tag

    def feed(self, event: Any) -> bool:
        """Handle one event; false once the stream has ended."""
        previous, self.previous_end = self.previous_end, getattr(event, "end_mark", None)
        if isinstance(event, ScalarEvent):
            self.scalar(event, previous)
        elif isinstance(event, MappingStartEvent | SequenceStartEvent):
            self.open(event)
        elif isinstance(event, MappingEndEvent | SequenceEndEvent):
            self.close()
        elif isinstance(event, AliasEvent):
            self.alias(event)
        elif isinstance(event, DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise _Fatal(
                    self.problem(
                        event.start_mark,
                        "a pipeline file holds one YAML document",
                        hint="remove the '---' line and everything after it, "
                        "or merge the documents",
                    )
                )
        elif isinstance(event, StreamEndEvent):
            return False
        return True

    def scalar(self, event: Any, previous_end: Any = None) -> None:
        self.grow(event.start_mark, 1, alias=False)
        text: str = event.value
        plain = event.style is None
        tag = self.check_tag(event, {_CORE + k for k in ("str", "int", "float", "bool", "null")})
        value: Scalar
        if tag is not None:
            try:
                value = _resolve_tagged(tag, text)
            except ValueError as exc:
                self.add(event.start_mark, str(exc))
                value = text
        elif plain and event.ctag is None:
            value = resolve_plain(text)
        else:
            value = text
        mark = event.start_mark
        unusable = _unusable_character(text)
        if unusable is not None:
            self.add(mark, *unusable)
        line, column = mark.line + 1, mark.column + 1
        if not text and plain and previous_end is not None and previous_end.line < mark.line:
            # An empty value (`name:` and nothing): the parser places it at the next token,
            # lines later; it belongs right after what precedes it (`name:`).
            line, column = previous_end.line + 1, previous_end.column + 2
        node = ScalarNode(value, text, line, column, quoted=not plain)
        if event.anchor is not None:
            self.anchors[event.anchor] = (node, 1)
        self.attach(node, event)

    def open(self, event: Any) -> None:
        mark = event.start_mark
        if len(self.stack) >= MAX_DEPTH:
            raise _Fatal(self.problem(mark, _TOO_DEEP, hint=_TOO_DEEP_HINT))
        self.grow(mark, 1, alias=False)
        node: MapNode | SeqNode
        if isinstance(event, MappingStartEvent):
            self.check_tag(event, {_CORE + "map"})
            node = MapNode([], mark.line + 1, mark.column + 1)
        else:
            self.check_tag(event, {_CORE + "seq"})
            node = SeqNode([], mark.line + 1, mark.column + 1)
        if event.anchor is not None:
            self.anchors[event.anchor] = None  # open: an alias to it now would be recursive
        self.stack.append(_Frame(node, event.anchor, self.count - 1))

    def close(self) -> None:
        frame = self.stack.pop()
        if frame.anchor is not None:
            self.anchors[frame.anchor] = (frame.node, self.count - frame.start_count)
        self.attach(frame.node, None)

    def alias(self, event: Any) -> None:
        name: str = event.anchor
        if name not in self.anchors:
            self.add(event.start_mark, f"unknown alias '*{name}': no anchor '&{name}' before it")
            mark = event.start_mark
            self.attach(ScalarNode(None, "", mark.line + 1, mark.column + 1), event)
            return
        target = self.anchors[name]
        if target is None:
            raise _Fatal(
                self.problem(
                    event.start_mark,
                    f"alias '*{name}' is inside the value it refers to",
                    hint="recursive structures are not supported",
                )
            )
        self.aliases_used = True
        self.grow(event.start_mark, target[1], alias=True)
        self.attach(target[0], event)

    def attach(self, node: Node, event: Any) -> None:
        """Put a finished node into its parent (``event`` gives a key's position, if any)."""
        if not self.stack:
            self.root = node
            return
        frame = self.stack[-1]
        parent = frame.node
        if isinstance(parent, SeqNode):
            parent.items.append(node)
            return
        if not frame.expect_key:
            frame.expect_key = True
            if not frame.skip_value and frame.key is not None:
                parent.items.append((frame.key, node))
            frame.key, frame.skip_value = None, False
            return
        frame.expect_key = False
        line, column = (
            (event.start_mark.line + 1, event.start_mark.column + 1)
            if event is not None
            else (node.line, node.column)
        )
        if not isinstance(node, ScalarNode):
            kind = "mapping" if isinstance(node, MapNode) else "list"
            self.report(
                SpecProblem(
                    self.source,
                    line,
                    column,
                    f"a mapping key must be a plain value such as a name, not a {kind}",
                )
            )
            frame.skip_value = True
            return
        if node.raw == "<<" and not node.quoted:
            self.report(
                SpecProblem(
                    self.source,
                    line,
                    column,
                    "merge keys ('<<') are not supported",
                    hint="Conveyor reads YAML 1.2, which has no merge keys: repeat the keys, "
                    "or alias a whole value",
                )
            )
            frame.skip_value = True
            return
        identity = (type(node.value), node.value)
        seen = frame.seen.get(identity)
        if seen is not None:
            first, first_raw = seen
            hint = "a key may appear only once in a mapping"
            if first_raw != node.raw:  # 1.0 and 1.00, 0x10 and 16: one number in YAML
                hint = (
                    f"YAML reads '{first_raw}' and '{node.raw}' as the same value: quote the"
                    " keys to keep them apart"
                )
            self.report(
                SpecProblem(
                    self.source,
                    line,
                    column,
                    f"duplicate key '{node.raw}' (first defined at line {first})",
                    hint=hint,
                )
            )
            frame.skip_value = True
            return
        frame.seen[identity] = (line, node.raw)
        frame.key = node


def _read(text: str, source: str) -> tuple[Node | None, list[SpecProblem]]:
    """Run the parser over ``text`` and build the tree (``None`` for an empty stream), with
    the problems that did not stop the reading (a duplicate key, a tag...)."""
    builder = _Builder(source)
    try:
        parser = _Context(text)._parser
        while parser.check_event():
            if not builder.feed(parser.get_event()):
                break
    except ReaderError as exc:
        line, column = _position(text, int(exc.position))
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[0])
        problem = SpecProblem(
            source,
            line,
            column,
            f"the file contains a character that YAML does not allow (U+{code:04X})",
            hint="remove the control character",
        )
        raise SpecError([*builder.problems, problem]) from None
    except MarkedYAMLError as exc:
        raise SpecError([*builder.problems, _parse_problem(source, exc, text)]) from None
    except _Fatal as exc:
        raise SpecError([*builder.problems, exc.problem]) from None
    except _TooMany:
        raise SpecError(builder.problems, complete=False) from None
    except _TooDeep as exc:
        problem = builder.problem(exc.mark, _TOO_DEEP, hint=_TOO_DEEP_HINT)
        raise SpecError([*builder.problems, problem]) from None
    except YAMLError as exc:
        problem = SpecProblem(source, 1, 1, f"invalid YAML: {_one_line(str(exc))}")
        raise SpecError([*builder.problems, problem]) from None
    return builder.root, builder.problems


def load_document(data: bytes, source: str) -> Node:
    """Parse the single YAML document in ``data`` into a node tree.

    Args:
        data: The raw bytes of the pipeline file (UTF-8, a BOM is allowed).
        source: The file name used in problems.

    Returns:
        The root node. Aliases share the anchored node's object.

    Raises:
        SpecError: With every problem found (or the first fatal one: a parse error, a limit
            exceeded, a second document).
    """
    root, problems = read_document(data, source)
    if problems:
        raise SpecError(problems)
    return root


def read_document(data: bytes, source: str) -> tuple[Node, list[SpecProblem]]:
    """``load_document``, but the problems that did not stop the reading are returned with
    the tree (in which a duplicate key keeps its first value, a refused tag or key is left
    out), so that the schema's checks can report their problems too.

    Raises:
        SpecError: When the file cannot be read into a tree at all.
    """
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(
            [
                SpecProblem(
                    source,
                    1,
                    1,
                    too_large(len(data)),
                    hint="a pipeline file is a few kilobytes; is this the right file?",
                )
            ]
        )
    try:
        text = _decode(data, source)
        root, problems = _read(text, source)
    except _Fatal as exc:
        raise SpecError([exc.problem]) from None
    except (RecursionError, MemoryError) as exc:
        kind = "nested" if isinstance(exc, RecursionError) else "large"
        raise SpecError([SpecProblem(source, 1, 1, f"the file is too {kind} to read")]) from None
    if root is None or (
        isinstance(root, ScalarNode) and root.value is None and root.raw == "" and not root.quoted
    ):
        raise SpecError(
            [*problems, SpecProblem(source, 1, 1, "the pipeline file is empty", hint=_INIT_HINT)]
        )
    return root, problems
