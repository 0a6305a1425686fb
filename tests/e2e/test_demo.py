"""The README's main command: the demo shows the whole path and leaves nothing running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import GIT_ENV


def test_demo_builds_once_deploys_promotes_and_cleans_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(GIT_ENV)
    env["TMPDIR"] = str(tmp_path)  # its checkpoints' folder too
    target = tmp_path / "shop"
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "demo", str(target), "--progress", "plain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "deployment 1 to staging: succeeded" in out
    assert "to production (deployment 3)" in out and "deployment 3 to production: succeeded" in out
    assert "verified" in out
    assert "(built by run 1)" in out
    assert "using token *** (masked in every log)" in out
    answers = [line for line in out.splitlines() if line.startswith("GET http://127.0.0.1:")]
    assert len(answers) == 2 and all(line.endswith('{"gross": 1200}') for line in answers)
    digests = {line.split("(")[1].split(",")[1].strip().rstrip(")") for line in answers}
    assert len(digests) == 1  # the same build in both environments
    assert "\nlistening on " in out  # what the production service printed (env logs)
    assert "gate tests: ok" in out and "a deployment would be allowed" in out
    assert "deployment frequency" in out
    assert "hash chain intact" in out
    # Every command that wrote shipped a checkpoint, into a folder of its own; the record
    # still holds what the first and the newest vouch for.
    assert "shipped a signed checkpoint of the record off the sample" in out
    oks = [line for line in out.splitlines() if line.startswith("ok: ")]
    assert sum("conveyor-demo-checkpoints-" in line and ".json (event" in line for line in oks) == 2
    # The services were stopped: no process runs from the sample's release folders.
    releases = str(target / ".conveyor" / "environments")
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cwd = str((proc_dir / "cwd").resolve())
        except OSError:
            continue
        assert not cwd.startswith(releases), f"left running: pid {proc_dir.name} in {cwd}"


def test_demo_in_a_folder_it_cannot_make_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "demo", str(tmp_path / "file" / "shop")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "cannot write the sample in" in proc.stderr and "internal error" not in proc.stderr
