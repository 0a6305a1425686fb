"""``conveyor demo``: the whole path on a sample service, from a commit to production.

It writes a tiny HTTP service (``shop``) with unit tests and a smoke test, commits it to a new
git repository, and runs the real ``conveyor`` command on it: the pipeline builds the service
once (a signed artifact), tests it, deploys it to ``staging`` as a local process; a second run
comes from the cache; the same digest is verified and promoted to ``production``; both
services answer over HTTP; then the history of both environments, and the record's check
against the signed checkpoints every command that wrote shipped off the sample
(``CONVEYOR_CHECKPOINT_COMMAND``). The services are stopped at the end.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

FILES: dict[str, str] = {
    "conveyor.yml": """\
pipeline: shop
env:
  APP_ENV: ci
secrets: [DEMO_TOKEN]
artifacts:
  shop: {path: dist/shop.tar.gz}
environments:
  staging:
    target: {type: process, command: "python -m shop --port $PORT", health: {http: /healthz}}
    timeout: 30s
  production:
    requires: [acceptance]
    branches: [main]
    gates:
      - tests: {min_passed_ratio: 1.0, min_count: 4}
    target: {type: process, command: "python -m shop --port $PORT", health: {http: /healthz}}
    timeout: 30s
stages:
  - name: commit
    jobs:
      lint:
        run: python -m compileall -q shop
        inputs: ["shop/**"]
      build:
        run: python scripts/package.py shop dist/shop.tar.gz
        inputs: ["shop/**"]
        outputs: [shop]
      unit:
        needs: [lint]
        run: python -m pytest -q -p no:cacheprovider --junitxml=reports/unit.xml tests
        reports: {junit: "reports/*.xml"}
        env: {PYTHONHASHSEED: "0"}
        inputs: ["shop/**", "tests/**"]
        timeout: 5m
        retries: 1
  - name: acceptance
    jobs:
      smoke:
        run: |
          echo "using token $DEMO_TOKEN (masked in every log)"
          echo "testing the built artifact $CONVEYOR_ARTIFACT_SHOP_DIGEST"
          python scripts/smoke.py "$CONVEYOR_ARTIFACT_SHOP"
        timeout: 2m
  - name: staging
    deploy: {environment: staging, artifact: shop}
""",
    "shop/__init__.py": '"""A tiny shop service."""\n',
    "shop/pricing.py": '''\
"""Prices with tax."""

TAX_RATE = 0.2


def price_with_tax(amount_cents: int) -> int:
    """Gross price in cents, rounded half up."""
    if amount_cents < 0:
        raise ValueError("amount must not be negative")
    return (amount_cents * 12 + 5) // 10
''',
    "shop/__main__.py": '''\
"""Serve the shop: GET /healthz and GET /price?cents=N."""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from shop.pricing import price_with_tax


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/healthz":
            self._send(200, {"status": "ok"})
        elif url.path == "/price":
            try:
                cents = int(parse_qs(url.query).get("cents", ["0"])[0])
                self._send(200, {"gross": price_with_tax(cents)})
            except ValueError as exc:
                self._send(400, {"error": str(exc)})
        else:
            self._send(404, {"error": "not found"})

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
''',
    "tests/test_pricing.py": """\
import pytest

from shop.pricing import price_with_tax


def test_adds_twenty_percent():
    assert price_with_tax(1000) == 1200


def test_rounds_half_up():
    assert price_with_tax(3) == 4


def test_zero():
    assert price_with_tax(0) == 0


def test_negative_is_refused():
    with pytest.raises(ValueError):
        price_with_tax(-1)
""",
    "scripts/smoke.py": '''\
"""Start the built service (the artifact, not the sources) on a free port, check it, stop it."""

import json
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

unpacked = tempfile.mkdtemp()
with tarfile.open(sys.argv[1]) as archive:
    archive.extractall(unpacked, filter="data")
proc = subprocess.Popen(
    [sys.executable, "-m", "shop", "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=unpacked
)
try:
    port = int(proc.stdout.readline().split()[-1])
    for _ in range(50):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                assert json.load(r) == {"status": "ok"}
            break
        except OSError:
            time.sleep(0.1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/price?cents=1000", timeout=2) as r:
        body = json.load(r)
    assert body == {"gross": 1200}, body
    print(f"smoke ok: service on port {port} answered {body}")
finally:
    proc.terminate()
    proc.wait(timeout=10)
''',
    "scripts/package.py": '''\
"""Package a source folder as a reproducible .tar.gz (sorted, no times, no owners)."""

import gzip
import io
import sys
import tarfile
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2])
target.parent.mkdir(parents=True, exist_ok=True)
buffer = io.BytesIO()
with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for path in sorted(p for p in source.rglob("*") if "__pycache__" not in p.parts):
        info = tar.gettarinfo(str(path), arcname=path.as_posix())
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if path.is_dir() else 0o644
        if path.is_file():
            with path.open("rb") as data:
                tar.addfile(info, data)
        else:
            tar.addfile(info)
with gzip.GzipFile(target, "wb", mtime=0) as out:
    out.write(buffer.getvalue())
print(f"built {target}")
''',
    ".gitignore": "dist/\nreports/\n__pycache__/\n",
}


def write_sample(directory: Path) -> None:
    """Write the sample repository and commit it."""
    directory.mkdir(parents=True, exist_ok=True)
    for rel, text in FILES.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = _git_env()
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "-A"],
        ["commit", "-q", "-m", "shop: pricing service, tests and pipeline"],
    ):
        subprocess.run(["git", *args], cwd=directory, check=True, env=env)


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GIT_AUTHOR_NAME", "Conveyor Demo")
    env.setdefault("GIT_AUTHOR_EMAIL", "demo@conveyor.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "Conveyor Demo")
    env.setdefault("GIT_COMMITTER_EMAIL", "demo@conveyor.invalid")
    return env


def run_demo(directory: Path | None, progress: str = "auto") -> int:
    """Create the sample and run its pipeline; returns the exit code of the first run."""
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="conveyor-demo-")) / "shop"
    if directory.is_dir() and any(directory.iterdir()):
        print(f"Error: {directory} is not empty; give a new folder", file=sys.stderr)
        return 2
    try:
        write_sample(directory)
    except OSError as exc:
        print(
            f"Error: cannot write the sample in {directory}: {exc.strerror or exc}\n"
            "  hint: give a new folder in a place you can write",
            file=sys.stderr,
        )
        return 2
    env = _git_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["DEMO_TOKEN"] = "demo-secret-7f3a9c"
    env.pop("CONVEYOR_HOME", None)
    # Off the sample (as off the machine): a new folder of its own, never beside DIRECTORY.
    offbox = Path(tempfile.mkdtemp(prefix="conveyor-demo-checkpoints-"))
    env["CONVEYOR_CHECKPOINT_COMMAND"] = (
        f'cat > {shlex.quote(str(offbox))}/"$CONVEYOR_CHECKPOINT_NAME"'
    )
    env.pop("CONVEYOR_CHECKPOINT_TIMEOUT", None)
    conveyor = [sys.executable, "-m", "conveyor"]

    def step(title: str, *args: str) -> int:
        print(f"\n$ conveyor {' '.join(args)}    # {title}", flush=True)
        return subprocess.run([*conveyor, *args], cwd=directory, env=env, check=False).returncode

    print(f"sample repository: {directory}")
    step("check the pipeline file", "validate")
    step("what would run, and why", "plan")
    first = step("build once, test, deploy to staging", "run", "--progress", progress)
    try:
        step("run again: unchanged jobs come from the cache", "run", "--progress", progress)
        step("the record of both runs", "runs", "list")
        step("one run in detail", "runs", "show", "1")
        step("the smoke job's log: the secret is masked", "logs", "1", "smoke")
        step("the artifact, built once, used by both runs", "artifacts", "list")
        step("is it what the pipeline built and signed?", "verify", "shop@1")
        step(
            "would production take it? (its gate: every test passed, at least 4)",
            "gates",
            "check",
            "production",
            "shop@1",
        )
        step(
            "the same digest to production (policy: main, acceptance passed, gates)",
            "promote",
            "1",
            "--to",
            "production",
        )
        step("what runs where", "env", "list")
        _ask_services(conveyor, directory, env)
        step("what the production service printed", "env", "logs", "production")
        step("every deployment to staging", "env", "history", "staging")
        step("every deployment to production", "env", "history", "production")
        step("delivery performance from the record (DORA keys)", "metrics", "--since", "1d")
        # checkpoint-<record>-<seq>-<hash>.json, in the order of their events
        shipped = sorted(offbox.iterdir(), key=lambda p: int(p.stem.split("-")[2]))
        print(
            f"\n# every command that wrote shipped a signed checkpoint of the record off the"
            f" sample (CONVEYOR_CHECKPOINT_COMMAND): {len(shipped)} in {offbox}",
            flush=True,
        )
        if shipped:
            step(
                "prove the record was not altered since the first and the newest of them",
                "audit",
                "verify",
                "--checkpoint",
                str(shipped[0]),
                "--checkpoint",
                str(shipped[-1]),
            )
    finally:
        quiet = {k: v for k, v in env.items() if k != "CONVEYOR_CHECKPOINT_COMMAND"}
        for name in ("staging", "production"):
            subprocess.run(
                [*conveyor, "env", "stop", name],
                cwd=directory,
                env=quiet,
                check=False,
                stdout=subprocess.DEVNULL,
            )
    print(f"\nthe sample stays in {directory}; its record is in {directory / '.conveyor'}")
    print("its services were stopped; `conveyor promote 1 --to staging` there starts one again")
    return first


def _ask_services(conveyor: list[str], directory: Path, env: dict[str, str]) -> None:
    """GET /price from each environment's service: the same build answers in both."""
    import json
    import urllib.request

    listing = subprocess.run(
        [*conveyor, "env", "list", "--json"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        environments = json.loads(listing.stdout)
    except ValueError:
        return
    for item in environments:
        if not item.get("url"):
            continue
        url = f"{item['url']}price?cents=1000"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
        except OSError as exc:
            body = f"no answer ({exc})"
        print(f"GET {url} ({item['name']}, {str(item['digest'])[:19]}): {body}")
