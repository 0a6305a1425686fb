"""JUnit reports: every usable test case is kept, unusable values are noted, totals are capped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conveyor.adapters import junit
from conveyor.adapters.junit import JunitReportReader, duration_of
from conveyor.domain.canonical import canonical_json


def _write(ws: Path, rel: str, cases: str) -> None:
    path = ws / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<testsuite name="s">{cases}</testsuite>')


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e400", "-5", "abc", "1,2,x"])
def test_an_unusable_time_is_none_never_nan_or_negative(text: str) -> None:
    value, why = duration_of(text)
    assert value is None
    assert why


@pytest.mark.parametrize(
    ("text", "value"), [(None, 0.0), ("", 0.0), ("0.25", 0.25), ("1,234.5", 1234.5)]
)
def test_usable_times(text: str | None, value: float) -> None:
    assert duration_of(text) == (value, "")


def test_one_bad_time_costs_only_that_value(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "reports/unit.xml",
        '<testcase name="a" time="0.5"/><testcase name="b" time="abc"/>'
        '<testcase name="c" time="nan"/><testcase name="d" time="-5"><failure message="x"/>'
        '</testcase><testcase name="e" time="1e400"/>',
    )
    result = JunitReportReader().read_junit(str(tmp_path), ["reports/*.xml"])
    durations = {t.name: t.duration_s for t in result.tests}
    assert durations == {"a": 0.5, "b": None, "c": None, "d": None, "e": None}
    assert [t.outcome for t in result.tests] == ["passed", "passed", "passed", "failed", "passed"]
    assert result.problems == [
        "reports/unit.xml: 4 test cases with an unusable time (first: 'b': time 'abc' is not a"
        " number); their duration is not recorded"
    ]
    assert not result.truncated
    payload = canonical_json([t.__dict__ for t in result.tests])
    json.loads(payload, parse_constant=lambda name: pytest.fail(f"{name} stored"))


def test_the_file_attribute_is_recorded_else_the_report_path(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "reports/unit.xml",
        '<testcase name="a" file="tests/test_a.py"/><testcase name="b"/>',
    )
    result = JunitReportReader().read_junit(str(tmp_path), ["reports/*.xml"])
    assert [t.file for t in result.tests] == ["tests/test_a.py", "reports/unit.xml"]


def test_long_names_are_cut(tmp_path: Path) -> None:
    name = "n" * 5000
    _write(tmp_path, "r.xml", f'<testcase name="{name}" classname="{name}" file="{name}"/>')
    (test,) = JunitReportReader().read_junit(str(tmp_path), ["r.xml"]).tests
    assert len(test.name) == len(test.classname) == len(test.file) == junit.MAX_NAME


def test_test_cases_are_capped_per_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(junit, "MAX_TEST_CASES", 3)
    _write(tmp_path, "r/a.xml", '<testcase name="a1"/><testcase name="a2"/>')
    _write(tmp_path, "r/b.xml", '<testcase name="b1"/><testcase name="b2"/><testcase name="b3"/>')
    _write(tmp_path, "r/c.xml", '<testcase name="c1"/>')
    result = JunitReportReader().read_junit(str(tmp_path), ["r/*.xml"])
    assert [t.name for t in result.tests] == ["a1", "a2", "b1"]
    assert result.truncated
    assert result.problems == [
        "r/b.xml: only the first 3 test cases of the attempt are recorded; 2 more in this file"
        " were dropped",
        "r/c.xml: not read: 3 test cases were recorded already",
    ]


def test_report_bytes_are_capped_per_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, "r/a.xml", '<testcase name="a"/>')
    _write(tmp_path, "r/b.xml", '<testcase name="b"/>')
    size = (tmp_path / "r/a.xml").stat().st_size
    monkeypatch.setattr(junit, "MAX_TOTAL_REPORT_BYTES", size + 10)
    result = JunitReportReader().read_junit(str(tmp_path), ["r/*.xml"])
    assert [t.name for t in result.tests] == ["a"]
    assert result.truncated
    assert result.problems == [
        f"r/b.xml: not read: the reports of one attempt may hold at most {size + 10} bytes together"
    ]


def test_a_malformed_file_is_a_problem_and_the_others_count(tmp_path: Path) -> None:
    (tmp_path / "bad.xml").write_text("<testsuite><testcase")
    _write(tmp_path, "good.xml", '<testcase name="g"/>')
    result = JunitReportReader().read_junit(str(tmp_path), ["*.xml"])
    assert [t.name for t in result.tests] == ["g"]
    assert result.problems[0].startswith("bad.xml: not a readable JUnit report")


def test_canonical_json_refuses_nan() -> None:
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="not JSON compliant"):
            canonical_json({"x": value})
