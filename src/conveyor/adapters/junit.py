"""JUnit XML reports -> per-test results, with junitparser.

Report files are untrusted: only regular files inside the workspace are read (symlinks leaving it
are ignored), each at most 50 MB and all of one attempt's together at most
:data:`MAX_TOTAL_REPORT_BYTES`; at most :data:`MAX_TEST_CASES` test cases are kept. A malformed
file becomes a reported problem, not a crash, and one unusable value (a ``time`` that is not a
finite, non-negative number) costs only that value: the test case is kept, its duration ``None``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from conveyor.domain.ports import ReportResult, TestCaseResult

MAX_REPORT_BYTES = 50 * 1024 * 1024
"""One report file."""
MAX_TOTAL_REPORT_BYTES = 50 * 1024 * 1024
"""All the report files of one attempt, together."""
MAX_TEST_CASES = 50_000
"""Test cases recorded per attempt: one event holds them all."""
MAX_MESSAGE = 4000
MAX_NAME = 1000
"""Characters kept of a test's name, classname and file."""


@cache
def _case_class() -> Any:
    """junitparser's ``TestCase`` with the attributes it does not read as we need them.

    ``time`` is read as text (junitparser's ``float`` would fail the whole file on one bad
    value); ``file`` is the attribute pytest and others write. Built on first use: junitparser
    is imported only by runs that read reports.
    """
    from junitparser import Attr, TestCase

    class Case(TestCase):
        time = Attr()
        file = Attr()

    return Case


@dataclass
class _Found:
    """What the files read so far gave."""

    tests: list[TestCaseResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    truncated: bool = False


def _outcome(case: object) -> tuple[str, str]:
    from junitparser import Error, Failure, Skipped

    results = list(getattr(case, "result", []) or [])
    for result in results:
        message = getattr(result, "message", None) or getattr(result, "text", None) or ""
        if isinstance(result, Failure):
            return "failed", str(message)[:MAX_MESSAGE]
        if isinstance(result, Error):
            return "error", str(message)[:MAX_MESSAGE]
        if isinstance(result, Skipped):
            return "skipped", str(message)[:MAX_MESSAGE]
    return "passed", ""


def duration_of(text: str | None) -> tuple[float | None, str]:
    """A ``time`` attribute in seconds, or ``None`` and why it cannot be used.

    A missing time is ``0.0``; NaN, infinities, numbers too large for a float and negative
    numbers are refused (JSON has no NaN, and a duration is never negative).
    """
    if text is None or not text.strip():
        return 0.0, ""
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None, "is not a number"
    if not math.isfinite(value):
        return None, "is not a finite number"
    if value < 0:
        return None, "is negative"
    return value, ""


def _iter_cases(node: Any) -> Iterator[Any]:
    """Every test case below a JUnitXml, TestSuite or TestCase node, in file order."""
    from junitparser import TestCase

    if isinstance(node, TestCase):
        yield node
        return
    for child in node:
        yield from _iter_cases(child)


def _result(node: Any, rel: str) -> tuple[TestCaseResult, str]:
    """One test case, and why its time is not recorded (if it is not)."""
    case = _case_class().fromelem(node)
    raw_time = case.time
    duration, why = duration_of(raw_time)
    outcome, message = _outcome(case)
    result = TestCaseResult(
        name=str(case.name or "")[:MAX_NAME],
        classname=str(case.classname or "")[:MAX_NAME],
        file=str(case.file or rel)[:MAX_NAME],
        outcome=outcome,
        duration_s=duration,
        message=message,
    )
    problem = f"time '{str(raw_time)[:40]}' {why}" if why else ""
    return result, problem


class JunitReportReader:
    """``ReportReader``: JUnit XML with junitparser; coverage and metrics with ``reports``."""

    def read_report(self, workspace: str, kind: str, path: str) -> dict[str, Any]:
        """A coverage report or metrics file at ``path`` under ``workspace`` (not outside)."""
        from conveyor.adapters.reports import read_cobertura, read_metrics
        from conveyor.errors import ConveyorError

        root = Path(workspace).resolve()
        full = (root / path).resolve()
        if not full.is_relative_to(root):
            raise ConveyorError(f"{kind} report {path} leaves the workspace")
        try:
            with open(full, "rb") as handle:
                data = handle.read(64 * 1024 * 1024 + 1)
        except OSError as exc:
            raise ConveyorError(
                f"{kind} report {path} cannot be read: {exc.strerror or exc}",
                hint="the job must write it before it ends",
            ) from exc
        if kind == "coverage":
            return {"percent": read_cobertura(data)}
        return dict(read_metrics(data))

    def read_junit(self, workspace: str, patterns: Sequence[str]) -> ReportResult:
        """Every test case of every report under ``workspace`` that matches ``patterns``."""
        root = Path(workspace).resolve()
        result = _Found()
        files: list[Path] = []
        for pattern in patterns:
            try:
                matches = sorted(root.glob(pattern))
            except (ValueError, NotImplementedError, OSError) as exc:
                result.problems.append(f"pattern '{pattern}' cannot be used: {exc}")
                continue
            if not matches:
                result.problems.append(f"no report matches '{pattern}'")
            files.extend(matches)
        seen: set[Path] = set()
        budget = MAX_TOTAL_REPORT_BYTES
        for path in files:
            real = path.resolve()
            rel = os.path.relpath(path, root)
            if real in seen:
                continue
            seen.add(real)
            if not real.is_relative_to(root) or not real.is_file():
                result.problems.append(f"{rel}: not a regular file inside the workspace; ignored")
                continue
            if len(result.tests) >= MAX_TEST_CASES:
                result.problems.append(
                    f"{rel}: not read: {MAX_TEST_CASES} test cases were recorded already"
                )
                result.truncated = True
                continue
            size = real.stat().st_size
            if size > MAX_REPORT_BYTES:
                result.problems.append(f"{rel}: larger than {MAX_REPORT_BYTES} bytes; ignored")
                continue
            if size > budget:
                result.problems.append(
                    f"{rel}: not read: the reports of one attempt may hold at most"
                    f" {MAX_TOTAL_REPORT_BYTES} bytes together"
                )
                result.truncated = True
                continue
            self._read_file(real, rel, budget, result)
            budget -= size
        return ReportResult(result.tests, result.problems, result.truncated)

    def _read_file(self, real: Path, rel: str, budget: int, result: _Found) -> None:
        """Add the test cases of one report file to ``result`` (up to the caps)."""
        from junitparser import JUnitXml

        try:
            with open(real, "rb") as handle:
                data = handle.read(min(budget, MAX_REPORT_BYTES) + 1)
            if len(data) > min(budget, MAX_REPORT_BYTES):
                result.problems.append(f"{rel}: grew while it was read; ignored")
                return
            document = JUnitXml.fromfile(io.BytesIO(data))
            cases = list(_iter_cases(document))
        except Exception as exc:  # malformed XML of any kind is the job's problem
            result.problems.append(f"{rel}: not a readable JUnit report ({exc})")
            return
        bad_times: list[str] = []
        unreadable = 0
        for number, node in enumerate(cases, 1):
            if len(result.tests) >= MAX_TEST_CASES:
                result.problems.append(
                    f"{rel}: only the first {MAX_TEST_CASES} test cases of the attempt are"
                    f" recorded; {len(cases) - number + 1} more in this file were dropped"
                )
                result.truncated = True
                break
            try:
                test, problem = _result(node, rel)
            except Exception as exc:  # one unusable test case costs only itself
                unreadable += 1
                if unreadable == 1:
                    result.problems.append(f"{rel}: test case #{number} cannot be read ({exc})")
                continue
            result.tests.append(test)
            if problem:
                bad_times.append(f"'{test.name[:100]}': {problem}")
        if unreadable > 1:
            result.problems.append(f"{rel}: {unreadable} test cases could not be read in all")
        if bad_times:
            count = len(bad_times)
            result.problems.append(
                f"{rel}: {count} test case{'s' if count > 1 else ''} with an unusable time"
                f" (first: {bad_times[0]}); {'their' if count > 1 else 'its'} duration is"
                " not recorded"
            )
