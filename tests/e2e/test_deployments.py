"""Environments end to end: the same digest everywhere, policies, rollback, leases, crashes."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.app.artifacts import resolve
from conveyor.errors import DeployCancelled, DeployError
from tests.e2e.conftest import Repo

SERVER = """\
import http.server, os, sys, pathlib
version = pathlib.Path("VERSION").read_text().strip()
if version == "crash":
    sys.exit(3)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz" and version == "unhealthy":
            self.send_response(500); self.end_headers(); return
        body = (version + " " + os.environ.get("CONVEYOR_ARTIFACT_DIGEST", "")).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""

PIPELINE = """\
pipeline: shop
artifacts:
  app: {path: dist/app.tar.gz}
environments:
  staging:
    target: {type: process, command: "python3 server.py", health: {http: /healthz}}
    timeout: 5s
  production:
    requires: [acceptance]
    branches: [main]
    target: {type: process, command: "python3 server.py", health: {http: /healthz}}
    timeout: 5s
stages:
  - name: commit
    jobs:
      build:
        run: |
          mkdir -p dist
          tar -czf dist/app.tar.gz server.py VERSION
        outputs: [app]
  - name: acceptance
    jobs:
      check: {run: 'tar -tzf "$CONVEYOR_ARTIFACT_APP" | grep server.py > /dev/null'}
  - name: staging
    deploy: {environment: staging, artifact: app}
"""


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def status(repo: Repo, env: str) -> dict[str, object]:
    result = repo.conveyor("env", "status", env, "--json")
    assert result.code == 0, result.err
    return dict(result.json())


@pytest.fixture
def shop(repo: Repo) -> Iterator[Repo]:
    repo.write("server.py", SERVER)
    repo.write("VERSION", "v1\n")
    repo.pipeline(PIPELINE)
    yield repo
    for env in ("staging", "production"):
        repo.conveyor("env", "stop", env)


def test_build_once_deploy_to_staging_promote_to_production(shop: Repo) -> None:
    run = shop.conveyor("run", "--progress", "plain")
    assert run.code == 0, run.out + run.err
    digest = shop.conveyor("artifacts", "list", "--json").json()[0]["digest"]
    staging = status(shop, "staging")
    assert staging["digest"] == digest and staging["running"] is True
    assert get(str(staging["url"])) == f"v1 {digest}"

    promoted = shop.conveyor("promote", "latest", "--to", "production")
    assert promoted.code == 0, promoted.out + promoted.err
    production = status(shop, "production")
    assert production["digest"] == digest
    assert production["revision"] == shop.git("rev-parse", "HEAD").strip()
    assert get(str(production["url"])) == f"v1 {digest}"
    assert production["url"] != staging["url"]

    history = shop.conveyor("env", "history", "production", "--json").json()
    assert [(h["status"], h["trigger"], h["actor"]) for h in history] == [
        ("succeeded", "promote", "tester@example.invalid")
    ]
    listed = {e["name"]: e for e in shop.conveyor("env", "list", "--json").json()}
    assert listed["staging"]["digest"] == listed["production"]["digest"] == digest
    assert shop.conveyor("audit", "verify").code == 0


@pytest.mark.slow
def test_an_unhealthy_release_rolls_back_and_the_previous_one_still_answers(shop: Repo) -> None:
    assert shop.conveyor("run").code == 0
    good = status(shop, "staging")
    shop.write("VERSION", "unhealthy\n")
    shop.commit("break it")
    run = shop.conveyor("run", "--progress", "plain")
    assert run.code == 1
    assert "rolled_back" in run.out
    after = status(shop, "staging")
    assert after["deployment"] == good["deployment"]
    assert after["running"] is True
    assert get(str(after["url"])).startswith("v1 ")
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert [h["status"] for h in history] == ["rolled_back", "succeeded"]
    assert "GET /healthz" in history[0]["health"] or "500" in history[0]["health"]


def test_a_crashing_first_release_fails_with_the_log_tail(shop: Repo) -> None:
    shop.write("VERSION", "crash\n")
    shop.commit("crash")
    run = shop.conveyor("run", "--progress", "plain")
    assert run.code == 1
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert history[0]["status"] == "failed"
    assert "exited" in history[0]["health"]
    assert status(shop, "staging")["status"] == "down"


@pytest.mark.slow
def test_promotion_policies_refuse_with_nothing_changed(shop: Repo) -> None:
    # A build of another branch is refused by production (branches: [main]).
    shop.git("checkout", "-q", "-b", "feature")
    shop.write("VERSION", "v2\n")
    shop.commit("feature work")
    assert shop.conveyor("run").code == 0
    refused = shop.conveyor("promote", "latest", "--to", "production")
    assert refused.code == 1
    assert "refused" in refused.err and "branch 'feature'" in refused.err
    assert "Traceback" not in refused.err
    assert shop.conveyor("env", "history", "production", "--json").json() == []
    checked = shop.conveyor("verify", "app@latest", "--env", "production")
    assert checked.code == 1 and "FAIL policy" in checked.out and "feature" in checked.out

    # A run that stopped before acceptance: the artifact has not passed the required stage.
    shop.git("checkout", "-q", "main")
    shop.write("VERSION", "v3\n")
    shop.commit("v3")
    assert shop.conveyor("run", "--stage", "commit").code == 0
    refused = shop.conveyor("promote", "latest", "--to", "production")
    assert refused.code == 1 and "has not passed stage 'acceptance'" in refused.err

    # An altered blob is refused.
    assert shop.conveyor("run").code == 0
    digest = shop.conveyor("artifacts", "list", "--run", "latest", "--json").json()[0]["digest"]
    hexd = digest.removeprefix("sha256:")
    blob = shop.path / ".conveyor" / "artifacts" / "sha256" / hexd[:2] / hexd[2:]
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes() + b"x")
    refused = shop.conveyor("promote", "latest", "--to", "production")
    assert refused.code == 1 and "does not verify: digest" in refused.err
    assert shop.conveyor("env", "history", "production", "--json").json() == []


def test_a_foreign_or_unattested_artifact_is_refused(shop: Repo, tmp_path: Path) -> None:
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    db = shop.path / ".conveyor" / "conveyor.db"
    # Re-sign the provenance with another instance's key: it does not verify with ours.
    other = tmp_path / "other"
    shop.conveyor("keys", "show", "--home", str(other))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from conveyor.adapters.signing import InstanceKey

    foreign = InstanceKey.load_or_create(other / "keys")
    conn = sqlite3.connect(db)
    (envelope_text,) = conn.execute("SELECT provenance FROM artifacts").fetchone()
    envelope = json.loads(envelope_text)
    import base64

    payload = base64.b64decode(envelope["payload"])
    resigned = foreign.sign(envelope["payloadType"], payload)
    conn.execute("UPDATE artifacts SET provenance = ?", (json.dumps(resigned),))
    conn.commit()
    refused = shop.conveyor("promote", "latest", "--to", "staging")
    assert refused.code == 1 and "does not verify: signature" in refused.err
    # No provenance at all (an artifact slipped into the record by hand): unattested.
    conn.execute("UPDATE artifacts SET provenance = ''")
    conn.commit()
    conn.close()
    refused = shop.conveyor("promote", "latest", "--to", "staging")
    assert refused.code == 1 and "does not verify" in refused.err
    assert shop.conveyor("env", "history", "staging", "--json").json() == []


def test_a_hostile_archive_is_refused_before_the_environment_changes(repo: Repo) -> None:
    repo.write(
        "make_evil.py",
        """\
        import io, tarfile
        with tarfile.open("dist/app.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo("../../escaped.txt")
            data = b"owned"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        """,
    )
    repo.pipeline(
        PIPELINE.replace(
            "tar -czf dist/app.tar.gz server.py VERSION", "python3 make_evil.py"
        ).replace("""tar -tzf "$CONVEYOR_ARTIFACT_APP" | grep server.py > /dev/null""", "true")
    )
    run = repo.conveyor("run", "--progress", "plain")
    assert run.code == 1
    assert "refused" in run.out and "../../escaped.txt" in run.out
    assert not list(repo.path.parent.rglob("escaped.txt"))
    assert repo.conveyor("env", "history", "staging", "--json").json() == []


@pytest.mark.slow
def test_kill_9_mid_deployment_leaves_a_recoverable_lease(shop: Repo) -> None:
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    shop.write("server.py", "import time\ntime.sleep(60)\n")  # never healthy
    slow = PIPELINE.replace("timeout: 5s", "timeout: 30s", 1)
    shop.pipeline(slow)
    proc = shop.popen("run", "--progress", "plain")
    deadline = time.monotonic() + 30
    db = shop.path / ".conveyor" / "conveyor.db"
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            conn = sqlite3.connect(db)
            rows = conn.execute("SELECT status FROM deployments").fetchall()
            conn.close()
        except sqlite3.Error:
            continue
        if rows and rows[-1][0] == "running":
            break
    else:
        proc.kill()
        proc.communicate()
        pytest.fail("the deployment never started")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    # The next deployment takes the lease over at once (its holder is dead), records the
    # interrupted deployment, and deploys.
    shop.pipeline(PIPELINE)
    promoted = shop.conveyor("promote", "1", "--to", "staging", "--wait", "0")
    assert promoted.code == 0, promoted.out + promoted.err
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert [h["status"] for h in history] == ["succeeded", "interrupted"]
    assert shop.conveyor("audit", "verify").code == 0


@pytest.mark.slow
def test_concurrent_promotions_to_one_environment_are_serialised(shop: Repo) -> None:
    assert shop.conveyor("run").code == 0
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "conveyor", "promote", "1", "--to", "production"],
            cwd=shop.path,
            env=shop.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0, 0], [err for _, err in outputs]
    history = shop.conveyor("env", "history", "production", "--json").json()
    assert len(history) == 3
    spans = sorted((h["started_at"], h["finished_at"]) for h in history)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, spans  # no two deployments overlapped
    assert get(str(status(shop, "production")["url"])).startswith("v1 ")


COMMAND_PIPELINE = """\
pipeline: ops
artifacts:
  bundle: {path: dist/bundle.txt}
environments:
  prod:
    timeout: 5s
    target:
      type: command
      deploy: ./ops/deploy.sh
      health: ./ops/health.sh
      rollback: ./ops/rollback.sh
stages:
  - name: commit
    jobs:
      build:
        run: mkdir -p dist && cp VERSION dist/bundle.txt
        outputs: [bundle]
  - name: prod
    deploy: {environment: prod}
"""


@pytest.mark.slow
def test_command_target_scripts_deploy_check_and_roll_back(repo: Repo, tmp_path: Path) -> None:
    live = tmp_path / "live"
    repo.env["LIVE_DIR"] = str(live)
    repo.write(
        "ops/deploy.sh",
        """\
        mkdir -p "$LIVE_DIR"
        cp "$CONVEYOR_ARTIFACT_PATH" "$LIVE_DIR/current"
        echo "$CONVEYOR_ENVIRONMENT $CONVEYOR_ARTIFACT_DIGEST prev=$CONVEYOR_PREVIOUS_DIGEST" \\
          >> "$LIVE_DIR/deploys"
        """,
    )
    repo.write("ops/health.sh", 'grep -qv broken "$LIVE_DIR/current"\n')
    repo.write(
        "ops/rollback.sh",
        """\
        cp "$CONVEYOR_ARTIFACT_PATH" "$LIVE_DIR/current"
        echo "rolled back to $CONVEYOR_ARTIFACT_DIGEST from $CONVEYOR_FAILED_DIGEST" \\
          >> "$LIVE_DIR/deploys"
        """,
    )
    for script in ("deploy", "health", "rollback"):
        os.chmod(repo.path / "ops" / f"{script}.sh", 0o755)
    repo.write("VERSION", "v1\n")
    repo.pipeline(COMMAND_PIPELINE)
    first = repo.conveyor("run", "--progress", "plain")
    assert first.code == 0, first.out + first.err
    assert (live / "current").read_text() == "v1\n"
    good = repo.conveyor("artifacts", "list", "--json").json()[0]["digest"]
    assert f"prod {good} prev=" in (live / "deploys").read_text()

    repo.write("VERSION", "broken\n")
    repo.commit("broken")
    second = repo.conveyor("run", "--progress", "plain")
    assert second.code == 1
    assert (live / "current").read_text() == "v1\n"
    assert f"rolled back to {good}" in (live / "deploys").read_text()
    history = repo.conveyor("env", "history", "prod", "--json").json()
    assert [h["status"] for h in history] == ["rolled_back", "succeeded"]
    assert "health script" in history[0]["health"]

    # `verify --env` applies the environment's policy as a promotion would.
    checked = repo.conveyor("verify", "bundle@1", "--env", "prod", "--json")
    assert checked.code == 0, checked.out + checked.err
    assert [c["name"] for c in checked.json()["checks"]][-1] == "policy"


def test_a_broken_target_state_ends_the_deployment_on_the_record(shop: Repo) -> None:
    assert shop.conveyor("run").code == 0
    state = next((shop.path / ".conveyor" / "environments" / "staging" / "run").glob("*.json"))
    service = json.loads(state.read_text())["pid"]
    state.write_text('{"pid": 1, "start_time": 1e400, "port": 1, "digest": "x", "started_at": ""}')
    promoted = shop.conveyor("promote", "1", "--to", "staging", "--wait", "0")
    assert promoted.code == 1
    assert "unreadable" in promoted.err and "Traceback" not in promoted.err
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert history[0]["status"] == "failed"
    assert history[0]["reason"].startswith("the deployment stopped:")
    state.unlink()
    os.killpg(service, signal.SIGKILL)  # the service whose record was broken


def test_a_file_that_looks_like_an_empty_tar_is_deployed_as_itself(repo: Repo) -> None:
    """A disk image starting with zeros is a valid (empty) tar to a sniffer: only the name
    decides what is unpacked."""
    repo.pipeline(
        COMMAND_PIPELINE.replace("dist/bundle.txt}", "dist/disk.img}")
        .replace(
            "run: mkdir -p dist && cp VERSION dist/bundle.txt",
            "run: mkdir -p dist && head -c 1024 /dev/zero > dist/disk.img"
            " && echo data >> dist/disk.img",
        )
        .replace("deploy: ./ops/deploy.sh", "deploy: 'test -s \"$CONVEYOR_ARTIFACT_PATH\"'")
        .replace("health: ./ops/health.sh", "health: 'true'")
        .replace("      rollback: ./ops/rollback.sh\n", "")
    )
    result = repo.conveyor("run", "--progress", "plain")
    assert result.code == 0, result.out + result.err
    released = next(
        (repo.path / ".conveyor" / "environments" / "prod" / "releases").glob("*/disk.img")
    )
    assert released.stat().st_size == 1029


def test_secrets_are_masked_in_what_a_deployment_says_and_records(repo: Repo) -> None:
    repo.pipeline(
        """\
pipeline: leak
secrets: [DEPLOY_TOKEN]
artifacts:
  app: {path: dist/app.txt}
environments:
  staging:
    timeout: 5s
    target: {type: process, command: 'echo "token=$DEPLOY_TOKEN"; exit 1'}
stages:
  - name: commit
    jobs:
      build: {run: mkdir -p dist && echo app > dist/app.txt, outputs: [app]}
  - name: staging
    deploy: {environment: staging}
"""
    )
    secret = "hunter2-deploy-secret"
    result = repo.conveyor("run", "--progress", "plain", env={"DEPLOY_TOKEN": secret})
    assert result.code == 1
    assert secret not in result.out + result.err
    history = repo.conveyor("env", "history", "staging", "--json")
    assert secret not in history.out and "token=***" in history.out
    assert secret not in repo.conveyor("runs", "show", "latest", "--json", "--events").out


def test_a_required_stage_passed_only_in_a_dirty_run_does_not_count(repo: Repo) -> None:
    repo.pipeline(
        """\
pipeline: req
artifacts:
  app: {path: dist/app.txt}
environments:
  prod:
    requires: [acceptance]
    target: {type: command, deploy: 'true', health: 'true'}
stages:
  - name: commit
    jobs:
      build: {run: mkdir -p dist && echo same-bytes > dist/app.txt, outputs: [app]}
  - name: acceptance
    jobs:
      smoke: {run: sh smoke.sh}
"""
    )
    repo.write("smoke.sh", "exit 1\n")
    repo.commit("failing acceptance")
    assert repo.conveyor("run").code == 1
    repo.write("smoke.sh", "exit 0\n")  # not committed
    assert repo.conveyor("run", "--dirty").code == 0  # same bytes, acceptance passed
    refused = repo.conveyor("promote", "app@1", "--to", "prod")
    assert refused.code == 1
    assert "has not passed stage 'acceptance'" in refused.err


POLICY_PIPELINE = """\
pipeline: guarded
artifacts:
  app: {path: dist/app.txt}
environments:
  production:
    branches: [main]
    requires: [acceptance]
    timeout: 5s
    target: {type: command, deploy: 'true', health: 'true'}
stages:
  - name: commit
    jobs:
      build: {run: mkdir -p dist && cat VERSION > dist/app.txt, outputs: [app]}
  - name: acceptance
    jobs:
      smoke: {run: 'true'}
  - name: prod
    deploy: {environment: production}
"""


def test_a_branch_cannot_relax_the_policy_it_is_deployed_under(repo: Repo) -> None:
    repo.write("VERSION", "v1\n")
    repo.pipeline(POLICY_PIPELINE)
    assert repo.conveyor("run").code == 0  # on main: deployed, its policy now in force
    repo.git("checkout", "-q", "-b", "evil")
    repo.write("VERSION", "evil\n")
    repo.pipeline(POLICY_PIPELINE.replace("    branches: [main]\n    requires: [acceptance]\n", ""))
    result = repo.conveyor("run")
    assert result.code == 1
    history = repo.conveyor("env", "history", "production", "--json").json()
    assert [h["status"] for h in history] == ["succeeded"]  # nothing else reached production
    refused = repo.conveyor("promote", "latest", "--to", "production")
    assert refused.code == 1 and "is defined differently here" in refused.err
    # On main, the policy may change: the change takes effect with that build.
    repo.git("checkout", "-q", "main")
    repo.pipeline(POLICY_PIPELINE.replace("timeout: 5s", "timeout: 6s"))
    assert repo.conveyor("run").code == 0


def test_an_edited_read_model_does_not_change_what_the_policy_sees(repo: Repo) -> None:
    repo.write("VERSION", "v1\n")
    repo.pipeline(POLICY_PIPELINE)
    repo.git("checkout", "-q", "-b", "feature")
    assert repo.conveyor("run").code == 1  # its own deploy stage is refused: not main
    conn = sqlite3.connect(repo.path / ".conveyor" / "conveyor.db")
    conn.execute("UPDATE runs SET branch = 'main'")
    conn.commit()
    conn.close()
    refused = repo.conveyor("promote", "app@1", "--to", "production")
    assert refused.code == 1 and "branch 'feature'" in refused.err


@pytest.mark.slow
def test_a_stopped_environment_is_not_restarted_by_a_rollback(repo: Repo, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    repo.env["LIVE_DIR"] = str(live)
    repo.write(
        "conveyor.yml",
        COMMAND_PIPELINE.replace(
            "deploy: ./ops/deploy.sh",
            """deploy: 'cp "$CONVEYOR_ARTIFACT_PATH" "$LIVE_DIR/current"'""",
        )
        .replace("health: ./ops/health.sh", """health: 'grep -qv broken "$LIVE_DIR/current"'""")
        .replace(
            "rollback: ./ops/rollback.sh", """rollback: 'echo restarted >> "$LIVE_DIR/rollbacks"'"""
        ),
    )
    repo.write("VERSION", "v1\n")
    repo.commit()
    assert repo.conveyor("run").code == 0
    assert repo.conveyor("env", "stop", "prod").code == 0
    repo.write("VERSION", "broken\n")
    repo.commit("broken")
    assert repo.conveyor("run").code == 1
    assert not (live / "rollbacks").exists()
    history = repo.conveyor("env", "history", "prod", "--json").json()
    assert history[0]["status"] == "failed"
    assert repo.conveyor("env", "status", "prod", "--json").json()["status"] != "running"


def test_unknown_environments_and_empty_titles_are_usage_errors(repo: Repo) -> None:
    repo.write("VERSION", "v1\n")
    repo.pipeline(POLICY_PIPELINE)
    assert repo.conveyor("metrics", "-e", "production").code == 0  # declared: zeros are right
    for args in (
        ("metrics", "-e", "prodution"),
        ("metrics", "-e", "\x1b[31mx"),
        ("env", "history", "nosuch"),
        ("incident", "open", "-e", "nosuch", "--title", "down"),
        ("incident", "open", "-e", "production", "--title", " "),
    ):
        result = repo.conveyor(*args)
        assert result.code == 2, (args, result.out, result.err)
        assert "\x1b" not in result.err
    assert "did you mean 'production'" in repo.conveyor("metrics", "-e", "prodution").err


@pytest.mark.slow
def test_env_stop_after_a_killed_deployment_stops_its_release(shop: Repo) -> None:
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    shop.write("server.py", "import time\ntime.sleep(60)\n")  # never healthy
    shop.pipeline(PIPELINE.replace("timeout: 5s", "timeout: 30s", 1))
    proc = shop.popen("run", "--progress", "plain")
    db = shop.path / ".conveyor" / "conveyor.db"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            conn = sqlite3.connect(db)
            rows = conn.execute("SELECT id, status FROM deployments").fetchall()
            conn.close()
        except sqlite3.Error:
            continue
        if rows and rows[-1][1] == "running":
            break
    else:
        proc.kill()
        proc.communicate()
        pytest.fail("the deployment never started")
    deployment = rows[-1][0]
    folder = shop.path / ".conveyor" / "environments" / "staging" / "releases" / str(deployment)
    time.sleep(0.5)  # its service has started
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()

    def serving() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == folder:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    assert serving()  # the killed deployer's release is still running
    # The first command after the kill recovers the run and says what it left unfinished.
    listed = shop.conveyor("runs", "list")
    assert listed.code == 0, listed.err
    assert f"stopped while deploying to 'staging' (deployment {deployment})" in listed.err
    assert "conveyor env stop staging" in listed.err
    assert "stopped while deploying" not in shop.conveyor("runs", "list").err  # said once
    status = shop.conveyor("env", "status", "staging", "--json").json()
    assert status["deploying"] is None
    assert [item["deployment"] for item in status["interrupted"]] == [deployment]
    assert f"interrupted deployment {deployment}" in shop.conveyor("env", "status", "staging").out
    assert "interrupted" in shop.conveyor("env", "list").out
    stopped = shop.conveyor("env", "stop", "staging")
    assert stopped.code == 0, stopped.err
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert history[0]["id"] == deployment and history[0]["status"] == "interrupted"
    assert shop.conveyor("env", "status", "staging", "--json").json()["interrupted"] == []
    deadline = time.monotonic() + 10
    while serving() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not serving()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_cancelled_promotion_stops_its_release(shop: Repo, sig: int) -> None:
    """Ctrl-C during a deployment: exit 130, the new release does not run on untracked (it
    held the port: the next deployment could not start), the record says interrupted."""
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    assert shop.conveyor("promote", "1", "--to", "staging").code == 0
    shop.write("server.py", "import time\ntime.sleep(60)\n")  # never healthy
    shop.commit("never healthy")  # a run builds what is committed
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    proc = shop.popen("promote", "2", "--to", "staging", "--json")
    state = shop.path / ".conveyor" / "environments" / "staging" / "run" / "2.json"
    deadline = time.monotonic() + 30
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists(), "the new release never started"
    pid = json.loads(state.read_text())["pid"]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out.decode() + err.decode()
    printed = json.loads(out)  # --json prints the deployment it recorded
    assert (printed["id"], printed["status"]) == (2, "interrupted")
    assert "deployment 2 to staging: interrupted" in err.decode()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"release 2 (pid {pid}) still runs")
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert history[0]["status"] == "interrupted"
    assert "cancelled" in history[0]["reason"] and "release 2 stopped" in history[0]["reason"]
    # The release it had stopped runs again (it used to stay stopped: the environment down).
    assert "deployment 1 was started again" in history[0]["reason"]
    now = status(shop, "staging")
    assert (now["status"], now["deployment"]) == ("running", 1)
    assert answers(str(now["url"]), "v1 ")


def test_ctrl_c_during_a_runs_last_deploy_stage_cancels_the_run(shop: Repo) -> None:
    """The deploy stage is the last one: the deployment stops at its next safe point (it went
    on, and the run ended 'succeeded', exit 0), and the run is cancelled."""
    shop.write("server.py", "import time\ntime.sleep(60)\n")  # never healthy
    shop.pipeline(PIPELINE.replace("timeout: 5s", "timeout: 30s", 1))
    proc = shop.popen("run", "--progress", "plain")
    state = shop.path / ".conveyor" / "environments" / "staging" / "run" / "1.json"
    deadline = time.monotonic() + 30
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists(), "the release never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out.decode() + err.decode()
    doc = shop.show()
    assert doc["status"] == "cancelled"
    staging = next(s for s in doc["stages"] if s["name"] == "staging")
    assert staging["status"] == "cancelled"
    assert "deployment 1 to staging: interrupted (cancelled" in staging["reason"]
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert history[0]["status"] == "interrupted" and "release 1 stopped" in history[0]["reason"]
    assert shop.conveyor("audit", "verify").code == 0


def in_process_deployer(
    repo: Repo, monkeypatch: pytest.MonkeyPatch, cancelled: Callable[[], bool]
) -> tuple[Any, Any, Any]:
    """A deployer over the repository's real home, record, store and targets, in this process
    (to say exactly when the cancel comes); with the record to close."""
    from conveyor.bootstrap import make_deployer
    from conveyor.cli.environments import _context

    monkeypatch.chdir(repo.path)
    for name in [k for k in os.environ if k.startswith("CONVEYOR_")]:
        monkeypatch.delenv(name)
    for name, value in repo.env.items():
        monkeypatch.setenv(name, value)
    _, home, spec, source, record = _context("conveyor.yml", None)
    deployer = make_deployer(home, record, source, lambda _: None, cancelled=cancelled)
    return deployer, spec, record


@pytest.mark.slow
@pytest.mark.parametrize("looks", [1, 2, 3])
def test_a_cancel_before_the_deployment_began_changes_nothing(
    shop: Repo, monkeypatch: pytest.MonkeyPatch, looks: int
) -> None:
    """Cancelled once the lease is held, after the gates, or after unpacking: nothing is
    recorded, no release folder is left, and the release that ran still answers (it used to
    be stopped, and the environment left down)."""
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    assert shop.conveyor("promote", "1", "--to", "staging").code == 0
    url = str(status(shop, "staging")["url"])
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    seen = itertools.count(1)
    deployer, spec, record = in_process_deployer(shop, monkeypatch, lambda: next(seen) >= looks)
    try:
        item = resolve(record, "app@2")
        with pytest.raises(
            DeployCancelled, match="before the deployment began: it changed nothing"
        ):
            deployer.deploy(
                spec.environment("staging"), item, revision="", actor="t", trigger="promote"
            )
    finally:
        record.close()
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert [(h["id"], h["status"]) for h in history] == [(1, "succeeded")]
    releases = shop.path / ".conveyor" / "environments" / "staging" / "releases"
    assert sorted(p.name for p in releases.iterdir()) == ["1", "1.path"]
    assert get(url).startswith("v1 ")
    assert shop.conveyor("audit", "verify").code == 0


class CancelAfter:
    """Wraps a target: records its stops and restores, and sets the cancel flag once the step
    ``when`` (``(step, deployment id)``) is done; ``fail_restore`` makes restores fail."""

    def __init__(self, target: Any, log: list[tuple[str, int]], when: tuple[str, int]) -> None:
        self.target = target
        self.log = log
        self.when = when
        self.stops_releases = target.stops_releases
        self.fail_restore = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def stop(self, release: Any) -> None:
        self.target.stop(release)
        self.log.append(("stop", release.deployment_id))

    def check(self, release: Any, timeout_s: float, cancelled: Any = lambda: False) -> Any:
        # Cancelled *at* a check: the check ends with its own verdict, then the cancel comes.
        at_it = self.when == ("check", release.deployment_id)
        health = self.target.check(release, timeout_s, (lambda: False) if at_it else cancelled)
        self.log.append(("check", release.deployment_id))
        return health

    def restore(self, previous: Any, failed: Any) -> None:
        if self.fail_restore:
            self.log.append(("restore failed", previous.deployment_id))
            raise DeployError("cannot start it again")
        self.target.restore(previous, failed)
        self.log.append(("restore", previous.deployment_id))


def deploy_cancelled_after(
    shop: Repo,
    monkeypatch: pytest.MonkeyPatch,
    when: tuple[str, int],
    version: str,
    fail_restore: bool = False,
) -> tuple[Any, list[tuple[str, int]], str]:
    """Release 1 runs; deploy release 2 (``version``) in this process, cancelled once ``when``
    is done: (the outcome or the DeployCancelled raised, the steps, release 1's URL)."""
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    assert shop.conveyor("promote", "1", "--to", "staging").code == 0
    url = str(status(shop, "staging")["url"])
    shop.write("VERSION", f"{version}\n")
    shop.commit(version)
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    steps: list[tuple[str, int]] = []
    deployer, spec, record = in_process_deployer(shop, monkeypatch, lambda: when in steps)
    make_target = deployer.make_target

    def spied(env: Any, release: Any) -> CancelAfter:
        target = CancelAfter(make_target(env, release), steps, when)
        target.fail_restore = fail_restore
        return target

    deployer.make_target = spied
    try:
        return (
            deployer.deploy(
                spec.environment("staging"),
                resolve(record, "app@2"),
                revision="",
                actor="t",
                trigger="promote",
            ),
            steps,
            url,
        )
    except DeployCancelled as exc:
        return exc, steps, url
    finally:
        record.close()


def answers(url: str, text: str) -> bool:
    """Whether ``url`` answers ``text...`` within 10 s (a release just started may still
    open its port)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            return get(url).startswith(text)
        except OSError:
            time.sleep(0.1)
    return False


@pytest.mark.slow
def test_a_cancel_once_the_running_release_is_stopped_starts_it_again(
    shop: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled between the stop of release 1 and the start of release 2: release 1 is
    started again (it used to stay stopped, and the environment down)."""
    raised, steps, url = deploy_cancelled_after(shop, monkeypatch, ("stop", 1), "v2")
    assert isinstance(raised, DeployCancelled)
    assert "deployment 1 was started again" in raised.message
    assert "deployment 2 to staging: interrupted" in raised.message
    assert steps == [("stop", 1), ("restore", 1)]  # release 2 never started
    assert status(shop, "staging")["deployment"] == 1
    assert status(shop, "staging")["status"] == "running"
    assert answers(url, "v1 ")


@pytest.mark.slow
def test_a_cancel_does_not_skip_the_rollback_and_cuts_its_check_short(
    shop: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Release 2 is unhealthy; the cancel comes while it is being stopped. The rollback still
    happens (a cancel used to skip it, leaving the environment down); its health check is cut
    short, so release 1 is recorded as what runs, the deployment interrupted, health unknown."""
    outcome, steps, url = deploy_cancelled_after(shop, monkeypatch, ("stop", 2), "unhealthy")
    assert steps == [("stop", 1), ("check", 2), ("stop", 2), ("restore", 1), ("check", 1)]
    assert outcome.status == "interrupted"
    assert "unhealthy:" in outcome.reason and "it runs, its health is not known" in outcome.reason
    assert status(shop, "staging")["deployment"] == 1
    assert answers(url, "v1 ")


@pytest.mark.slow
@pytest.mark.parametrize(("version", "expected"), [("v2", "succeeded"), ("crash", "interrupted")])
def test_a_verdict_that_came_in_before_the_cancel_stands(
    shop: Repo, monkeypatch: pytest.MonkeyPatch, version: str, expected: str
) -> None:
    """The cancel comes as release 2's check ends with a verdict: a healthy release stays (it
    used to be stopped, and the environment left down); a crashed one is rolled back (the
    rollback used to be skipped), the rollback's own check then being cut short."""
    outcome, steps, url = deploy_cancelled_after(shop, monkeypatch, ("check", 2), version)
    assert outcome.status == expected
    if version == "v2":
        assert steps == [("stop", 1), ("check", 2)]
        assert status(shop, "staging")["deployment"] == 2
        assert answers(url, "v2 ")
    else:
        assert steps == [("stop", 1), ("check", 2), ("stop", 2), ("restore", 1), ("check", 1)]
        assert "unhealthy: the process exited" in outcome.reason
        assert status(shop, "staging")["deployment"] == 1
        assert answers(url, "v1 ")


@pytest.mark.slow
def test_a_failed_rollback_is_not_recorded_as_running_after_a_cancel(
    shop: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, steps, _ = deploy_cancelled_after(
        shop, monkeypatch, ("stop", 2), "unhealthy", fail_restore=True
    )
    # What the failed restore may have started is stopped: the record says nothing runs.
    assert steps == [("stop", 1), ("check", 2), ("stop", 2), ("restore failed", 1), ("stop", 1)]
    assert outcome.status == "failed"
    assert "the rollback to deployment 1 failed too: cannot start it again" in outcome.reason
    assert status(shop, "staging")["status"] == "down"


@pytest.mark.slow
def test_a_cancel_stops_a_command_targets_deploy_script(repo: Repo, tmp_path: Path) -> None:
    """A `command` target's script runs in its own session, out of Ctrl-C's reach: the cancel
    terminates it at once (it used to run on for up to 10 minutes), and the record says that
    what runs is not known (it used to say the release was stopped, which scripts cannot do)."""
    live = tmp_path / "live"
    repo.env["LIVE_DIR"] = str(live)
    repo.write(
        "ops/deploy.sh",
        """\
        mkdir -p "$LIVE_DIR"
        if grep -q slow "$CONVEYOR_ARTIFACT_PATH"; then echo $$ > "$LIVE_DIR/pid"; sleep 60; fi
        cp "$CONVEYOR_ARTIFACT_PATH" "$LIVE_DIR/current"
        """,
    )
    repo.write("ops/health.sh", "true\n")
    repo.write("ops/rollback.sh", "true\n")
    for script in ("deploy", "health", "rollback"):
        os.chmod(repo.path / "ops" / f"{script}.sh", 0o755)
    repo.write("VERSION", "v1\n")
    repo.pipeline(COMMAND_PIPELINE)
    assert repo.conveyor("run", "--progress", "plain").code == 0
    repo.write("VERSION", "slow\n")
    repo.commit("slow")
    assert repo.conveyor("run", "--stage", "commit").code == 0
    proc = repo.popen("promote", "2", "--to", "prod")
    deadline = time.monotonic() + 30
    while not (live / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (live / "pid").exists(), "the deploy script never started"
    time.sleep(0.2)
    pid = int((live / "pid").read_text())
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out.decode() + err.decode()
    assert time.monotonic() - began < 15
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (live / "current").read_text() == "v1\n"
    history = repo.conveyor("env", "history", "prod", "--json").json()
    assert history[0]["status"] == "interrupted"
    reason = history[0]["reason"]
    assert "deploy script was stopped partway" in reason and "prod now is not known" in reason
    assert "stopped;" not in reason and "release 2 stopped" not in reason
    assert "deployment 2 to prod: interrupted" in err.decode()
    state = repo.conveyor("env", "status", "prod", "--json").json()
    assert (state["status"], state["deployment"]) == ("unknown", 1)
    assert repo.conveyor("promote", "1", "--to", "prod").code == 0
    assert repo.conveyor("env", "status", "prod", "--json").json()["status"] == "running"


@pytest.mark.slow
def test_ending_a_killed_deployment_does_not_record_a_stopped_release_as_running(
    shop: Repo,
) -> None:
    """`kill -9` while release 2 is checked: release 1 was stopped already. Ending the dead
    deployer's deployment records that nothing runs (it recorded release 1 as running)."""
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    assert shop.conveyor("promote", "1", "--to", "staging").code == 0
    shop.write("server.py", "import time\ntime.sleep(60)\n")  # never healthy
    shop.pipeline(PIPELINE.replace("timeout: 5s", "timeout: 30s", 1))
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    proc = shop.popen("promote", "2", "--to", "staging")
    state = shop.path / ".conveyor" / "environments" / "staging" / "run" / "2.json"
    deadline = time.monotonic() + 30
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert state.exists(), "release 2 never started"
    stopped = shop.conveyor("env", "stop", "staging")
    assert stopped.code == 0, stopped.err
    assert "nothing runs in 'staging'" in stopped.out
    assert status(shop, "staging")["status"] == "down"
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert [(h["id"], h["status"]) for h in history] == [(2, "interrupted"), (1, "succeeded")]


def kill_deployer_2_while_it_checks(shop: Repo, version: str) -> Path:
    """Deploy release 1 (v1), then `kill -9` the deployer of release 2 (a server that binds
    no port, never healthy) once it started it: release 1 was stopped already. Then commit and
    build run 3 with ``version``. Returns the folder of the environment."""
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    assert shop.conveyor("promote", "1", "--to", "staging").code == 0
    shop.write("server.py", "import time\ntime.sleep(60)\n")  # never healthy
    shop.pipeline(PIPELINE.replace("timeout: 5s", "timeout: 30s", 1))
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    proc = shop.popen("promote", "2", "--to", "staging")
    folder = shop.path / ".conveyor" / "environments" / "staging"
    deadline = time.monotonic() + 30
    while not (folder / "run" / "2.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert (folder / "run" / "2.json").exists(), "release 2 never started"
    shop.write("server.py", SERVER)
    shop.write("VERSION", f"{version}\n")
    shop.pipeline(PIPELINE)
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    return folder


def processes_in(folder: Path) -> list[int]:
    """The processes whose working directory is ``folder`` (a release's service)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == folder:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_cancel_while_the_restarted_release_is_checked_leaves_it_and_begins_nothing(
    shop: Repo,
) -> None:
    """The next deployment starts release 1 again (a dead deployer had stopped it); Ctrl-C
    while release 1 is checked: it is left running, unchecked, and the new deployment does not
    begin. The command says what was done (it used to say it "changed nothing")."""
    folder = kill_deployer_2_while_it_checks(shop, "v3")
    (folder / "releases" / "1" / "server.py").write_text("import time\ntime.sleep(60)\n")
    (folder / "run" / "1.json").unlink(missing_ok=True)
    proc = shop.popen("promote", "3", "--to", "staging")
    deadline = time.monotonic() + 30
    while not (folder / "run" / "1.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (folder / "run" / "1.json").exists(), "release 1 was not started again"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out.decode() + err.decode()
    assert "it only ended what a dead deployer left unfinished" in err.decode()
    assert "changed nothing" not in err.decode()
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert [(h["id"], h["status"]) for h in history] == [(2, "interrupted"), (1, "succeeded")]
    assert "cut its health check short: it runs, its health is not known" in history[0]["reason"]
    now = status(shop, "staging")
    assert (now["status"], now["deployment"], now["running"]) == ("running", 1, True)


@pytest.mark.slow
def test_a_dead_deployers_release_is_stopped_even_if_its_folder_is_gone(shop: Repo) -> None:
    """It held the environment's port: the next deployment failed with "port in use"."""
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    assert shop.conveyor("promote", "1", "--to", "staging").code == 0
    url = str(status(shop, "staging")["url"])
    shop.write("VERSION", "unhealthy\n")  # it serves, but /healthz answers 500
    shop.pipeline(PIPELINE.replace("timeout: 5s", "timeout: 30s", 1))
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    proc = shop.popen("promote", "2", "--to", "staging")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if get(url).startswith("unhealthy "):
                break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        pytest.fail("release 2 never answered")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    releases = shop.path / ".conveyor" / "environments" / "staging" / "releases"
    shutil.rmtree(releases / "2")
    shop.write("VERSION", "v3\n")
    shop.pipeline(PIPELINE)
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    promoted = shop.conveyor("promote", "3", "--to", "staging")
    assert promoted.code == 0, promoted.out + promoted.err
    assert get(url).startswith("v3 ")
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert [(h["id"], h["status"]) for h in history] == [
        (3, "succeeded"),
        (2, "interrupted"),
        (1, "succeeded"),
    ]


@pytest.mark.slow
def test_a_restored_release_that_fails_its_check_is_stopped(shop: Repo) -> None:
    """The rollback to release 1 fails its health check: release 1 is stopped again, as the
    record says (its process used to run on, the record saying nothing ran)."""
    shop.pipeline(PIPELINE.replace("timeout: 5s", "timeout: 3s", 1))
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    assert shop.conveyor("promote", "1", "--to", "staging").code == 0
    release_1 = shop.path / ".conveyor" / "environments" / "staging" / "releases" / "1"
    (release_1 / "VERSION").write_text("unhealthy\n")  # it would no longer come back healthy
    shop.write("VERSION", "crash\n")
    shop.commit("crash")
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    promoted = shop.conveyor("promote", "2", "--to", "staging")
    assert promoted.code == 1, promoted.out + promoted.err
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert history[0]["status"] == "failed"
    assert "the rollback to deployment 1 failed too" in history[0]["reason"]
    assert status(shop, "staging")["status"] == "down"
    deadline = time.monotonic() + 15
    while processes_in(release_1) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_in(release_1)


@pytest.mark.slow
@pytest.mark.parametrize("folder_lost", [False, True])
def test_the_release_a_killed_deployer_had_stopped_runs_again_at_the_next_deployment(
    shop: Repo, folder_lost: bool
) -> None:
    """`kill -9` while release 2 is checked: release 1 was stopped already. The next deployment
    starts release 1 again before it begins, so that its own failure rolls back to release 1
    (the environment used to stay down, with nothing to roll back to). If release 1 cannot be
    started, the record says why and nothing runs."""
    folder = kill_deployer_2_while_it_checks(shop, "crash")  # release 3 exits at once
    url = str(status(shop, "staging")["url"])
    if folder_lost:
        shutil.rmtree(folder / "releases" / "1")
    promoted = shop.conveyor("promote", "3", "--to", "staging")
    assert promoted.code == 1, promoted.out + promoted.err
    if folder_lost:
        history = shop.conveyor("env", "history", "staging", "--json").json()
        assert [(h["id"], h["status"]) for h in history] == [
            (3, "failed"),
            (2, "interrupted"),
            (1, "succeeded"),
        ]
        assert (
            "deployment 1, which no longer ran, could not be started again: its folder"
            in (history[1]["reason"])
        )
        assert status(shop, "staging")["status"] == "down"
        return
    assert "starting deployment 1 again" in promoted.out
    assert "rolling back to deployment 1" in promoted.out
    assert get(url).startswith("v1 ")
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert [(h["id"], h["status"]) for h in history] == [
        (3, "rolled_back"),
        (2, "interrupted"),
        (1, "succeeded"),
    ]
    assert (
        "deployment 1, which no longer ran, was started again and is healthy"
        in (history[1]["reason"])
    )
    now = status(shop, "staging")
    assert (now["status"], now["deployment"]) == ("running", 1)
    assert shop.conveyor("audit", "verify").code == 0


@pytest.mark.slow
def test_old_release_folders_are_deleted_but_the_running_one(shop: Repo) -> None:
    """An environment keeps the folders of its 5 newest deployments and of the one that runs,
    however old: a rollback and a restart need only that one."""
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    assert shop.conveyor("promote", "1", "--to", "staging").code == 0
    shop.write("VERSION", "crash\n")  # every later release exits at once: rolled back to 1
    shop.commit("crash")
    assert shop.conveyor("run", "--stage", "commit", "--stage", "acceptance").code == 0
    releases = shop.path / ".conveyor" / "environments" / "staging" / "releases"
    for stray in ("012", "notes"):  # not a deployment's: never counted, never deleted
        (releases / stray).mkdir()
    (releases / "99.path").write_text("stray")
    for _ in range(6):
        assert shop.conveyor("promote", "2", "--to", "staging").code == 1
    for stray in ("012", "notes"):
        (releases / stray).rmdir()
    assert sorted(int(p.name) for p in releases.iterdir() if p.is_dir() and p.name != ".trash") == [
        1,
        3,
        4,
        5,
        6,
        7,
    ]
    assert not (releases / "2.path").exists() and (releases / "1.path").exists()
    trash = releases / ".trash"  # moved there under the lease, deleted by a detached rm
    deadline = time.monotonic() + 10
    while any(trash.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(trash.iterdir())
    now = status(shop, "staging")
    assert (now["deployment"], now["running"]) == (1, True)
    assert get(str(now["url"])).startswith("v1 ")
    assert shop.conveyor("promote", "1", "--to", "staging").code == 0  # unpacked again
    assert sorted(int(p.name) for p in releases.iterdir() if p.is_dir() and p.name != ".trash") == [
        4,
        5,
        6,
        7,
        8,
    ]


@pytest.mark.slow
def test_a_cancel_while_unpacking_after_a_recovery_says_what_the_recovery_did(
    shop: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recovery started release 1 again; a cancel during the new release's unpacking
    must not say the deployment "changed nothing"."""
    kill_deployer_2_while_it_checks(shop, "v3")
    unpacked = [False]
    deployer, spec, record = in_process_deployer(shop, monkeypatch, lambda: unpacked[0])
    prepare = deployer._prepare

    def prepared(*args: Any, **kwargs: Any) -> Any:
        release = prepare(*args, **kwargs)
        unpacked[0] = True
        return release

    deployer._prepare = prepared
    try:
        with pytest.raises(DeployCancelled, match="it only ended what a dead deployer left"):
            deployer.deploy(
                spec.environment("staging"),
                resolve(record, "app@3"),
                revision="",
                actor="t",
                trigger="promote",
            )
    finally:
        record.close()
    assert (status(shop, "staging")["deployment"], status(shop, "staging")["running"]) == (1, True)


@pytest.mark.slow
def test_a_release_that_cannot_be_started_again_after_a_cancel_is_tried_once(
    shop: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled once release 1 is stopped: starting it again fails; it is tried once, and the
    record says the environment is down (it was tried twice, with a reason saying both)."""
    exc, steps, _ = deploy_cancelled_after(shop, monkeypatch, ("stop", 1), "v2", fail_restore=True)
    assert isinstance(exc, DeployCancelled)
    assert steps == [("stop", 1), ("restore failed", 1)]
    history = shop.conveyor("env", "history", "staging", "--json").json()
    assert history[0]["status"] == "interrupted"
    assert history[0]["reason"].count("could not be started again") == 2  # the cancel's, the fate's
    assert status(shop, "staging")["status"] == "down"


def keepers_of(log: Path) -> list[int]:
    """The log keeper processes writing ``log``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(log).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_services_output_is_kept_in_rotated_files_of_a_capped_size(shop: Repo) -> None:
    chatty = (
        "import sys\nfor i in range(3000):\n    print(f'line {i:05d} ' + 'x' * 40)\n"
        "print('to stderr', file=sys.stderr)\nsys.stdout.flush()\n"
    )
    shop.write("server.py", chatty + SERVER)
    shop.pipeline(
        PIPELINE.replace(
            "    timeout: 5s\n  production:",
            "    timeout: 5s\n    logs: {max_size: 20KB, files: 3}\n  production:",
        )
    )
    assert shop.conveyor("run").code == 0
    logs = shop.path / ".conveyor" / "environments" / "staging" / "logs"
    log = logs / "1.log"
    deadline = time.monotonic() + 10
    while b"to stderr" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(p.name for p in logs.iterdir()) == ["1.log", "1.log.1", "1.log.2"]
    for path in logs.iterdir():
        assert len(path.read_bytes()) <= 20_000 + 200
    lines = log.read_bytes().splitlines()
    assert b"older output is in the rotated files" in lines[0]
    assert lines[-2:] == [b"line 02999 " + b"x" * 40, b"to stderr"]
    assert keepers_of(log), "the keeper runs as long as the service"
    assert get(str(status(shop, "staging")["url"])).startswith("v1 ")

    assert shop.conveyor("env", "stop", "staging").code == 0
    assert keepers_of(log) == []  # it ended with the service, its last words written


def test_a_command_targets_output_is_capped_and_keeps_its_order(repo: Repo, tmp_path: Path) -> None:
    repo.write("ops/deploy.sh", "seq 1 20000\n")  # 109 KB
    repo.write("ops/health.sh", "echo healthy\n")
    repo.write("ops/rollback.sh", "true\n")
    for script in ("deploy", "health", "rollback"):
        os.chmod(repo.path / "ops" / f"{script}.sh", 0o755)
    repo.write("VERSION", "v1\n")
    repo.pipeline(
        COMMAND_PIPELINE.replace(
            "    timeout: 5s\n", "    timeout: 5s\n    logs: {max_size: 5KB}\n"
        )
    )
    assert repo.conveyor("run").code == 0
    logs = repo.path / ".conveyor" / "environments" / "prod" / "logs"
    deadline = time.monotonic() + 10  # one keeper for all the scripts, ended with conveyor
    while keepers_of(logs / "1.log") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keepers_of(logs / "1.log") == []
    assert sorted(p.name for p in logs.iterdir()) == ["1.log", "1.log.1"]
    assert all(len(p.read_bytes()) <= 5000 + 200 for p in logs.iterdir())
    lines = (logs / "1.log").read_text().splitlines()
    assert "20000" in lines
    after = lines[lines.index("20000") + 1 :]  # Conveyor's line after the script's last one
    assert "health script for" in after[0] and after[1] == "healthy"
