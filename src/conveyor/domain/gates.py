"""Quality gates: whether an artifact digest may enter an environment, and why (pure).

Every gate yields a :class:`Verdict`: passed or not, a one-line ``summary`` for humans and the
``evidence`` it looked at (the observed numbers and the thresholds, as plain JSON values), so the
record shows why a digest was let in or kept out. An evaluator never raises for a problem in its
data: a missing report, an unknown metric or a division by zero is a *failing* verdict that says
what is missing. Only programming errors raise (e.g. a naive ``at`` for :func:`window_gate`).

Gates
=====

``tests``
    ``ratio = passed / (passed + failed)``; skipped tests count for neither. The gate passes when
    ``passed + failed >= min_count`` and ``ratio >= min_passed_ratio``. A run in which no test
    ran never passes, whatever ``min_count`` says.

``coverage``
    Line coverage in percent (0-100). Fails when no report was recorded. ``min``: the coverage
    must be at least this. ``max_drop``: the coverage may be at most this many percentage points
    below the *baseline*, the coverage of the digest the environment runs now; without a
    baseline (nothing deployed yet, or it had no report) the drop check passes and the evidence
    says so (``checks.max_drop == "no baseline"``). Values are compared after rounding to 6
    decimals, so ``85.3 - 84.8`` is a drop of exactly ``0.5``.

``metric``
    A condition on numbers from a JSON file (see *Metric expressions*). Fails when the file was
    not recorded, when it lacks a metric the condition uses, or when evaluating it divides by zero
    or overflows.

``approval``
    Counts *distinct* approvers (compared case-insensitively; ``Name <mail>`` counts as
    ``mail``) who hold ``role`` (when given; roles compare exactly), leaving out the authors of
    the change when ``not_author`` is set, and approvals of another digest when ``digest`` is
    given. Passes when at least ``count`` are counted.

``window``
    Fails while the local wall-clock time in ``timezone`` is inside one of the ``deny`` windows
    (see *Change windows*).

Metric expressions
==================

A metric file is a JSON object; :func:`flatten_metrics` turns it into ``{dotted.name: number}``
(``{"latency": {"p95": 212}}`` gives ``latency.p95``). Booleans, strings, lists and nulls are
ignored; at most :data:`MAX_METRICS` numbers, values nested deeper than
:data:`MAX_METRIC_DEPTH` levels or with names longer than :data:`MAX_NAME_LENGTH` characters
are ignored. When two keys flatten to the same name (``{"a.b": 1, "a": {"b": 2}}``) the first
one wins. Only keys that are identifiers can be used in an expression.

The expression grammar (Python syntax, parsed with :mod:`ast` and checked against an allow-list;
nothing is ever evaluated by Python)::

    condition  := condition "or" condition | condition "and" condition | "not" condition
                | number CMP number [CMP number ...]        chains: 0 < errors <= 5
                | "(" condition ")"
    number     := number ("+" | "-" | "*" | "/") number | ("-" | "+") number
                | NUMBER | NAME ("." NAME)* | "(" number ")"
    CMP        := "<" | "<=" | ">" | ">=" | "==" | "!="

Precedence and short-circuiting are Python's (``not`` > ``and`` > ``or``; ``*`` ``/`` before
``+`` ``-``). The whole expression must be a condition and must use at least one metric. Names
starting with ``__``, strings, ``True``/``False``/``None``, calls, indexing, lists, lambdas,
comprehensions, ``if``-expressions and every other operator are refused, as are expressions
longer than :data:`MAX_EXPRESSION_LENGTH` characters or nested deeper than
:data:`MAX_EXPRESSION_DEPTH` levels. Errors carry the 1-based ``column`` in the expression.

Change windows
==============

A window is a weekly span of local wall-clock time in which changes are denied::

    DAY HH:MM-DAY HH:MM     a span, e.g. "Fri 16:00-Mon 08:00" (may wrap the week end)
    DAY HH:MM-HH:MM         within a day, e.g. "Wed 12:00-14:00"; an end at or before the start
                            is on the next day: "Fri 22:00-06:00" ends Saturday 06:00
    DAY-DAY                 whole days, inclusive, e.g. "Sat-Sun", "Fri-Mon" (may wrap)
    DAY                     one whole day, e.g. "Sat"

``DAY`` is ``Mon`` .. ``Sun`` or the full English name, in any case; ``HH:MM`` is ``00:00`` ..
``23:59``, and ``24:00`` may end a span. Several windows may be given as a list or separated by
commas. A window includes its start and excludes its end: "Fri 16:00-Mon 08:00" denies Friday
16:00:00 and allows Monday 08:00:00.

Windows are compared with the local wall-clock time of the instant, so they follow daylight
saving time: "Fri 16:00-Mon 08:00" in Europe/Berlin ends at 08:00 local time on Monday, which is
07:00 UTC in winter and 06:00 UTC in summer, even across the weekend the clocks change. A
boundary that falls into the hour skipped when clocks go forward takes effect at the first
moment after it; in the hour repeated when clocks go back, both occurrences of a wall-clock time
are treated alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from conveyor.errors import ConveyorError
from conveyor.spec.expressions import (
    MAX_EXPRESSION_DEPTH,
    MAX_EXPRESSION_LENGTH,
    MAX_METRIC_DEPTH,
    MAX_NAME_LENGTH,
    CompiledExpr,
    ExpressionError,
    is_number,
    parse_expression,
)
from conveyor.spec.windows import (
    _DAY_NAMES,
    _DAY_SECONDS,
    _WEEK_SECONDS,
    Window,
    WindowError,
    _covered_for,
    _instant_after,
    _zone,
    check_timezone,
    parse_windows,
)

__all__ = [  # the parsers live in conveyor.spec (the pipeline file's validator uses them)
    "MAX_EXPRESSION_DEPTH",
    "MAX_EXPRESSION_LENGTH",
    "MAX_METRICS",
    "MAX_METRIC_DEPTH",
    "MAX_NAME_LENGTH",
    "Approval",
    "CompiledExpr",
    "ExpressionError",
    "MetricsError",
    "Verdict",
    "Window",
    "WindowError",
    "approval_gate",
    "check_timezone",
    "coverage_gate",
    "flatten_metrics",
    "metric_gate",
    "parse_expression",
    "parse_windows",
    "tests_gate",
    "window_gate",
]

MAX_METRICS = 10_000


class MetricsError(ConveyorError):
    """A metrics document is too large to use."""


_UTC_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # the record's timestamps


@dataclass(frozen=True)
class Verdict:
    """A gate's decision and the evidence it was made on."""

    gate: str
    kind: str
    """``tests``, ``coverage``, ``metric``, ``approval`` or ``window``."""
    passed: bool
    summary: str
    evidence: dict[str, Any]
    """JSON-ready: the observed values and the thresholds."""

    def payload(self) -> dict[str, Any]:
        """The verdict as plain JSON values."""
        return {
            "gate": self.gate,
            "kind": self.kind,
            "passed": self.passed,
            "summary": self.summary,
            "evidence": self.evidence,
        }


def _pct(value: float) -> str:
    """A percentage (or points) with one to three decimals: ``96.0``, ``85.25``."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _num(value: float) -> str:
    """A number as written by a human: ``250``, ``212.5``, ``1e+20``."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


_is_number = is_number


# --------------------------------------------------------------------------------------- tests


def tests_gate(
    name: str,
    *,
    passed: int,
    failed: int,
    skipped: int,
    min_passed_ratio: float = 1.0,
    min_count: int = 1,
) -> Verdict:
    """Whether enough tests ran and a large enough share of them passed."""
    total = passed + failed
    evidence: dict[str, Any] = {
        "passed": passed,
        "failed": failed,
        "skipped": skipped,
        "ratio": passed / total if total > 0 and passed >= 0 and failed >= 0 else None,
        "min_passed_ratio": min_passed_ratio,
        "min_count": min_count,
    }
    needs = f"needs {_pct(min_passed_ratio * 100)}% of at least {max(min_count, 1)}"
    if passed < 0 or failed < 0 or skipped < 0:
        return Verdict(
            name,
            "tests",
            False,
            f"the test counts are invalid ({passed} passed, {failed} failed, {skipped} skipped); "
            "the test reports of this build are corrupt",
            evidence,
        )
    if total == 0:
        skipped_text = f" ({skipped} skipped)" if skipped else ""
        return Verdict(name, "tests", False, f"no tests ran{skipped_text}, {needs}", evidence)
    ratio = passed / total
    ok = total >= min_count and ratio >= min_passed_ratio
    hundredths = passed * 10_000 // total  # rounded down: 99.96% is not shown as 100.0%
    shown = _pct(hundredths / 100)
    skipped_text = f", {skipped} skipped" if skipped else ""
    summary = f"{passed} of {total} tests passed ({shown}%{skipped_text}), {needs}"
    return Verdict(name, "tests", ok, summary, evidence)


# ------------------------------------------------------------------------------------ coverage


def _percent_or_none(value: float | None) -> float | None:
    if value is None or not _is_number(value) or not 0 <= value <= 100:
        return None
    return round(float(value), 6)


def coverage_gate(
    name: str,
    *,
    current: float | None,
    baseline: float | None,
    min: float | None,  # the option's name in the pipeline file; shadows the builtin here
    max_drop: float | None,
    report: str,
) -> Verdict:
    """Whether line coverage is high enough and did not drop too far from the running digest."""
    minimum = min
    evidence: dict[str, Any] = {
        "current": None,
        "baseline": _percent_or_none(baseline),
        "drop": None,
        "min": minimum,
        "max_drop": max_drop,
        "report": report,
        "checks": {"min": "not set", "max_drop": "not set"},
    }
    checks: dict[str, str] = evidence["checks"]
    if current is None:
        return Verdict(
            name,
            "coverage",
            False,
            f"no coverage report '{report}' was recorded for this build",
            evidence,
        )
    now = _percent_or_none(current)
    if now is None:
        return Verdict(
            name,
            "coverage",
            False,
            f"coverage report '{report}' gave {current!r}, not a percentage from 0 to 100",
            evidence,
        )
    evidence["current"] = now
    base = evidence["baseline"]
    drop = round(base - now, 6) if base is not None else None
    evidence["drop"] = drop
    problems: list[str] = []
    notes: list[str] = []
    if minimum is not None:
        if now >= minimum:
            checks["min"] = "passed"
            notes.append(f"at least {_pct(minimum)}%")
        else:
            checks["min"] = "failed"
            problems.append(f"below the minimum {_pct(minimum)}%")
    if max_drop is not None:
        if base is None or drop is None:
            checks["max_drop"] = "no baseline"
            notes.append("no baseline to compare with (the environment runs no covered digest)")
        elif drop <= max_drop:
            checks["max_drop"] = "passed"
            change = f"{_pct(drop)} points below" if drop > 0 else "not below"
            notes.append(
                f"{change} the {_pct(base)}% running now (at most {_pct(max_drop)} allowed)"
            )
        else:
            checks["max_drop"] = "failed"
            problems.append(
                f"{_pct(drop)} points below the {_pct(base)}% running now, "
                f"more than the {_pct(max_drop)} allowed"
            )
    head = f"coverage {_pct(now)}% ({report})"
    if problems:
        return Verdict(name, "coverage", False, f"{head}: " + "; ".join(problems), evidence)
    tail = "; ".join(notes) if notes else "recorded, no threshold set"
    return Verdict(name, "coverage", True, f"{head}: {tail}", evidence)


def flatten_metrics(data: Any) -> dict[str, float]:
    """``{dotted.name: number}`` from a JSON object (see the module docstring for the limits).

    Anything that is not a JSON object gives ``{}``.

    Raises:
        MetricsError: the object holds more than :data:`MAX_METRICS` numbers.
    """
    found: dict[str, float] = {}

    def walk(node: Mapping[Any, Any], prefix: str, depth: int) -> None:
        for key, value in node.items():
            if not isinstance(key, str):
                continue
            if (len(prefix) + 1 if prefix else 0) + len(key) > MAX_NAME_LENGTH:
                continue
            dotted = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                if depth < MAX_METRIC_DEPTH:
                    walk(value, dotted, depth + 1)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            try:
                number = float(value)
            except OverflowError:
                continue
            if not math.isfinite(number) or dotted in found:
                continue
            if len(found) >= MAX_METRICS:
                raise MetricsError(
                    f"the metrics file holds more than {MAX_METRICS} numbers",
                    hint="write only the metrics the gates use to the file",
                )
            found[dotted] = number

    if isinstance(data, dict):
        walk(data, "", 1)
    return found


def metric_gate(name: str, *, values: Mapping[str, float] | None, expr: str, file: str) -> Verdict:
    """Whether a condition on the metrics recorded from ``file`` holds."""
    evidence: dict[str, Any] = {"expr": expr, "values": {}, "file": file}
    try:
        compiled = parse_expression(expr)
    except ExpressionError as exc:
        where = f" (column {exc.column})" if exc.column else ""
        return Verdict(
            name, "metric", False, f"the condition `{expr}` cannot be used: {exc}{where}", evidence
        )
    if values is None:
        return Verdict(
            name, "metric", False, f"no metrics file {file} was recorded for this build", evidence
        )
    evidence["values"] = {
        metric: values[metric]
        for metric in compiled.names
        if metric in values and _is_number(values[metric])
    }
    missing = [metric for metric in compiled.names if metric not in values]
    if missing:
        available = sorted(values)
        listed = ", ".join(available[:20]) if available else "no numbers at all"
        if len(available) > 20:
            listed += f" and {len(available) - 20} more"
        what = "metric" if len(missing) == 1 else "metrics"
        return Verdict(
            name,
            "metric",
            False,
            f"{what} {', '.join(missing)} not in {file}; it has: {listed}",
            evidence,
        )
    try:
        ok = compiled.evaluate(values)
    except ExpressionError as exc:
        return Verdict(name, "metric", False, f"`{expr}` cannot be evaluated: {exc}", evidence)
    observed = ", ".join(f"{metric} = {_num(values[metric])}" for metric in compiled.names)
    verb = "holds" if ok else "does not hold"
    return Verdict(name, "metric", ok, f"`{expr}` {verb} with {observed} ({file})", evidence)


# ------------------------------------------------------------------------------------ approvals


@dataclass(frozen=True)
class Approval:
    """One recorded approval of a digest for an environment."""

    approver: str
    roles: tuple[str, ...]
    """The roles the approver held when approving."""
    comment: str
    at: str
    digest: str


_ANGLE = re.compile(r"<([^<>]+)>\s*\Z")


def _identity(person: str) -> str:
    """The comparable form of a person: the address of ``Name <mail>``, stripped, lower case."""
    match = _ANGLE.search(person)
    return (match.group(1) if match else person).strip().lower()


def approval_gate(
    name: str,
    *,
    approvals: Sequence[Approval],
    count: int,
    role: str | None,
    not_author: bool,
    authors: Collection[str],
    digest: str | None = None,
) -> Verdict:
    """Whether at least ``count`` distinct eligible people approved.

    ``digest``, when given, leaves out approvals recorded for another digest.
    """
    author_ids = {_identity(author) for author in authors}
    counted: list[str] = []
    counted_ids: set[str] = set()
    not_counted: list[dict[str, str]] = []
    refused: set[tuple[str, str]] = set()
    for approval in approvals:
        person = _identity(approval.approver)
        if person in counted_ids:
            continue
        if not person:
            reason = "no approver recorded"
        elif digest is not None and approval.digest != digest:
            reason = f"approved another digest ({approval.digest})"
        elif role is not None and role not in approval.roles:
            reason = f"does not have the role '{role}'"
        elif not_author and person in author_ids:
            reason = "is an author of the change"
        else:
            counted.append(approval.approver.strip())
            counted_ids.add(person)
            continue
        if (person, reason) not in refused:
            refused.add((person, reason))
            not_counted.append({"approver": approval.approver, "reason": reason})
    # An approver refused once (e.g. for another digest) but counted later is not "not counted".
    not_counted = [item for item in not_counted if _identity(item["approver"]) not in counted_ids]
    evidence: dict[str, Any] = {
        "required": count,
        "role": role,
        "not_author": not_author,
        "counted": counted,
        "not_counted": not_counted,
    }
    ok = len(counted) >= count
    rules = []
    if role is not None:
        rules.append(f"role '{role}'")
    if not_author:
        rules.append("not an author")
    what = f"{len(counted)} of {count} required approvals"
    if rules:
        what += f" ({', '.join(rules)})"
    parts = [what + (": " + ", ".join(counted) if counted else "")]
    if not_counted:
        parts.append(
            "not counted: "
            + ", ".join(f"{item['approver']} ({item['reason']})" for item in not_counted)
        )
    return Verdict(name, "approval", ok, "; ".join(parts), evidence)


def window_gate(name: str, *, deny: Sequence[Window], timezone: str, at: datetime) -> Verdict:
    """Whether ``at`` is outside every deny window, in the local time of ``timezone``.

    Raises:
        ValueError: ``at`` is a naive datetime.
    """
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("window_gate needs an aware datetime")
    evidence: dict[str, Any] = {
        "timezone": timezone,
        "at": at.astimezone(UTC).strftime(_UTC_FORMAT),
        "local_time": None,
        "windows": [w.text for w in deny],
        "window": None,
        "ends_at": None,
        "next_starts_at": None,
    }
    try:
        tz = _zone(timezone)
    except WindowError as exc:
        return Verdict(name, "window", False, exc.message, evidence)
    local = at.astimezone(tz)
    evidence["local_time"] = local.isoformat()
    second = local.weekday() * _DAY_SECONDS + local.hour * 3600 + local.minute * 60 + local.second
    when = f"{_DAY_NAMES[local.weekday()]} {local:%Y-%m-%d %H:%M} {timezone}"
    inside = [w for w in deny if w.contains(second)]
    if inside:
        evidence["window"] = inside[0].text
        covered = _covered_for(deny, second)
        if covered is None:
            until = "the windows cover the whole week"
        else:
            ends = _instant_after(local, covered, at).isoformat()
            evidence["ends_at"] = ends
            until = f"changes are allowed again from {ends}"
        summary = f"{when} is inside the change window '{inside[0].text}'; {until}"
        return Verdict(name, "window", False, summary, evidence)
    if not deny:
        return Verdict(name, "window", True, f"{when}: no change window is set", evidence)
    wait = min((w.start - second) % _WEEK_SECONDS for w in deny)
    starts = _instant_after(local, wait, at).isoformat()
    evidence["next_starts_at"] = starts
    summary = f"{when} is outside every change window; the next one starts {starts}"
    return Verdict(name, "window", True, summary, evidence)
