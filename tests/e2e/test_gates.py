"""Gates, approvals, overrides and incidents end to end, through the CLI on real repositories."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tests.e2e.conftest import Repo

BUILD = """\
import json, pathlib
q = dict(line.split("=") for line in pathlib.Path("quality.env").read_text().split())
passed, failed = int(q["PASSED"]), int(q["FAILED"])
pathlib.Path("dist").mkdir(exist_ok=True)
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("dist/app.txt").write_text("app " + pathlib.Path("VERSION").read_text())
cases = [f'<testcase classname="t" name="ok{i}"/>' for i in range(passed)]
cases += [f'<testcase classname="t" name="bad{i}"><failure message="no"/></testcase>'
          for i in range(failed)]
pathlib.Path("reports/unit.xml").write_text(
    f'<testsuite name="unit" tests="{passed + failed}">' + "".join(cases) + "</testsuite>"
)
pathlib.Path("coverage.xml").write_text(
    f'<?xml version="1.0" ?><coverage line-rate="{q["LINE_RATE"]}" version="7.4"></coverage>'
)
pathlib.Path("reports/perf.json").write_text(json.dumps({"p95_ms": float(q["P95"])}))
"""

PIPELINE = """\
pipeline: shop
artifacts:
  app: {path: dist/app.txt}
environments:
  production:
    target: {type: command, deploy: 'cp "$CONVEYOR_ARTIFACT_PATH" "$LIVE_DIR/current"'}
    gates:
      - tests: {min_passed_ratio: 1.0, min_count: 3}
      - coverage: {report: coverage.xml, min: 80, max_drop: 1.0}
      - metric: {file: reports/perf.json, expr: "p95_ms <= 200"}
      - approval: {count: 1, role: release-manager, not_author: true}
    overrides: {expires: 1h, max_expires: 4h}
  frozen:
    target: {type: command, deploy: "true"}
    gates:
      - window: {deny: "Fri 16:00-Mon 08:00", timezone: Europe/Berlin}
stages:
  - name: commit
    jobs:
      build:
        run: python3 build.py
        outputs: [app]
        reports: {junit: reports/unit.xml, coverage: coverage.xml, metrics: reports/perf.json}
"""

GOOD = "PASSED=4\nFAILED=0\nLINE_RATE=0.85\nP95=150\n"
AUTHOR = "test@example.invalid"  # the e2e repositories' commit author


@pytest.fixture
def shop(repo: Repo, tmp_path: Path) -> Repo:
    live = tmp_path / "live"
    live.mkdir()
    repo.env["LIVE_DIR"] = str(live)
    repo.write("build.py", BUILD)
    repo.write("quality.env", GOOD)
    repo.write("VERSION", "1\n")
    repo.pipeline(PIPELINE)
    assert repo.conveyor("users", "add", "admin@example.invalid", "--role", "admin").code == 0
    for name, role in (
        ("rm@example.invalid", "release-manager"),
        (AUTHOR, "release-manager"),
        ("ops@example.invalid", "overrider"),
    ):
        added = repo.conveyor("users", "add", name, "--role", role, "--as", "admin@example.invalid")
        assert added.code == 0, added.err
    return repo


def build(repo: Repo, quality: str = GOOD, version: str = "1") -> int:
    repo.write("quality.env", quality)
    repo.write("VERSION", version + "\n")
    repo.commit(f"version {version}")
    result = repo.conveyor("run")
    assert result.code == 0, result.out + result.err
    return int(repo.show()["id"])


def promote(repo: Repo, run: int, *extra: str) -> tuple[int, str]:
    result = repo.conveyor("promote", str(run), "--to", "production", "--wait", "0", *extra)
    return result.code, result.out + result.err


def test_all_gates_pass_with_an_approval_by_someone_else(shop: Repo) -> None:
    run = build(shop)
    code, out = promote(shop, run)
    assert code == 1 and "gate 'approval'" in out  # no approval yet
    assert (
        shop.conveyor("approve", str(run), "-e", "production", "--as", "rm@example.invalid").code
        == 0
    )
    code, out = promote(shop, run)
    assert code == 0, out
    for line in ("gate tests: ok", "gate coverage: ok", "gate metric: ok", "gate approval: ok"):
        assert line in out, out
    status = shop.conveyor("env", "status", "production", "--json").json()
    assert status["status"] == "running"
    assert {g["gate"]: g["verdict"] for g in status["gates"]} == {
        "tests": "passed",
        "coverage": "passed",
        "metric": "passed",
        "approval": "passed",
    }


@pytest.mark.parametrize(
    ("quality", "gate", "evidence"),
    [
        ("PASSED=3\nFAILED=1\nLINE_RATE=0.85\nP95=150\n", "tests", "3 of 4"),
        ("PASSED=2\nFAILED=0\nLINE_RATE=0.85\nP95=150\n", "tests", "at least 3"),
        ("PASSED=0\nFAILED=0\nLINE_RATE=0.85\nP95=150\n", "tests", "no tests"),
        ("PASSED=4\nFAILED=0\nLINE_RATE=0.70\nP95=150\n", "coverage", "70"),
        ("PASSED=4\nFAILED=0\nLINE_RATE=0.85\nP95=250\n", "metric", "250"),
    ],
)
def test_a_failing_gate_refuses_with_its_evidence(
    shop: Repo, quality: str, gate: str, evidence: str
) -> None:
    run = build(shop, quality)
    shop.conveyor("approve", str(run), "-e", "production", "--as", "rm@example.invalid")
    code, out = promote(shop, run)
    assert code == 1
    assert f"gate '{gate}' of environment 'production' failed" in out
    assert evidence in out.lower() or evidence in out, out
    assert shop.conveyor("env", "history", "production", "--json").json() == []
    verdicts = shop.conveyor("env", "status", "production", "--json").json()["gates"]
    failed = [v for v in verdicts if v["verdict"] == "failed"]
    assert failed and failed[0]["gate"] == gate and failed[0]["evidence"]


@pytest.mark.slow
def test_coverage_may_not_drop_against_what_runs_now(shop: Repo) -> None:
    first = build(shop, GOOD.replace("0.85", "0.90"))
    shop.conveyor("approve", str(first), "-e", "production", "--as", "rm@example.invalid")
    assert promote(shop, first)[0] == 0
    second = build(shop, GOOD.replace("0.85", "0.885"), version="2")  # 88.5 %: a 1.5 point drop
    shop.conveyor("approve", str(second), "-e", "production", "--as", "rm@example.invalid")
    code, out = promote(shop, second)
    assert code == 1 and "gate 'coverage'" in out and "90" in out


@pytest.mark.slow
def test_self_approval_and_approvals_of_another_digest_do_not_count(shop: Repo) -> None:
    first = build(shop)
    # The author of the change approves it: recorded, but not counted (not_author).
    assert shop.conveyor("approve", str(first), "-e", "production", "--as", AUTHOR).code == 0
    code, out = promote(shop, first)
    assert code == 1 and "gate 'approval'" in out and "author" in out
    # An approval of the first build does not carry over to a second one.
    shop.conveyor("approve", str(first), "-e", "production", "--as", "rm@example.invalid")
    second = build(shop, version="2")
    code, out = promote(shop, second)
    assert code == 1 and "gate 'approval'" in out
    assert promote(shop, first)[0] == 0


@pytest.mark.slow
def test_overrides_are_accountable(shop: Repo) -> None:
    run = build(shop, GOOD.replace("P95=150", "P95=900"))
    shop.conveyor("approve", str(run), "-e", "production", "--as", "rm@example.invalid")
    base = ["override", str(run), "--gate", "metric", "--environment", "production"]
    no_reason = shop.conveyor(*base, "--as", "ops@example.invalid")
    assert no_reason.code == 2 and "--reason" in no_reason.err
    trivial = shop.conveyor(*base, "--reason", "asap", "--as", "ops@example.invalid")
    assert trivial.code == 2 and "reason" in trivial.err
    reason = "perf lab is down; p95 measured by hand at 180 ms (INC-7)"
    denied = shop.conveyor(*base, "--reason", reason, "--as", "rm@example.invalid")
    assert denied.code == 1 and "overrider" in denied.err
    too_long = shop.conveyor(
        *base, "--reason", reason, "--expires", "1d", "--as", "ops@example.invalid"
    )
    assert too_long.code == 2 and "longer than" in too_long.err
    granted = shop.conveyor(
        *base, "--reason", reason, "--expires", "30m", "--as", "ops@example.invalid", "--json"
    )
    assert granted.code == 0, granted.err
    override_id = granted.json()["id"]

    needless = shop.conveyor(
        "override", "--confirm", str(override_id), "--as", "rm@example.invalid"
    )
    assert needless.code == 2 and "needs no confirmation" in needless.err

    code, out = promote(shop, run)
    assert code == 0, out
    assert "gate metric: OVERRIDDEN" in out
    status = shop.conveyor("env", "status", "production", "--json").json()
    metric = next(g for g in status["gates"] if g["gate"] == "metric")
    assert metric["verdict"] == "overridden" and metric["override"] == override_id
    assert metric["evidence"]["values"]["p95_ms"] == 900  # the failing evidence stays visible
    report = shop.conveyor("report", "overrides", "--json").json()
    assert report["by_environment_gate_person"] == [
        {"environment": "production", "gate": "metric", "person": "ops@example.invalid", "count": 1}
    ]
    assert report["override_rate"]["production"]["overridden"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", report["since"])
    history = shop.conveyor("env", "history", "production", "--json").json()
    assert history[0]["overridden"] is True

    # Expired: make the override's expiry pass (the record is the clock's only witness).
    db = shop.path / ".conveyor" / "conveyor.db"
    conn = sqlite3.connect(db)
    conn.execute("UPDATE overrides SET expires_epoch = 1 WHERE id = ?", (override_id,))
    conn.commit()
    conn.close()
    code, out = promote(shop, run)
    assert code == 1 and "gate 'metric'" in out


@pytest.mark.slow
def test_an_override_can_need_a_second_person(shop: Repo) -> None:
    shop.pipeline(
        PIPELINE.replace(
            "overrides: {expires: 1h, max_expires: 4h}",
            "overrides: {expires: 1h, max_expires: 4h, confirm: true}",
        )
    )
    shop.conveyor(
        "users",
        "add",
        "ops2@example.invalid",
        "--role",
        "overrider",
        "--as",
        "admin@example.invalid",
    )
    run = build(shop, GOOD.replace("P95=150", "P95=900"), version="3")
    shop.conveyor("approve", str(run), "-e", "production", "--as", "rm@example.invalid")
    granted = shop.conveyor(
        "override",
        str(run),
        "--gate",
        "metric",
        "-e",
        "production",
        "--reason",
        "perf lab is down; measured by hand at 180 ms",
        "--as",
        "ops@example.invalid",
        "--json",
    )
    override_id = str(granted.json()["id"])
    assert promote(shop, run)[0] == 1  # not confirmed yet
    same = shop.conveyor("override", "--confirm", override_id, "--as", "ops@example.invalid")
    assert same.code == 1 and "another person" in same.err
    assert (
        shop.conveyor("override", "--confirm", override_id, "--as", "ops2@example.invalid").code
        == 0
    )
    assert promote(shop, run)[0] == 0


def test_users_are_managed_by_admins_only(shop: Repo) -> None:
    result = shop.conveyor(
        "users", "add", "me@example.invalid", "--role", "admin", "--as", "rm@example.invalid"
    )
    assert result.code == 1 and "admin role" in result.err
    names = [u["name"] for u in shop.conveyor("users", "list", "--json").json()]
    assert "me@example.invalid" not in names


def test_change_window_in_its_time_zone_across_dst(shop: Repo) -> None:
    # Europe/Berlin leaves summer time on Sunday 2026-10-25 (03:00 CEST -> 02:00 CET).
    cases = [
        ("2026-10-23T13:30:00Z", 0),  # Fri 15:30 CEST: before the freeze
        ("2026-10-23T14:30:00Z", 1),  # Fri 16:30 CEST: frozen
        ("2026-10-26T06:30:00Z", 1),  # Mon 07:30 CET: still frozen (UTC+2 would say 08:30)
        ("2026-10-26T07:30:00Z", 0),  # Mon 08:30 CET: open again
    ]
    for at, expected in cases:
        result = shop.conveyor("gates", "check", "frozen", "--at", at)
        assert result.code == expected, (at, result.out, result.err)
    # every time shown is UTC with microseconds and a Z, whatever zone --at was given in
    doc = shop.conveyor("gates", "check", "frozen", "--at", "2026-10-23T15:30:00+01:00", "--json")
    assert doc.json()["at"] == "2026-10-23T14:30:00.000000Z"


@pytest.mark.slow
def test_incidents_and_hotfixes_feed_the_dora_keys(shop: Repo) -> None:
    first = build(shop)
    shop.conveyor("approve", str(first), "-e", "production", "--as", "rm@example.invalid")
    assert promote(shop, first)[0] == 0
    opened = shop.conveyor(
        "incident", "open", "-e", "production", "--title", "checkout broken", "--json"
    )
    assert opened.code == 0, opened.err
    incident = opened.json()
    assert incident["deployment"] == 1
    second = build(shop, version="2")
    shop.conveyor("approve", str(second), "-e", "production", "--as", "rm@example.invalid")
    assert promote(shop, second, "--hotfix")[0] == 0
    listed = shop.conveyor("incident", "list", "--unresolved", "--json").json()
    assert [(i["id"], i["title"], i["resolved_at"]) for i in listed] == [
        (incident["id"], "checkout broken", None)
    ]
    assert shop.conveyor("incident", "list", "-e", "productio").code == 2  # a typo
    text = shop.conveyor("incident", "list", "-e", "production").out
    assert "checkout broken" in text and " open " in text
    unknown = shop.conveyor("incident", "resolve", str(incident["id"] + 100))
    assert unknown.code == 2
    assert f"unresolved incidents: {incident['id']} (conveyor incident list)" in unknown.err
    assert shop.conveyor("incident", "resolve", str(incident["id"])).code == 0
    assert shop.conveyor("incident", "list", "--unresolved", "--json").json() == []
    assert shop.conveyor("incident", "list", "--json").json()[0]["resolved_at"].endswith("Z")
    doc = shop.conveyor("metrics", "--since", "1d", "--json").json()
    assert doc["deployments"] == 2
    assert doc["change_failure_rate"] == 1.0  # one linked to the incident, one hotfix
    assert doc["rework_rate"] == 0.5
    assert doc["lead_time_hours"]["commits"] >= 2
    assert doc["recovery_time_hours"]["count"] == 1
    text = shop.conveyor("metrics", "--since", "1d")
    assert text.code == 0 and "deployment frequency" in text.out


def test_a_stage_gate_stops_the_line_with_its_reason(repo: Repo) -> None:
    repo.write("build.py", BUILD)
    repo.write("quality.env", "PASSED=3\nFAILED=1\nLINE_RATE=0.5\nP95=1\n")
    repo.write("VERSION", "1\n")
    repo.pipeline(
        """\
        pipeline: shop
        stages:
          - name: commit
            jobs:
              build:
                run: python3 build.py
                reports: {junit: reports/unit.xml, coverage: coverage.xml}
          - name: acceptance
            gates:
              - tests: {min_passed_ratio: 1.0}
              - coverage: {report: coverage.xml, min: 40}
            jobs:
              e2e: {run: "true"}
        """
    )
    run = repo.conveyor("run", "--progress", "plain")
    assert run.code == 1
    assert "gate 'tests' failed: 3 of 4 tests passed" in run.out
    doc = repo.show()
    acceptance = doc["stages"][1]
    assert acceptance["status"] == "failed"
    assert acceptance["reason"].startswith("gate 'tests' failed")
    assert [(g["gate"], g["verdict"]) for g in acceptance["gates"]] == [
        ("tests", "failed"),
        ("coverage", "passed"),
    ]
    assert acceptance["jobs"][0]["status"] == "skipped"


def test_a_cached_job_keeps_its_reports_for_the_gates(repo: Repo) -> None:
    repo.write("build.py", BUILD)
    repo.write("quality.env", GOOD)
    repo.write("VERSION", "1\n")
    repo.pipeline(
        """\
        pipeline: shop
        stages:
          - name: commit
            jobs:
              build:
                run: python3 build.py
                reports: {junit: reports/unit.xml, coverage: coverage.xml}
          - name: acceptance
            gates:
              - coverage: {report: coverage.xml, min: 80}
            jobs:
              e2e: {run: "true"}
        """
    )
    assert repo.conveyor("run").code == 0
    second = repo.conveyor("run", "--progress", "plain")
    assert second.code == 0, second.out
    assert "build cached" in second.out
    gates = repo.show()["stages"][1]["gates"]
    assert [(g["gate"], g["verdict"]) for g in gates] == [("coverage", "passed")]


def test_not_author_fails_closed_for_a_dirty_build(shop: Repo) -> None:
    shop.write("VERSION", "local change\n")
    assert shop.conveyor("run", "--dirty").code == 0
    shop.conveyor("approve", "latest", "-e", "production", "--as", "rm@example.invalid")
    code, out = promote(shop, int(shop.show()["id"]))
    assert code == 1 and "dirty working tree" in out


@pytest.mark.slow
def test_the_author_of_a_merged_change_cannot_approve_it(shop: Repo) -> None:
    """not_author covers every commit a deployment brings, not only the tip (a merge commit
    made by someone else)."""
    first = build(shop)
    shop.conveyor("approve", str(first), "-e", "production", "--as", "rm@example.invalid")
    assert promote(shop, first)[0] == 0
    dev = "dev@example.invalid"
    added = shop.conveyor(
        "users", "add", dev, "--role", "release-manager", "--as", "admin@example.invalid"
    )
    assert added.code == 0, added.err
    shop.git("checkout", "-q", "-b", "feature")
    shop.env.update(GIT_AUTHOR_EMAIL=dev, GIT_COMMITTER_EMAIL=dev)
    shop.write("VERSION", "2\n")
    shop.commit("the feature")
    shop.git("checkout", "-q", "main")
    shop.env.update(GIT_AUTHOR_EMAIL="rm@example.invalid", GIT_COMMITTER_EMAIL="rm@example.invalid")
    shop.git("merge", "-q", "--no-ff", "feature", "-m", "merge the feature")
    assert shop.conveyor("run").code == 0
    second = int(shop.show()["id"])
    assert shop.conveyor("approve", str(second), "-e", "production", "--as", dev).code == 0
    code, out = promote(shop, second)
    assert code == 1 and "gate 'approval'" in out and "author" in out


def test_a_reason_may_be_written_in_any_script() -> None:
    from conveyor.cli.governance import _check_reason
    from conveyor.errors import UsageError

    _check_reason("отчёт о покрытии сломан новым инструментом")
    _check_reason("覆盖率 报告 工具 坏了 需要 修复")
    with pytest.raises(UsageError):
        _check_reason("ok ok ok ok ok ok")
