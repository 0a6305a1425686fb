"""`conveyor run` end to end: real repositories, real processes, the real record."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Repo

SIMPLE = """\
pipeline: shop
env: {APP_ENV: ci}
stages:
  - name: commit
    jobs:
      build:
        run: |
          mkdir -p dist
          echo "built for $APP_ENV" > dist/out.txt
          echo building
      unit:
        needs: [build]
        run: cat dist/out.txt
  - name: acceptance
    jobs:
      smoke: {run: echo smoke ok}
"""


def test_init_validate_run_and_show(repo: Repo) -> None:
    assert repo.conveyor("init").code == 0
    assert repo.conveyor("validate").code == 0
    repo.commit("add pipeline")
    result = repo.conveyor("run")
    assert result.code == 0, result.out + result.err
    doc = repo.show()
    assert doc["status"] == "succeeded"
    assert doc["revision"] == repo.git("rev-parse", "HEAD").strip()
    assert doc["pipeline_digest"].startswith("sha256:")
    for key in ("id", "pipeline", "revision", "status", "started_at", "finished_at", "stages"):
        assert key in doc
    job = doc["stages"][0]["jobs"][0]
    for key in ("name", "status", "exit_code", "attempts", "duration_s", "tests"):
        assert key in job
    runs = repo.conveyor("runs", "list", "--json").json()
    assert [r["id"] for r in runs] == [doc["id"]]


def test_run_uses_the_committed_revision_not_the_working_tree(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    repo.write("conveyor.yml", SIMPLE.replace("echo smoke ok", "exit 3"))
    result = repo.conveyor("run")
    assert result.code == 0, result.out
    assert "conveyor.yml has uncommitted changes; this uses the committed version" in result.err
    assert repo.show()["dirty"] is False
    dirty = repo.conveyor("run", "--dirty")
    assert dirty.code == 1
    assert repo.show()["dirty"] is True
    assert repo.jobs()["smoke"]["exit_code"] == 3


def test_a_dirty_run_is_a_repository_of_its_own(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: dirty
        stages:
          - name: s
            jobs:
              git:
                run: |
                  git tag job-was-here
                  git rev-parse --show-toplevel > toplevel.txt
                  git status --porcelain > status.txt
                  cat kept.txt new.txt
                  test ! -e gone.txt
        """)
    repo.write("kept.txt", "committed\n")
    repo.write("gone.txt", "deleted in the working tree\n")
    repo.commit("files")
    repo.write("kept.txt", "changed\n")
    repo.write("new.txt", "untracked\n")
    (repo.path / "gone.txt").unlink()
    result = repo.conveyor("run", "--dirty")
    assert result.code == 0, result.out + result.err
    assert "job-was-here" not in repo.git("tag")  # the user's repository is untouched
    log = repo.conveyor("logs", "latest", "git").out
    assert "changed\nuntracked" in log
    workspaces = repo.path / ".conveyor" / "workspaces"
    toplevel = next(workspaces.rglob("toplevel.txt")).read_text().strip()
    assert Path(toplevel) != repo.path and workspaces in Path(toplevel).parents
    status = next(workspaces.rglob("status.txt")).read_text()
    assert " M kept.txt" in status and " D gone.txt" in status and "?? new.txt" in status


def test_a_reader_that_stops_reading_does_not_stop_the_run(repo: Repo) -> None:
    """`conveyor run | head -2`: the run goes on without output and is recorded."""
    repo.pipeline("""\
        pipeline: head
        stages:
          - name: s
            jobs:
              talk:
                run: |
                  for i in 1 2 3 4 5; do echo "line $i"; sleep 0.2; done
        """)
    proc = repo.popen("run", "--progress", "plain")
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=30) == 0, err
    assert b"Traceback" not in err and b"internal error" not in err
    assert repo.show()["status"] == "succeeded"


def test_jobs_share_the_workspace_and_get_the_conveyor_variables(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: vars
        stages:
          - name: commit
            jobs:
              show:
                run: |
                  echo "run=$CONVEYOR_RUN_ID rev=$CONVEYOR_REVISION stage=$CONVEYOR_STAGE"
                  echo "job=$CONVEYOR_JOB ws=$CONVEYOR_WORKSPACE pwd=$(pwd)"
        """)
    assert repo.conveyor("run").code == 0
    log = repo.conveyor("logs", "latest", "show").out
    rev = repo.git("rev-parse", "HEAD").strip()
    assert f"run=1 rev={rev} stage=commit" in log
    ws = log.split("ws=")[1].split()[0]
    assert f"pwd={ws}" in log
    assert Path(ws).is_dir() and ws != str(repo.path)


def test_the_workspace_is_a_clean_git_checkout_that_borrows_the_objects(
    repo: Repo, tmp_path: Path
) -> None:
    repo.pipeline("""\
        pipeline: ws
        stages:
          - name: commit
            jobs:
              inspect:
                run: |
                  git rev-parse HEAD
                  echo "status=[$(git status --porcelain)]"
                  git cat-file -t HEAD
                  echo "alternates=$(cat .git/objects/info/alternates)"
                  ls .git/objects | grep -c . || true
        """)
    repo.write("sub/readme.txt", "hello\n")
    rev = repo.commit("sub")
    (repo.path / "sub" / "untracked.txt").write_text("not committed\n")
    ran = repo.conveyor("run", cwd=repo.path / "sub")
    assert ran.code == 0, ran.out + ran.err
    log = repo.conveyor("logs", "latest", "inspect").out
    assert rev in log and "status=[]" in log and "commit" in log
    assert f"alternates={repo.path.resolve() / '.git' / 'objects'}" in log
    # A linked worktree's runs borrow the common object database.
    linked = tmp_path / "linked"
    repo.git("worktree", "add", "-q", "--detach", str(linked))
    in_linked = repo.conveyor("run", "--home", str(tmp_path / "home"), cwd=linked)
    assert in_linked.code == 0, in_linked.out + in_linked.err


def test_a_sha256_repository_is_checked_out(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "sha256", object_format="sha256")
    repo.pipeline(SIMPLE)
    result = repo.conveyor("run", "--no-cache")
    assert result.code == 0, result.out + result.err
    assert len(repo.show()["revision"]) == 64


def test_the_workspace_has_the_tags_branches_and_history_jobs_expect(
    repo: Repo, tmp_path: Path
) -> None:
    repo.pipeline("""\
        pipeline: refs
        stages:
          - name: commit
            jobs:
              describe:
                run: |
                  echo "describe=$(git describe --tags)"
                  echo "branches=$(git branch -a --format='%(refname:short)' | tr '\\n' ' ')"
                  echo "commits=$(git rev-list --count HEAD)"
                  echo "default=$(git rev-parse --abbrev-ref origin/HEAD)"
                  echo "upstream=$(git rev-parse --abbrev-ref main@{upstream})"
                  echo "hooks=$(ls .git/hooks 2>/dev/null | wc -l)"
        """)
    repo.git("tag", "v1.0")
    repo.write("later.txt", "x\n")
    repo.commit("later")
    assert repo.conveyor("run").code == 0
    log = repo.conveyor("logs", "latest", "describe").out
    assert "describe=v1.0-1-g" in log
    assert "origin/main" in log and "commits=2" in log
    assert "default=origin/main" in log and "upstream=origin/main" in log and "hooks=0" in log
    # A shallow clone (what most CI systems check out) keeps its boundary.
    shallow = Repo.__new__(Repo)
    shallow.path, shallow.env = tmp_path / "shallow", dict(repo.env)
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", f"file://{repo.path}", str(shallow.path)],
        check=True,
        env=repo.env,
    )
    ran = shallow.conveyor("run")
    assert ran.code == 0, ran.out + ran.err
    assert "commits=1" in shallow.conveyor("logs", "latest", "describe").out


def test_git_variables_of_a_hook_do_not_reach_the_checkout_or_the_jobs(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: hook
        stages:
          - name: commit
            jobs:
              env:
                run: |
                  echo "gitdir=[${GIT_DIR:-}] index=[${GIT_INDEX_FILE:-}]"
                  git status --porcelain
        """)
    head = repo.git("symbolic-ref", "HEAD").strip()
    hook_env = {"GIT_DIR": str(repo.path / ".git"), "GIT_INDEX_FILE": str(repo.path / ".git/index")}
    ran = repo.conveyor("run", env=hook_env)  # as from a pre-push hook
    assert ran.code == 0, ran.out + ran.err
    assert repo.git("symbolic-ref", "HEAD").strip() == head  # the user's repository is untouched
    assert repo.git("status", "--porcelain") == ""
    assert "gitdir=[] index=[]" in repo.conveyor("logs", "latest", "env").out


def test_pruning_keeps_the_workspace_of_a_run_still_going(tmp_path: Path) -> None:
    from conveyor.adapters.home import Home
    from conveyor.adapters.processes import acquire_run_lock
    from conveyor.bootstrap import prune_workspaces

    home = Home(tmp_path / "home")
    for run_id in range(1, 9):
        (home.workspaces / str(run_id)).mkdir(parents=True)
    lock = acquire_run_lock(home.locks, 1)  # run 1 is still running
    try:
        prune_workspaces(home, keep=5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = sorted(p.name for p in home.workspaces.iterdir() if not p.name.startswith("."))
            if left == ["1", "4", "5", "6", "7", "8"]:
                break
            time.sleep(0.05)
        assert left == ["1", "4", "5", "6", "7", "8"]
    finally:
        lock.release()


def test_a_repository_path_with_a_newline_is_refused_clearly(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "new\nline")
    repo.pipeline(SIMPLE)
    result = repo.conveyor("run")
    assert result.code == 2
    assert "contains a newline" in result.err and "Traceback" not in result.err


def test_old_workspaces_are_pruned(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    for _ in range(7):
        assert repo.conveyor("run", "--no-cache").code == 0
    workspaces = repo.path / ".conveyor" / "workspaces"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # deleted by a background rm
        left = sorted(p.name for p in workspaces.iterdir() if not p.name.startswith("."))
        trash = workspaces / ".trash"
        if left == ["3", "4", "5", "6", "7"] and not (trash.exists() and any(trash.iterdir())):
            break
        time.sleep(0.05)
    assert left == ["3", "4", "5", "6", "7"]
    assert not any((workspaces / ".trash").iterdir())


def test_failed_stage_stops_the_line(repo: Repo) -> None:
    repo.pipeline(SIMPLE.replace("cat dist/out.txt", "echo boom; exit 4"))
    result = repo.conveyor("run")
    assert result.code == 1
    jobs = repo.jobs()
    assert jobs["unit"]["status"] == "failed"
    assert jobs["unit"]["exit_code"] == 4
    assert jobs["smoke"]["status"] == "skipped"
    doc = repo.show()
    assert doc["status"] == "failed"
    assert [s["status"] for s in doc["stages"]] == ["failed", "skipped"]
    assert "conveyor logs" in result.out


def test_the_summary_names_ten_failed_jobs_and_counts_the_rest(repo: Repo) -> None:
    jobs = "".join(f"      f{i}: {{run: 'exit 3'}}\n" for i in range(13))
    repo.pipeline("pipeline: many\nstages:\n  - name: s\n    jobs:\n" + jobs)
    result = repo.conveyor("run", "--progress", "quiet")
    assert result.code == 1
    named = [line for line in result.out.splitlines() if "failed: see `conveyor logs" in line]
    assert len(named) == 10
    assert "and 3 more failed jobs: `conveyor runs show 1` lists them all" in result.out


def test_jobs_run_in_parallel_up_to_the_limit(repo: Repo) -> None:
    jobs = "\n".join(
        f"      j{i}:\n        run: |\n          date +%s.%N >> ../times-$CONVEYOR_RUN_ID-{i}\n"
        f"          sleep 0.6\n          date +%s.%N >> ../times-$CONVEYOR_RUN_ID-{i}\n"
        for i in range(3)
    )
    repo.pipeline("pipeline: par\nstages:\n  - name: s\n    jobs:\n" + jobs)

    def intervals(run_id: int) -> list[tuple[float, float]]:
        ws_parent = repo.path / ".conveyor" / "workspaces"
        out = []
        for i in range(3):
            lines = (ws_parent / f"times-{run_id}-{i}").read_text().split()
            out.append((float(lines[0]), float(lines[1])))
        return out

    def max_overlap(spans: list[tuple[float, float]]) -> int:
        points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
        best = cur = 0
        for _, delta in points:
            cur += delta
            best = max(best, cur)
        return best

    assert repo.conveyor("run", "--jobs", "3").code == 0
    assert max_overlap(intervals(1)) == 3
    assert repo.conveyor("run", "--jobs", "1", "--no-cache").code == 0
    assert max_overlap(intervals(2)) == 1


def test_retries_then_success(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: retry
        stages:
          - name: s
            jobs:
              flaky:
                retries: 2
                run: |
                  if [ ! -e marker ]; then touch marker; echo first try fails; exit 1; fi
                  echo second try passes
        """)
    assert repo.conveyor("run").code == 0
    job = repo.jobs()["flaky"]
    assert job["status"] == "succeeded"
    assert job["attempts"] == 2
    assert [a["status"] for a in job["attempt_details"]] == ["failed", "succeeded"]
    assert "first try fails" in repo.conveyor("logs", "latest", "flaky", "--attempt", "1").out


def test_a_timed_out_attempt_is_retried(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: retry-timeout
        stages:
          - name: s
            jobs:
              slow-once:
                timeout: 1s
                retries: 1
                run: |
                  if [ ! -e marker ]; then touch marker; sleep 30; fi
                  echo second try passes
        """)
    assert repo.conveyor("run").code == 0
    job = repo.jobs()["slow-once"]
    assert [a["status"] for a in job["attempt_details"]] == ["timed_out", "succeeded"]
    assert "second try passes" in repo.conveyor("logs", "latest", "slow-once").out


def test_timeout_kills_the_whole_process_group(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: slow
        stages:
          - name: s
            jobs:
              slow:
                timeout: 1s
                run: |
                  sleep 60 &
                  echo $! > ../child.pid
                  sleep 60
        """)
    result = repo.conveyor("run")
    assert result.code == 1
    assert repo.jobs()["slow"]["status"] == "timed_out"
    child = int((repo.path / ".conveyor" / "workspaces" / "child.pid").read_text())
    assert not Path(f"/proc/{child}").exists() or _is_zombie(child)


def test_processes_that_leave_the_job_s_group_end_with_it(repo: Repo) -> None:
    """`timeout` and `set -m` put children in groups of their own; they still end: with a
    timed-out job, and at the end of the stage for a job that left one behind."""
    repo.pipeline("""\
        pipeline: strays
        stages:
          - name: s
            jobs:
              slow:
                timeout: 1s
                run: |
                  timeout 1011 sleep 1010 &
                  echo $! > ../slow-stray.pid
                  sleep 1012
              leaves:
                run: |
                  set -m
                  sleep 1013 &
                  echo $! > ../left-stray.pid
          - name: later
            jobs:
              check: {run: "true"}
        """)
    result = repo.conveyor("run")
    assert result.code == 1
    assert repo.jobs()["slow"]["status"] == "timed_out"
    workspaces = repo.path / ".conveyor" / "workspaces"
    for name in ("slow-stray.pid", "left-stray.pid"):
        pid = int((workspaces / name).read_text())
        _wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _is_zombie(pid))


def test_a_daemon_without_the_run_s_token_ends_with_its_stage(repo: Repo) -> None:
    """A process that leaves the job's session and drops CONVEYOR_RUN_TOKEN (a daemon that
    clears its environment) is still found, by its ancestry, and ends before the next stage;
    it used to run on for good."""
    repo.pipeline("""\
        pipeline: daemons
        stages:
          - name: s
            jobs:
              daemon:
                run: |
                  env -i setsid -f sh -c 'echo $$ > ../hidden.pid; exec sleep 1015'
                  while [ ! -s ../hidden.pid ]; do sleep 0.05; done
          - name: later
            jobs:
              check: {run: '! kill -0 "$(cat ../hidden.pid)"'}
        """)
    result = repo.conveyor("run", "--progress", "plain")
    pid = int((repo.path / ".conveyor" / "workspaces" / "hidden.pid").read_text())
    alive = Path(f"/proc/{pid}").exists()
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert result.code == 0, result.out + result.err
    assert not alive


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _wait_for(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _wait_for_run(repo: Repo, run_id: int) -> None:
    """Wait until the run is on the record (its process may still be starting)."""
    db = repo.path / ".conveyor" / "conveyor.db"

    def recorded() -> bool:
        if not db.exists():
            return False
        try:
            conn = sqlite3.connect(db)
            try:
                row = conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return False
        return row is not None

    _wait_for(recorded)


LONG = """\
pipeline: long
stages:
  - name: s
    jobs:
      long:
        run: |
          echo $$ > ../long.pid
          sleep 60
      after:
        needs: [long]
        run: echo never
  - name: t
    jobs:
      later: {run: echo never}
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_cancel_cleanly(repo: Repo, sig: int) -> None:
    repo.pipeline(LONG)
    proc = repo.popen("run")
    pidfile = repo.path / ".conveyor" / "workspaces" / "long.pid"
    _wait_for(pidfile.exists)
    _wait_for(lambda: pidfile.read_text().strip() != "")
    job_pid = int(pidfile.read_text())
    proc.send_signal(sig)
    proc.communicate(timeout=20)
    assert proc.returncode == 130
    jobs = repo.jobs()
    assert jobs["long"]["status"] == "cancelled"
    assert jobs["after"]["status"] == "skipped"
    assert jobs["later"]["status"] == "skipped"
    assert repo.show()["status"] == "cancelled"
    assert not Path(f"/proc/{job_pid}").exists() or _is_zombie(job_pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_conveyor_starts_cancels_it_without_a_traceback(sig: int) -> None:
    """Before a command has started anything, Ctrl-C or SIGTERM just ends it (exit 130)."""
    code = (
        "import os, signal, sys, time\n"
        "sys.argv[0] = '/usr/bin/conveyor'  # as the console script runs it\n"
        "import conveyor.cli\n"
        f"os.kill(os.getpid(), {int(sig)})\n"
        "time.sleep(5)\n"
        "import conveyor.cli.main\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert proc.returncode == 130
    assert proc.stderr.decode() == "cancelled\n"


def test_sigterm_cancels_a_command_like_ctrl_c(repo: Repo) -> None:
    repo.pipeline(LONG)
    proc = repo.popen("run")
    _wait_for_run(repo, 1)
    follower = repo.popen("logs", "latest", "long", "--follow")
    time.sleep(0.5)
    follower.send_signal(signal.SIGTERM)
    _, err = follower.communicate(timeout=10)
    assert follower.returncode == 130 and b"cancelled" in err and b"Traceback" not in err
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 130


def test_ctrl_c_during_a_long_checkout_cancels_at_once(repo: Repo, tmp_path: Path) -> None:
    """A checkout that takes long (here a smudge filter that sleeps) stops on Ctrl-C."""
    config = tmp_path / "gitconfig"
    config.write_text('[filter "slow"]\n\tsmudge = sleep 20; cat\n\tclean = cat\n')
    repo.env["GIT_CONFIG_GLOBAL"] = str(config)
    repo.write(".gitattributes", "slow.txt filter=slow\n")
    repo.write("slow.txt", "data\n")
    repo.pipeline(SIMPLE)
    proc = repo.popen("run")
    _wait_for_run(repo, 1)  # recorded: the engine now waits for the checkout
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 10  # not after the 20 s checkout
    assert repo.show()["status"] == "cancelled"
    assert repo.jobs()["build"]["status"] == "cancelled"


def test_kill_9_leaves_a_consistent_record_and_the_run_is_interrupted(repo: Repo) -> None:
    repo.pipeline(LONG)
    proc = repo.popen("run")
    pidfile = repo.path / ".conveyor" / "workspaces" / "long.pid"
    _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    job_pid = int(pidfile.read_text())
    db = repo.path / ".conveyor" / "conveyor.db"
    conn = sqlite3.connect(db)
    before = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.close()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert Path(f"/proc/{job_pid}").exists()  # the job outlived its parent...
    runs = repo.conveyor("runs", "list", "--json").json()  # ...until the next command
    assert runs[0]["status"] == "interrupted"
    _wait_for(lambda: not Path(f"/proc/{job_pid}").exists() or _is_zombie(job_pid))
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    after = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.close()
    assert after == before + 1  # every event before the kill is there, plus run.interrupted
    assert repo.jobs()["long"]["status"] == "interrupted"
    assert repo.conveyor("audit", "verify").code == 0


def test_logs_follow_stops_when_the_run_process_is_killed(repo: Repo) -> None:
    repo.pipeline(LONG)
    proc = repo.popen("run")
    pidfile = repo.path / ".conveyor" / "workspaces" / "long.pid"
    _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    follower = repo.popen("logs", "1", "long", "--follow")
    (running,) = repo.jobs("1")["long"]["attempt_details"]
    assert running["status"] == "running" and running["log_truncated"] is None
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    _, err = follower.communicate(timeout=15)  # it waited forever
    assert follower.returncode == 1
    assert err.decode().startswith(
        "Error: run 1 was interrupted while its log was followed: the conveyor process running"
        " it stopped without finishing it\n  hint: `conveyor runs show 1`"
    )
    assert repo.show()["status"] == "interrupted"


def test_a_copy_of_a_live_home_does_not_take_the_run_for_an_orphan(
    repo: Repo, tmp_path: Path
) -> None:
    repo.pipeline(LONG)
    proc = repo.popen("run")
    pidfile = repo.path / ".conveyor" / "workspaces" / "long.pid"
    _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    job_pid = int(pidfile.read_text())
    copy = tmp_path / "copy"
    shutil.copytree(repo.path / ".conveyor", copy)
    # Nobody holds the copied lock, but the owner lives (it locks the original home's file).
    shown = repo.conveyor("runs", "show", "latest", "--json", "--home", str(copy))
    assert shown.code == 0, shown.err
    assert shown.json()["status"] == "running"
    assert Path(f"/proc/{job_pid}").exists() and not _is_zombie(job_pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    # Once the owner is gone, the copy recovers the run like the original would.
    assert (
        repo.conveyor("runs", "show", "latest", "--json", "--home", str(copy)).json()["status"]
        == "interrupted"
    )
    _wait_for(lambda: not Path(f"/proc/{job_pid}").exists() or _is_zombie(job_pid))


def test_a_job_needing_an_uncached_job_runs_again(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: volatile
        stages:
          - name: s
            jobs:
              build: {run: "date +%s%N > out.txt", cache: false}
              test: {run: "cat out.txt", needs: [build]}
        """)
    assert repo.conveyor("run").code == 0
    plan = repo.conveyor("plan", "--json").json()
    decided = {j["name"]: j for lvl in plan["stages"][0]["levels"] for j in lvl}
    assert decided["test"]["action"] == "run"
    assert "build" in decided["test"]["reason"]
    assert repo.conveyor("run").code == 0
    assert repo.jobs()["test"]["status"] == "succeeded"


def test_an_inputs_file_losing_its_executable_bit_is_a_cache_miss(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: modes
        stages:
          - name: s
            jobs:
              check:
                run: "test -x src/run.sh && echo exec || echo noexec"
                inputs: ["src/**"]
        """)
    script = repo.write("src/run.sh", "#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    repo.commit("executable")
    assert repo.conveyor("run").code == 0
    script.chmod(0o644)
    repo.commit("not executable")
    assert repo.conveyor("run").code == 0
    assert repo.jobs()["check"]["status"] == "succeeded"
    assert "noexec" in repo.conveyor("logs", "latest", "check").out


def test_cache_hits_and_misses(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: cache
        stages:
          - name: s
            jobs:
              lint:
                run: cat src/a.txt
                inputs: ["src/**"]
              docs:
                run: cat docs/d.txt
                inputs: ["docs/**"]
              all:
                needs: [lint]
                run: echo all
                inputs: ["src/**"]
              tree:
                run: echo whole tree
        """)
    repo.write("src/a.txt", "a1")
    repo.write("docs/d.txt", "d1")
    repo.commit()
    assert repo.conveyor("run").code == 0
    assert repo.conveyor("run").code == 0
    jobs = repo.jobs()
    assert {j["status"] for j in jobs.values()} == {"cached"}
    assert jobs["lint"]["cached_from"] == {"run": 1, "job": "lint", "attempt": 1}
    plan = repo.conveyor("plan", "--json").json()
    actions = {j["name"]: j["action"] for lvl in plan["stages"][0]["levels"] for j in lvl}
    assert actions == {"lint": "cached", "docs": "cached", "all": "cached", "tree": "cached"}
    repo.write("docs/d.txt", "d2")
    repo.commit()
    assert repo.conveyor("run").code == 0
    jobs = repo.jobs()
    assert jobs["lint"]["status"] == "cached"
    assert jobs["all"]["status"] == "cached"
    assert jobs["docs"]["status"] == "succeeded"
    assert jobs["tree"]["status"] == "succeeded"  # no inputs: the whole tree is the input
    assert repo.conveyor("run", "--no-cache").code == 0
    assert {j["status"] for j in repo.jobs().values()} == {"succeeded"}


def test_secrets_are_masked_everywhere(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: sec
        secrets: [API_TOKEN]
        stages:
          - name: s
            jobs:
              leak:
                reports: {metrics: m.json}
                run: |
                  echo "plain: $API_TOKEN"
                  printf 'split: %s' "${API_TOKEN:0:5}"; sleep 0.3; printf '%s\\n' "${API_TOKEN:5}"
                  echo "b64: $(printf %s "$API_TOKEN" | base64)"
                  a=${API_TOKEN:0:7} b=${API_TOKEN:7}
                  printf 'colour: %s\\033[01;31m\\033[K%s\\033[m\\n' "$a" "$b"
                  printf 'nul: %s\\000%s\\n' "$a" "$b"
                  printf '{"%s": 1}' "$API_TOKEN" > m.json
        """)
    secret = "s3cr3t-value-123"
    result = repo.conveyor("run", env={"API_TOKEN": secret})
    assert result.code == 0, result.err
    assert secret not in result.out
    log = repo.conveyor("logs", "latest", "leak").out
    assert "plain: ***" in log
    assert "split: ***" in log
    assert "b64: ***" in log
    assert "colour: ***" in log
    assert "nul: ***" in log
    assert "s3cr3t" not in log
    raw = (repo.path / ".conveyor").rglob("*")
    for path in raw:
        if path.is_file() and "workspaces" not in path.parts:
            assert secret.encode() not in path.read_bytes(), path
    events = repo.conveyor("runs", "show", "latest", "--json", "--events").out
    assert secret not in events
    assert '"***": 1' in events or '"***":1' in events  # the metric named by the secret


def test_junit_reports_become_test_results(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: tests
        stages:
          - name: s
            jobs:
              unit:
                reports: {junit: "reports/*.xml"}
                run: |
                  mkdir -p reports
                  cat > reports/unit.xml <<'XML'
                  <testsuite name="t" tests="3">
                    <testcase classname="shop.test_a" name="test_one" time="0.01"/>
                    <testcase classname="shop.test_a" name="test_two" time="0.02">
                      <failure message="assert 1 == 2">trace</failure>
                    </testcase>
                    <testcase classname="shop.test_b" name="test_skip"><skipped/></testcase>
                  </testsuite>
                  XML
        """)
    assert repo.conveyor("run").code == 0
    assert repo.jobs()["unit"]["tests"] == {"passed": 1, "failed": 1, "skipped": 1}
    conn = sqlite3.connect(repo.path / ".conveyor" / "conveyor.db")
    rows = conn.execute(
        "SELECT classname, name, outcome, message FROM test_results ORDER BY id"
    ).fetchall()
    conn.close()
    assert rows == [
        ("shop.test_a", "test_one", "passed", ""),
        ("shop.test_a", "test_two", "failed", "assert 1 == 2"),
        ("shop.test_b", "test_skip", "skipped", ""),
    ]


def test_unusable_junit_times_are_null_and_noted_never_nan(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: tests
        stages:
          - name: s
            jobs:
              unit:
                reports: {junit: "reports/*.xml"}
                run: |
                  mkdir -p reports
                  cat > reports/unit.xml <<'XML'
                  <testsuite name="t">
                    <testcase name="a" time="nan" file="tests/test_a.py"/>
                    <testcase name="b" time="abc"/>
                    <testcase name="c" time="-5"/>
                    <testcase name="d" time="0.5"/>
                  </testsuite>
                  XML
        """)
    assert repo.conveyor("run").code == 0
    result = repo.conveyor("runs", "show", "latest", "--events", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    (event,) = [e for e in doc["events"] if e["type"] == "job.tests.reported"]
    payload = event["payload"]
    assert [(t["name"], t["duration_s"], t["file"]) for t in payload["tests"]] == [
        ("a", None, "tests/test_a.py"),
        ("b", None, "reports/unit.xml"),
        ("c", None, "reports/unit.xml"),
        ("d", 0.5, "reports/unit.xml"),
    ]
    assert payload["truncated"] is False
    assert "3 test cases with an unusable time" in payload["problems"][0]
    log = repo.conveyor("logs", "latest", "unit").out
    assert "conveyor: JUnit reports: reports/unit.xml: 3 test cases with an unusable time" in log
    assert repo.conveyor("audit", "verify").code == 0


def test_logs_neutralise_escapes_and_are_capped(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: logs
        stages:
          - name: s
            jobs:
              noisy:
                run: |
                  printf 'red \\033[31mtext\\033[0m \\033]52;c;aGk=\\007clip \\033[2Jclear\\n'
                  head -c 300000 /dev/zero | tr '\\0' 'x'
        """)
    assert repo.conveyor("run", env={"CONVEYOR_LOG_MAX_BYTES": "100000"}).code == 0
    shown = repo.conveyor("logs", "latest", "noisy").out
    assert "\x1b" not in shown
    assert "red text clip clear" in shown
    assert "log truncated at 100000 bytes" in shown
    raw = repo.conveyor("logs", "latest", "noisy", "--raw").out
    assert "\x1b[31m" in raw
    attempt = repo.jobs()["noisy"]["attempt_details"][0]
    assert attempt["log_truncated"] is True
    assert repo.conveyor("runs", "list", "--help").out.count("How many runs to list") == 1


def test_a_log_file_left_by_an_earlier_record_is_not_appended_to(repo: Repo) -> None:
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: 'echo new'}\n")
    old = repo.path / ".conveyor" / "logs" / "1" / "a.1.log"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"the log of run 1 of a record that was replaced\n")
    result = repo.conveyor("run", "--progress", "plain")
    assert result.code == 1
    assert "the log file logs/1/a.1.log exists already" in result.out
    assert result.out.count("exists already") == 1
    assert old.read_bytes() == b"the log of run 1 of a record that was replaced\n"
    (attempt,) = repo.jobs()["a"]["attempt_details"]
    assert (attempt["status"], attempt["exit_code"], attempt["log_bytes"]) == ("failed", None, 0)


@pytest.mark.parametrize("value", ["0", "abc", "-5", "1.5", "²"])
def test_an_invalid_log_cap_is_a_usage_error(repo: Repo, value: str) -> None:
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: 'true'}\n")
    result = repo.conveyor("run", env={"CONVEYOR_LOG_MAX_BYTES": value})
    assert result.code == 2
    assert result.err.startswith(
        f"Error: CONVEYOR_LOG_MAX_BYTES must be a whole number of bytes above 0, not '{value}'"
    )
    assert repo.conveyor("runs", "list", "--json").json() == []


def test_runs_show_and_list_neutralise_what_users_chose(repo: Repo) -> None:
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: 'true'}\n")
    actor = "ev\x1b]0;PWNED\x07il\x1b[2J\nnext"
    assert repo.conveyor("run", "--progress", "quiet", "--as", actor).code == 0
    shown = repo.conveyor("runs", "show", "1", "--events")
    assert shown.code == 0
    assert "  by        evil next\n" in shown.out
    assert not any(ord(c) < 32 and c != "\n" for c in shown.out)
    listed = repo.conveyor("runs", "list")
    assert "\x1b" not in listed.out
    doc = repo.show("1")
    assert doc["actor"] == actor  # recorded as given
    assert doc["environment_gates"] == [] and doc["stages"][0]["gates"] == []
    assert doc["stages"][0]["jobs"][0]["attempt_details"][0]["log_truncated"] is False


def test_logs_of_an_attempt_that_did_not_happen_says_so(repo: Repo) -> None:
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      slow: {run: 'echo hi'}\n")
    assert repo.conveyor("run", "--progress", "quiet").code == 0
    result = repo.conveyor("logs", "1", "slow", "--attempt", "5")
    assert result.code == 2
    assert result.err.startswith("Error: job 'slow' of run 1 has no attempt 5: it had 1\n")
    assert repo.conveyor("logs", "1", "slow", "--attempt", "1").out == "hi\n"


def test_logs_of_a_deleted_or_replaced_log_file_say_so(repo: Repo) -> None:
    """A log deleted, or replaced by a link or a folder, is an error (it printed nothing, or
    followed the link; --follow waited for ever); a record naming a log elsewhere is refused."""
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: 'echo hi'}\n")
    assert repo.conveyor("run", "--progress", "quiet").code == 0
    log = repo.path / ".conveyor" / "logs" / "1" / "a.1.log"
    log.unlink()
    for follow in ([], ["--follow"]):
        result = repo.conveyor("logs", "1", "a", *follow, timeout=10)
        assert result.code == 1
        assert "holds 0 of the 3 bytes recorded" in result.err and "was deleted" in result.err
    outside = repo.path / "outside.txt"
    outside.write_text("not a log\n")
    log.symlink_to(outside)
    result = repo.conveyor("logs", "1", "a")
    assert result.code == 1 and "it is a symbolic link" in result.err
    assert "not a log" not in result.out
    log.unlink()
    log.mkdir()
    result = repo.conveyor("logs", "1", "a")
    assert result.code == 1 and "not a regular file" in result.err
    log.rmdir()
    run_logs = log.parent
    run_logs.rename(repo.path / "moved")
    (repo.path / "moved" / "a.1.log").write_text("hi\n")
    run_logs.symlink_to(repo.path / "moved")  # a run's folder linked elsewhere
    result = repo.conveyor("logs", "1", "a")
    assert result.code == 1 and "its folder is a link" in result.err
    with sqlite3.connect(repo.path / ".conveyor" / "conveyor.db") as conn:
        conn.execute("UPDATE jobs SET log_path = ?", (str(outside),))
    result = repo.conveyor("logs", "1", "a")
    assert result.code == 1 and "outside its logs folder" in result.err


@pytest.mark.parametrize("home", ["/dev/null", "conveyor.yml/sub"])
def test_a_home_that_cannot_be_a_folder_is_a_usage_error(repo: Repo, home: str) -> None:
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: 'true'}\n")
    result = repo.conveyor("runs", "list", "--home", home)
    assert result.code == 2, result.err
    assert "cannot be used:" in result.err and "not a folder" in result.err
    assert "--home" in result.err  # the hint
    run = repo.conveyor("run", "--home", home)  # its checkout starts first, and says so
    assert run.code == 2 and "Not a directory" in run.err and "internal error" not in run.err


@pytest.mark.parametrize("ref", ["²", "٣", "１"])
def test_a_run_id_is_ascii_digits(repo: Repo, ref: str) -> None:
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: 'true'}\n")
    for _ in range(3):
        assert repo.conveyor("run", "--progress", "quiet").code == 0
    result = repo.conveyor("runs", "show", ref)
    assert result.code == 2
    assert result.err.startswith(f"Error: there is no run '{ref}'")


def test_logs_of_an_unknown_job_suggest_one_and_list_or_count_the_jobs(repo: Repo) -> None:
    jobs = "".join(f"      job{i}: {{run: 'true'}}\n" for i in range(21))
    repo.pipeline("pipeline: wide\nstages:\n  - name: s\n    jobs:\n" + jobs)
    assert repo.conveyor("run", "--progress", "quiet").code == 0
    result = repo.conveyor("logs", "1", "jobb3")
    assert result.code == 2
    assert "run 1 has no job 'jobb3'" in result.err
    assert "did you mean 'job3'?" in result.err
    assert "`conveyor runs show 1` lists its 21 jobs" in result.err
    assert "job20," not in result.err
    repo.pipeline("pipeline: narrow\nstages:\n  - name: s\n    jobs:\n      a: {run: 'true'}\n")
    assert repo.conveyor("run", "--progress", "quiet").code == 0
    assert "jobs: a" in repo.conveyor("logs", "2", "zzz").err


def test_logs_follow_streams_while_the_job_runs(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: follow
        stages:
          - name: s
            jobs:
              slowprint:
                run: |
                  for i in 1 2 3; do echo "line $i"; sleep 0.4; done
        """)
    proc = repo.popen("run")
    _wait_for_run(repo, 1)
    follower = repo.popen("logs", "1", "slowprint", "--follow")
    out, _ = follower.communicate(timeout=30)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.decode().splitlines() == ["line 1", "line 2", "line 3"]


def test_a_damaged_record_is_a_clear_error_and_audit_verify_names_the_event(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    conn = sqlite3.connect(repo.path / ".conveyor" / "conveyor.db")
    conn.execute("DROP TRIGGER events_append_only_update")
    conn.execute("UPDATE events SET payload = 'not json' WHERE seq = 2")
    conn.commit()
    shown = repo.conveyor("runs", "show", "1", "--events")
    assert shown.code == 1
    assert "is damaged: a stored JSON value is not valid JSON" in shown.err
    assert "internal error" not in shown.err and "audit verify" in shown.err
    conn.execute("UPDATE events SET payload = CAST(X'7B22FF227D' AS TEXT) WHERE seq = 2")
    conn.commit()
    conn.close()
    verified = repo.conveyor("audit", "verify", "--json")
    assert verified.code == 1
    assert verified.json()["first_bad_seq"] == 2
    assert verified.json()["problem"].startswith("event 2 holds text that is not UTF-8")
    shown = repo.conveyor("runs", "show", "1", "--events", "--json")
    assert shown.code == 1 and "is damaged: it holds text that is not UTF-8" in shown.err


def test_audit_verify_detects_tampering(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    assert repo.conveyor("audit", "verify").code == 0
    conn = sqlite3.connect(repo.path / ".conveyor" / "conveyor.db")
    conn.execute("DROP TRIGGER events_append_only_update")
    conn.execute(
        "UPDATE events SET payload = replace(payload, 'succeeded', 'failed')"
        " WHERE seq = (SELECT min(seq) FROM events WHERE type = 'job.finished')"
    )
    conn.commit()
    seq = conn.execute("SELECT min(seq) FROM events WHERE type = 'job.finished'").fetchone()[0]
    conn.close()
    result = repo.conveyor("audit", "verify")
    assert result.code == 1
    assert f"event {seq}" in result.err


def test_audit_verify_detects_reordering(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    conn = sqlite3.connect(repo.path / ".conveyor" / "conveyor.db")
    conn.execute("DROP TRIGGER events_append_only_update")
    rows = conn.execute("SELECT seq, payload, type FROM events WHERE seq IN (3, 4)").fetchall()
    conn.execute("UPDATE events SET payload = ?, type = ? WHERE seq = 3", (rows[1][1], rows[1][2]))
    conn.execute("UPDATE events SET payload = ?, type = ? WHERE seq = 4", (rows[0][1], rows[0][2]))
    conn.commit()
    conn.close()
    result = repo.conveyor("audit", "verify", "--json")
    assert result.code == 1
    assert result.json()["first_bad_seq"] == 3


def test_audit_verify_detects_a_deleted_write_ahead_log(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    assert repo.conveyor("run", "--no-cache").code == 0
    home = repo.path / ".conveyor"
    last = repo.conveyor("audit", "verify", "--json").json()["events"]
    # The second run's events are only in the write-ahead log (no checkpoint yet).
    assert (home / "conveyor.db-wal").stat().st_size > 0
    (home / "conveyor.db-wal").unlink()
    (home / "conveyor.db-shm").unlink(missing_ok=True)
    result = repo.conveyor("audit", "verify", "--json")
    assert result.code == 1
    report = result.json()
    assert report["first_bad_seq"] <= last
    assert "removed from the end" in report["problem"]
    assert "conveyor.db.head" in report["problem"]


def test_a_deleted_or_forged_head_mark_does_not_verify(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    mark = repo.path / ".conveyor" / "conveyor.db.head"
    mark.write_text('{"seq": "x"}')
    forged = repo.conveyor("audit", "verify")
    assert forged.code == 1 and "conveyor.db.head is not a mark Conveyor wrote" in forged.err
    mark.unlink()
    gone = repo.conveyor("audit", "verify", "--json")
    assert gone.code == 1
    assert gone.json()["first_bad_seq"] is None
    assert "conveyor.db.head is missing" in gone.json()["problem"]


def test_deleting_the_log_with_its_head_mark_does_not_verify(repo: Repo) -> None:
    """The note that a mark was written is in the database file itself, and audit verify
    checks the record as found (recovering the run first would write a new mark)."""
    repo.pipeline(SIMPLE)
    for _ in range(2):
        assert repo.conveyor("run").code == 0
    home = repo.path / ".conveyor"
    for name in ("conveyor.db-wal", "conveyor.db-shm", "conveyor.db.head"):
        (home / name).unlink(missing_ok=True)
    result = repo.conveyor("audit", "verify")
    assert result.code == 1 and "conveyor.db.head is missing" in result.err
    listed = repo.conveyor("runs", "list")
    assert listed.code == 0 and "warning: conveyor.db.head is missing" in listed.err


def test_a_deleted_database_is_not_silently_replaced(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    home = repo.path / ".conveyor"
    for name in ("conveyor.db", "conveyor.db-wal", "conveyor.db-shm"):
        (home / name).unlink(missing_ok=True)
    for args in (("runs", "list"), ("audit", "verify"), ("run",)):
        result = repo.conveyor(*args)
        assert result.code == 1, args
        assert "missing or empty" in result.err
        assert "Traceback" not in result.err
    assert not (home / "conveyor.db").exists()
    (home / "conveyor.db").write_bytes(b"")  # emptied rather than deleted: the same
    assert "missing or empty" in repo.conveyor("runs", "list").err


def test_usage_errors_exit_2(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    result = repo.conveyor("run", "--stage", "comit")
    assert result.code == 2
    assert "did you mean 'commit'" in result.err
    assert repo.conveyor("runs", "show", "42").code == 2
    assert repo.conveyor("logs", "latest", "build").code == 2  # no runs yet
    assert "Traceback" not in result.err


def test_stage_selection(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run", "--stage", "acceptance").code == 0
    jobs = repo.jobs()
    assert jobs["build"]["status"] == "skipped"
    assert jobs["smoke"]["status"] == "succeeded"
    # An unknown stage is a usage error, and the checkout started for it is removed.
    assert repo.conveyor("run", "--stage", "nosuch").code == 2
    workspaces = repo.path / ".conveyor" / "workspaces"
    assert not [p for p in workspaces.iterdir() if p.name.startswith(".checkout-")]


def test_no_commits_yet_is_a_clear_error(repo: Repo) -> None:
    repo.write("conveyor.yml", SIMPLE)
    result = repo.conveyor("run")
    assert result.code == 2
    assert "no commits yet" in result.err


def test_home_option_and_env(repo: Repo, tmp_path: Path) -> None:
    repo.pipeline(SIMPLE)
    home = tmp_path / "elsewhere"
    assert repo.conveyor("run", "--home", str(home)).code == 0
    assert (home / "conveyor.db").exists()
    assert not (repo.path / ".conveyor" / "conveyor.db").exists()
    listed = repo.conveyor("runs", "list", "--json", env={"CONVEYOR_HOME": str(home)})
    assert len(listed.json()) == 1
    assert "conveyor.db" not in repo.git("status", "--porcelain")


def test_fail_fast_cancels_the_other_jobs(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: ff
        stages:
          - name: s
            jobs:
              slow: {run: sleep 30}
              bad: {run: exit 1}
        """)
    started = time.monotonic()
    assert repo.conveyor("run", "--fail-fast").code == 1
    assert time.monotonic() - started < 25
    jobs = repo.jobs()
    assert jobs["bad"]["status"] == "failed"
    assert jobs["slow"]["status"] == "cancelled"


def test_plan_explains(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    result = repo.conveyor("plan")
    assert result.code == 0
    assert "level 0" in result.out and "level 1" in result.out
    assert "no successful attempt with this cache key" in result.out
    plan = repo.conveyor("plan", "--json").json()
    assert [s["name"] for s in plan["stages"]] == ["commit", "acceptance"]
    assert [[j["name"] for j in lvl] for lvl in plan["stages"][0]["levels"]] == [
        ["build"],
        ["unit"],
    ]


def test_os_environment_is_not_leaking_conveyor_internal_vars(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: env
        stages:
          - name: s
            jobs:
              e: {run: env}
        """)
    assert repo.conveyor("run", env={"CONVEYOR_HOME": str(repo.path / ".conveyor")}).code == 0
    log = repo.conveyor("logs", "latest", "e").out
    assert "CONVEYOR_HOME=" not in log
    assert os.environ.get("PATH", "") == "" or "PATH=" in log


def test_logs_follow_goes_on_with_the_retry(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: follow-retry
        stages:
          - name: s
            jobs:
              flaky:
                retries: 1
                run: |
                  if [ ! -e marker ]; then touch marker; echo one; sleep 0.5; exit 1; fi
                  for i in 1 2 3 4 5; do echo "second $i"; done
                  sleep 0.3
        """)
    proc = repo.popen("run")
    _wait_for_run(repo, 1)
    follower = repo.popen("logs", "1", "flaky", "--follow")
    out, _ = follower.communicate(timeout=30)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = out.decode().splitlines()
    assert lines[0] == "one"
    assert "--- attempt 2 ---" in lines
    assert lines[-1] == "second 5"


def test_allowed_failure_lets_dependants_run(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: allowed
        stages:
          - name: s
            jobs:
              optional: {run: exit 3, allow_failure: true}
              after: {run: echo after, needs: [optional]}
          - name: t
            jobs:
              next: {run: echo next}
        """)
    assert repo.conveyor("run").code == 0
    jobs = repo.jobs()
    assert jobs["optional"]["status"] == "failed"
    assert jobs["after"]["status"] == "succeeded"
    assert jobs["next"]["status"] == "succeeded"


def test_logs_of_a_cached_job_show_the_original_attempt(repo: Repo) -> None:
    repo.pipeline("""\
        pipeline: cached-log
        stages:
          - name: s
            jobs:
              hello: {run: echo hello from the first run}
        """)
    assert repo.conveyor("run").code == 0
    assert repo.conveyor("run").code == 0
    result = repo.conveyor("logs", "2", "hello")
    assert result.code == 0
    assert "hello from the first run" in result.out
    assert "taken from the cache" in result.err


def test_revision_option_runs_an_older_commit(repo: Repo) -> None:
    repo.pipeline("pipeline: r\nstages:\n  - name: s\n    jobs:\n      v: {run: cat version.txt}\n")
    repo.write("version.txt", "one\n")
    first = repo.commit("one")
    repo.write("version.txt", "two\n")
    repo.commit("two")
    assert repo.conveyor("run", "--revision", "HEAD~1").code == 0
    assert repo.show()["revision"] == first
    assert repo.conveyor("logs", "latest", "v").out == "one\n"
    bad = repo.conveyor("run", "--revision", "no-such-branch")
    assert bad.code == 2
    assert "not a commit" in bad.err


def test_pipeline_file_option(repo: Repo) -> None:
    repo.write(
        "ci/pipeline.yml", "pipeline: f\nstages:\n  - name: s\n    jobs:\n      a: {run: echo f}\n"
    )
    repo.commit("pipeline elsewhere")
    assert repo.conveyor("validate", "-f", "ci/pipeline.yml").code == 0
    result = repo.conveyor("run", "-f", "ci/pipeline.yml")
    assert result.code == 0, result.err
    doc = repo.show()
    assert doc["pipeline"] == "f"
    assert doc["pipeline_file"] == "ci/pipeline.yml"
    missing = repo.conveyor("run")
    assert missing.code == 2
    assert "conveyor.yml" in missing.err


def test_logs_of_a_cached_job_has_no_other_attempt(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    assert repo.conveyor("run").code == 0
    assert repo.jobs()["build"]["status"] == "cached"
    shown = repo.conveyor("logs", "2", "build")
    assert shown.code == 0 and "taken from the cache" in shown.err
    other = repo.conveyor("logs", "2", "build", "--attempt", "99")
    assert other.code == 2 and "taken from the cache" in other.err


def test_the_workspace_survives_unusual_heads_and_subfolders(repo: Repo, tmp_path: Path) -> None:
    repo.pipeline("""\
        pipeline: heads
        stages:
          - name: commit
            jobs:
              look:
                run: |
                  echo "default=$(git rev-parse --abbrev-ref origin/HEAD 2>/dev/null || echo none)"
                  echo "commits=$(git rev-list --count HEAD)"
                  echo "alternates=$(cat .git/objects/info/alternates)"
        """)
    repo.write("services/api/readme.txt", "api\n")
    repo.commit("api")
    # From a subfolder: the borrowed objects are named by an absolute, resolved path, so the
    # workspace outlives that folder.
    sub = repo.path / "services" / "api"
    ran = repo.conveyor("run", "-f", "../../conveyor.yml", cwd=sub)
    assert ran.code == 0, ran.out + ran.err
    log = repo.conveyor("logs", "latest", "look").out
    assert f"alternates={(repo.path / '.git' / 'objects').resolve()}" in log
    # A detached HEAD: origin/HEAD is guessed as a clone would (the branch at that commit).
    repo.git("checkout", "-q", "--detach")
    assert repo.conveyor("run", "--no-cache").code == 0
    assert "default=origin/main" in repo.conveyor("logs", "latest", "look").out
    # A tag named HEAD makes HEAD ambiguous: the run goes on, without origin/HEAD.
    repo.git("checkout", "-q", "main")
    repo.git("tag", "HEAD")
    ran = repo.conveyor("run", "--no-cache")
    assert ran.code == 0, ran.out + ran.err
    repo.git("tag", "-d", "HEAD")
    # An orphan branch just begun, running another revision.
    repo.git("checkout", "-q", "--orphan", "gh-pages")
    ran = repo.conveyor("run", "--no-cache", "--revision", "main")
    assert ran.code == 0, ran.out + ran.err
    assert "commits=2" in repo.conveyor("logs", "latest", "look").out
