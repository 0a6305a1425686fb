"""The DORA metrics on a large record: ``conveyor metrics`` must answer in under 2 s.

Generates, in a fresh record under a temporary folder, about two years of history: by default
100,000 production deployments (a few failed, rolled back, interrupted, hotfixes or overridden),
10,000 staging deployments, 1,000,000 commits shipped by the successful production deployments
and one incident per hundred deployments (most linked to a deployment, a few unresolved). The
rows are written with plain SQL (``executemany``, one transaction) into a schema made by
``ensure_schema``.

Then it times, ``-n`` times each, ``conveyor.store.metrics.metrics`` in-process, a bare
``python -c`` process that calls it and prints the JSON (the command's floor), and the whole
command ``python -m conveyor metrics --home DIR --environment production --since 800d --json``
(if this Conveyor has that command), and prints the medians and their ratio to the target.
Usage: ``python bench/metrics.py [-n RUNS] [--deployments 100000] [--commits 1000000] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from conveyor.store.metrics import metrics
from conveyor.store.migrate import ensure_schema

HERE = Path(__file__).resolve().parent

TARGET_S = 2.0
DAY = 86400.0
HISTORY_DAYS = 730
ACTORS = ("alice", "bob", "carol", "dave", "erin", "frank")

_DEPLOYMENT_COLUMNS = (
    "id, environment, run_id, artifact, digest, revision, actor, trigger, strategy, status,"
    " reason, health, previous_digest, previous_deployment, lease, started_at, finished_at,"
    " duration_s, hotfix, overridden, started_epoch, finished_epoch"
)
_INCIDENT_COLUMNS = (
    "id, environment, deployment_id, title, opened_by, opened_at, opened_epoch, resolved_by,"
    " resolved_at, resolved_epoch"
)
_FLOOR = (
    "import json, sys; from pathlib import Path; from conveyor.store.metrics import metrics;"
    " print(json.dumps(metrics(Path(sys.argv[1]), 'production', float(sys.argv[2]),"
    " float(sys.argv[3]))))"
)
"""The command's floor: a process that imports the store, reads the metrics and prints them."""
_SAME = (
    "deployments",
    "attempted_deployments",
    "lead_time_hours",
    "change_failure_rate",
    "recovery_time_hours",
    "rework_rate",
    "override_rate",
)
"""Keys the command must show as ``metrics()`` computes them (its window ends a bit later)."""


def iso(epoch: float) -> str:
    """The record's text form of a time."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hexdigits(rng: random.Random, bits: int) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def status_of(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.04:
        return "failed"
    if roll < 0.06:
        return "rolled_back"
    if roll < 0.07:
        return "interrupted"
    return "succeeded"


def generate(db: Path, deployments: int, commits: int, staging: int, now: float) -> dict[str, int]:
    """Write the history into a new record at ``db``; the numbers of rows written."""
    rng = random.Random(20261126)
    ensure_schema(db)
    start = now - HISTORY_DAYS * DAY
    environments = ["production"] * deployments + ["staging"] * staging
    rng.shuffle(environments)
    gap = (HISTORY_DAYS - 1) * DAY / max(1, len(environments))
    rows: list[tuple[object, ...]] = []
    shipped: list[tuple[int, float]] = []  # (id, finished_epoch) of successful production ones
    last: dict[str, tuple[int, str]] = {}
    t = start
    for dep_id, environment in enumerate(environments, start=1):
        t += rng.expovariate(1.0 / gap)
        duration = rng.uniform(30.0, 600.0)
        finished = t + duration
        status = status_of(rng)
        digest = "sha256:" + hexdigits(rng, 256)
        previous = last.get(environment)
        hotfix = int(status == "succeeded" and rng.random() < 0.02)
        overridden = int(rng.random() < 0.01)
        rows.append(
            (
                dep_id,
                environment,
                dep_id,
                "app",
                digest,
                hexdigits(rng, 160),
                rng.choice(ACTORS),
                "promote",
                "recreate",
                status,
                "" if status == "succeeded" else "health check failed",
                "healthy" if status == "succeeded" else "unhealthy",
                previous[1] if previous else None,
                previous[0] if previous else None,
                dep_id,
                iso(t),
                iso(finished),
                duration,
                hotfix,
                overridden,
                t,
                finished,
            )
        )
        if status == "succeeded":
            last[environment] = (dep_id, digest)
            if environment == "production":
                shipped.append((dep_id, finished))
    counts = [0] * len(shipped)
    for _ in range(commits if shipped else 0):
        counts[rng.randrange(len(shipped))] += 1
    commit_rows: list[tuple[int, str, float]] = []
    for (dep_id, finished), count in zip(shipped, counts, strict=True):
        for _ in range(count):
            lead = min(rng.lognormvariate(math.log(20 * 3600.0), 1.0), 90 * DAY)
            commit_rows.append((dep_id, hexdigits(rng, 160), finished - lead))
    incident_rows: list[tuple[object, ...]] = []
    production = [row for row in rows if row[1] == "production"]
    for inc_id in range(1, deployments // 100 + 1):
        linked = production[rng.randrange(len(production))]
        opened = float(str(linked[21])) + rng.uniform(300.0, 6 * 3600.0)
        resolved = None if rng.random() < 0.03 else opened + rng.lognormvariate(math.log(5400), 1)
        if resolved is not None and resolved > now:
            resolved = None
        incident_rows.append(
            (
                inc_id,
                "production",
                linked[0] if rng.random() < 0.7 else None,
                f"incident {inc_id}",
                rng.choice(ACTORS),
                iso(opened),
                opened,
                rng.choice(ACTORS) if resolved is not None else None,
                iso(resolved) if resolved is not None else None,
                resolved,
            )
        )
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            f"INSERT INTO deployments ({_DEPLOYMENT_COLUMNS}) VALUES ({', '.join('?' * 22)})",
            rows,
        )
        conn.executemany(
            'INSERT INTO deployment_commits (deployment_id, "commit", committed_epoch)'
            " VALUES (?, ?, ?)",
            commit_rows,
        )
        conn.executemany(
            f"INSERT INTO incidents ({_INCIDENT_COLUMNS}) VALUES ({', '.join('?' * 10)})",
            incident_rows,
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return {
        "deployments": len(rows),
        "production": deployments,
        "commits": len(commit_rows),
        "incidents": len(incident_rows),
    }


def has_metrics_command(env: dict[str, str]) -> bool:
    """Whether this Conveyor has ``conveyor metrics`` (another change adds it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "metrics", "--help"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc.returncode == 0


def timed_command(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr}")
    return elapsed, proc.stdout


def verdict(seconds: float) -> str:
    return f"{seconds / TARGET_S:5.2f}x of {TARGET_S:.0f} s " + (
        "ok" if seconds < TARGET_S else "MISSED"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("--deployments", type=int, default=100_000)
    parser.add_argument("--commits", type=int, default=1_000_000)
    parser.add_argument("--staging", type=int, default=None, help="default: deployments / 10")
    parser.add_argument("--keep", action="store_true", help="keep the record and print its path")
    args = parser.parse_args()
    staging = args.deployments // 10 if args.staging is None else args.staging
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["CONVEYOR_USER"] = "bench"
    # Bytecode for Conveyor's modules, as `make` installs it (PYTHONDONTWRITEBYTECODE may be set).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "src")], check=True)
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-metrics-"))
    home = work / "home"
    home.mkdir()
    db = home / "conveyor.db"
    now = time.time()
    try:
        start = time.perf_counter()
        written = generate(db, args.deployments, args.commits, staging, now)
        generation = time.perf_counter() - start
        size = db.stat().st_size / 2**20
        print(
            f"record in {home}: {written['deployments']} deployments ({written['production']}"
            f" production), {written['commits']} commits, {written['incidents']} incidents,"
            f" {size:.0f} MiB; generated in {generation:.1f} s"
        )
        since, until = now - 800 * DAY, time.time() + 60.0
        document = metrics(db, "production", since, until)  # warm the page cache once
        in_process: list[float] = []
        for _ in range(args.runs):
            start = time.perf_counter()
            metrics(db, "production", since, until)
            in_process.append(time.perf_counter() - start)
        floor = [sys.executable, "-c", _FLOOR, str(db), str(since), str(until)]
        timed_command(floor, env)
        process = [timed_command(floor, env)[0] for _ in range(args.runs)]
        cli: list[float] = []
        if has_metrics_command(env):
            cmd = [sys.executable, "-m", "conveyor", "metrics", "--home", str(home)]
            cmd += ["--environment", "production", "--since", "800d", "--json"]
            timed_command(cmd, env)
            for _ in range(args.runs):
                elapsed, out = timed_command(cmd, env)
                cli.append(elapsed)
            shown = json.loads(out)
            for key in _SAME:
                if shown.get(key) != document[key]:
                    print(f"warning: {key}: the command says {shown.get(key)!r},")
                    print(f"         metrics() says {document[key]!r}")
        print(f"{args.runs} runs each; times are medians (s)")
        print(f"{'what':<34} {'median':>7} {'min':>7}  target")
        t = statistics.median(in_process)
        print(f"{'metrics() in-process':<34} {t:7.3f} {min(in_process):7.3f}  {verdict(t)}")
        t = statistics.median(process)
        print(f"{'python -c metrics() (process)':<34} {t:7.3f} {min(process):7.3f}  {verdict(t)}")
        if cli:
            t = statistics.median(cli)
            print(f"{'conveyor metrics --json':<34} {t:7.3f} {min(cli):7.3f}  {verdict(t)}")
        else:
            print(f"{'conveyor metrics --json':<34}       -       -  not timed: no such command")
        print(
            f"result: {document['deployments']} deployments, {document['attempted_deployments']}"
            f" attempted, lead time median {document['lead_time_hours']['median']} h over"
            f" {document['lead_time_hours']['commits']} commits"
        )
    finally:
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
