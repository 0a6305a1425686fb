"""Quality gates: verdicts and their evidence, metric expressions, approvals, change windows."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from conveyor.domain.gates import (
    MAX_EXPRESSION_LENGTH,
    MAX_METRIC_DEPTH,
    MAX_METRICS,
    MAX_NAME_LENGTH,
    Approval,
    ExpressionError,
    MetricsError,
    Verdict,
    WindowError,
    approval_gate,
    check_timezone,
    coverage_gate,
    flatten_metrics,
    metric_gate,
    parse_expression,
    parse_windows,
    window_gate,
)
from conveyor.domain.gates import tests_gate as evaluate_tests  # not collected by pytest
from conveyor.errors import ConveyorError

# ------------------------------------------------------------------------------------- tests


def test_tests_gate_passes_with_all_tests_passing() -> None:
    v = evaluate_tests("unit", passed=50, failed=0, skipped=2, min_count=50)
    assert v == Verdict(
        "unit",
        "tests",
        True,
        "50 of 50 tests passed (100.0%, 2 skipped), needs 100.0% of at least 50",
        {
            "passed": 50,
            "failed": 0,
            "skipped": 2,
            "ratio": 1.0,
            "min_passed_ratio": 1.0,
            "min_count": 50,
        },
    )


def test_tests_gate_fails_below_the_ratio() -> None:
    v = evaluate_tests("unit", passed=48, failed=2, skipped=0, min_count=50)
    assert not v.passed
    assert v.kind == "tests"
    assert v.summary == "48 of 50 tests passed (96.0%), needs 100.0% of at least 50"
    assert v.evidence == {
        "passed": 48,
        "failed": 2,
        "skipped": 0,
        "ratio": 0.96,
        "min_passed_ratio": 1.0,
        "min_count": 50,
    }


def test_tests_gate_ratio_boundary_is_inclusive() -> None:
    assert evaluate_tests("unit", passed=48, failed=2, skipped=0, min_passed_ratio=0.96).passed
    assert not evaluate_tests("unit", passed=47, failed=3, skipped=0, min_passed_ratio=0.96).passed


def test_tests_gate_fails_below_the_count() -> None:
    v = evaluate_tests("unit", passed=10, failed=0, skipped=0, min_count=20)
    assert not v.passed
    assert v.summary == "10 of 10 tests passed (100.0%), needs 100.0% of at least 20"


@pytest.mark.parametrize("min_count", [0, 1, 5])
def test_tests_gate_fails_when_no_test_ran(min_count: int) -> None:
    v = evaluate_tests(
        "unit", passed=0, failed=0, skipped=5, min_passed_ratio=0.0, min_count=min_count
    )
    assert not v.passed
    assert v.summary.startswith("no tests ran (5 skipped)")
    assert v.evidence["ratio"] is None


def test_tests_gate_never_shows_an_almost_full_ratio_as_100_percent() -> None:
    v = evaluate_tests("unit", passed=19_999, failed=1, skipped=0)
    assert not v.passed
    assert "(99.99%)" in v.summary


def test_tests_gate_refuses_negative_counts() -> None:
    v = evaluate_tests("unit", passed=5, failed=-5, skipped=0)
    assert not v.passed
    assert "invalid" in v.summary


# ---------------------------------------------------------------------------------- coverage


def test_coverage_gate_passes_at_the_exact_allowed_drop() -> None:
    # 85.3 - 84.8 is 0.5000000000000057 in floating point: it must still count as 0.5.
    v = coverage_gate(
        "cov", current=84.8, baseline=85.3, min=80.0, max_drop=0.5, report="coverage.xml"
    )
    assert v.passed, v.summary
    assert v.evidence == {
        "current": 84.8,
        "baseline": 85.3,
        "drop": 0.5,
        "min": 80.0,
        "max_drop": 0.5,
        "report": "coverage.xml",
        "checks": {"min": "passed", "max_drop": "passed"},
    }
    assert v.summary == (
        "coverage 84.8% (coverage.xml): at least 80.0%; "
        "0.5 points below the 85.3% running now (at most 0.5 allowed)"
    )


def test_coverage_gate_fails_on_a_larger_drop() -> None:
    v = coverage_gate(
        "cov", current=84.7, baseline=85.3, min=80.0, max_drop=0.5, report="coverage.xml"
    )
    assert not v.passed
    assert v.evidence["drop"] == 0.6
    assert v.evidence["checks"] == {"min": "passed", "max_drop": "failed"}
    assert v.summary == (
        "coverage 84.7% (coverage.xml): 0.6 points below the 85.3% running now, "
        "more than the 0.5 allowed"
    )


def test_coverage_gate_fails_below_the_minimum_and_reports_both_problems() -> None:
    v = coverage_gate("cov", current=70.0, baseline=85.0, min=80.0, max_drop=1.0, report="c.xml")
    assert not v.passed
    assert v.evidence["checks"] == {"min": "failed", "max_drop": "failed"}
    assert "below the minimum 80.0%" in v.summary
    assert "15.0 points below the 85.0% running now" in v.summary


def test_coverage_gate_without_baseline_passes_the_drop_check_and_says_so() -> None:
    v = coverage_gate("cov", current=81.0, baseline=None, min=80, max_drop=0.5, report="c.xml")
    assert v.passed
    assert v.evidence["baseline"] is None
    assert v.evidence["drop"] is None
    assert v.evidence["checks"] == {"min": "passed", "max_drop": "no baseline"}
    assert "no baseline" in v.summary


def test_coverage_gate_with_higher_coverage_than_baseline() -> None:
    v = coverage_gate("cov", current=90.0, baseline=85.0, min=None, max_drop=0.0, report="c.xml")
    assert v.passed
    assert v.evidence["drop"] == -5.0
    assert v.evidence["checks"] == {"min": "not set", "max_drop": "passed"}


def test_coverage_gate_fails_without_a_report() -> None:
    v = coverage_gate("cov", current=None, baseline=85.0, min=80, max_drop=1, report="coverage.xml")
    assert not v.passed
    assert v.summary == "no coverage report 'coverage.xml' was recorded for this build"
    assert v.evidence["current"] is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 100.5])
def test_coverage_gate_fails_on_a_value_that_is_not_a_percentage(bad: float) -> None:
    v = coverage_gate("cov", current=bad, baseline=None, min=None, max_drop=None, report="c.xml")
    assert not v.passed
    assert "not a percentage" in v.summary
    json.dumps(v.evidence, allow_nan=False)  # stays JSON-ready


# ------------------------------------------------------------------------ metric expressions


def holds(expr: str, **values: float) -> bool:
    return parse_expression(expr).evaluate(values)


def test_expression_names_in_order_of_first_use() -> None:
    compiled = parse_expression("latency.p95 < 250 and errors == 0 and latency.p95 > 0")
    assert compiled.names == ("latency.p95", "errors")
    assert compiled.evaluate({"latency.p95": 212.5, "errors": 0, "other": 1})
    assert not compiled.evaluate({"latency.p95": 300, "errors": 0})


def test_expression_precedence_and_associativity() -> None:
    assert holds("a + b * 2 == 7", a=1, b=3)
    assert holds("(a + b) * 2 == 8", a=1, b=3)
    assert holds("a - b - c == 3", a=10, b=4, c=3)  # (10 - 4) - 3, not 10 - (4 - 3)
    assert holds("a / b / c == 1", a=8, b=4, c=2)  # (8 / 4) / 2
    assert holds("-a + b == 1", a=2, b=3)
    assert holds("- -a == a", a=2)
    assert holds("+a == 2", a=2)
    assert holds("a / 4 == 0.5", a=2)  # true division


@pytest.mark.parametrize(("x", "expected"), [(0, False), (0.5, True), (5, True), (6, False)])
def test_expression_comparison_chains(x: float, expected: bool) -> None:
    assert holds("0 < x <= 5", x=x) is expected


def test_expression_boolean_operators() -> None:
    # `not` binds tighter than `and`, which binds tighter than `or`:
    # not a > 1 or b > 1 and c > 1  ==  (not (a > 1)) or ((b > 1) and (c > 1))
    expr = "not a > 1 or b > 1 and c > 1"
    assert holds(expr, a=0, b=0, c=0)
    assert not holds(expr, a=2, b=2, c=0)
    assert holds(expr, a=2, b=2, c=2)
    assert holds("not (a > 1 or b > 1)", a=0, b=0)
    assert not holds("not (a > 1 or b > 1)", a=0, b=2)
    assert holds("a != 1 and a == 2", a=2)
    assert holds("a >= 2 and a <= 2 and not a < 2 and not a > 2", a=2)


def test_expression_division_by_zero_is_an_error_not_a_crash() -> None:
    compiled = parse_expression("errors / requests < 0.01")
    with pytest.raises(ExpressionError, match="division by zero in `errors / requests`"):
        compiled.evaluate({"errors": 1, "requests": 0})
    # `or` and `and` short-circuit, so a guard avoids the division.
    assert holds("requests == 0 or errors / requests < 0.01", errors=1, requests=0)


def test_expression_overflow_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="overflows"):
        holds("a * a > 0", a=1e200)
    with pytest.raises(ExpressionError, match="overflows"):
        holds("a / b > 0", a=1e300, b=1e-300)


def test_expression_unknown_and_non_finite_metrics() -> None:
    compiled = parse_expression("latency.p99 < 250")
    with pytest.raises(ExpressionError, match=r"unknown metric 'latency\.p99'"):
        compiled.evaluate({"latency.p95": 1})
    with pytest.raises(ExpressionError, match="not a finite number"):
        compiled.evaluate({"latency.p99": math.nan})


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("__import__('os')", "function calls are not allowed"),
        ("__import__('os').system('id') == 0", "function calls are not allowed"),
        ("x.__class__", "names starting with '__' are not allowed"),
        ("x.__class__ > 0", "names starting with '__' are not allowed"),
        ("__builtins__ > 0", "names starting with '__' are not allowed"),
        ("[1]", "lists, tuples, sets and dicts are not allowed"),
        ("x in [1, 2]", "the comparison `in` is not allowed"),
        ("'a'", "strings are not allowed"),
        ("x == 'a'", "strings are not allowed"),
        ("f'{x}' == 1", "strings are not allowed"),
        ("lambda: 1", "lambdas are not allowed"),
        ("f(x)", "function calls are not allowed"),
        ("f(x) > 1", "function calls are not allowed"),
        ("x[0] > 1", "indexing is not allowed"),
        ("x[0]", "indexing is not allowed"),
        ("[y for y in x] == 1", "comprehensions are not allowed"),
        ("(y for y in x)", "comprehensions are not allowed"),
        ("f(x).y < 1", "may only follow a metric name"),
        ("x ** 2 > 1", "the operator `**` is not allowed"),
        ("x // 2 > 1", "the operator `//` is not allowed"),
        ("x % 2 == 1", "the operator `%` is not allowed"),
        ("x & 1 == 1", "the operator `&` is not allowed"),
        ("~x > 1", "the operator `~` is not allowed"),
        ("x is 1", "the comparison `is` is not allowed"),
        ("(x := 1) > 0", "`:=` is not allowed"),
        ("x if y else z", "is not allowed"),
        ("True", "`True` is not allowed"),
        ("x == None", "`None` is not allowed"),
        ("x > 1j", "`1j` is not allowed"),
        ("x", "`x` is a number, not a condition"),
        ("x + 1", "is a number, not a condition"),
        ("not x", "`x` is a number, not a condition"),
        ("(a < b) < c", "is a condition, not a number"),
        ("(a < b) + 1 > 0", "is a condition, not a number"),
        ("a < 1, b < 2", "lists, tuples, sets and dicts are not allowed"),
        ("1 < 2", "uses no metric"),
        ("a < 1e999", "the number `1e999` is too large"),
        ("a <", "not valid"),
        ("a < 1)", "not valid"),
        ("", "empty"),
        ("   ", "empty"),
        ("a < 1\x00", "null"),
    ],
)
def test_hostile_and_malformed_expressions_are_refused(expr: str, message: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse_expression(expr)
    assert message in caught.value.message
    assert isinstance(caught.value, ConveyorError)


@pytest.mark.parametrize(
    "expr",
    [
        "a < 1 and " * 200 + "a < 1",  # too long
        "-" * 200 + "a < 1",  # too deep
        "not " * 100 + "a < 1",
        "a" + " + 1" * 100 + " > 0",
        "(" * 300 + "a" + ")" * 300 + " < 1",  # beyond Python's own parser limit
        "a." * 400 + "b < 1",
        "a" + " < 1" * 400,
    ],
)
def test_very_long_or_deep_expressions_are_bounded(expr: str) -> None:
    with pytest.raises(ExpressionError):
        parse_expression(expr)


def test_expression_limits() -> None:
    assert len("a < 1 and " * 200) > MAX_EXPRESSION_LENGTH
    assert parse_expression("-" * 40 + "a < 1").evaluate({"a": 0})  # 40 levels are fine


@pytest.mark.parametrize(
    ("expr", "column"),
    [
        ("a < 1 and f(b)", 11),
        ("  f(x) > 1", 3),  # leading spaces count
        ("é < f(1)", 5),  # characters, not UTF-8 bytes
        ("a < 1 and x.__class__ > 0", 11),
        ("a < (1", 5),  # the parser's position
        ("a <", 4),  # the end of the expression
        ("a < 1 and\n  b[0] > 1", 13),  # a line break counts as one character
    ],
)
def test_expression_errors_carry_the_column(expr: str, column: int) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse_expression(expr)
    assert caught.value.column == column


def test_multiline_expression_from_a_yaml_block() -> None:
    assert holds("latency.p95 < 250\n  and errors == 0\n", **{"latency.p95": 1, "errors": 0})


def test_metric_gate_passes_and_fails_with_evidence() -> None:
    values = {"latency.p95": 212.5, "latency.p50": 80.0, "errors": 0.0}
    v = metric_gate("perf", values=values, expr="latency.p95 < 250", file="reports/perf.json")
    assert v == Verdict(
        "perf",
        "metric",
        True,
        "`latency.p95 < 250` holds with latency.p95 = 212.5 (reports/perf.json)",
        {
            "expr": "latency.p95 < 250",
            "values": {"latency.p95": 212.5},
            "file": "reports/perf.json",
        },
    )
    v = metric_gate("perf", values=values, expr="latency.p95 < 200", file="reports/perf.json")
    assert not v.passed
    assert (
        v.summary
        == "`latency.p95 < 200` does not hold with latency.p95 = 212.5 (reports/perf.json)"
    )


def test_metric_gate_without_a_file() -> None:
    v = metric_gate("perf", values=None, expr="latency.p95 < 250", file="reports/perf.json")
    assert not v.passed
    assert "no metrics file reports/perf.json was recorded" in v.summary


def test_metric_gate_names_the_unknown_metric_and_lists_the_available_ones() -> None:
    values = {"latency.p95": 212.5, "errors": 0.0}
    v = metric_gate("perf", values=values, expr="latency.p99 < 250", file="reports/perf.json")
    assert not v.passed
    assert v.summary == "metric latency.p99 not in reports/perf.json; it has: errors, latency.p95"


def test_metric_gate_division_by_zero_and_bad_expression_fail_without_raising() -> None:
    v = metric_gate("perf", values={"a": 1, "b": 0}, expr="a / b < 2", file="m.json")
    assert not v.passed
    assert "division by zero" in v.summary
    assert v.evidence["values"] == {"a": 1, "b": 0}
    v = metric_gate("perf", values={"a": 1}, expr="f(a) < 2", file="m.json")
    assert not v.passed
    assert "function calls are not allowed (column 1)" in v.summary


# ------------------------------------------------------------------------------ flattening


def test_flatten_metrics_nested_objects_to_dotted_names() -> None:
    data = {
        "latency": {"p50": 80, "p95": 212.5, "unit": "ms", "buckets": [1, 2]},
        "errors": 0,
        "ok": True,
        "none": None,
        "deep": {"er": {"still": -1.5}},
    }
    assert flatten_metrics(data) == {
        "latency.p50": 80.0,
        "latency.p95": 212.5,
        "errors": 0.0,
        "deep.er.still": -1.5,
    }


def test_flatten_metrics_edge_cases() -> None:
    assert flatten_metrics([1, 2]) == {}
    assert flatten_metrics(3) == {}
    assert flatten_metrics({"a.b": 1, "a": {"b": 2}}) == {"a.b": 1.0}  # the first wins
    assert flatten_metrics({"big": 10**400, "nan": math.nan, "inf": math.inf}) == {}


def test_flatten_metrics_bounds_depth_and_name_length() -> None:
    def nested(levels: int) -> dict[str, object]:
        node: dict[str, object] = {"k": 1}
        for _ in range(levels - 1):
            node = {"k": node}
        return node

    assert flatten_metrics(nested(MAX_METRIC_DEPTH)) == {".".join(["k"] * MAX_METRIC_DEPTH): 1.0}
    assert flatten_metrics(nested(MAX_METRIC_DEPTH + 1)) == {}
    assert flatten_metrics(nested(10_000)) == {}  # no recursion error
    assert flatten_metrics({"x" * MAX_NAME_LENGTH: 1, "y" * (MAX_NAME_LENGTH + 1): 2}) == {
        "x" * MAX_NAME_LENGTH: 1.0
    }


def test_flatten_metrics_refuses_too_many_numbers() -> None:
    assert len(flatten_metrics({f"m{i}": i for i in range(MAX_METRICS)})) == MAX_METRICS
    with pytest.raises(MetricsError, match="more than 10000 numbers"):
        flatten_metrics({f"m{i}": i for i in range(MAX_METRICS + 1)})


# -------------------------------------------------------------------------------- approvals


def approval(who: str, *roles: str, digest: str = "sha256:aa") -> Approval:
    return Approval(
        approver=who, roles=roles, comment="ok", at="2026-01-01T00:00:00Z", digest=digest
    )


def test_approval_gate_role_filter() -> None:
    v = approval_gate(
        "release",
        approvals=[approval("alice@example.com", "release"), approval("bob@example.com", "dev")],
        count=1,
        role="release",
        not_author=False,
        authors=[],
    )
    assert v == Verdict(
        "release",
        "approval",
        True,
        "1 of 1 required approvals (role 'release'): alice@example.com; "
        "not counted: bob@example.com (does not have the role 'release')",
        {
            "required": 1,
            "role": "release",
            "not_author": False,
            "counted": ["alice@example.com"],
            "not_counted": [
                {"approver": "bob@example.com", "reason": "does not have the role 'release'"}
            ],
        },
    )
    v = approval_gate(
        "release",
        approvals=[approval("bob@example.com", "dev")],
        count=1,
        role="release",
        not_author=False,
        authors=[],
    )
    assert not v.passed


def test_approval_gate_does_not_count_self_approval() -> None:
    approvals = [approval("Carol@Example.com", "release"), approval("dave@example.com", "release")]
    v = approval_gate(
        "release",
        approvals=approvals,
        count=2,
        role=None,
        not_author=True,
        authors=["Carol <carol@example.COM>", "erin@example.com"],
    )
    assert not v.passed
    assert v.evidence["counted"] == ["dave@example.com"]
    assert v.evidence["not_counted"] == [
        {"approver": "Carol@Example.com", "reason": "is an author of the change"}
    ]
    assert v.summary.startswith("1 of 2 required approvals (not an author): dave@example.com")
    # Without not_author, the author's approval counts.
    v = approval_gate(
        "release", approvals=approvals, count=2, role=None, not_author=False, authors=["carol@x"]
    )
    assert v.passed


def test_approval_gate_counts_a_person_once() -> None:
    approvals = [
        approval("alice@example.com", "release"),
        approval("ALICE@example.com ", "release"),
        approval("Alice <alice@example.com>", "release"),
    ]
    v = approval_gate(
        "release", approvals=approvals, count=2, role="release", not_author=True, authors=[]
    )
    assert not v.passed
    assert v.evidence["counted"] == ["alice@example.com"]
    assert v.evidence["not_counted"] == []
    v = approval_gate(
        "release", approvals=approvals, count=1, role="release", not_author=True, authors=[]
    )
    assert v.passed


def test_approval_gate_other_digest_and_no_approvals() -> None:
    approvals = [approval("alice@example.com", "release", digest="sha256:old")]
    v = approval_gate(
        "r",
        approvals=approvals,
        count=1,
        role=None,
        not_author=False,
        authors=[],
        digest="sha256:new",
    )
    assert not v.passed
    assert v.evidence["not_counted"] == [
        {"approver": "alice@example.com", "reason": "approved another digest (sha256:old)"}
    ]
    v = approval_gate("r", approvals=[], count=1, role=None, not_author=False, authors=[])
    assert not v.passed
    assert v.summary == "0 of 1 required approvals"


# ---------------------------------------------------------------------------------- windows

BERLIN_FREEZE = parse_windows("Fri 16:00-Mon 08:00")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def frozen(at: datetime, windows: str = "Fri 16:00-Mon 08:00", tz: str = "Europe/Berlin") -> bool:
    return not window_gate("freeze", deny=parse_windows(windows), timezone=tz, at=at).passed


def test_parse_windows_forms() -> None:
    day, week = 86_400, 7 * 86_400
    [span] = parse_windows("Fri 16:00-Mon 08:00")
    assert (span.start, span.length) == (4 * day + 16 * 3600, 2 * day + 16 * 3600)
    [days] = parse_windows("Sat-Sun")
    assert (days.start, days.length) == (5 * day, 2 * day)
    [wrap_days] = parse_windows("Fri-Mon")
    assert (wrap_days.start, wrap_days.length) == (4 * day, 4 * day)
    [one] = parse_windows("sat")
    assert (one.start, one.length) == (5 * day, day)
    [night] = parse_windows("Wed 22:00-02:00")
    assert (night.start, night.length) == (2 * day + 22 * 3600, 4 * 3600)
    [to_midnight] = parse_windows("Fri 18:00-24:00")
    assert (to_midnight.start, to_midnight.length) == (4 * day + 18 * 3600, 6 * 3600)
    [full] = parse_windows("Monday-SUNDAY")
    assert (full.start, full.length) == (0, week)
    [spaced] = parse_windows("  fri  16:00 - mon  8:00 ")
    assert (spaced.start, spaced.length) == (span.start, span.length)
    assert spaced.text == "fri 16:00 - mon 8:00"
    several = parse_windows("Sat-Sun, Wed 12:00-14:00")
    assert [w.text for w in several] == ["Sat-Sun", "Wed 12:00-14:00"]
    assert parse_windows([]) == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("Fry 16:00-Mon 08:00", "unknown day 'Fry'"),
        ("Fri 25:00-Mon 08:00", "'25:00' is not a time"),
        ("Fri 16:60-18:00", "'16:60' is not a time"),
        ("Fri 24:00-Mon 08:00", "'24:00' is not a time"),
        ("Fri 16:00-Fri 16:00", "starts and ends at the same time"),
        ("Fri 16:00-16:00", "starts and ends at the same time"),
        ("Mon-Fri 22:00-06:00", "a range of days cannot have times"),
        ("Fri 16:00", "not a window"),
        ("16:00-18:00", "not a window"),
        ("Fri 1600-1800", "not a window"),
        ("Fri 16:00-Mon 08:00-Tue", "not a window"),
        ("", "empty"),
        ("Sat-Sun,", "empty"),
        ("Fri 1٦:00-18:00", "not a window"),  # a non-ASCII digit
    ],
)
def test_parse_windows_errors(spec: str, message: str) -> None:
    with pytest.raises(WindowError) as caught:
        parse_windows(spec)
    assert message in caught.value.message
    assert caught.value.hint and "DAY HH:MM-DAY HH:MM" in caught.value.hint


def test_parse_windows_error_names_the_list_position() -> None:
    with pytest.raises(WindowError) as caught:
        parse_windows(["Sat-Sun", "Fri 16:00-Mon 8"])
    assert caught.value.index == 1
    with pytest.raises(WindowError) as caught:
        parse_windows(["Sat-Sun", 3])  # type: ignore[list-item]
    assert caught.value.index == 1


def test_window_wraps_the_week_end() -> None:
    # 2026-01-04 is a Sunday, 2026-01-05 a Monday.
    spec = "Sun 20:00-Mon 06:00"
    assert not frozen(utc("2026-01-04T19:59:59"), spec, "UTC")
    assert frozen(utc("2026-01-04T20:00:00"), spec, "UTC")
    assert frozen(utc("2026-01-04T23:59:59"), spec, "UTC")
    assert frozen(utc("2026-01-05T00:00:00"), spec, "UTC")
    assert frozen(utc("2026-01-05T05:59:59"), spec, "UTC")
    assert not frozen(utc("2026-01-05T06:00:00"), spec, "UTC")
    assert frozen(utc("2026-01-05T12:00:00"), "Sat-Mon", "UTC")
    assert not frozen(utc("2026-01-06T00:00:00"), "Sat-Mon", "UTC")  # Tuesday


def test_window_gate_evidence_inside_and_outside() -> None:
    # 2026-01-09 is a Friday; Berlin is on CET (UTC+1) in January.
    v = window_gate(
        "freeze", deny=BERLIN_FREEZE, timezone="Europe/Berlin", at=utc("2026-01-09T15:30:00")
    )
    assert not v.passed
    assert v.evidence == {
        "timezone": "Europe/Berlin",
        "at": "2026-01-09T15:30:00.000000Z",
        "local_time": "2026-01-09T16:30:00+01:00",
        "windows": ["Fri 16:00-Mon 08:00"],
        "window": "Fri 16:00-Mon 08:00",
        "ends_at": "2026-01-12T08:00:00+01:00",
        "next_starts_at": None,
    }
    assert v.summary == (
        "Fri 2026-01-09 16:30 Europe/Berlin is inside the change window 'Fri 16:00-Mon 08:00'; "
        "changes are allowed again from 2026-01-12T08:00:00+01:00"
    )
    v = window_gate(
        "freeze", deny=BERLIN_FREEZE, timezone="Europe/Berlin", at=utc("2026-01-08T10:00:00")
    )
    assert v.passed
    assert v.evidence["window"] is None
    assert v.evidence["next_starts_at"] == "2026-01-09T16:00:00+01:00"


def test_window_gate_overlapping_windows_end_together() -> None:
    deny = parse_windows(["Fri 18:00-24:00", "Sat-Sun", "Mon 00:00-Mon 09:00"])
    v = window_gate("freeze", deny=deny, timezone="UTC", at=utc("2026-01-09T19:00:00"))
    assert not v.passed
    assert v.evidence["ends_at"] == "2026-01-12T09:00:00+00:00"
    v = window_gate(
        "freeze", deny=parse_windows("Mon-Sun"), timezone="UTC", at=utc("2026-01-09T19:00:00")
    )
    assert not v.passed
    assert v.evidence["ends_at"] is None
    assert "cover the whole week" in v.summary


def test_window_gate_without_windows_passes() -> None:
    assert window_gate("freeze", deny=[], timezone="UTC", at=utc("2026-01-09T19:00:00")).passed


def test_window_gate_uses_the_instant_whatever_the_offset_of_at() -> None:
    # 10:30 at UTC-5 is 15:30 UTC is 16:30 CET: inside the Friday freeze.
    at = datetime(2026, 1, 9, 10, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert frozen(at)


def test_window_freeze_across_the_october_clock_change_in_berlin() -> None:
    # Berlin is on CEST (UTC+2) until Sunday 2026-10-25 01:00 UTC, when 03:00 CEST becomes
    # 02:00 CET (UTC+1).
    # Friday 2026-10-23 16:00 CEST = 14:00 UTC: the freeze starts.
    assert not frozen(utc("2026-10-23T13:59:59"))
    assert frozen(utc("2026-10-23T14:00:00"))
    # Both occurrences of Sunday 02:30 (00:30 UTC in CEST, 01:30 UTC in CET) are frozen.
    assert frozen(utc("2026-10-25T00:30:00"))
    assert frozen(utc("2026-10-25T01:30:00"))
    # Monday 2026-10-26 08:00 CET = 07:00 UTC: the freeze ends. Using Friday's offset (+2)
    # would wrongly end it at 06:00 UTC.
    assert frozen(utc("2026-10-26T06:30:00"))
    assert frozen(utc("2026-10-26T06:59:59"))
    assert not frozen(utc("2026-10-26T07:00:00"))
    v = window_gate(
        "f", deny=BERLIN_FREEZE, timezone="Europe/Berlin", at=utc("2026-10-23T14:00:00")
    )
    assert v.evidence["local_time"] == "2026-10-23T16:00:00+02:00"
    assert v.evidence["ends_at"] == "2026-10-26T08:00:00+01:00"


def test_window_freeze_across_the_march_clock_change_in_berlin() -> None:
    # Berlin is on CET (UTC+1) until Sunday 2026-03-29 01:00 UTC, when 02:00 CET becomes
    # 03:00 CEST (UTC+2).
    # Friday 2026-03-27 16:00 CET = 15:00 UTC: the freeze starts.
    assert not frozen(utc("2026-03-27T14:59:59"))
    assert frozen(utc("2026-03-27T15:00:00"))
    # Around the switch itself: 00:59:59 UTC = 01:59:59 CET, 01:00 UTC = 03:00 CEST.
    assert frozen(utc("2026-03-29T00:59:59"))
    assert frozen(utc("2026-03-29T01:00:00"))
    # Monday 2026-03-30 08:00 CEST = 06:00 UTC: the freeze ends. Using Friday's offset (+1)
    # would wrongly keep it until 07:00 UTC.
    assert frozen(utc("2026-03-30T05:59:59"))
    assert not frozen(utc("2026-03-30T06:00:00"))
    assert not frozen(utc("2026-03-30T06:30:00"))
    v = window_gate(
        "f", deny=BERLIN_FREEZE, timezone="Europe/Berlin", at=utc("2026-03-27T15:00:00")
    )
    assert v.evidence["ends_at"] == "2026-03-30T08:00:00+02:00"


def test_window_boundaries_inside_the_skipped_and_repeated_hours() -> None:
    # Sunday 2026-03-29: 02:00-03:00 does not exist in Berlin. A window starting at 02:30
    # starts at the first moment after the gap, 03:00 CEST = 01:00 UTC.
    deny = parse_windows("Sun 02:30-04:00")
    assert not frozen(utc("2026-03-29T00:59:59"), "Sun 02:30-04:00")  # 01:59:59 CET
    assert frozen(utc("2026-03-29T01:00:00"), "Sun 02:30-04:00")  # 03:00 CEST
    v = window_gate("f", deny=deny, timezone="Europe/Berlin", at=utc("2026-03-28T12:00:00"))
    assert v.evidence["next_starts_at"] == "2026-03-29T03:00:00+02:00"
    # Sunday 2026-10-25: 02:00-03:00 happens twice. At 02:20 CET (the second time, 01:20 UTC)
    # a window ending 02:45 ends at 02:45 CET, not at the earlier 02:45 CEST.
    v = window_gate(
        "f",
        deny=parse_windows("Sun 02:15-02:45"),
        timezone="Europe/Berlin",
        at=utc("2026-10-25T01:20:00"),
    )
    assert not v.passed
    assert v.evidence["ends_at"] == "2026-10-25T02:45:00+01:00"


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus", "../etc/passwd", "/etc/localtime", "", "Europe", "localtime", "utc"]
)
def test_unknown_time_zones(zone: str) -> None:
    with pytest.raises(WindowError) as caught:
        check_timezone(zone)
    assert caught.value.hint and "Europe/Berlin" in caught.value.hint
    v = window_gate("freeze", deny=BERLIN_FREEZE, timezone=zone, at=utc("2026-01-08T10:00:00"))
    assert not v.passed
    assert v.evidence["local_time"] is None


def test_known_time_zones() -> None:
    check_timezone("Europe/Berlin")
    check_timezone("UTC")
    check_timezone("America/Argentina/Buenos_Aires")
    check_timezone("Etc/GMT+5")


def test_window_gate_needs_an_aware_datetime() -> None:
    with pytest.raises(ValueError, match="aware"):
        window_gate("freeze", deny=BERLIN_FREEZE, timezone="UTC", at=datetime(2026, 1, 1))


def test_verdicts_are_json_ready() -> None:
    verdicts = [
        evaluate_tests("t", passed=1, failed=0, skipped=0),
        coverage_gate("c", current=90, baseline=80, min=50, max_drop=1, report="c.xml"),
        metric_gate("m", values={"a": 1}, expr="a > 0", file="m.json"),
        approval_gate(
            "a", approvals=[approval("x@y")], count=1, role=None, not_author=True, authors=[]
        ),
        window_gate(
            "w", deny=BERLIN_FREEZE, timezone="Europe/Berlin", at=utc("2026-01-09T15:30:00")
        ),
    ]
    for verdict in verdicts:
        assert json.loads(json.dumps(verdict.payload(), allow_nan=False)) == verdict.payload()
