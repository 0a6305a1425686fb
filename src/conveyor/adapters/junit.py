"""JUnit XML reports -> per-test results, with junitparser.

Report files are untrusted: only regular files inside the workspace are read (symlinks leaving it
are ignored), each at most 50 MB, and a malformed file becomes a reported problem, not a crash.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conveyor.domain.ports import ReportResult, TestCaseResult

MAX_REPORT_BYTES = 50 * 1024 * 1024
MAX_MESSAGE = 4000


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


def _cases(node: object, rel: str) -> list[TestCaseResult]:
    """Every test case below a JUnitXml, TestSuite or TestCase node."""
    from junitparser import TestCase

    if isinstance(node, TestCase):
        outcome, message = _outcome(node)
        return [
            TestCaseResult(
                name=str(node.name or ""),
                classname=str(node.classname or ""),
                file=str(getattr(node, "file", None) or rel),
                outcome=outcome,
                duration_s=float(node.time or 0.0),
                message=message,
            )
        ]
    found: list[TestCaseResult] = []
    for child in node:  # type: ignore[attr-defined]
        found.extend(_cases(child, rel))
    return found


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
        from junitparser import JUnitXml

        root = Path(workspace).resolve()
        result = ReportResult()
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
        for path in files:
            real = path.resolve()
            rel = os.path.relpath(path, root)
            if real in seen:
                continue
            seen.add(real)
            if not real.is_relative_to(root) or not real.is_file():
                result.problems.append(f"{rel}: not a regular file inside the workspace; ignored")
                continue
            if real.stat().st_size > MAX_REPORT_BYTES:
                result.problems.append(f"{rel}: larger than {MAX_REPORT_BYTES} bytes; ignored")
                continue
            try:
                result.tests.extend(_cases(JUnitXml.fromfile(str(real)), rel))
            except Exception as exc:  # malformed XML of any kind is the job's problem
                result.problems.append(f"{rel}: not a readable JUnit report ({exc})")
        return result
