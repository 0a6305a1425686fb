"""`conveyor validate` and hostile pipeline files through the real command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.conftest import Repo

BAD = """\
pipeline: shop
stagse: []
stages:
  - name: commit
    jobs:
      build:
        run: make
        timeout: ten minutes
        retries: one
      unit:
        needs: [biuld]
        run: pytest
        colour: red
      a: {run: x, needs: [b]}
      b: {run: y, needs: [a]}
  - name: empty
    jobs: {}
  - name: acceptance
    jobs:
      build: {run: again}
      smoke: {run: s, needs: [unit]}
"""


def test_a_good_file(repo: Repo) -> None:
    repo.write("conveyor.yml", "pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: x}\n")
    result = repo.conveyor("validate")
    assert result.code == 0
    assert result.out == "conveyor.yml: ok: pipeline 'p', 1 stage, 1 job\n"
    assert repo.conveyor("validate", "--json").json()["valid"] is True


def test_every_problem_is_reported_with_line_and_column(repo: Repo) -> None:
    repo.write("conveyor.yml", BAD)
    result = repo.conveyor("validate")
    assert result.code == 2
    err = result.err
    assert "Traceback" not in err
    expected = [
        ("conveyor.yml:2:1:", "stagse"),  # unknown key
        ("conveyor.yml:8:18:", "timeout"),  # bad duration
        ("conveyor.yml:9:18:", "retries"),  # wrong type
        ("conveyor.yml:11:17:", "biuld"),  # unknown need
        ("conveyor.yml:13:9:", "colour"),  # unknown key
        ("conveyor.yml:14:7:", "cycle"),  # a -> b -> a
        ("conveyor.yml:17:", "no jobs"),  # empty stage
        ("conveyor.yml:20:7:", "duplicate job name 'build'"),
        ("conveyor.yml:21:", "stage 'commit'"),  # needs a job of another stage
    ]
    for where, what in expected:
        lines = [line for line in err.splitlines() if line.startswith(where)]
        assert any(what in line for line in lines), (where, what, err)
    assert "did you mean 'stages'" in err
    assert "did you mean 'build'" in err
    assert "a -> b -> a" in err
    problems = repo.conveyor("validate", "--json").json()["problems"]
    assert len(problems) >= len(expected)


HOSTILE = {
    "alias bomb": b"a: &a [x, x, x, x, x, x, x, x, x]\n"
    + b"".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n".encode()
        for i in range(9)
    ),
    "20 MB file": b"pipeline: p\n# " + b"x" * (20 * 1024 * 1024) + b"\n",
    "deep nesting": b"pipeline: " + b"[" * 10_000 + b"]" * 10_000 + b"\n",
    "python tag": b'pipeline: !!python/object/apply:os.system ["touch PWNED"]\n',
    "duplicate keys": b"pipeline: a\npipeline: b\nstages: []\n",
    "not utf-8": b"pipeline: caf\xe9\nstages: []\n",
    "binary": bytes(range(256)) * 4,
    "empty": b"",
    "a list": b"- a\n- b\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_gets_a_clear_error(repo: Repo, name: str) -> None:
    (repo.path / "conveyor.yml").write_bytes(HOSTILE[name])
    result = repo.conveyor("validate", timeout=20)
    assert result.code == 2, result.err
    assert "Traceback" not in result.err + result.out
    assert result.err.startswith("conveyor.yml:")
    assert not (repo.path / "PWNED").exists()


def test_run_refuses_an_invalid_committed_file(repo: Repo) -> None:
    repo.pipeline("pipeline: p\nstages: []\n")
    result = repo.conveyor("run")
    assert result.code == 2
    assert "conveyor.yml:" in result.err


def test_junit_patterns_must_stay_in_the_workspace(repo: Repo) -> None:
    repo.write(
        "conveyor.yml",
        "pipeline: p\nstages:\n  - name: s\n    jobs:\n"
        "      a: {run: x, reports: {junit: /tmp/*.xml}, inputs: [../x]}\n",
    )
    result = repo.conveyor("validate")
    assert result.code == 2
    assert "not relative to the workspace" in result.err
    assert "leaves the workspace" in result.err


def test_missing_file_and_init(repo: Repo) -> None:
    result = repo.conveyor("validate")
    assert result.code == 2
    assert "conveyor init" in result.err
    assert repo.conveyor("init").code == 0
    assert repo.conveyor("init").code == 2  # refuses to overwrite
    assert repo.conveyor("validate").code == 0


def test_plan_json_prints_the_problems_of_an_invalid_file(repo: Repo) -> None:
    repo.pipeline("pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: x, retries: 99}\n")
    validated = repo.conveyor("validate", "--json")
    result = repo.conveyor("plan", "--json")
    assert result.code == 2, result.err
    assert result.json() == validated.json()
    assert result.json()["problems"][0]["line"] == 5
    assert "Traceback" not in result.err


def test_past_100_problems_the_count_stays_right(repo: Repo) -> None:
    jobs = "".join(f"      j{index}: {{run: x, retries: -1}}\n" for index in range(150))
    repo.write("conveyor.yml", f"pipeline: p\nstages:\n  - name: s\n    jobs:\n{jobs}")
    result = repo.conveyor("validate")
    assert result.code == 2
    assert result.err.count("must be between 0 and 10") == 100
    assert result.err.endswith(
        "... and 50 more problems from line 105 on, not shown\n150 problems in the pipeline file\n"
    )
    document = repo.conveyor("validate", "--json").json()
    assert len(document["problems"]) == 100
    assert (document["count"], document["omitted"], document["complete"]) == (150, 50, True)


def test_a_fifo_or_a_device_is_refused_at_once(repo: Repo) -> None:
    os.mkfifo(repo.path / "pipe.yml")
    result = repo.conveyor("validate", "-f", "pipe.yml", timeout=5)
    assert result.code == 2
    assert "pipe.yml is a FIFO (named pipe), not a regular file" in result.err
    result = repo.conveyor("validate", "-f", "/dev/zero", timeout=5)
    assert result.code == 2
    assert "/dev/zero is a character device, not a regular file" in result.err


def test_plan_refuses_a_committed_directory_or_link_and_takes_any_file_name(repo: Repo) -> None:
    good = "pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: x}\n"
    repo.write("ci/conveyor.yml", good)
    repo.write("good.yml", good)
    os.symlink("good.yml", repo.path / "link.yml")
    (repo.path / os.fsdecode(b"\xfe.yml")).write_text(good)
    repo.commit()
    result = repo.conveyor("plan", "-f", "ci")
    assert result.code == 2
    assert result.err.startswith("ci:1:1: ci is a directory in commit ")
    result = repo.conveyor("plan", "-f", "link.yml")
    assert result.code == 2
    assert "link.yml is a symbolic link in commit " in result.err
    result = repo.conveyor("validate", "-f", "link.yml")  # as run and plan would
    assert result.code == 2
    assert "is a symbolic link" in result.err
    for command in ("plan", "validate"):
        result = repo.conveyor(command, "-f", os.fsdecode(b"\xfe.yml"))
        assert result.code == 0, result.err


@pytest.mark.parametrize("folder", ["true", "sp ace ünï 日本", "x" * 80, "1.5"])
def test_init_writes_a_pipeline_that_validates_whatever_the_folder_name(
    tmp_path: Path, folder: str
) -> None:
    repo = Repo(tmp_path / folder)
    assert repo.conveyor("init").code == 0
    result = repo.conveyor("validate")
    assert result.code == 0, result.err


def test_init_refuses_unusable_paths_and_empty_options_are_usage_errors(repo: Repo) -> None:
    (repo.path / "dir").mkdir()
    for args in (
        ("init", "-f", "no/such/x.yml"),
        ("init", "-f", "dir", "--force"),
        ("init", "-f", ""),
        ("init", "-f", "../outside.yml"),
        ("init", "-f", "/dev/null", "--force"),
        ("runs", "list", "--home", ""),
        ("plan", "-r", ""),
        ("run", "--as", ""),
    ):
        result = repo.conveyor(*args)
        assert result.code == 2, (args, result.err)
        assert "internal error" not in result.err
    assert not (repo.path / ".gitignore").exists()
    written = repo.conveyor("init", "-f", "ci/conveyor.yml")
    assert written.code == 2  # the folder does not exist
    (repo.path / "ci").mkdir()
    written = repo.conveyor("init", "-f", "ci/conveyor.yml")
    assert written.code == 0 and "conveyor validate -f ci/conveyor.yml" in written.out


def test_odd_file_and_revision_arguments_get_clear_errors(repo: Repo) -> None:
    """What `git rev-parse` echoes back (a '^HEAD', a path with '*', the root tree) is not read
    as an object id; an empty -f is a usage error."""
    repo.write("conveyor.yml", "pipeline: p\nstages:\n  - name: s\n    jobs:\n      a: {run: x}\n")
    repo.commit()
    for name in (".", "./"):
        result = repo.conveyor("plan", "-f", name)
        assert result.code == 2
        assert "the repository's root is a directory, not a pipeline file" in result.err
    for command in ("plan", "validate", "run", "init"):
        result = repo.conveyor(command, "-f", "")
        assert result.code == 2 and "must not be empty" in result.err
    result = repo.conveyor("plan", "--json", "-f", "conveyor*.yml")
    assert result.code == 2
    assert "is not in the committed revision" in result.json()["problems"][0]["message"]
    for revision in ("^HEAD", "*"):
        result = repo.conveyor("plan", "-r", revision)
        assert result.code == 2 and "is not a commit of this repository" in result.err
        assert "git cat-file" not in result.err
    result = repo.conveyor("init", "-f", ".git/conveyor.yml")
    assert result.code == 2 and "inside git's own folder" in result.err
    os.symlink(".git", repo.path / "gl")
    result = repo.conveyor("init", "-f", "gl/conveyor.yml")
    assert result.code == 2 and "inside git's own folder" in result.err
    assert not (repo.path / ".git" / "conveyor.yml").exists()
