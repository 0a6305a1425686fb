"""Validation of pipeline files into specs, and reading them from disk."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from conveyor.errors import SpecError, SpecProblem
from conveyor.spec import load_pipeline_file, parse_pipeline
from conveyor.spec.models import DEFAULT_TIMEOUT_S, JobSpec, Location, PipelineSpec, StageSpec
from conveyor.spec.schema import did_you_mean

GOOD = """\
pipeline: shop
env: {APP_ENV: ci}
secrets: [DEPLOY_TOKEN]
stages:
  - name: commit
    jobs:
      build:
        run: |
          make dist
      unit:
        needs: [build]
        run: pytest -q --junitxml=reports/unit.xml
        reports: {junit: "reports/*.xml"}
        timeout: 10m
        retries: 1
        env: {PYTHONHASHSEED: "0"}
        inputs: ["src/**", "tests/**"]
        cache: true
        allow_failure: false
  - name: acceptance
    jobs:
      smoke: {run: ./scripts/smoke.sh}
"""


def parse(text: str) -> PipelineSpec:
    return parse_pipeline(textwrap.dedent(text).encode())


def problems_of(text: str) -> list[SpecProblem]:
    with pytest.raises(SpecError) as info:
        parse(text)
    return info.value.problems


def found(text: str) -> list[tuple[int, int, str]]:
    return [(p.line, p.column, p.message) for p in problems_of(text)]


def only_problem(text: str) -> SpecProblem:
    problems = problems_of(text)
    assert len(problems) == 1, [p.render() for p in problems]
    return problems[0]


def pipeline_with_jobs(jobs: str, stage: str = "commit") -> str:
    """A one-stage pipeline; ``jobs`` is indented under ``jobs:`` (job keys at line 5)."""
    body = textwrap.indent(textwrap.dedent(jobs), " " * 6)
    return f"pipeline: shop\nstages:\n  - name: {stage}\n    jobs:\n{body}"


# -- the good file ---------------------------------------------------------------------------


def test_good_file_parses_to_the_expected_models() -> None:
    spec = parse_pipeline(GOOD.encode())
    assert spec == PipelineSpec(
        name="shop",
        stages=(
            StageSpec(
                name="commit",
                jobs=(
                    JobSpec(
                        name="build", stage="commit", run="make dist\n", location=Location(7, 7)
                    ),
                    JobSpec(
                        name="unit",
                        stage="commit",
                        run="pytest -q --junitxml=reports/unit.xml",
                        needs=("build",),
                        env={"PYTHONHASHSEED": "0"},
                        timeout_s=600.0,
                        retries=1,
                        junit=("reports/*.xml",),
                        inputs=("src/**", "tests/**"),
                        cache=True,
                        allow_failure=False,
                        location=Location(10, 7),
                    ),
                ),
                location=Location(5, 5),
            ),
            StageSpec(
                name="acceptance",
                jobs=(
                    JobSpec(
                        name="smoke",
                        stage="acceptance",
                        run="./scripts/smoke.sh",
                        location=Location(22, 7),
                    ),
                ),
                location=Location(20, 5),
            ),
        ),
        env={"APP_ENV": "ci"},
        secrets=("DEPLOY_TOKEN",),
        source="conveyor.yml",
        digest="sha256:" + hashlib.sha256(GOOD.encode()).hexdigest(),
    )
    assert type(spec.job("unit").env) is dict
    assert spec.job("build").timeout_s == DEFAULT_TIMEOUT_S


def test_values_are_converted_to_text_and_lists() -> None:
    spec = parse(
        """\
        pipeline: 2024
        env: {DEBUG: True, VERSION: 1.10, COUNT: 3, NAME: x}
        secrets: TOKEN
        stages:
          - name: 1
            jobs:
              "7":
                run: echo
                needs: []
                env:
                inputs: "src/**"
                reports: {junit: ["a.xml", "b/*.xml"]}
                timeout: 90
                cache: false
                allow_failure: true
              lint: {run: x, needs: "7", inputs: []}
        """
    )
    assert spec.name == "2024"
    assert spec.env == {"DEBUG": "true", "VERSION": "1.10", "COUNT": "3", "NAME": "x"}
    assert spec.secrets == ("TOKEN",)
    job = spec.job("7")
    assert (job.stage, job.env, job.inputs, job.junit) == (
        "1",
        {},
        ("src/**",),
        ("a.xml", "b/*.xml"),
    )
    assert (job.timeout_s, job.cache, job.allow_failure) == (90.0, False, True)
    assert spec.job("lint").needs == ("7",)
    assert spec.job("lint").inputs == ()


def test_parse_pipeline_names_the_source() -> None:
    spec = parse_pipeline(GOOD.encode(), source="ci/pipeline.yml")
    assert spec.source == "ci/pipeline.yml"
    with pytest.raises(SpecError) as info:
        parse_pipeline(b"pipeline: [", source="ci/pipeline.yml")
    assert info.value.problems[0].render().startswith("ci/pipeline.yml:")


# -- every problem at once -------------------------------------------------------------------


def test_all_problems_of_a_file_are_reported_at_once() -> None:
    text = """\
    pipeline: my shop
    stagez: []
    stages:
      - name: commit
        jobs:
          build:
            script: make
          unit:
            needs: [biuld]
            run: pytest
            retries: one
            cache: yes
    """
    assert found(text) == [
        (1, 11, "invalid pipeline name 'my shop'"),
        (2, 1, "unknown key 'stagez' at the top level"),
        (7, 9, "unknown key 'script' in job 'build'"),
        (7, 9, "missing required key 'run' in job 'build'"),
        (9, 17, "job 'unit' needs 'biuld', which is not a job"),
        (11, 18, "'retries' must be an integer, got string 'one'"),
        (12, 16, "'cache' must be true or false, got string 'yes'"),
    ]
    rendered = SpecError(problems_of(text)).render()
    assert "conveyor.yml:9:17: job 'unit' needs 'biuld', which is not a job\n" in rendered
    assert "  hint: did you mean 'build'?" in rendered
    assert rendered.endswith("7 problems in the pipeline file")


def test_many_problems_are_listed_up_to_100_and_all_counted() -> None:
    jobs = "".join(f"j{index}: {{run: x, retries: -1}}\n" for index in range(150))
    with pytest.raises(SpecError) as info:
        parse(pipeline_with_jobs(jobs))
    error = info.value
    assert len(error.problems) == 100
    assert all("'retries' must be between 0 and 10" in p.message for p in error.problems)
    assert (error.count, error.omitted, error.complete) == (150, 50, True)
    assert error.render().endswith(
        "... and 50 more problems from line 105 on, not shown\n150 problems in the pipeline file"
    )


# -- the top level ---------------------------------------------------------------------------


def test_top_level_must_be_a_mapping() -> None:
    problem = only_problem("- a\n- b\n")
    assert (problem.line, problem.column) == (1, 1)
    assert problem.message.startswith("the pipeline file must be a mapping")
    assert problem.message.endswith("got a list")
    assert "got string 'hello'" in only_problem("hello\n").message


def test_missing_required_top_level_keys() -> None:
    assert found("env: {A: b}\n") == [
        (1, 1, "missing required key 'pipeline' (the pipeline's name)"),
        (1, 1, "missing required key 'stages'"),
    ]


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    problem = only_problem(GOOD + "colour: blue\n")
    assert problem.message == "unknown key 'colour' at the top level"
    assert problem.hint == ("known keys: pipeline, env, secrets, artifacts, environments, stages")


def test_top_level_jobs_get_a_pointer_to_stages() -> None:
    problem = only_problem(GOOD + "jobs: {}\n")
    assert problem.hint is not None and problem.hint.startswith("jobs belong to a stage")


def test_no_stages() -> None:
    assert found("pipeline: shop\nstages: []\n") == [(2, 9, "the pipeline has no stages")]
    assert found("pipeline: shop\nstages:\n") == [(2, 1, "the pipeline has no stages")]
    assert found("pipeline: shop\nstages: {a: 1}\n") == [
        (2, 9, "'stages' must be a list of stages, got a mapping")
    ]


# -- env and secrets -------------------------------------------------------------------------


def test_env_problems() -> None:
    text = 'pipeline: shop\nenv: {1A: x, B-C: y, N: ~, L: [1], M: {a: 1}, OK: ""}\nstages: []\n'
    assert found(text)[:5] == [
        (2, 7, "invalid environment variable name '1A' in env"),
        (2, 14, "invalid environment variable name 'B-C' in env"),
        (2, 25, "env variable 'N' has no value"),
        (2, 31, "env variable 'L' must be a string, got a list"),
        (2, 39, "env variable 'M' must be a string, got a mapping"),
    ]
    assert found("pipeline: shop\nenv: [A]\nstages: []\n")[0] == (
        2,
        6,
        "'env' must be a mapping of variable names to values, got a list",
    )


def test_secret_problems() -> None:
    text = """\
    pipeline: shop
    secrets: [TOKEN, TOKEN, bad-name, 3]
    env: {TOKEN: x}
    stages:
      - name: s
        jobs:
          a:
            run: x
            env: {TOKEN: y}
    """
    problems = problems_of(text)
    assert [(p.line, p.column, p.message) for p in problems] == [
        (2, 18, "secret 'TOKEN' is listed twice (first at line 2)"),
        (2, 25, "invalid secret name 'bad-name'"),
        (2, 35, "invalid secret name '3'"),
        (3, 7, "'TOKEN' is a secret and cannot also be set in env"),
        (9, 15, "'TOKEN' is a secret and cannot also be set in env"),
    ]
    assert problems[3].hint is not None
    assert "secrets come from the environment of `conveyor run`" in problems[3].hint


def test_variables_conveyor_sets_are_reserved() -> None:
    text = """\
    pipeline: shop
    secrets: [CI, TOKEN, CONVEYOR_RUN_ID]
    env: {CONVEYOR: x, CONVEYOR_JOB: mine, CONVEYORS: ok, ci: ok}
    stages:
      - name: s
        jobs:
          a:
            run: x
            env: {CONVEYOR_WORKSPACE: /tmp, CIA: ok}
    """
    problems = problems_of(text)
    assert [(p.line, p.column, p.message) for p in problems] == [
        (2, 11, "'CI' is set by Conveyor and cannot be a secret"),
        (2, 22, "'CONVEYOR_RUN_ID' is set by Conveyor and cannot be a secret"),
        (3, 7, "'CONVEYOR' is set by Conveyor and cannot be set in env"),
        (3, 20, "'CONVEYOR_JOB' is set by Conveyor and cannot be set in env"),
        (9, 15, "'CONVEYOR_WORKSPACE' is set by Conveyor and cannot be set in env"),
    ]
    assert all("CONVEYOR_*" in (p.hint or "") for p in problems)


# -- stages ----------------------------------------------------------------------------------


def test_stage_problems() -> None:
    text = """\
    pipeline: shop
    stages:
      - name: commit
        jobs: {a: {run: x}}
      - name: commit
        jobs: {b: {run: x}}
      - name: empty
        jobs: {}
      - name: nulljobs
        jobs:
      - name: nojobs
      - jobs: {c: {run: x}}
      - name: bad name
        jobs: {d: {run: x}}
      - build
      - name: listjobs
        jobs: [e]
      - name: x
        jobz: {}
    """
    assert found(text) == [
        (5, 5, "duplicate stage name 'commit' (first at line 3)"),
        (8, 5, "stage 'empty' has no jobs"),
        (10, 5, "stage 'nulljobs' has no jobs"),
        (11, 5, "stage 'nojobs' has no jobs"),
        (12, 5, "missing required key 'name' in a stage"),
        (13, 11, "invalid stage name 'bad name'"),
        (15, 5, "each stage must be a mapping with 'name' and 'jobs', got string 'build'"),
        (17, 11, "'jobs' must be a mapping of job names to jobs, got a list"),
        (18, 5, "stage 'x' has no jobs"),
        (19, 5, "unknown key 'jobz' in a stage"),
    ]


# -- jobs ------------------------------------------------------------------------------------


def test_job_unknown_key_suggests_the_closest() -> None:
    problem = only_problem(pipeline_with_jobs("a: {run: x, timout: 5m}\n"))
    assert (problem.line, problem.column) == (5, 19)
    assert problem.message == "unknown key 'timout' in job 'a'"
    assert problem.hint == "did you mean 'timeout'?"


def test_job_unknown_key_from_another_ci_system() -> None:
    problems = problems_of(pipeline_with_jobs("a: {script: make}\n"))
    assert [(p.column, p.message, p.hint) for p in problems] == [
        (10, "missing required key 'run' in job 'a'", "'run' is the shell script of the job"),
        (11, "unknown key 'script' in job 'a'", "did you mean 'run'?"),
    ]


def test_a_word_of_another_tool_beats_a_near_spelling() -> None:
    """'steps' is spelled close to 'gates' but means 'jobs' (GitHub Actions' word)."""
    problems = problems_of("pipeline: p\nstages:\n  - name: commit\n    steps: {a: {run: x}}\n")
    hints = {p.message: p.hint for p in problems}
    assert hints["unknown key 'steps' in a stage"] == "did you mean 'jobs'?"


def test_job_unknown_key_lists_the_known_keys() -> None:
    problem = only_problem(pipeline_with_jobs("a: {run: x, zzz: 1}\n"))
    assert problem.hint == (
        "known keys: run, needs, reports, timeout, retries, env, inputs, cache, allow_failure,"
        " outputs"
    )


def test_job_missing_run_is_at_the_job_mapping() -> None:
    assert found(pipeline_with_jobs("a:\n  needs: []\n")) == [
        (6, 9, "missing required key 'run' in job 'a'")
    ]


def test_job_must_be_a_mapping() -> None:
    problem = only_problem(pipeline_with_jobs("a: make dist\n"))
    assert (problem.line, problem.column) == (5, 10)
    assert (
        problem.message == "job 'a' must be a mapping with at least 'run', got string 'make dist'"
    )
    assert problem.hint == "write a: {run: make dist}"
    problem = only_problem(pipeline_with_jobs("a:\n"))
    assert (problem.line, problem.column, problem.message) == (
        5,
        7,
        "job 'a' must be a mapping with at least 'run', got nothing (null)",
    )


def test_invalid_job_names() -> None:
    text = pipeline_with_jobs("-bad: {run: x}\n" + "x" * 65 + ": {run: x}\ntrue: {run: x}\n")
    assert [(line, message) for line, _, message in found(text)] == [
        (5, "invalid job name '-bad'"),
        (6, "invalid job name '" + "x" * 65 + "'"),
        (7, "a job name must be a string, got boolean true"),
    ]


@pytest.mark.parametrize(
    ("value", "message", "hint"),
    [
        ("one", "'retries' must be an integer, got string 'one'", None),
        ('"1"', "'retries' must be an integer, got string '1'", "remove the quotes"),
        ("true", "'retries' must be an integer, got boolean true", None),
        ("1.5", "'retries' must be an integer, got number 1.5", None),
        ("11", "'retries' must be between 0 and 10, got 11", None),
        ("-1", "'retries' must be between 0 and 10, got -1", None),
    ],
)
def test_bad_retries(value: str, message: str, hint: str | None) -> None:
    problem = only_problem(pipeline_with_jobs(f"a:\n  run: x\n  retries: {value}\n"))
    assert (problem.line, problem.column, problem.message, problem.hint) == (7, 18, message, hint)


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("yes", "write true or false (YAML 1.2)"),
        ("On", "write true or false (YAML 1.2)"),
        ("n", "write true or false (YAML 1.2)"),
        ("'true'", "remove the quotes"),
        ("'yes'", None),
        ("1", None),
    ],
)
def test_bad_booleans(value: str, hint: str | None) -> None:
    problem = only_problem(pipeline_with_jobs(f"a:\n  run: x\n  cache: {value}\n"))
    assert (problem.line, problem.column) == (7, 16)
    assert problem.message.startswith("'cache' must be true or false, got ")
    assert problem.hint == hint


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ten", "'timeout': expected a duration such as 90s, 10m or 1h30m, got 'ten'"),
        ("10x", "'timeout': expected a duration such as 90s, 10m or 1h30m, got '10x'"),
        ("0", "'timeout': a duration must be longer than zero, got 0"),
        ("-5", "'timeout': a duration cannot be negative, got -5"),
        ("8d", "'timeout': a duration can be at most 7 days (7d), got '8d'"),
        ("true", "'timeout' must be a duration such as 90s, 10m or 1h30m, got boolean true"),
        ("[1]", "'timeout' must be a duration such as 90s, 10m or 1h30m, got a list"),
    ],
)
def test_bad_timeouts(value: str, message: str) -> None:
    problem = only_problem(pipeline_with_jobs(f"a:\n  run: x\n  timeout: {value}\n"))
    assert (problem.line, problem.column, problem.message) == (7, 18, message)


def test_bad_run_reports_and_inputs() -> None:
    text = pipeline_with_jobs(
        """\
        a:
          run: "  "
          reports: {junit: 5, xml: x}
          inputs: [1, "ok"]
        b:
          run: [make, make test]
          reports: junit.xml
        c:
          run: 42
        """
    )
    assert found(text) == [
        (6, 14, "'run' of job 'a' is empty"),
        (7, 26, "'junit' must be a string or a list of strings, got integer 5"),
        (7, 29, "unknown key 'xml' in the reports of job 'a'"),
        (8, 18, "each item of 'inputs' must be a string, got integer 1"),
        (10, 14, "'run' must be a string (a shell script), got a list"),
        (
            11,
            18,
            "'reports' must be a mapping such as {junit: \"reports/*.xml\"}, "
            "got string 'junit.xml'",
        ),
        (13, 14, "'run' must be a string, got integer 42"),
    ]


# -- needs and cycles ------------------------------------------------------------------------


def test_needs_problems() -> None:
    text = """\
    pipeline: shop
    stages:
      - name: commit
        jobs:
          build: {run: x}
          unit:
            run: x
            needs: [biuld, unit, build, build, smoke, {a: 1}]
      - name: acceptance
        jobs:
          smoke: {run: x, needs: [unit]}
    """
    problems = problems_of(text)
    assert [(p.line, p.column, p.message) for p in problems] == [
        (8, 17, "job 'unit' needs 'biuld', which is not a job"),
        (8, 24, "job 'unit' needs itself"),
        (8, 37, "'build' is listed twice in the needs of job 'unit'"),
        (
            8,
            44,
            "job 'smoke' is in stage 'acceptance'; needs only links jobs of the same stage: "
            "earlier stages always finish first",
        ),
        (8, 51, "each item of 'needs' must be a name, got a mapping"),
        (
            11,
            31,
            "job 'unit' is in stage 'commit'; needs only links jobs of the same stage: "
            "earlier stages always finish first",
        ),
    ]
    assert problems[0].hint == "did you mean 'build'? (jobs of stage 'commit': 'build')"
    assert problems[5].hint == (
        "remove it: stage 'commit' always finishes before stage 'acceptance' starts"
    )


def test_scripts_and_variables_too_long_for_a_process_are_refused() -> None:
    limit = 100 * 1024
    ok = pipeline_with_jobs(f"a: {{run: {'x' * limit}, env: {{A: {'y' * limit}}}}}\n")
    assert parse(ok).job("a").run == "x" * limit
    text = pipeline_with_jobs(f"a: {{run: {'x' * 150_000}, env: {{A: {'é' * 60_000}}}}}\n")
    assert [(p.line, p.column, p.message) for p in problems_of(text)] == [
        (
            5,
            16,
            "'run' of job 'a' is too long: 150,000 bytes, the limit is 102,400 bytes (100 KiB)",
        ),
        (
            5,
            150_027,
            "env variable 'A' is too long: 120,000 bytes, the limit is 102,400 bytes (100 KiB)",
        ),
    ]


def test_long_values_are_cut_in_messages() -> None:
    name = "b" * 400_000
    problem = only_problem(pipeline_with_jobs(f"a: {{run: x, needs: [{name}]}}\n"))
    assert problem.message == f"job 'a' needs '{'b' * 77}...', which is not a job"
    problem = only_problem(pipeline_with_jobs(f'"{"k " * 100}": {{run: x}}\n'))
    assert problem.message == f"invalid job name '{('k ' * 39)[:77]}...'"
    assert len(SpecProblem("f", 1, 1, "x" * 5000).message) == 500


def test_unknown_need_without_a_close_match_lists_the_stage_jobs() -> None:
    problems = problems_of(pipeline_with_jobs("a: {run: x}\nb: {run: x, needs: zzz}\n"))
    assert problems[0].hint == "jobs of stage 'commit': 'a'"


def test_dependency_cycle_is_reported_at_its_first_job() -> None:
    text = pipeline_with_jobs(
        """\
        start: {run: x}
        c: {run: x, needs: [b]}
        a: {run: x, needs: [c, start]}
        b: {run: x, needs: a}
        """
    )
    assert found(text) == [(6, 7, "dependency cycle: c -> b -> a -> c")]


def test_every_independent_cycle_of_a_stage_is_reported() -> None:
    text = pipeline_with_jobs(
        """\
        a: {run: x, needs: [b]}
        b: {run: x, needs: [a]}
        e: {run: x, needs: [f]}
        f: {run: x, needs: e}
        """
    )
    assert [message for _, _, message in found(text)] == [
        "dependency cycle: a -> b -> a",
        "dependency cycle: e -> f -> e",
    ]


def test_two_job_cycle() -> None:
    text = pipeline_with_jobs("a: {run: x, needs: b}\nb: {run: x, needs: a}\n")
    assert found(text) == [(5, 7, "dependency cycle: a -> b -> a")]


def test_job_names_are_unique_across_the_pipeline() -> None:
    text = """\
    pipeline: shop
    stages:
      - name: commit
        jobs:
          build: {run: x}
      - name: acceptance
        jobs:
          build: {run: y}
    """
    problem = only_problem(text)
    assert (problem.line, problem.column) == (8, 7)
    assert problem.message == (
        "duplicate job name 'build': already defined in stage 'commit' at line 5"
    )


def test_a_value_repeated_by_aliases_has_its_problems_listed_once() -> None:
    text = """\
    pipeline: shop
    stages:
      - &commit
        name: commit
        jobs:
          a: &job {run: x, timeout: bad}
          b: *job
          c: *job
      - *commit
    """
    assert found(text) == [
        (3, 5, "stage 'commit' is listed twice: an alias repeats it"),
        (6, 33, "'timeout': expected a duration such as 90s, 10m or 1h30m, got 'bad'"),
    ]


def test_jobs_repeated_by_an_alias_in_another_stage() -> None:
    text = """\
    pipeline: shop
    artifacts: {app: {path: app}}
    stages:
      - name: one
        jobs: &jobs {build: {run: x, outputs: [app]}}
      - name: two
        jobs: *jobs
    """
    assert found(text) == [
        (5, 18, "job 'build' is in stages 'one' and 'two': an alias repeats the jobs of a stage")
    ]


def test_loader_problems_come_through() -> None:
    problem = only_problem(GOOD + "pipeline: again\n")
    assert problem.message == "duplicate key 'pipeline' (first defined at line 1)"


# -- files -----------------------------------------------------------------------------------


def test_load_pipeline_file(tmp_path: Path) -> None:
    path = tmp_path / "conveyor.yml"
    path.write_bytes(GOOD.encode())
    spec = load_pipeline_file(path, display_name="conveyor.yml")
    assert spec == parse_pipeline(GOOD.encode())
    assert load_pipeline_file(path).source == str(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_pipeline_file(tmp_path / "nope.yml", display_name="nope.yml")
    (problem,) = info.value.problems
    assert problem == SpecProblem(
        "nope.yml",
        1,
        1,
        f"no pipeline file at {tmp_path / 'nope.yml'}",
        hint="run `conveyor init` to write a starter conveyor.yml, or pass -f PATH",
    )


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_pipeline_file(tmp_path)
    assert "is a directory" in info.value.problems[0].message


def test_too_large_file_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.yml"
    path.write_bytes(b"a: " + b"x" * 2_000_000)
    with pytest.raises(SpecError) as info:
        load_pipeline_file(path, display_name="big.yml")
    assert "2,000,003 bytes" in info.value.problems[0].message


def test_the_cached_form_round_trips_through_json_and_leaves_defaults_out() -> None:
    import json

    text = textwrap.dedent(
        """\
        pipeline: shop
        env: {APP_ENV: ci}
        secrets: [TOKEN]
        stages:
          - name: commit
            jobs:
              build: {run: make}
              unit:
                needs: [build]
                run: pytest
                reports: {junit: "reports/*.xml", coverage: cov.xml, metrics: m.json}
                timeout: 10m
                retries: 2
                env: {SEED: "0"}
                inputs: ["src/**"]
                cache: false
                allow_failure: true
        """
    )
    spec = parse_pipeline(text.encode(), "conveyor.yml")
    cached = json.loads(json.dumps(spec.to_dict()))
    assert PipelineSpec.from_dict(cached) == spec
    build, unit = cached["stages"][0]["jobs"]
    assert set(build) == {"name", "stage", "run", "location"}  # the rest are defaults
    assert unit["retries"] == 2 and unit["inputs"] == ["src/**"] and unit["cache"] is False


def test_the_cached_form_keeps_a_value_of_another_type_than_the_default() -> None:
    import json

    job = JobSpec("j", "s", "true", timeout_s=3600, retries=0)  # an int, not the float default
    spec = PipelineSpec("p", (StageSpec("s", (job,)),))
    back = PipelineSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert type(back.stages[0].jobs[0].timeout_s) is int
    assert back == spec


def test_jobs_of_a_stage_without_a_valid_name_are_still_checked() -> None:
    text = """\
pipeline: x
stages:
  - name: "t t"
    jobs:
      h: {run: x, needs: [zz]}
      i: {run: x, needs: [i]}
  - jobs:
      k: {run: x, needs: [nope]}
"""
    assert found(text) == [
        (3, 11, "invalid stage name 't t'"),
        (5, 27, "job 'h' needs 'zz', which is not a job"),
        (6, 27, "job 'i' needs itself"),
        (7, 5, "missing required key 'name' in a stage"),
        (8, 27, "job 'k' needs 'nope', which is not a job"),
    ]


def test_an_empty_value_is_reported_where_its_key_is() -> None:
    assert found("pipeline:\nstages:\n  - name: s\n    jobs:\n      j: {run: x}\n") == [
        (1, 10, "a pipeline name must be a string, got nothing (null)")
    ]
    text = (
        "pipeline: x\nstages:\n  - name: s\n    jobs:\n      j:\n"
        "        run: x\n        retries:\n# c\n"
    )
    assert found(text) == [(7, 17, "'retries' must be an integer, got nothing (null)")]


def test_a_duplicate_key_does_not_hide_the_other_problems() -> None:
    text = pipeline_with_jobs(
        """\
        j: {run: a, timeout: 5 min, needs: [nope]}
        k: {run: a, run: b}
        """
    )
    messages = [message for _, _, message in found(text)]
    assert len(messages) == 3
    assert messages[0].startswith("'timeout': expected a duration")
    assert messages[1] == "job 'j' needs 'nope', which is not a job"
    assert messages[2].startswith("duplicate key 'run'")


def test_an_invalid_entry_causes_no_false_problems_elsewhere() -> None:
    text = """\
pipeline: x
artifacts:
  app: {path: a.tgz, kind: image}
  my-app: {path: /abs, kind: weird}
  my_app: {path: b.tgz}
stages:
  - name: s
    jobs:
      b: {run: x, outputs: [app]}
      "c d": {run: x}
      e: {run: x, needs: ["c d"]}
"""
    assert [(line, message) for line, _, message in found(text)] == [
        (3, "unknown artifact kind 'image'"),
        (4, "artifact path '/abs' is not relative to the workspace"),
        (4, "unknown artifact kind 'weird'"),
        (
            5,
            "artifacts 'my-app' and 'my_app' would both be given to jobs as"
            " $CONVEYOR_ARTIFACT_MY_APP",
        ),
        (10, "invalid job name 'c d'"),
    ]


def test_did_you_mean_prefers_the_fewest_typos() -> None:
    assert did_you_mean("jbo1", ["job10", "job1", "jab1x"]) == "did you mean 'job1'?"
    assert did_you_mean("tset", ["test", "tests"]) == "did you mean 'test'?"
    assert did_you_mean("zzzz", ["test"]) is None


def test_many_unknown_needs_keep_each_hint_short() -> None:
    """A thousand unknown needs among a thousand jobs: each hint lists a few jobs, not all
    (the output grew with the square of the jobs), and suggestions stop at a budget."""
    jobs = "".join(f"j{i:04d}: {{run: x, needs: [k{i:04d}]}}\n" for i in range(1000))
    problems = problems_of(pipeline_with_jobs(jobs))
    assert len(problems) == 100  # the first hundred are kept, then a count
    assert all(p.hint is not None and len(p.hint) < 400 for p in problems)
    assert problems[0].hint is not None and problems[0].hint.endswith("... (979 more))")
    assert problems[-1].hint is not None and "did you mean" not in problems[-1].hint


def test_a_job_whose_variables_together_are_too_large_to_start_is_a_problem() -> None:
    """Each value under its own limit (aliases of one long value), but not all together."""
    value = "x" * 100_000
    names = "".join(f"  V{i}: *long\n" for i in range(1, 12))
    text = (
        f"pipeline: p\nenv:\n  V0: &long {value}\n{names}"
        "stages:\n  - name: s\n    jobs:\n      a: {run: 'true'}\n"
    )
    problem = only_problem(text)
    assert problem.message.startswith("job 'a' is too large to start: its script and variables")
    assert (problem.line, problem.column) == (18, 7)  # the job's name
    only_env = text.replace(names, "")
    assert parse_pipeline(only_env.encode(), "conveyor.yml").stages[0].jobs[0].name == "a"


def test_a_number_too_large_to_read_is_called_so() -> None:
    problem = only_problem(pipeline_with_jobs(f"a: {{run: x, retries: {'9' * 5000}}}\n"))
    assert problem.message == (
        "'retries' must be an integer, got a number too large to read (5,000 digits)"
    )


def test_signs_alone_are_not_a_large_number() -> None:
    problem = only_problem(pipeline_with_jobs("a: {run: x, retries: --5}\n"))
    assert problem.message == "'retries' must be an integer, got string '--5'"
