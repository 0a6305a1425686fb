"""Gates, overrides and coverage/metrics reports in the pipeline file."""

from __future__ import annotations

import pytest

from conveyor.errors import SpecError
from conveyor.spec import parse_pipeline
from conveyor.spec.delivery import GateSpec
from conveyor.spec.models import PipelineSpec

BASE = """\
pipeline: shop
environments:
  production:
    target: {type: command, deploy: ./deploy.sh}
    gates:
      - tests: {min_passed_ratio: 0.98, min_count: 50}
      - coverage: {report: coverage.xml, min: 80, max_drop: 1.0}
      - metric: {file: reports/perf.json, expr: "p95_ms <= 200 and errors == 0", name: perf}
      - approval: {count: 2, role: release-manager, not_author: true}
      - window: {deny: ["Fri 16:00-Mon 08:00", "Dec 24"], timezone: Europe/Berlin}
    override_roles: [sre]
    overrides: {expires: 1h, max_expires: 8h, confirm: true}
stages:
  - name: commit
    jobs:
      unit:
        run: make test
        reports: {junit: reports/*.xml, coverage: coverage.xml, metrics: reports/perf.json}
  - name: acceptance
    gates:
      - tests: {min_count: 10}
    jobs:
      e2e: {run: ./e2e.sh}
"""


def parse(text: str) -> PipelineSpec:
    return parse_pipeline(text.encode(), "conveyor.yml")


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse(text)
    return [p.render() for p in info.value.problems]


def test_gates_and_overrides_parse() -> None:
    spec = parse(BASE.replace(', "Dec 24"', ""))
    production = spec.environment("production")
    assert [g.name for g in production.gates] == ["tests", "coverage", "perf", "approval", "window"]
    assert production.gates[0] == GateSpec(
        "tests", "tests", {"min_passed_ratio": 0.98, "min_count": 50}, production.gates[0].location
    )
    assert production.gates[2].params == {
        "file": "reports/perf.json",
        "expr": "p95_ms <= 200 and errors == 0",
    }
    assert production.gates[3].params == {
        "count": 2,
        "role": "release-manager",
        "not_author": True,
    }
    assert production.gates[4].params == {
        "deny": ["Fri 16:00-Mon 08:00"],
        "timezone": "Europe/Berlin",
    }
    assert production.override_roles == ("sre",)
    assert (production.override_expiry_s, production.override_max_s) == (3600.0, 8 * 3600.0)
    assert production.override_confirm is True
    assert spec.stage("acceptance").gates[0].params == {"min_passed_ratio": 1.0, "min_count": 10}
    unit = spec.job("unit")
    assert (unit.coverage, unit.metrics) == ("coverage.xml", "reports/perf.json")
    assert PipelineSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('"Dec 24"', '"Dec 24"'), "conveyor.yml:10:"),  # a bad window, at its line
        (("p95_ms <= 200 and errors == 0", "p95_ms <= __import__('os')"), "'expr':"),
        (("p95_ms <= 200 and errors == 0", "p95_ms"), "'expr':"),
        (("timezone: Europe/Berlin", "timezone: Mars/Olympus"), "Mars/Olympus"),
        (("min_passed_ratio: 0.98", "min_passed_ratio: 1.5"), "between 0 and 1"),
        (("min_count: 50", "min_count: 0"), "a build where no tests ran never passes"),
        (("- approval: {count: 2", "- approvl: {count: 2"), "unknown gate kind 'approvl'"),
        (
            ("report: coverage.xml, min: 80", "report: other.xml, min: 80"),
            "no job declares 'other.xml' as its coverage report",
        ),
        (
            ("expires: 1h, max_expires: 8h", "expires: 9h, max_expires: 8h"),
            "longer than 'max_expires'",
        ),
        (
            ("      - tests: {min_count: 10}", "      - approval: {count: 1}"),
            "approvals belong to environments",
        ),
        (
            ("name: perf}", "name: tests}"),
            "two gates of environment 'production' are called 'tests'",
        ),
        (
            ("      - tests: {min_count: 10}", "      - {}"),
            "is a mapping with one kind, got an empty mapping",
        ),
        (
            ("      - tests: {min_count: 10}", "      - {tests: {}, coverage: {}}"),
            "is a mapping with one kind, got 2 keys: 'tests', 'coverage'",
        ),
        (
            ("override_roles: [sre]", 'override_roles: [sre, "Release Manager", ""]'),
            "'Release Manager' is not a role name\n  hint: lower-case letters",
        ),
        (
            ("role: release-manager", 'role: "Release Manager"'),
            "'Release Manager' is not a role name",
        ),
        (
            ("      - tests: {min_count: 10}", "      - tests: {min_count: 10}\n        name: t"),
            "hint: a gate's name is one of its settings: - tests: {name: unit, ...}",
        ),
    ],
)
def test_bad_gates_are_explained(change: tuple[str, str], expected: str) -> None:
    found = problems(BASE.replace(*change))
    assert any(expected in p for p in found), found
    assert all(p.startswith("conveyor.yml:") for p in found)
