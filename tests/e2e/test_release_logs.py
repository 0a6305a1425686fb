"""``conveyor env logs``: a release's output, kept across rotations, followed live."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Repo

SERVER = """\
import http.server, os, signal, sys
print("starting \\x1b[31mred\\x1b[0m")
for i in range(800):
    print(f"boot {i:03d} " + "x" * 40)
sys.stdout.flush()
def bye(*_):
    print("bye", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/healthz":
            print(f"request {self.path}", flush=True)
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""

PIPELINE = """\
pipeline: shop
artifacts:
  app: {path: dist/app.tar.gz}
environments:
  staging:
    target: {type: process, command: "python3 server.py", health: {http: /healthz}}
    timeout: 5s
    logs: {max_size: 8KB, files: 3}
stages:
  - name: commit
    jobs:
      build: {run: "mkdir -p dist && tar -czf dist/app.tar.gz server.py", outputs: [app]}
  - name: staging
    deploy: {environment: staging}
"""


@pytest.fixture
def shop(repo: Repo) -> Iterator[Repo]:
    repo.write("server.py", SERVER)
    repo.pipeline(PIPELINE)
    yield repo
    repo.conveyor("env", "stop", "staging")


def url(repo: Repo) -> str:
    return str(repo.conveyor("env", "status", "staging", "--json").json()["url"])


def wait_for(predicate: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)


def test_env_logs_prints_what_is_kept_in_order_and_the_last_lines(shop: Repo) -> None:
    assert shop.conveyor("run").code == 0
    wait_for(lambda: "boot 799" in shop.conveyor("env", "logs", "staging").out)

    shown = shop.conveyor("env", "logs", "staging")
    assert shown.code == 0, shown.err
    boots = [line for line in shown.out.splitlines() if line.startswith("boot ")]
    numbers = [int(line.split()[1]) for line in boots]
    assert numbers == list(range(numbers[0], 800)) and numbers[0] > 0  # the oldest rotated away
    assert shown.out.count("==> conveyor") >= 2  # where each kept file begins

    last = shop.conveyor("env", "logs", "staging", "-n", "2")
    assert last.out.splitlines() == ["boot 798 " + "x" * 40, "boot 799 " + "x" * 40]
    assert shop.conveyor("env", "logs", "staging", "--lines", "0").out == ""
    by_number = shop.conveyor("env", "logs", "staging", "--deployment", "1", "-n", "1")
    assert by_number.out == "boot 799 " + "x" * 40 + "\n"


def test_escape_sequences_are_neutralised_unless_raw(shop: Repo) -> None:
    shop.pipeline(PIPELINE.replace("max_size: 8KB", "max_size: 1MB"))
    assert shop.conveyor("run").code == 0
    wait_for(lambda: "boot 799" in shop.conveyor("env", "logs", "staging").out)
    shown = shop.conveyor("env", "logs", "staging").out
    assert "starting" in shown and "\x1b" not in shown
    raw = shop.conveyor("env", "logs", "staging", "--raw").out
    assert "starting \x1b[31mred\x1b[0m" in raw


@pytest.mark.slow
def test_follow_prints_new_output_and_ends_with_the_release(shop: Repo) -> None:
    shop.pipeline(PIPELINE.replace("max_size: 8KB", "max_size: 20KB"))
    assert shop.conveyor("run").code == 0
    follower = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "env", "logs", "staging", "-F", "-n", "0"],
        cwd=shop.path,
        env=shop.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # it is following
        base = url(shop)
        for index in range(150):  # enough to rotate the file while followed
            path = f"r{index}" if index < 3 else "z" * 200
            with urllib.request.urlopen(base + path, timeout=5):
                pass
        assert shop.conveyor("env", "stop", "staging").code == 0
        out, err = follower.communicate(timeout=20)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, err
    lines = out.splitlines()
    assert lines[:3] == ["request /r0", "request /r1", "request /r2"]
    assert sum(line == "request /" + "z" * 200 for line in lines) == 147  # none lost at a rotation
    assert lines[-1] == "bye"  # its last words, then it ended by itself


def test_bad_references_are_usage_errors(shop: Repo) -> None:
    never = shop.conveyor("env", "logs", "staging")
    assert never.code == 2 and "environment 'staging' has no deployment yet" in never.err
    unknown = shop.conveyor("env", "logs", "stagin")
    assert unknown.code == 2 and "did you mean 'staging'?" in unknown.err
    assert shop.conveyor("run").code == 0
    missing = shop.conveyor("env", "logs", "staging", "--deployment", "7")
    assert missing.code == 2 and "environment 'staging' has no deployment 7" in missing.err
    assert shop.conveyor("env", "logs", "staging", "-n", "-1").code == 2


COMMAND_PIPELINE = """\
pipeline: ops
artifacts:
  bundle: {path: dist/bundle.txt}
environments:
  prod:
    target: {type: command, deploy: ./deploy.sh, health: "true"}
stages:
  - name: commit
    jobs:
      build: {run: "mkdir -p dist && echo v1 > dist/bundle.txt", outputs: [bundle]}
"""


@pytest.mark.slow
def test_follow_goes_on_while_a_scripts_leftover_writes(repo: Repo) -> None:
    repo.write(
        "deploy.sh",
        "printf 'deploying'\n"  # no line end: Conveyor's next line begins its own
        '( for i in 1 2 3 4 5; do sleep 0.3; echo "leftover $i"; done ) &\n',
    )
    os.chmod(repo.path / "deploy.sh", 0o755)
    repo.pipeline(COMMAND_PIPELINE)
    assert repo.conveyor("run").code == 0
    assert repo.conveyor("promote", "1", "--to", "prod").code == 0
    followed = repo.conveyor("env", "logs", "prod", "-F", timeout=30)
    assert followed.code == 0, followed.err
    lines = followed.out.splitlines()
    assert lines[-1] == "leftover 5"  # it followed the leftover to its end
    deploying = lines.index("deploying")
    assert "health script for" in lines[deploying + 1]


def test_a_deployment_number_too_large_is_a_usage_error(repo: Repo) -> None:
    repo.write("deploy.sh", "true\n")
    repo.pipeline(COMMAND_PIPELINE)
    huge = repo.conveyor("env", "logs", "prod", "--deployment", "9" * 20)
    assert huge.code == 2 and "Traceback" not in huge.err and "internal" not in huge.err


@pytest.mark.slow
def test_a_scripts_keeper_ends_with_its_deployment_not_with_the_run(repo: Repo) -> None:
    repo.write("deploy.sh", "echo deployed\n")
    os.chmod(repo.path / "deploy.sh", 0o755)
    repo.pipeline(
        COMMAND_PIPELINE
        + "  - name: prod\n    deploy: {environment: prod}\n"
        + "  - name: later\n    jobs:\n      wait: {run: sleep 4}\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "run"],
        cwd=repo.path,
        env=repo.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        keeper = repo.path / ".conveyor" / "environments" / "prod" / "run" / "1.keeper"
        wait_for(lambda: "deployed" in repo.conveyor("env", "logs", "prod").out, timeout=20)
        wait_for(lambda: not keeper.exists())
        assert not keeper.exists() and run.poll() is None  # released, while the run goes on
        followed = repo.conveyor("env", "logs", "prod", "-F", timeout=3)
        assert followed.code == 0 and "deployed" in followed.out
    finally:
        run.wait(timeout=30)


def test_a_missing_logs_folder_is_said(repo: Repo) -> None:
    repo.write("deploy.sh", "echo deployed\n")
    os.chmod(repo.path / "deploy.sh", 0o755)
    repo.pipeline(COMMAND_PIPELINE)
    assert repo.conveyor("run").code == 0
    assert repo.conveyor("promote", "1", "--to", "prod").code == 0
    logs = repo.path / ".conveyor" / "environments" / "prod" / "logs"
    logs.rename(logs.with_name("moved"))
    shown = repo.conveyor("env", "logs", "prod")
    assert shown.code == 0 and shown.out == ""
    assert "deployment 1 has no output kept in" in shown.err
