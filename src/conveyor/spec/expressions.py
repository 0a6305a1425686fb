"""The small, safe expression language of ``metric`` gates (pure; no ``eval``).

An expression is a condition over numbers from a job's metrics file, e.g. ``p95_ms <= 200 and
errors == 0``. It is parsed with Python's own parser (``ast.parse(..., mode="eval")``) and then
compiled from an allow-list of node types only: numbers, metric names (dotted names such as
``latency.p95`` address nested keys), unary ``-``/``+``, ``+ - * /``, comparisons (chains such as
``0 < x <= 5``), ``and``, ``or``, ``not`` and parentheses. Anything else (calls, attributes of
non-names, subscripts, strings, lambdas, comprehensions, names starting with ``__``) is refused.
The pipeline file's validator uses :func:`parse_expression` so a bad ``expr`` is reported at its
line and column; ``conveyor.domain.gates`` evaluates it.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from conveyor.errors import ConveyorError

MAX_EXPRESSION_LENGTH = 1000
MAX_EXPRESSION_DEPTH = 50
MAX_METRIC_DEPTH = 32
MAX_NAME_LENGTH = 200


def is_number(value: object) -> bool:
    """A finite int or float (a boolean is not a number)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_EXPRESSION_HINT = (
    "a metric condition compares metric names and numbers with < <= > >= == !=, using + - * /, "
    "and, or, not and parentheses, e.g. `latency.p95 < 250 and errors == 0`"
)


class ExpressionError(ConveyorError):
    """A metric expression cannot be parsed or evaluated.

    ``column`` is the 1-based position in the expression text of the part at fault, when known.
    """

    def __init__(self, message: str, *, column: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.column = column


# ------------------------------------------------------------------------- metric expressions

_Values = Mapping[str, float]
_NumberFn = Callable[[_Values], float]
_ConditionFn = Callable[[_Values], bool]

_COMPARE: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
}
_ARITHMETIC: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
}
_REFUSED: tuple[tuple[type[ast.AST] | tuple[type[ast.AST], ...], str], ...] = (
    (ast.Call, "function calls are not allowed"),
    (ast.Subscript, "indexing is not allowed; write nested keys with dots, e.g. `latency.p95`"),
    (ast.Lambda, "lambdas are not allowed"),
    (
        (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp),
        "comprehensions are not allowed",
    ),
    ((ast.List, ast.Tuple, ast.Set, ast.Dict), "lists, tuples, sets and dicts are not allowed"),
    (ast.IfExp, "`... if ... else ...` is not allowed; combine conditions with and, or, not"),
    (ast.NamedExpr, "`:=` is not allowed"),
    (ast.JoinedStr, "strings are not allowed; only numbers and metric names"),
    (ast.Starred, "`*` unpacking is not allowed"),
)
_OPERATOR_TEXT: dict[type[ast.AST], str] = {
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.Invert: "~",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}


@dataclass(frozen=True)
class CompiledExpr:
    """A checked metric condition, ready to evaluate on flattened metrics."""

    source: str
    names: tuple[str, ...]
    """The metric names the condition uses, in order of first appearance."""
    _fn: _ConditionFn = field(repr=False, compare=False)

    def evaluate(self, values: Mapping[str, float]) -> bool:
        """Whether the condition holds.

        Raises:
            ExpressionError: a metric is missing or not a finite number, a division by zero or
                an overflow.
        """
        for metric in self.names:
            if metric not in values:
                raise ExpressionError(f"unknown metric '{metric}'")
            if not is_number(values[metric]):
                raise ExpressionError(f"metric '{metric}' is not a finite number")
        return self._fn(values)


class _Compiler:
    """Turns an allow-listed ``ast`` tree into closures; every refusal names the column."""

    def __init__(self, text: str, shift: int) -> None:
        self.text = text
        self.shift = shift
        self.names: list[str] = []

    def column(self, node: ast.AST) -> int | None:
        offset = getattr(node, "col_offset", None)
        if offset is None:
            return None
        chars = len(self.text.encode()[:offset].decode("utf-8", "replace"))
        return self.shift + chars + 1

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or "?"

    def error(self, node: ast.AST, message: str) -> ExpressionError:
        return ExpressionError(message, column=self.column(node), hint=_EXPRESSION_HINT)

    def refuse(self, node: ast.AST) -> ExpressionError:
        for types, message in _REFUSED:
            if isinstance(node, types):
                return self.error(node, message)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str | bytes):
                return self.error(node, "strings are not allowed; only numbers and metric names")
            return self.error(
                node, f"`{self.segment(node)}` is not allowed; only numbers and metric names"
            )
        if isinstance(node, ast.BinOp | ast.UnaryOp):
            op = _OPERATOR_TEXT.get(type(node.op), type(node.op).__name__)
            return self.error(node, f"the operator `{op}` is not allowed; use + - * /")
        return self.error(node, f"`{self.segment(node)}` is not allowed in a metric condition")

    def check_depth(self, node: ast.AST, depth: int) -> None:
        if depth > MAX_EXPRESSION_DEPTH:
            raise self.error(
                node, f"the expression is nested more than {MAX_EXPRESSION_DEPTH} levels deep"
            )

    def condition(self, node: ast.AST, depth: int) -> _ConditionFn:
        self.check_depth(node, depth)
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(value, depth + 1) for value in node.values]
            if isinstance(node.op, ast.And):
                return lambda v: all(part(v) for part in parts)
            return lambda v: any(part(v) for part in parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            operand = self.condition(node.operand, depth + 1)
            return lambda v: not operand(v)
        if isinstance(node, ast.Compare):
            return self.compare(node, depth)
        if self.is_number(node):
            self.number(node, depth)  # refuses what is wrong inside it first (``x.__class__``)
            text = self.segment(node)
            raise self.error(
                node,
                f"`{text}` is a number, not a condition; compare it, e.g. `{text} > 0`",
            )
        raise self.refuse(node)

    def compare(self, node: ast.Compare, depth: int) -> _ConditionFn:
        tests: list[Callable[[float, float], bool]] = []
        for op in node.ops:
            test = _COMPARE.get(type(op))
            if test is None:
                text = _OPERATOR_TEXT.get(type(op), type(op).__name__)
                raise self.error(
                    node, f"the comparison `{text}` is not allowed; use < <= > >= == !="
                )
            tests.append(test)
        operands = [self.number(item, depth + 1) for item in [node.left, *node.comparators]]

        def run(v: _Values) -> bool:
            left = operands[0](v)
            for test, operand in zip(tests, operands[1:], strict=True):
                right = operand(v)
                if not test(left, right):
                    return False
                left = right
            return True

        return run

    def is_number(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, int | float) and not isinstance(node.value, bool)
        if isinstance(node, ast.UnaryOp):
            return isinstance(node.op, ast.USub | ast.UAdd)
        if isinstance(node, ast.BinOp):
            return isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div)
        return isinstance(node, ast.Name | ast.Attribute)

    def number(self, node: ast.AST, depth: int) -> _NumberFn:
        self.check_depth(node, depth)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            if isinstance(node.value, bool):
                raise self.refuse(node)
            try:
                value = float(node.value)
            except OverflowError:
                value = math.inf
            if not math.isfinite(value):
                raise self.error(node, f"the number `{self.segment(node)}` is too large")
            return lambda v: value
        if isinstance(node, ast.Name | ast.Attribute):
            metric = self.metric_name(node)
            if metric not in self.names:
                self.names.append(metric)
            return lambda v: float(v[metric])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = self.number(node.operand, depth + 1)
            if isinstance(node.op, ast.USub):
                return lambda v: -operand(v)
            return operand
        if isinstance(node, ast.BinOp) and self.is_number(node):
            return self.arithmetic(node, depth)
        if isinstance(node, ast.Compare | ast.BoolOp) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
        ):
            raise self.error(
                node,
                f"`{self.segment(node)}` is a condition, not a number; "
                "conditions combine only with and, or, not",
            )
        raise self.refuse(node)

    def arithmetic(self, node: ast.BinOp, depth: int) -> _NumberFn:
        left = self.number(node.left, depth + 1)
        right = self.number(node.right, depth + 1)
        text = self.segment(node)
        divisor = self.segment(node.right)
        column = self.column(node)

        def overflow() -> ExpressionError:
            return ExpressionError(f"`{text}` overflows", column=column)

        if isinstance(node.op, ast.Div):

            def divide(v: _Values) -> float:
                b = right(v)
                if b == 0:
                    raise ExpressionError(
                        f"division by zero in `{text}`: `{divisor}` is 0", column=column
                    )
                result = left(v) / b
                if not math.isfinite(result):
                    raise overflow()
                return result

            return divide
        apply = _ARITHMETIC[type(node.op)]

        def calculate(v: _Values) -> float:
            result = apply(left(v), right(v))
            if not math.isfinite(result):
                raise overflow()
            return result

        return calculate

    def metric_name(self, node: ast.AST) -> str:
        parts: list[str] = []
        current = node
        while isinstance(current, ast.Attribute):
            parts.append(current.attr)
            current = current.value
        if not isinstance(current, ast.Name):
            raise self.error(
                node,
                f"`{self.segment(node)}`: a `.` may only follow a metric name, as in `latency.p95`",
            )
        parts.append(current.id)
        parts.reverse()
        for part in parts:
            if part.startswith("__"):
                raise self.error(node, f"names starting with '__' are not allowed ('{part}')")
        metric = ".".join(parts)
        if len(parts) > MAX_METRIC_DEPTH or len(metric) > MAX_NAME_LENGTH:
            raise self.error(
                node,
                f"the metric name is longer than {MAX_NAME_LENGTH} characters or "
                f"{MAX_METRIC_DEPTH} levels, so no metric can have it",
            )
        return metric


def parse_expression(expr: str) -> CompiledExpr:
    """Check a metric condition and prepare it for evaluation (see the module docstring).

    Raises:
        ExpressionError: the expression is not a valid metric condition; ``column`` is the
            1-based position of the fault in ``expr`` when it is known.
    """
    if not isinstance(expr, str):
        raise ExpressionError("a metric condition must be a string", hint=_EXPRESSION_HINT)
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(
            f"the metric condition is {len(expr)} characters long; "
            f"at most {MAX_EXPRESSION_LENGTH} are allowed",
            hint="split it into several metric gates",
        )
    shift = len(expr) - len(expr.lstrip())
    # Line breaks (from a YAML block scalar) are spaces, so columns count along ``expr``.
    text = re.sub(r"[\r\n\t\f\v]", " ", expr).strip()
    if not text:
        raise ExpressionError("the metric condition is empty", hint=_EXPRESSION_HINT)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        column = shift + exc.offset if exc.offset and exc.offset > 0 else shift + len(text) + 1
        raise ExpressionError(
            f"the metric condition is not valid: {exc.msg}", column=column, hint=_EXPRESSION_HINT
        ) from None
    except (ValueError, RecursionError, MemoryError):
        raise ExpressionError(
            "the metric condition cannot be parsed (null characters or too complex)",
            hint=_EXPRESSION_HINT,
        ) from None
    compiler = _Compiler(text, shift)
    fn = compiler.condition(tree.body, 1)
    if not compiler.names:
        raise ExpressionError(
            "the metric condition uses no metric, so its result never changes",
            column=shift + 1,
            hint=_EXPRESSION_HINT,
        )
    return CompiledExpr(expr, tuple(compiler.names), fn)
