"""End-to-end helpers: real git repositories and the real ``conveyor`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Repo:
    """A temporary git repository and a way to run ``conveyor`` in it."""

    def __init__(self, path: Path, object_format: str = "sha1") -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        self.env.update(GIT_ENV)
        self.env["CONVEYOR_USER"] = "tester@example.invalid"
        # No resident Conveyor of the user's: each command a process of its own, unless the
        # suite is run through one on purpose (CONVEYOR_TEST_DAEMON_SOCKET).
        self.env["CONVEYOR_DAEMON_SOCKET"] = os.environ.get("CONVEYOR_TEST_DAEMON_SOCKET", "")
        self.git("init", "-q", "-b", "main", f"--object-format={object_format}")

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=self.path, env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def write(self, rel: str, text: str) -> Path:
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def commit(self, message: str = "change") -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD").strip()

    def pipeline(self, text: str, commit: bool = True) -> None:
        self.write("conveyor.yml", text)
        if commit:
            self.commit("pipeline")

    def conveyor(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 60,
        input_bytes: bytes | None = None,
        cwd: Path | None = None,
    ) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "conveyor", *args],
            cwd=cwd or self.path,
            env={**self.env, **(env or {})},
            capture_output=True,
            timeout=timeout,
            input=input_bytes,
            stdin=None if input_bytes is not None else subprocess.DEVNULL,
        )
        return Result(
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args],
            cwd=self.path,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )

    def show(self, run: str = "latest") -> dict[str, Any]:
        result = self.conveyor("runs", "show", run, "--json")
        assert result.code == 0, result.err
        return dict(result.json())

    def jobs(self, run: str = "latest") -> dict[str, dict[str, Any]]:
        return {j["name"]: j for s in self.show(run)["stages"] for j in s["jobs"]}


@pytest.fixture(autouse=True)
def _no_resident_conveyor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resident Conveyor the user started must not run the tests' commands: each starts a
    process of its own (unless the suite runs through one on purpose: see Repo)."""
    monkeypatch.setenv("CONVEYOR_DAEMON_SOCKET", os.environ.get("CONVEYOR_TEST_DAEMON_SOCKET", ""))


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    path = tmp_path / "repo"
    path.mkdir()
    return Repo(path)
