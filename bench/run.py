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


Timed = tuple[list[str], dict[str, str]]


def rounds(commands: list[Timed], cwd: Path, runs: int) -> list[list[float]]:
    """Each command's times, the commands alternating (A B C A B C ...) after one warm-up."""
    for cmd, env in commands:
        timed(cmd, cwd, env)
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(runs):
        for i, (cmd, env) in enumerate(commands):
            times[i].append(timed(cmd, cwd, env))
    return times


class Row:
    """One workload against one baseline: Conveyor by itself (cold) and resident."""

    def __init__(self, workload: str, baseline: str, times: list[list[float]]) -> None:
        cold, resident, base = times
        self.workload, self.baseline = workload, baseline
        self.cold = statistics.median(cold)
        self.resident = statistics.median(resident)
        self.base = statistics.median(base)
        self.cold_ratios = [a / b for a, b in zip(cold, base, strict=True)]
        self.resident_ratios = [a / b for a, b in zip(resident, base, strict=True)]

    @staticmethod
    def spread(ratios: list[float]) -> str:
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        return f"{q1:.2f}-{q3:.2f}"

    def verdict(self, ratio: float, seconds: float) -> str:
        if self.workload == "W4":
            return "ok" if seconds < 0.5 else "MISSED"
        if self.workload == "W5":
            return "ok" if seconds < 0.25 else "MISSED"
        limit = TARGETS.get((self.workload, self.baseline))
        if limit is None:
            return ""
        return "ok" if ratio <= limit else "MISSED"

    def lines(self) -> list[str]:
        out = []
        for mode, seconds, ratios in (
            ("cold", self.cold, self.cold_ratios),
            ("resident", self.resident, self.resident_ratios),
        ):
            ratio = statistics.median(ratios)
            out.append(
                f"{self.workload:<8} {self.baseline:<15} {mode:<9} {seconds:9.3f} {self.base:9.3f}"
                f" {ratio:6.2f}x {self.spread(ratios):>11}  {self.verdict(ratio, seconds)}"
            )
        return out


TARGETS = {("W1", "make -j2"): 3.0, ("W2", "make -j2"): 2.0, ("W3", "make -j2"): 3.0}
TARGET_TEXT = {
    "W1": "<= 3x make",
    "W2": "<= 2x make",
    "W3": "<= 3x make",
    "W4": "conveyor < 0.5 s",
    "W5": "conveyor < 0.25 s",
}


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
    cold_env = {**env, "CONVEYOR_DAEMON_SOCKET": ""}  # every command starts from scratch
    resident_env = {**env, "CONVEYOR_DAEMON_SOCKET": str(work / "daemon" / "daemon.sock")}
    rows: list[Row] = []
    make = shutil.which("make")
    # Bytecode for Conveyor's modules, as `make` installs it (PYTHONDONTWRITEBYTECODE may be set).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "src")], check=True)
    print(f"benchmark in {work}; {args.runs} alternated runs per pair; times are medians (s)")
    subprocess.run(
        [*conveyor, "daemon", "start", "--idle-timeout", "1h"],
        env=resident_env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        for workload in ("W1", "W2", "W3", "W4"):
            if workload not in wanted:
                continue
            repo = prepare(work, workload)
            home = work / f"{workload}-home"
            run = [*conveyor, "run", "--jobs", "2", "--progress", "quiet", "--home", str(home)]
            if workload == "W4":
                timed(run, repo, cold_env)  # fill the cache once
            else:
                run.append("--no-cache")
            both: list[Timed] = [(run, cold_env), (run, resident_env)]
            if make and workload != "W4":
                times = rounds([*both, ([make, "-s", "-j2"], env)], repo, args.runs)
                rows.append(Row(workload, "make -j2", times))
            floor = [sys.executable, str(FLOOR), workload, "--db", str(work / "floor.db")]
            rows.append(
                Row(workload, "python floor", rounds([*both, (floor, env)], repo, args.runs))
            )
        if "W5" in wanted:
            small = work / "small"
            small.mkdir()
            (small / "conveyor.yml").write_text(
                "pipeline: small\nstages:\n  - name: commit\n    jobs:\n      build: {run: make}\n"
                "      unit: {run: pytest, needs: [build]}\n"
            )
            validate = [*conveyor, "validate"]
            times = rounds(
                [
                    (validate, cold_env),
                    (validate, resident_env),
                    ([sys.executable, "-c", "pass"], env),
                ],
                small,
                args.runs,
            )
            rows.append(Row("W5", "python -c pass", times))
    finally:
        subprocess.run(
            [*conveyor, "daemon", "stop"], env=resident_env, stdout=subprocess.DEVNULL, check=False
        )
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'workload':<8} {'baseline':<15} {'conveyor':<9} {'conveyor':>9} {'baseline':>9}"
        f" {'ratio':>7} {'p25-p75':>11}  target"
    )
    for row in rows:
        for line in row.lines():
            print(line)
    print("targets: " + "; ".join(f"{w} {t}" for w, t in TARGET_TEXT.items()))
    print("cold: each command a process of its own; resident: through `conveyor daemon start`")


if __name__ == "__main__":
    main()
