"""Conveyor's benchmark: per-job overhead against GNU make and a Python floor, in one run.

Workloads (every job runs ``true``):
  W1  200 jobs in 10 layers of 20; each job needs every job of the layer before
  W2  1000 independent jobs
  W3  a chain of 100 jobs
  W4  W1 again with every job cached
  W5  ``conveyor validate`` of a small file (start-up cost)

Each workload runs with ``conveyor run --jobs 2``, with ``make -j2`` on the same DAG (the floor of
process scheduling) and with a minimal asyncio script that spawns the same processes and commits
one SQLite row per job event (the Python floor). Runs alternate (A B A B ...) and the ratio is the
median of per-pair ratios (p25-p75: their spread).
Usage: ``python bench/run.py [-n RUNS] [--only W1,W2]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOOR = HERE / "floor.py"


def dag(workload: str) -> list[tuple[str, list[str]]]:
    """(job, needs) in a valid order."""
    if workload in ("W1", "W4"):
        jobs: list[tuple[str, list[str]]] = []
        for layer in range(10):
            prev = [f"l{layer - 1}j{i}" for i in range(20)] if layer else []
            jobs.extend((f"l{layer}j{i}", prev) for i in range(20))
        return jobs
    if workload == "W2":
        return [(f"j{i}", []) for i in range(1000)]
    if workload == "W3":
        return [(f"c{i}", [f"c{i - 1}"] if i else []) for i in range(100)]
    raise ValueError(workload)


def write_pipeline(workload: str) -> str:
    lines = [f"pipeline: bench-{workload.lower()}", "stages:", "  - name: only", "    jobs:"]
    for name, needs in dag(workload):
        lines.append(f"      {name}:")
        lines.append('        run: "true"')
        if needs:
            lines.append(f"        needs: [{', '.join(needs)}]")
    return "\n".join(lines) + "\n"


def write_makefile(workload: str) -> str:
    jobs = dag(workload)
    out = [".PHONY: all " + " ".join(j for j, _ in jobs), "all: " + " ".join(j for j, _ in jobs)]
    for name, needs in jobs:
        out.append(f"{name}: {' '.join(needs)}".rstrip())
        out.append("\t@true")
    return "\n".join(out) + "\n"


def git(cwd: Path, *args: str) -> None:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@invalid",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@invalid",
    )
    subprocess.run(["git", *args], cwd=cwd, check=True, env=env, stdout=subprocess.DEVNULL)


def prepare(root: Path, workload: str) -> Path:
    repo = root / workload
    repo.mkdir(parents=True)
    (repo / "conveyor.yml").write_text(write_pipeline(workload))
    (repo / "Makefile").write_text(write_makefile(workload))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "bench")
    return repo


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr.decode()}")
    return elapsed


def pairs(
    a: list[str], b: list[str], cwd: Path, env: dict[str, str], runs: int
) -> tuple[list[float], list[float]]:
    timed(a, cwd, env)
    timed(b, cwd, env)
    ta, tb = [], []
    for _ in range(runs):
        ta.append(timed(a, cwd, env))
        tb.append(timed(b, cwd, env))
    return ta, tb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=7)
    parser.add_argument("--only", default="W1,W2,W3,W4,W5")
    args = parser.parse_args()
    wanted = args.only.split(",")
    conveyor = [sys.executable, "-m", "conveyor"]
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["CONVEYOR_USER"] = "bench"
    results: list[tuple[str, str, float, float, float, list[float]]] = []
    make = shutil.which("make")
    # Bytecode for Conveyor's modules, as `make` installs it (PYTHONDONTWRITEBYTECODE may be set).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "src")], check=True)
    print(f"benchmark in {work}; {args.runs} alternated runs per pair; times are medians (s)")
    try:
        for workload in ("W1", "W2", "W3", "W4"):
            if workload not in wanted:
                continue
            repo = prepare(work, workload)
            home = work / f"{workload}-home"
            run = [*conveyor, "run", "--jobs", "2", "--progress", "quiet", "--home", str(home)]
            if workload == "W4":
                timed(run, repo, env)  # fill the cache once
            else:
                run.append("--no-cache")
            if make and workload != "W4":
                ta, tb = pairs(run, [make, "-s", "-j2"], repo, env, args.runs)
                ratios = [a / b for a, b in zip(ta, tb, strict=True)]
                results.append(
                    (
                        workload,
                        "make -j2",
                        statistics.median(ta),
                        statistics.median(tb),
                        statistics.median(ratios),
                        ratios,
                    )
                )
            floor = [sys.executable, str(FLOOR), workload, "--db", str(work / "floor.db")]
            ta, tb = pairs(run, floor, repo, env, args.runs)
            ratios = [a / b for a, b in zip(ta, tb, strict=True)]
            results.append(
                (
                    workload,
                    "python floor",
                    statistics.median(ta),
                    statistics.median(tb),
                    statistics.median(ratios),
                    ratios,
                )
            )
        if "W5" in wanted:
            repo = work / "W1"
            if not repo.exists():
                repo = prepare(work, "W1")
            small = work / "small"
            small.mkdir()
            (small / "conveyor.yml").write_text(
                "pipeline: small\nstages:\n  - name: commit\n    jobs:\n      build: {run: make}\n"
                "      unit: {run: pytest, needs: [build]}\n"
            )
            ta, tb = pairs(
                [*conveyor, "validate"], [sys.executable, "-c", "pass"], small, env, args.runs
            )
            ratios = [a / b for a, b in zip(ta, tb, strict=True)]
            results.append(
                (
                    "W5",
                    "python -c pass",
                    statistics.median(ta),
                    statistics.median(tb),
                    statistics.median(ratios),
                    ratios,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets = {("W1", "make -j2"): 3.0, ("W2", "make -j2"): 2.0, ("W3", "make -j2"): 3.0}
    print(
        f"{'workload':<8} {'baseline':<15} {'conveyor':>9} {'baseline':>9} {'ratio':>7}"
        f" {'p25-p75':>11}  target"
    )
    for workload, base, t_conv, t_base, ratio, ratios in results:
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio] * 3
        spread = f"{q1:.2f}-{q3:.2f}"
        if workload == "W4":
            target = "conveyor < 0.5 s " + ("ok" if t_conv < 0.5 else "MISSED")
        elif workload == "W5":
            target = "conveyor < 0.25 s " + ("ok" if t_conv < 0.25 else "MISSED")
        elif (workload, base) in targets:
            limit = targets[(workload, base)]
            target = f"<= {limit:.0f}x " + ("ok" if ratio <= limit else "MISSED")
        else:
            target = ""
        print(
            f"{workload:<8} {base:<15} {t_conv:9.3f} {t_base:9.3f} {ratio:6.2f}x"
            f" {spread:>11}  {target}"
        )


if __name__ == "__main__":
    main()
