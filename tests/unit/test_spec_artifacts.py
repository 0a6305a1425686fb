"""``artifacts`` and job ``outputs`` in the pipeline file."""

from __future__ import annotations

import pytest

from conveyor.errors import SpecError, SpecProblem
from conveyor.spec import parse_pipeline
from conveyor.spec.models import ArtifactSpec, Location, PipelineSpec

HEAD = "pipeline: shop\n"


def parse(text: str) -> PipelineSpec:
    return parse_pipeline(text.encode(), "conveyor.yml")


def problems_of(text: str) -> list[tuple[int, int, str, str | None]]:
    with pytest.raises(SpecError) as info:
        parse(text)
    return [(p.line, p.column, p.message, p.hint) for p in info.value.problems]


def with_artifacts(artifacts: str, jobs: str = "build: {run: make, outputs: [app]}") -> str:
    return (
        HEAD
        + "artifacts:\n"
        + "".join(f"  {line}\n" for line in artifacts.splitlines())
        + "stages:\n  - name: commit\n    jobs:\n"
        + "".join(f"      {line}\n" for line in jobs.splitlines())
    )


def test_artifacts_and_outputs_parse() -> None:
    spec = parse(
        HEAD + "artifacts:\n"
        "  app: {path: dist/app.tar.gz}\n"
        "  site: {path: build/site/, kind: dir}\n"
        "  docs-html: {path: ./docs/html, kind: dir}\n"
        "stages:\n"
        "  - name: commit\n"
        "    jobs:\n"
        "      build: {run: make dist, outputs: [app, site]}\n"
        "      docs: {run: make docs, outputs: docs-html}\n"
        "  - name: acceptance\n"
        "    jobs:\n"
        '      e2e: {run: ./e2e.sh "$CONVEYOR_ARTIFACT_APP"}\n'
    )
    assert spec.artifacts == (
        ArtifactSpec("app", "dist/app.tar.gz", "file", Location(3, 3)),
        ArtifactSpec("site", "build/site", "dir", Location(4, 3)),
        ArtifactSpec("docs-html", "docs/html", "dir", Location(5, 3)),
    )
    assert spec.job("build").outputs == ("app", "site")
    assert spec.job("docs").outputs == ("docs-html",)
    assert spec.job("e2e").outputs == ()
    assert spec.artifact("docs-html").env_name == "CONVEYOR_ARTIFACT_DOCS_HTML"
    assert spec.producer("site") is spec.job("build")
    assert PipelineSpec.from_dict(spec.to_dict()) == spec


def test_output_of_an_undeclared_artifact_suggests_the_declared_one() -> None:
    [(line, column, message, hint)] = problems_of(
        with_artifacts("app: {path: dist/app}", "build: {run: make, outputs: [ap]}")
    )
    assert (line, column) == (7, 36)
    assert message == "job 'build' outputs 'ap', which is not a declared artifact"
    assert hint is not None and "did you mean 'app'?" in hint


def test_output_without_any_artifacts_explains_how_to_declare_one() -> None:
    [(_, _, message, hint)] = problems_of(
        HEAD + "stages:\n  - name: s\n    jobs:\n      b: {run: make, outputs: [app]}\n"
    )
    assert "not a declared artifact" in message
    assert hint is not None and "artifacts:\n  app: {path: dist/app.tar.gz}" in hint


def test_an_artifact_has_one_producer() -> None:
    [(line, _, message, hint)] = problems_of(
        with_artifacts(
            "app: {path: dist/app}",
            "build: {run: make, outputs: [app]}\nagain: {run: make, outputs: [app]}",
        )
    )
    assert line == 8
    assert message == "artifact 'app' is already an output of job 'build' (line 7)"
    assert hint is not None and "built once" in hint


@pytest.mark.parametrize(
    ("artifact", "expected"),
    [
        ("app: {path: /etc/passwd}", "artifact path '/etc/passwd' is not relative"),
        ("app: {path: ../up/app}", "must name one file or directory in the workspace"),
        ("app: {path: 'dist/*.tar.gz'}", "must name one file or directory in the workspace"),
        ("app: {path: .}", "needs a path inside the workspace"),
        ("app: {path: dist/app, kind: image}", "unknown artifact kind 'image'"),
        ("app: {path: dist/, kind: file}", "is a file but its path 'dist/' ends with '/'"),
        ("app: dist/app", "artifact 'app' must be a mapping with 'path'"),
        ("app: {kind: file}", "missing required key 'path' in artifact 'app'"),
        ("app: {path: dist/app, size: 3}", "unknown key 'size' in artifact 'app'"),
        ("1app: {path: x}", "invalid artifact name '1app'"),
    ],
)
def test_bad_artifacts_are_explained(artifact: str, expected: str) -> None:
    found = problems_of(with_artifacts(artifact))
    assert any(expected in message for _, _, message, _ in found), found
    assert all(line >= 3 for line, _, _, _ in found)


def test_names_that_map_to_the_same_variable_clash() -> None:
    found = problems_of(
        with_artifacts("my-app: {path: a}\nmy_app: {path: b}", "b: {run: make, outputs: [my-app]}")
    )
    assert found[0][2] == (
        "artifacts 'my-app' and 'my_app' would both be given to jobs as $CONVEYOR_ARTIFACT_MY_APP"
    )


def test_job_key_artifacts_suggests_outputs() -> None:
    found = problems_of(with_artifacts("app: {path: a}", "b: {run: make, artifacts: [app]}"))
    assert found[0][2] == "unknown key 'artifacts' in job 'b'"
    assert found[0][3] == "did you mean 'outputs'?"


def test_problems_render_with_file_line_and_column() -> None:
    with pytest.raises(SpecError) as info:
        parse(with_artifacts("app: {path: /abs}"))
    problem: SpecProblem = info.value.problems[0]
    assert problem.render().startswith("conveyor.yml:3:15: artifact path '/abs'")
