"""``environments`` and deploy stages in the pipeline file."""

from __future__ import annotations

import pytest

from conveyor.errors import SpecError
from conveyor.spec import parse_pipeline
from conveyor.spec.delivery import DeploySpec, TargetSpec
from conveyor.spec.models import PipelineSpec

BASE = """\
pipeline: shop
artifacts:
  app: {path: dist/app.tar.gz}
environments:
  staging:
    target: {type: process, command: "./serve --port $PORT", health: {http: /healthz}}
    port: 8080
    timeout: 45s
  production:
    requires: [acceptance]
    branches: [main, "release/*"]
    target:
      type: command
      deploy: ./ops/deploy.sh
      health: ./ops/health.sh
      rollback: ./ops/rollback.sh
stages:
  - name: commit
    jobs:
      build: {run: make dist, outputs: [app]}
  - name: acceptance
    jobs:
      e2e: {run: ./e2e.sh}
  - name: staging
    deploy: {environment: staging, artifact: app}
"""


def parse(text: str) -> PipelineSpec:
    return parse_pipeline(text.encode(), "conveyor.yml")


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse(text)
    return [p.render() for p in info.value.problems]


def test_environments_and_deploy_stages_parse() -> None:
    spec = parse(BASE)
    staging = spec.environment("staging")
    assert staging.target == TargetSpec(
        "process", command="./serve --port $PORT", health_http="/healthz"
    )
    assert staging.port == 8080 and staging.health_timeout_s == 45.0
    production = spec.environment("production")
    assert production.requires == ("acceptance",)
    assert production.branches == ("main", "release/*")
    assert production.target == TargetSpec(
        "command",
        deploy="./ops/deploy.sh",
        health_command="./ops/health.sh",
        rollback="./ops/rollback.sh",
    )
    stage = spec.stage("staging")
    assert stage.jobs == () and stage.deploy is not None
    assert (stage.deploy.environment, stage.deploy.artifact) == ("staging", "app")
    assert isinstance(stage.deploy, DeploySpec)
    assert PipelineSpec.from_dict(spec.to_dict()) == spec


def test_log_limits_default_and_parse() -> None:
    spec = parse(
        BASE.replace("timeout: 45s", "timeout: 45s\n    logs: {max_size: 10MiB, files: 3}")
    )
    staging = spec.environment("staging")
    assert (staging.log_max_bytes, staging.log_files) == (10 * 1024 * 1024, 3)
    production = spec.environment("production")
    assert (production.log_max_bytes, production.log_files) == (50 * 1024 * 1024, 2)
    assert PipelineSpec.from_dict(spec.to_dict()) == spec


def test_the_only_artifact_is_the_default() -> None:
    spec = parse(
        BASE.replace(
            "deploy: {environment: staging, artifact: app}", "deploy: {environment: staging}"
        )
    )
    assert spec.stage("staging").deploy.artifact == "app"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("environment: staging, artifact: app", "environment: stagin, artifact: app"),
            "deploys to 'stagin', which is not an environment",
        ),
        (
            ("environment: staging, artifact: app", "environment: staging, artifact: ap"),
            "deploys artifact 'ap', which is not declared",
        ),
        (
            ("type: process, command", "type: docker, command"),
            "unknown target type 'docker'\n  hint: known types: process, command",
        ),
        (
            ("type: process, command", "type: proces, command"),
            "unknown target type 'proces'\n  hint: did you mean 'process'?",
        ),
        (
            ("requires: [acceptance]", "requires: [acceptanse]"),
            "requires stage 'acceptanse', which is not a stage",
        ),
        (
            ("health: {http: /healthz}", "health: {http: healthz}"),
            "health path 'healthz' must start with '/'",
        ),
        (("port: 8080", "port: 70000"), "'port' must be between 1 and 65535"),
        (("health: {http: /healthz}", 'health: ""'), "'health' is empty"),
        (("      deploy: ./ops/deploy.sh\n", ""), "missing required key 'deploy'"),
        (("timeout: 45s", "timeout: soon"), "'timeout'"),
        (
            ("timeout: 45s", "timeout: 45s\n    logs: {max_size: 10 lines}"),
            "conveyor.yml:9:22: 'max_size': expected a size such as 50MB, 10MiB or 4096 (bytes),"
            " got '10 lines'",
        ),
        (
            ("timeout: 45s", "timeout: 45s\n    logs: {max_size: 999}"),
            "'max_size': a size must be at least 1KB (1000 bytes), got 999",
        ),
        (
            ("timeout: 45s", "timeout: 45s\n    logs: {files: 0}"),
            "'files' must be between 1 and 100, got 0",
        ),
        (
            ("timeout: 45s", "timeout: 45s\n    logs: {max_sise: 1MB}"),
            "unknown key 'max_sise' in logs\n  hint: did you mean 'max_size'?",
        ),
        (("timeout: 45s", "timeout: 45s\n    logs: 10MB"), "'logs' must be a mapping"),
        (
            (
                "    deploy: {environment: staging, artifact: app}",
                "    jobs: {x: {run: y}}\n    deploy: {environment: staging, artifact: app}",
            ),
            "has both 'jobs' and 'deploy'",
        ),
    ],
)
def test_bad_environments_and_deploys_are_explained(change: tuple[str, str], expected: str) -> None:
    found = problems(BASE.replace(*change))
    assert any(expected in p for p in found), found
    assert all(p.startswith("conveyor.yml:") for p in found)


def test_a_deploy_needs_an_artifact_built_earlier() -> None:
    text = BASE.replace(
        "  - name: commit\n    jobs:\n      build: {run: make dist, outputs: [app]}\n", ""
    ) + ("  - name: late\n    jobs:\n      build: {run: make dist, outputs: [app]}\n")
    found = problems(text)
    assert any("deploys 'app', but no earlier stage builds it" in p for p in found), found


def test_a_required_stage_must_run_before_the_deploy() -> None:
    text = BASE.replace(
        "  - name: staging\n    deploy: {environment: staging, artifact: app}",
        "  - name: prod\n    deploy: {environment: production, artifact: app}",
    ).replace("  - name: acceptance\n    jobs:\n      e2e: {run: ./e2e.sh}\n", "") + (
        "  - name: acceptance\n    jobs:\n      e2e: {run: ./e2e.sh}\n"
    )
    found = problems(text)
    assert any(
        "requires stage 'acceptance', which does not run before stage 'prod'" in p for p in found
    ), found


def test_a_deploy_stage_cannot_require_itself() -> None:
    text = BASE.replace("requires: [acceptance]", "requires: [prod]").replace(
        "  - name: staging\n    deploy: {environment: staging, artifact: app}",
        "  - name: prod\n    deploy: {environment: production, artifact: app}",
    )
    found = problems(text)
    assert any("a stage cannot require itself" in p for p in found), found
    assert not any("move stage 'prod' after 'prod'" in p for p in found), found
