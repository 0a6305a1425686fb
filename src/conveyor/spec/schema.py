"""The node tree of a pipeline file to a validated :class:`~conveyor.spec.models.PipelineSpec`.

Every problem in the file is collected (``file:line:col``, a message and a hint) and raised as
one :class:`~conveyor.errors.SpecError`, so a user fixes them all in one round. The format::

    pipeline: shop
    env: {APP_ENV: ci}
    secrets: [DEPLOY_TOKEN]
    artifacts:
      app: {path: dist/app.tar.gz}
      site: {path: build/site/, kind: dir}
    stages:
      - name: commit
        jobs:
          build: {run: make dist, outputs: [app]}
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
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conveyor.errors import SpecError, SpecProblem
from conveyor.spec.delivery import (
    DEFAULT_HEALTH_TIMEOUT_S,
    DEFAULT_LOG_FILES,
    DEFAULT_LOG_MAX_BYTES,
    DEFAULT_OVERRIDE_EXPIRY_S,
    DEFAULT_OVERRIDE_MAX_S,
    DEFAULT_OVERRIDE_ROLES,
    GATE_KINDS,
    ROLE_HINT,
    ROLE_NAME,
    STAGE_GATE_KINDS,
    TARGET_TYPES,
    DeploySpec,
    EnvironmentSpec,
    GateSpec,
    TargetSpec,
)
from conveyor.spec.durations import parse_duration
from conveyor.spec.graph import find_cycles
from conveyor.spec.loader import MapNode, Node, ScalarNode, SeqNode, resolve_plain
from conveyor.spec.models import (
    ARTIFACT_KINDS,
    DEFAULT_TIMEOUT_S,
    ArtifactSpec,
    JobSpec,
    Location,
    PipelineSpec,
    StageSpec,
)
from conveyor.spec.sizes import parse_size

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Pipeline, stage and job names."""
ARTIFACT_NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
"""Artifact names (they become ``CONVEYOR_ARTIFACT_<NAME>`` variables)."""
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""Environment variable names (env keys and secrets)."""
RESERVED_ENV_NAMES = frozenset({"CI", "CONVEYOR"})
"""Variables Conveyor sets for every job, as well as every name starting with ``CONVEYOR_``."""
MAX_RETRIES = 10
MAX_SCRIPT_BYTES = 100 * 1024
"""Longest script or env value (UTF-8 bytes): Linux refuses to start a process with one argument
or variable over 128 KiB (``MAX_ARG_STRLEN``), and scripts run as ``bash -c SCRIPT``."""
MAX_JOB_BYTES = 1024 * 1024
"""A job's script and environment variables together (Linux allows about 2 MiB of arguments
and environment, including what the job inherits)."""

PIPELINE_KEYS = ("pipeline", "env", "secrets", "artifacts", "environments", "stages")
ARTIFACT_KEYS = ("path", "kind")
ENVIRONMENT_KEYS = (
    "target",
    "requires",
    "branches",
    "port",
    "timeout",
    "gates",
    "override_roles",
    "overrides",
    "logs",
)
LOG_KEYS = ("max_size", "files")
MAX_LOG_FILES = 100
TARGET_KEYS = {
    "process": ("type", "command", "health"),
    "command": ("type", "deploy", "health", "rollback"),
}
HEALTH_KEYS = ("http", "command")
DEPLOY_KEYS = ("environment", "artifact")
STAGE_KEYS = ("name", "jobs", "deploy", "gates")
JOB_KEYS = (
    "run",
    "needs",
    "reports",
    "timeout",
    "retries",
    "env",
    "inputs",
    "cache",
    "allow_failure",
    "outputs",
)
REPORT_KEYS = ("junit", "coverage", "metrics")
GATE_KEYS: dict[str, tuple[str, ...]] = {
    "tests": ("min_passed_ratio", "min_count", "name"),
    "coverage": ("report", "min", "max_drop", "name"),
    "metric": ("file", "expr", "name"),
    "approval": ("count", "role", "not_author", "name"),
    "window": ("deny", "timezone", "name"),
}
OVERRIDE_KEYS = ("expires", "max_expires", "confirm")

_NAME_RULE = (
    "use letters, digits, '_', '.' and '-', starting with a letter or digit, at most 64 characters"
)
_ENV_RULE = "use letters, digits and '_', not starting with a digit"
_RESERVED_HINT = (
    "Conveyor sets CI, CONVEYOR and the CONVEYOR_* variables of every job itself, over any"
    " other value; choose another name"
)
_ARTIFACT_RULE = "use letters, digits, '_' and '-', starting with a letter, at most 64 characters"
_YAML11_BOOLS = frozenset({"yes", "no", "on", "off", "y", "n"})
_STARTER = (
    "a pipeline file looks like:\n"
    "pipeline: shop\n"
    "stages:\n"
    "  - name: commit\n"
    "    jobs:\n"
    "      build: {run: make dist}"
)

# Keys of other CI systems and the Conveyor key that does the same.
_PIPELINE_SYNONYMS = {"name": "pipeline", "variables": "env"}
_STAGE_SYNONYMS = {"stage": "name", "steps": "jobs"}
_JOB_SYNONYMS = {
    "script": "run",
    "steps": "run",
    "command": "run",
    "commands": "run",
    "depends_on": "needs",
    "dependencies": "needs",
    "variables": "env",
    "environment": "env",
    "artifacts": "outputs",
    "produces": "outputs",
    "timeout-minutes": "timeout",
    "timeout_minutes": "timeout",
    "retry": "retries",
    "continue-on-error": "allow_failure",
    "allow-failure": "allow_failure",
}


def describe(node: Node) -> str:
    """A short description of a value for messages (``string 'one'``, ``a mapping``)."""
    if isinstance(node, MapNode):
        return "a mapping"
    if isinstance(node, SeqNode):
        return "a list"
    value = node.value
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {_short(node.raw)}"
    if isinstance(value, float):
        return f"number {_short(node.raw)}"
    if not node.quoted and re.fullmatch(r"[+-]?[0-9]+", value):
        digits = len(value.lstrip("+-"))
        return f"a number too large to read ({digits:,} digits)"  # over int()'s limit
    return f"string {_short(value)!r}"


def _short(text: str, limit: int = 40) -> str:
    """``text``, cut to ``limit`` characters for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, choices: Sequence[str]) -> str | None:
    """``did you mean 'x'?`` for the closest of ``choices``, if one is close enough.

    Among the most similar (difflib), the one fewest typing errors away wins: ``jbo1`` is
    ``job1``, not ``job10``.
    """
    close = difflib.get_close_matches(word, choices, n=50, cutoff=0.6)
    if not close:
        return None
    best = min(close, key=lambda choice: _typos(word, choice))  # stable: ties keep difflib's order
    return f"did you mean '{best}'?"


def _typos(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) from ``a`` to ``b``."""
    before: list[int] = []
    row = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], before[j - 2] + 1)
        before, row = row, current
    return row[len(b)]


def _quoted_as(node: Node, kind: type) -> bool:
    """Whether ``node`` is a quoted scalar that, unquoted, would be a ``kind``."""
    if not isinstance(node, ScalarNode) or not node.quoted:
        return False
    value = resolve_plain(node.raw.strip())
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def is_reserved(name: str) -> bool:
    """Whether Conveyor sets the variable ``name`` for every job (``CI``, ``CONVEYOR_JOB``...)."""
    return name in RESERVED_ENV_NAMES or name.startswith("CONVEYOR_")


_SUGGESTION_BUDGET = 20_000
"""Name comparisons for "did you mean" in one file (about 10 µs each): a file with a thousand
unknown names among a thousand jobs is still answered within a second, without suggestions
past the budget."""


def _quote_list(names: Sequence[str], limit: int = 20) -> str:
    """``'a', 'b'``; a long list is cut (a thousand problems must not each list every job)."""
    shown = ", ".join(f"'{name}'" for name in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


@dataclass
class _JobDraft:
    """A job read from its stage, before ``needs`` can be checked against the whole pipeline."""

    name: str
    stage: str
    key: ScalarNode
    run: str = ""
    needs: list[tuple[str, ScalarNode]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = 0
    junit: tuple[str, ...] = ()
    inputs: tuple[str, ...] | None = None
    cache: bool = True
    allow_failure: bool = False
    outputs: list[tuple[str, ScalarNode]] = field(default_factory=list)
    coverage: str | None = None
    metrics: str | None = None


@dataclass
class _StageDraft:
    name: str
    node: MapNode
    jobs: list[_JobDraft] = field(default_factory=list)
    deploy: tuple[str | None, str | None, MapNode] | None = None
    """``(environment, artifact, node)`` of a deploy stage, as written."""
    gates: tuple[GateSpec, ...] = ()
    named: bool = True
    """False when the stage's name is missing or invalid (its jobs are still checked)."""


class _Schema:
    """Reads the tree, recording every problem instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[SpecProblem] = []
        self._requires_nodes: dict[str, list[tuple[str, ScalarNode]]] = {}
        self._report_refs: list[tuple[str, str | None, Node]] = []
        """Reports that gates read: (kind, path, node), checked against the jobs' reports."""
        self.declared_artifacts: set[str] = set()
        """Every artifact name written under ``artifacts``, usable or not."""
        self.refused_jobs: set[str] = set()
        """Job names refused as invalid: a need naming one is not a second problem."""
        self._comparisons_left = _SUGGESTION_BUDGET

    # -- reporting -------------------------------------------------------------------------

    def suggest(self, word: str, choices: Sequence[str], besides: str = "") -> str | None:
        """:func:`did_you_mean` (never ``besides``), while the file's budget of name
        comparisons lasts."""
        self._comparisons_left -= len(choices)
        if self._comparisons_left < 0:
            return None
        return did_you_mean(word, [c for c in choices if c != besides] if besides else choices)

    def add(self, at: Node | Location, message: str, hint: str | None = None) -> None:
        """Record a problem at a node's (or a location's) line and column."""
        self.problems.append(SpecProblem(self.source, at.line, at.column, message, hint))

    def wrong_type(self, key: str, expected: str, node: Node, hint: str | None = None) -> None:
        """Record ``'key' must be <expected>, got <what>``."""
        self.add(node, f"'{key}' must be {expected}, got {describe(node)}", hint)

    def too_long(self, what: str, node: Node, text: str) -> bool:
        """Record a problem if ``text`` (a script or a variable) cannot be passed to a process."""
        if len(text) <= MAX_SCRIPT_BYTES // 4:  # at most 4 bytes a character
            return False
        size = len(text.encode("utf-8", "surrogatepass"))
        if size <= MAX_SCRIPT_BYTES:
            return False
        self.add(
            node,
            f"{what} is too long: {size:,} bytes, the limit is {MAX_SCRIPT_BYTES:,} bytes"
            " (100 KiB)",
            hint="a process cannot be started with a longer argument or variable; put the script"
            " in a file in the repository and run that file",
        )
        return True

    def job_sizes(self, stages: Sequence[_StageDraft], env: Mapping[str, str]) -> None:
        """A problem for each job whose script and variables together are too large to start
        a process with (each may be under its own limit: forty aliases of one long value)."""
        for stage in stages:
            for job in stage.jobs:
                texts = [job.run, *(f"{k}={v}" for k, v in {**env, **job.env}.items())]
                if sum(len(text) + 1 for text in texts) * 4 <= MAX_JOB_BYTES:
                    continue  # at most 4 bytes a character
                size = sum(len(text.encode("utf-8", "surrogatepass")) + 1 for text in texts)
                if size > MAX_JOB_BYTES:
                    self.add(
                        job.key,
                        f"job '{job.name}' is too large to start: its script and variables take"
                        f" {size:,} bytes, the limit is {MAX_JOB_BYTES:,} (1 MiB)",
                        hint="the system refuses larger arguments and environments; put the"
                        " data in files in the repository",
                    )

    # -- generic readers -------------------------------------------------------------------

    def fields(
        self,
        node: MapNode,
        known: Sequence[str],
        where: str,
        synonyms: Mapping[str, str] | None = None,
    ) -> dict[str, tuple[ScalarNode, Node]]:
        """The known keys of a mapping; each unknown key is a problem (with a suggestion)."""
        found: dict[str, tuple[ScalarNode, Node]] = {}
        for key, value in node.items:
            name = key.value if isinstance(key.value, str) else key.raw
            if name in known:
                found[name] = (key, value)
                continue
            if synonyms and name in synonyms:  # a word of another tool beats a near spelling
                hint: str | None = f"did you mean '{synonyms[name]}'?"
            else:
                hint = self.suggest(name, known)
            if hint is None:
                hint = "known keys: " + ", ".join(known)
            if where == "at the top level" and name == "jobs":
                hint = "jobs belong to a stage: " + _STARTER
            self.add(key, f"unknown key '{name}' {where}", hint)
        return found

    def require(self, node: MapNode, found: Mapping[str, object], key: str, what: str) -> None:
        """Record a missing required key at the mapping's location."""
        if key not in found:
            self.add(node, f"missing required key '{key}' in {what}")

    def name(self, node: Node, kind: str) -> str | None:
        """A pipeline, stage or job name (plain numbers count as their text)."""
        text: str | None = None
        if isinstance(node, ScalarNode):
            if isinstance(node.value, str):
                text = node.value
            elif isinstance(node.value, int | float) and not isinstance(node.value, bool):
                text = node.raw
        if text is None:
            self.add(
                node,
                f"a {kind} name must be a string, got {describe(node)}",
                hint="quote it" if isinstance(node, ScalarNode) and node.raw else None,
            )
            return None
        if not NAME_PATTERN.fullmatch(text):
            self.add(node, f"invalid {kind} name {text!r}", hint=_NAME_RULE)
            return None
        return text

    def text(self, key: str, node: Node) -> str | None:
        """A string value (``None`` and a problem otherwise)."""
        if isinstance(node, ScalarNode) and isinstance(node.value, str):
            return node.value
        self.wrong_type(key, "a string", node)
        return None

    def boolean(self, key: str, node: Node) -> bool | None:
        """``true`` or ``false``; YAML 1.1 spellings such as ``yes`` get a hint."""
        if isinstance(node, ScalarNode) and isinstance(node.value, bool):
            return node.value
        hint = None
        if isinstance(node, ScalarNode) and not node.quoted and node.raw.lower() in _YAML11_BOOLS:
            hint = "write true or false (YAML 1.2)"
        elif _quoted_as(node, bool):
            hint = "remove the quotes"
        self.wrong_type(key, "true or false", node, hint)
        return None

    def integer(self, key: str, node: Node) -> int | None:
        """An integer (a boolean is not one)."""
        if (
            isinstance(node, ScalarNode)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
        ):
            return node.value
        self.wrong_type(
            key, "an integer", node, "remove the quotes" if _quoted_as(node, int) else None
        )
        return None

    def strings(self, key: str, node: Node) -> tuple[tuple[str, ScalarNode], ...] | None:
        """A list of strings; a single string is a one-item list."""
        if isinstance(node, ScalarNode) and isinstance(node.value, str):
            return ((node.value, node),)
        if not isinstance(node, SeqNode):
            self.wrong_type(key, "a string or a list of strings", node)
            return None
        items: list[tuple[str, ScalarNode]] = []
        ok = True
        for item in node.items:
            if isinstance(item, ScalarNode) and isinstance(item.value, str):
                items.append((item.value, item))
            else:
                self.add(item, f"each item of '{key}' must be a string, got {describe(item)}")
                ok = False
        return tuple(items) if ok else None

    def path_patterns(self, key: str, node: Node) -> tuple[str, ...] | None:
        """Glob patterns relative to the workspace: no absolute paths, no '..' segments."""
        patterns = self.strings(key, node)
        if patterns is None:
            return None
        ok = True
        for pattern, item in patterns:
            parts = pattern.replace("\\", "/").split("/")
            if not pattern.strip():
                self.add(item, f"'{key}' has an empty pattern")
                ok = False
            elif pattern.startswith(("/", "~")) or (len(pattern) > 1 and pattern[1] == ":"):
                self.add(
                    item,
                    f"'{key}' pattern '{pattern}' is not relative to the workspace",
                    hint="write it relative to the repository root, e.g. reports/*.xml",
                )
                ok = False
            elif ".." in parts or "\0" in pattern:
                self.add(
                    item,
                    f"'{key}' pattern '{pattern}' leaves the workspace",
                    hint="patterns may not contain '..'",
                )
                ok = False
        return tuple(p.removeprefix("./") for p, _ in patterns) if ok else None

    def names(self, key: str, node: Node) -> list[tuple[str, ScalarNode]]:
        """A list of names (job names, variable names); a single name is a one-item list."""
        if isinstance(node, ScalarNode) and node.value is None and not node.quoted:
            return []
        if isinstance(node, MapNode):
            self.wrong_type(key, "a list of names", node)
            return []
        items = [node] if isinstance(node, ScalarNode) else node.items
        result: list[tuple[str, ScalarNode]] = []
        for item in items:
            value = item.value if isinstance(item, ScalarNode) else None
            if isinstance(item, ScalarNode) and isinstance(value, str):
                result.append((value, item))
            elif (
                isinstance(item, ScalarNode)
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                result.append((item.raw, item))
            else:
                self.add(item, f"each item of '{key}' must be a name, got {describe(item)}")
        return result

    def role_name(self, name: str, node: Node) -> bool:
        """Whether ``name`` is a role a user can be given; a problem if not."""
        if re.fullmatch(ROLE_NAME, name):
            return True
        self.add(node, f"'{_short(name)}' is not a role name", hint=ROLE_HINT)
        return False

    def env(self, node: Node, secrets: Mapping[str, ScalarNode]) -> dict[str, str]:
        """An ``env`` mapping: variable names to text (numbers and booleans become text)."""
        if isinstance(node, ScalarNode) and node.value is None and not node.quoted:
            return {}
        if not isinstance(node, MapNode):
            self.wrong_type("env", "a mapping of variable names to values", node)
            return {}
        env: dict[str, str] = {}
        for key, value in node.items:
            name = key.value if isinstance(key.value, str) else key.raw
            if not ENV_NAME_PATTERN.fullmatch(name):
                self.add(key, f"invalid environment variable name {name!r} in env", _ENV_RULE)
                continue
            if is_reserved(name):
                self.add(
                    key, f"'{name}' is set by Conveyor and cannot be set in env", _RESERVED_HINT
                )
                continue
            if name in secrets:
                self.add(
                    key,
                    f"'{name}' is a secret and cannot also be set in env",
                    hint="secrets come from the environment of `conveyor run`; remove it from env",
                )
                continue
            text = self.env_value(name, value)
            if text is not None:
                env[name] = text
        return env

    def env_value(self, name: str, node: Node) -> str | None:
        """An env value as text: strings as written, booleans ``true``/``false``, numbers as
        written (``1.10`` stays ``1.10``)."""
        if isinstance(node, ScalarNode):
            value = node.value
            if isinstance(value, str):
                return None if self.too_long(f"env variable '{name}'", node, value) else value
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, int | float):
                return node.raw
            self.add(
                node,
                f"env variable '{name}' has no value",
                hint=f'write {name}: "" for an empty value',
            )
            return None
        self.add(node, f"env variable '{name}' must be a string, got {describe(node)}")
        return None

    # -- the pipeline ----------------------------------------------------------------------

    def pipeline(self, root: Node, digest: str) -> PipelineSpec | None:
        """Read the whole file; ``None`` if there was any problem."""
        if not isinstance(root, MapNode):
            self.add(
                root,
                "the pipeline file must be a mapping with 'pipeline' and 'stages', "
                f"got {describe(root)}",
                hint=_STARTER,
            )
            return None
        found = self.fields(root, PIPELINE_KEYS, "at the top level", _PIPELINE_SYNONYMS)
        name: str | None = None
        if "pipeline" in found:
            name = self.name(found["pipeline"][1], "pipeline")
        else:
            self.add(
                root,
                "missing required key 'pipeline' (the pipeline's name)",
                hint="add e.g. 'pipeline: shop' at the top of the file",
            )
        secrets = self.secrets(found["secrets"][1]) if "secrets" in found else {}
        env = self.env(found["env"][1], secrets) if "env" in found else {}
        artifacts = self.artifacts(found["artifacts"][1]) if "artifacts" in found else {}
        environments = (
            self.environments(found["environments"][1]) if "environments" in found else {}
        )
        stages = self.stages(root, found.get("stages"), secrets)
        self.job_sizes(stages, env)
        specs = self.link(stages, artifacts)
        specs = self.deploy_stages(stages, specs, artifacts, environments)
        if self.problems or name is None:
            return None
        return PipelineSpec(
            name=name,
            stages=specs,
            env=env,
            secrets=tuple(secrets),
            source=self.source,
            digest=digest,
            artifacts=tuple(artifacts.values()),
            environments=tuple(environments.values()),
        )

    def artifacts(self, node: Node) -> dict[str, ArtifactSpec]:
        """The ``artifacts`` mapping: name to ``{path, kind}``."""
        if isinstance(node, ScalarNode) and node.value is None and not node.quoted:
            return {}
        if not isinstance(node, MapNode):
            self.wrong_type(
                "artifacts",
                "a mapping of artifact names to {path: ...}",
                node,
                hint="artifacts:\n  app: {path: dist/app.tar.gz}",
            )
            return {}
        result: dict[str, ArtifactSpec] = {}
        by_env: dict[str, str] = {}
        for key, value in node.items:
            name = key.value if isinstance(key.value, str) else key.raw
            self.declared_artifacts.add(name)  # referring to it is not a second problem
            if not ARTIFACT_NAME_PATTERN.fullmatch(name):
                self.add(key, f"invalid artifact name {name!r}", hint=_ARTIFACT_RULE)
                continue
            artifact = self.artifact(name, key, value)
            env_name = ArtifactSpec(name, "x").env_name
            clash = by_env.get(env_name)
            if clash is not None:
                self.add(
                    key,
                    f"artifacts '{clash}' and '{name}' would both be given to jobs as ${env_name}",
                    hint="rename one of them",
                )
                continue
            by_env[env_name] = name
            if artifact is not None:
                result[name] = artifact
        return result

    def artifact(self, name: str, key: ScalarNode, node: Node) -> ArtifactSpec | None:
        """One artifact: ``{path: dist/app.tar.gz}`` or ``{path: build/site/, kind: dir}``."""
        if isinstance(node, ScalarNode) and isinstance(node.value, str):
            self.add(
                node,
                f"artifact '{name}' must be a mapping with 'path', got {describe(node)}",
                hint=f"write {name}: {{path: {node.value}}}",
            )
            return None
        if not isinstance(node, MapNode):
            self.add(
                node if isinstance(node, MapNode | SeqNode) else key,
                f"artifact '{name}' must be a mapping with 'path', got {describe(node)}",
                hint=f"write {name}: {{path: dist/{name}.tar.gz}}",
            )
            return None
        found = self.fields(node, ARTIFACT_KEYS, f"in artifact '{name}'")
        if "path" not in found:
            self.add(node, f"missing required key 'path' in artifact '{name}'")
            return None
        path_node = found["path"][1]
        path = self.text("path", path_node)
        usable = path is not None
        if path is None:
            path = ""
        parts = path.replace("\\", "/").split("/")
        if not usable:
            pass
        elif not path.strip() or path.strip() in (".", "./"):
            self.add(
                path_node,
                f"artifact '{name}' needs a path inside the workspace",
                hint="e.g. dist/app.tar.gz or build/site/",
            )
            usable = False
        elif path.startswith(("/", "~")) or (len(path) > 1 and path[1] == ":"):
            self.add(
                path_node,
                f"artifact path '{path}' is not relative to the workspace",
                hint="write it relative to the repository root, e.g. dist/app.tar.gz",
            )
            usable = False
        elif ".." in parts or "\0" in path or any(c in path for c in "*?["):
            self.add(
                path_node,
                f"artifact path '{path}' must name one file or directory in the workspace",
                hint="no '..' and no wildcards",
            )
            usable = False
        kind = "dir" if path.endswith("/") else "file"
        if "kind" in found:
            kind_node = found["kind"][1]
            given = self.text("kind", kind_node)
            if given is None:
                return None
            if given not in ARTIFACT_KINDS:
                self.add(
                    kind_node,
                    f"unknown artifact kind '{given}'",
                    hint="'file' (one file) or 'dir' (a directory)",
                )
                return None
            if given == "file" and path.endswith("/"):
                self.add(
                    kind_node,
                    f"artifact '{name}' is a file but its path '{path}' ends with '/'",
                    hint="remove the '/' or write kind: dir",
                )
                return None
            kind = given
        if not usable:
            return None
        clean = "/".join(p for p in parts if p not in ("", "."))
        return ArtifactSpec(name, clean, kind, Location(key.line, key.column))

    def secrets(self, node: Node) -> dict[str, ScalarNode]:
        """The secret names, in order."""
        secrets: dict[str, ScalarNode] = {}
        for name, item in self.names("secrets", node):
            if not ENV_NAME_PATTERN.fullmatch(name):
                self.add(item, f"invalid secret name {name!r}", hint=_ENV_RULE)
            elif is_reserved(name):
                self.add(
                    item, f"'{name}' is set by Conveyor and cannot be a secret", _RESERVED_HINT
                )
            elif name in secrets:
                self.add(
                    item, f"secret '{name}' is listed twice (first at line {secrets[name].line})"
                )
            else:
                secrets[name] = item
        return secrets

    def stages(
        self,
        root: MapNode,
        entry: tuple[ScalarNode, Node] | None,
        secrets: Mapping[str, ScalarNode],
    ) -> list[_StageDraft]:
        """Every stage and its jobs, in file order."""
        if entry is None:
            self.add(root, "missing required key 'stages'", hint=_STARTER)
            return []
        key, node = entry
        if isinstance(node, ScalarNode) and node.value is None and not node.quoted:
            self.add(key, "the pipeline has no stages", hint=_STARTER)
            return []
        if not isinstance(node, SeqNode):
            self.wrong_type("stages", "a list of stages", node, hint=_STARTER)
            return []
        if not node.items:
            self.add(node, "the pipeline has no stages", hint=_STARTER)
            return []
        drafts: list[_StageDraft] = []
        first: dict[str, MapNode] = {}
        for item in node.items:
            draft = self.stage(item, secrets)
            if draft is None:
                continue
            if not draft.named:  # already reported; its jobs' needs are still checked
                drafts.append(draft)
                continue
            if draft.name in first and draft.node is first[draft.name]:
                self.add(
                    draft.node,
                    f"stage '{draft.name}' is listed twice: an alias repeats it",
                    hint="stage names must be unique; remove the alias, or copy the stage and"
                    " rename the copy",
                )
                continue
            if draft.name in first:
                self.add(
                    draft.node,
                    f"duplicate stage name '{draft.name}' (first at line {first[draft.name].line})",
                    hint="stage names must be unique",
                )
                continue
            first[draft.name] = draft.node
            drafts.append(draft)
        return drafts

    def stage(self, node: Node, secrets: Mapping[str, ScalarNode]) -> _StageDraft | None:
        """One stage entry (``- name: ...``)."""
        if not isinstance(node, MapNode):
            hint = _STARTER
            if isinstance(node, ScalarNode) and isinstance(node.value, str):
                hint = (
                    "each stage is a mapping with its jobs:\n"
                    f"- name: {node.value}\n"
                    "  jobs:\n"
                    "    build: {run: make dist}"
                )
            self.add(
                node,
                f"each stage must be a mapping with 'name' and 'jobs', got {describe(node)}",
                hint=hint,
            )
            return None
        found = self.fields(node, STAGE_KEYS, "in a stage", _STAGE_SYNONYMS)
        name = None
        if "name" in found:
            name = self.name(found["name"][1], "stage")
        else:
            self.add(node, "missing required key 'name' in a stage")
        shown = name or "?"
        draft = _StageDraft(shown, node)
        if "gates" in found:
            draft.gates = self.gates(found["gates"][1], f"stage '{shown}'", STAGE_GATE_KINDS)
        jobs = found.get("jobs")
        if "deploy" in found:
            if jobs is not None:
                self.add(
                    found["deploy"][0],
                    f"stage '{shown}' has both 'jobs' and 'deploy'",
                    hint="a stage either runs jobs or deploys; split it into two stages",
                )
            draft.deploy = self.deploy(shown, found["deploy"][1])
            return draft if name else None
        if jobs is None:
            self.add(
                node,
                f"stage '{shown}' has no jobs",
                hint="add a 'jobs:' mapping, or 'deploy: {environment: ..., artifact: ...}'",
            )
            return draft if name else None
        key, value = jobs
        if isinstance(value, ScalarNode) and value.value is None and not value.quoted:
            self.add(key, f"stage '{shown}' has no jobs", hint="add jobs under 'jobs:'")
        elif not isinstance(value, MapNode):
            self.wrong_type(
                "jobs",
                "a mapping of job names to jobs",
                value,
                hint="write jobs as 'name: {run: ...}' entries, not as a list"
                if isinstance(value, SeqNode)
                else None,
            )
        elif not value.items:
            self.add(key, f"stage '{shown}' has no jobs", hint="add jobs under 'jobs:'")
        else:
            for job_key, job_node in value.items:
                job = self.job(shown, job_key, job_node, secrets)
                if job is not None:
                    draft.jobs.append(job)
        if not name:
            draft.named = False
            return draft if draft.jobs else None
        return draft

    def job(
        self, stage: str, key: ScalarNode, node: Node, secrets: Mapping[str, ScalarNode]
    ) -> _JobDraft | None:
        """One job (``name: {run: ...}``)."""
        name = self.name(key, "job")
        if name is None:
            self.refused_jobs.add(key.value if isinstance(key.value, str) else key.raw)
            return None
        job = _JobDraft(name, stage, key)
        if not isinstance(node, MapNode):
            hint = None
            if isinstance(node, ScalarNode) and isinstance(node.value, str):
                hint = f"write {name}: {{run: {node.value}}}"
            self.add(
                node if not (isinstance(node, ScalarNode) and node.value is None) else key,
                f"job '{name}' must be a mapping with at least 'run', got {describe(node)}",
                hint=hint,
            )
            return job
        found = self.fields(node, JOB_KEYS, f"in job '{name}'", _JOB_SYNONYMS)
        if "run" not in found:
            self.add(
                node,
                f"missing required key 'run' in job '{name}'",
                hint="'run' is the shell script of the job",
            )
        else:
            self.run(job, found["run"][1])
        if "needs" in found:
            job.needs = self.names("needs", found["needs"][1])
        if "reports" in found:
            self.reports(job, found["reports"][1])
        if "timeout" in found:
            self.timeout(job, found["timeout"][1])
        if "retries" in found:
            retries = self.integer("retries", found["retries"][1])
            if retries is not None and not 0 <= retries <= MAX_RETRIES:
                self.add(
                    found["retries"][1],
                    f"'retries' must be between 0 and {MAX_RETRIES}, "
                    f"got {describe(found['retries'][1]).removeprefix('integer ')}",
                )
            elif retries is not None:
                job.retries = retries
        if "env" in found:
            job.env = self.env(found["env"][1], secrets)
        if "inputs" in found:
            inputs = found["inputs"][1]
            if not (isinstance(inputs, ScalarNode) and inputs.value is None and not inputs.quoted):
                job.inputs = self.path_patterns("inputs", inputs)
        for flag in ("cache", "allow_failure"):
            if flag in found:
                value = self.boolean(flag, found[flag][1])
                if value is not None:
                    setattr(job, flag, value)
        if "outputs" in found:
            job.outputs = self.names("outputs", found["outputs"][1])
        return job

    def deploy(self, stage: str, node: Node) -> tuple[str | None, str | None, MapNode] | None:
        """A deploy stage's ``{environment, artifact}`` (checked against the pipeline later)."""
        if not isinstance(node, MapNode):
            self.wrong_type(
                "deploy",
                "a mapping such as {environment: staging, artifact: app}",
                node,
            )
            return None
        found = self.fields(node, DEPLOY_KEYS, f"in the deploy of stage '{stage}'")
        environment = artifact = None
        if "environment" in found:
            environment = self.text("environment", found["environment"][1])
        else:
            self.add(node, f"missing required key 'environment' in the deploy of stage '{stage}'")
        if "artifact" in found:
            artifact = self.text("artifact", found["artifact"][1])
        return environment, artifact, node

    # -- environments ----------------------------------------------------------------------

    def environments(self, node: Node) -> dict[str, EnvironmentSpec]:
        """The ``environments`` mapping: name to ``{target, requires, branches, port, timeout}``."""
        if isinstance(node, ScalarNode) and node.value is None and not node.quoted:
            return {}
        if not isinstance(node, MapNode):
            self.wrong_type(
                "environments",
                "a mapping of environment names to environments",
                node,
                hint="environments:\n  staging:\n    target: {type: process, command: ./serve}",
            )
            return {}
        result: dict[str, EnvironmentSpec] = {}
        for key, value in node.items:
            name = self.name(key, "environment")
            if name is None:
                continue
            environment = self.environment(name, key, value)
            if environment is not None:
                result[name] = environment
        return result

    def environment(self, name: str, key: ScalarNode, node: Node) -> EnvironmentSpec | None:
        if not isinstance(node, MapNode):
            self.add(
                node if not isinstance(node, ScalarNode) or node.value is not None else key,
                f"environment '{name}' must be a mapping with 'target', got {describe(node)}",
                hint=f"{name}:\n  target: {{type: process, command: ./serve --port $PORT}}",
            )
            return None
        found = self.fields(node, ENVIRONMENT_KEYS, f"in environment '{name}'")
        target = None
        if "target" in found:
            target = self.target(name, found["target"][1])
        else:
            self.add(
                node,
                f"missing required key 'target' in environment '{name}'",
                hint="e.g. target: {type: process, command: ./serve --port $PORT}",
            )
        requires: tuple[str, ...] = ()
        if "requires" in found:
            requires = tuple(n for n, _ in self.names("requires", found["requires"][1]))
            self._requires_nodes[name] = self.names("requires", found["requires"][1])
        branches: tuple[str, ...] = ()
        if "branches" in found:
            items = self.strings("branches", found["branches"][1])
            if items is not None:
                branches = tuple(b for b, _ in items)
        port = None
        if "port" in found:
            port = self.integer("port", found["port"][1])
            if port is not None and not 1 <= port <= 65535:
                self.add(found["port"][1], f"'port' must be between 1 and 65535, got {port}")
                port = None
        timeout = DEFAULT_HEALTH_TIMEOUT_S
        if "timeout" in found:
            timeout = self.duration("timeout", found["timeout"][1], DEFAULT_HEALTH_TIMEOUT_S)
        gates: tuple[GateSpec, ...] = ()
        if "gates" in found:
            gates = self.gates(found["gates"][1], f"environment '{name}'", GATE_KINDS)
        roles: tuple[str, ...] = DEFAULT_OVERRIDE_ROLES
        if "override_roles" in found:
            roles = tuple(
                n
                for n, item in self.names("override_roles", found["override_roles"][1])
                if self.role_name(n, item)
            )
        expiry, maximum, confirm = DEFAULT_OVERRIDE_EXPIRY_S, DEFAULT_OVERRIDE_MAX_S, False
        if "overrides" in found:
            expiry, maximum, confirm = self.overrides(found["overrides"][1])
        log_max_bytes, log_files = DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_FILES
        if "logs" in found:
            log_max_bytes, log_files = self.logs(found["logs"][1])
        if target is None:
            return None
        return EnvironmentSpec(
            name=name,
            target=target,
            requires=requires,
            branches=branches,
            port=port,
            health_timeout_s=timeout,
            gates=gates,
            override_roles=roles,
            override_expiry_s=expiry,
            override_max_s=maximum,
            override_confirm=confirm,
            log_max_bytes=log_max_bytes,
            log_files=log_files,
            location=Location(key.line, key.column),
        )

    def duration(self, key: str, node: Node, default: float) -> float:
        draft = _JobDraft(key, "", ScalarNode(None, "", node.line, node.column))
        draft.timeout_s = default
        before = len(self.problems)
        self.timeout(draft, node)
        if len(self.problems) > before:
            for index in range(before, len(self.problems)):
                problem = self.problems[index]
                self.problems[index] = SpecProblem(
                    problem.source,
                    problem.line,
                    problem.column,
                    problem.message.replace("'timeout'", f"'{key}'"),
                    problem.hint,
                )
        return draft.timeout_s

    def logs(self, node: Node) -> tuple[int, int]:
        """``{max_size: 50MiB, files: 2}``: how much of a release's output is kept."""
        max_bytes, files = DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_FILES
        if not isinstance(node, MapNode):
            self.wrong_type("logs", "a mapping such as {max_size: 50MiB, files: 2}", node)
            return max_bytes, files
        found = self.fields(node, LOG_KEYS, "in logs")
        if "max_size" in found:
            size_node = found["max_size"][1]
            value = size_node.value if isinstance(size_node, ScalarNode) else None
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                self.wrong_type("max_size", "a size such as 50MB or 10MiB", size_node)
            else:
                try:
                    max_bytes = parse_size(value)
                except ValueError as exc:
                    self.add(size_node, f"'max_size': {exc}")
        if "files" in found:
            count = self.integer("files", found["files"][1])
            if count is not None and not 1 <= count <= MAX_LOG_FILES:
                self.add(
                    found["files"][1],
                    f"'files' must be between 1 and {MAX_LOG_FILES}, got {count}",
                    hint="the newest file counts: 2 keeps it and the one before",
                )
            elif count is not None:
                files = count
        return max_bytes, files

    def overrides(self, node: Node) -> tuple[float, float, bool]:
        """``{expires: 2h, max_expires: 24h, confirm: true}``."""
        expiry, maximum, confirm = DEFAULT_OVERRIDE_EXPIRY_S, DEFAULT_OVERRIDE_MAX_S, False
        if not isinstance(node, MapNode):
            self.wrong_type("overrides", "a mapping such as {expires: 2h, max_expires: 24h}", node)
            return expiry, maximum, confirm
        found = self.fields(node, OVERRIDE_KEYS, "in overrides")
        if "max_expires" in found:
            maximum = self.duration("max_expires", found["max_expires"][1], maximum)
        if "expires" in found:
            expiry = self.duration("expires", found["expires"][1], expiry)
            if expiry > maximum:
                self.add(
                    found["expires"][1],
                    "the default 'expires' is longer than 'max_expires'",
                    hint="overrides must expire; make max_expires at least as long",
                )
        elif expiry > maximum:
            expiry = maximum
        if "confirm" in found:
            value = self.boolean("confirm", found["confirm"][1])
            confirm = bool(value)
        return expiry, maximum, confirm

    def gates(self, node: Node, where: str, kinds: Sequence[str]) -> tuple[GateSpec, ...]:
        """A list of gates: ``- tests: {min_count: 50}``, ``- window: {deny: ...}``..."""
        if not isinstance(node, SeqNode):
            self.wrong_type("gates", "a list such as [{tests: {min_count: 1}}]", node)
            return ()
        result: list[GateSpec] = []
        names: dict[str, int] = {}
        for item in node.items:
            gate = self.gate(item, where, kinds)
            if gate is None:
                continue
            if gate.name in names:
                self.add(
                    item,
                    f"two gates of {where} are called '{gate.name}' (first at line"
                    f" {names[gate.name]})",
                    hint="give each a distinct 'name'",
                )
                continue
            names[gate.name] = item.line
            result.append(gate)
        return tuple(result)

    def gate(self, node: Node, where: str, kinds: Sequence[str]) -> GateSpec | None:
        if not isinstance(node, MapNode) or len(node.items) != 1:
            got, hint = describe(node), "e.g. - tests: {min_passed_ratio: 1.0, min_count: 50}"
            if isinstance(node, MapNode) and not node.items:
                got = "an empty mapping"
            elif isinstance(node, MapNode):
                got = f"{len(node.items)} keys: " + _quote_list([k.raw for k, _ in node.items])
                hint = "make each kind a list item of its own: - tests: {...}, - coverage: {...}"
                if any(k.raw == "name" for k, _ in node.items):
                    hint = "a gate's name is one of its settings: - tests: {name: unit, ...}"
            self.add(node, f"each gate of {where} is a mapping with one kind, got {got}", hint)
            return None
        key, value = node.items[0]
        kind = key.value if isinstance(key.value, str) else key.raw
        if kind not in kinds:
            hint = self.suggest(kind, kinds) or "kinds: " + ", ".join(kinds)
            if kind == "approval":
                hint = "approvals belong to environments (they approve a digest for one)"
            self.add(key, f"unknown gate kind '{kind}' in {where}", hint=hint)
            return None
        if isinstance(value, ScalarNode) and value.value is None and not value.quoted:
            value = MapNode([], value.line, value.column)
        if not isinstance(value, MapNode):
            self.wrong_type(kind, "a mapping of settings", value)
            return None
        found = self.fields(value, GATE_KEYS[kind], f"in a {kind} gate")
        params: dict[str, object] = {}
        name = kind
        if "name" in found:
            name = self.name(found["name"][1], "gate") or kind
        reader = getattr(self, f"gate_{kind}")
        if not reader(value, found, params):
            return None
        return GateSpec(name, kind, params, Location(key.line, key.column))

    def number(self, key: str, node: Node, low: float, high: float | None) -> float | None:
        value = node.value if isinstance(node, ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.wrong_type(key, "a number", node)
            return None
        if value < low or (high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            self.add(node, f"'{key}' must be {bounds}, got {value:g}")
            return None
        return float(value)

    def gate_tests(
        self, node: MapNode, found: Mapping[str, Any], params: dict[str, object]
    ) -> bool:
        ok = True
        ratio = 1.0
        if "min_passed_ratio" in found:
            value = self.number("min_passed_ratio", found["min_passed_ratio"][1], 0.0, 1.0)
            ok = ok and value is not None
            ratio = value if value is not None else ratio
        count = 1
        if "min_count" in found:
            got = self.integer("min_count", found["min_count"][1])
            if got is not None and got < 1:
                self.add(
                    found["min_count"][1],
                    "'min_count' must be at least 1: a build where no tests ran never passes",
                )
                got = None
            ok = ok and got is not None
            count = got if got is not None else count
        params.update(min_passed_ratio=ratio, min_count=count)
        return ok

    def gate_coverage(
        self, node: MapNode, found: Mapping[str, Any], params: dict[str, object]
    ) -> bool:
        if "report" not in found:
            self.add(
                node,
                "missing required key 'report' in a coverage gate",
                hint="the Cobertura XML a job declares in reports: {coverage: ...}",
            )
            return False
        report = self.report_path("report", found["report"][1])
        minimum = self.number("min", found["min"][1], 0, 100) if "min" in found else None
        drop = (
            self.number("max_drop", found["max_drop"][1], 0, 100) if "max_drop" in found else None
        )
        if "min" not in found and "max_drop" not in found:
            self.add(node, "a coverage gate needs 'min', 'max_drop' or both")
            return False
        params.update(report=report, min=minimum, max_drop=drop)
        self._report_refs.append(("coverage", report, found["report"][1]))
        return report is not None

    def gate_metric(
        self, node: MapNode, found: Mapping[str, Any], params: dict[str, object]
    ) -> bool:
        missing = [k for k in ("file", "expr") if k not in found]
        if missing:
            self.add(
                node,
                f"missing required key '{missing[0]}' in a metric gate",
                hint='e.g. - metric: {file: reports/perf.json, expr: "p95_ms <= 200"}',
            )
            return False
        file = self.report_path("file", found["file"][1])
        expr = self.text("expr", found["expr"][1])
        if expr is not None:
            from conveyor.spec.expressions import ExpressionError, parse_expression

            try:
                parse_expression(expr)
            except ExpressionError as exc:
                column = found["expr"][1].column + (getattr(exc, "column", 0) or 0)
                self.add(
                    Location(found["expr"][1].line, column),
                    f"'expr': {exc.message}",
                    hint=exc.hint or "comparisons of numbers: p95_ms <= 200 and errors == 0",
                )
                expr = None
        params.update(file=file, expr=expr)
        self._report_refs.append(("metrics", file, found["file"][1]))
        return file is not None and expr is not None

    def gate_approval(
        self, node: MapNode, found: Mapping[str, Any], params: dict[str, object]
    ) -> bool:
        count = 1
        if "count" in found:
            got = self.integer("count", found["count"][1])
            if got is not None and got < 1:
                self.add(found["count"][1], "'count' must be at least 1")
                return False
            if got is None:
                return False
            count = got
        role = self.text("role", found["role"][1]) if "role" in found else None
        if role is not None and not self.role_name(role, found["role"][1]):
            return False
        not_author = False
        if "not_author" in found:
            not_author = bool(self.boolean("not_author", found["not_author"][1]))
        params.update(count=count, role=role, not_author=not_author)
        return True

    def gate_window(
        self, node: MapNode, found: Mapping[str, Any], params: dict[str, object]
    ) -> bool:
        if "deny" not in found:
            self.add(
                node,
                "missing required key 'deny' in a window gate",
                hint='e.g. - window: {deny: "Fri 16:00-Mon 08:00", timezone: Europe/Berlin}',
            )
            return False
        spans = self.strings("deny", found["deny"][1])
        timezone = "UTC"
        if "timezone" in found:
            timezone = self.text("timezone", found["timezone"][1]) or "UTC"
        from conveyor.spec.windows import WindowError, check_timezone, parse_windows

        ok = spans is not None
        for text, item in spans or ():
            try:
                parse_windows(text)
            except WindowError as exc:
                self.add(item, f"'deny': {exc.message}", hint=exc.hint)
                ok = False
        if "timezone" in found:
            try:
                check_timezone(timezone)
            except WindowError as exc:
                self.add(found["timezone"][1], exc.message, hint=exc.hint)
                ok = False
        params.update(deny=[t for t, _ in spans or ()], timezone=timezone)
        return ok

    def target(self, environment: str, node: Node) -> TargetSpec | None:
        """``{type: process, command, health}`` or ``{type: command, deploy, health, rollback}``."""
        if not isinstance(node, MapNode):
            self.wrong_type(
                "target",
                "a mapping such as {type: process, command: ./serve --port $PORT}",
                node,
            )
            return None
        type_entry = next(
            ((k, v) for k, v in node.items if isinstance(k.value, str) and k.value == "type"), None
        )
        if type_entry is None:
            self.add(
                node,
                f"missing required key 'type' in the target of environment '{environment}'",
                hint="type: process (run it as a local service) or type: command (your scripts)",
            )
            return None
        kind = self.text("type", type_entry[1])
        if kind is None:
            return None
        if kind not in TARGET_TYPES:
            self.add(
                type_entry[1],
                f"unknown target type '{kind}'",
                hint=self.suggest(kind, TARGET_TYPES) or "known types: " + ", ".join(TARGET_TYPES),
            )
            return None
        found = self.fields(node, TARGET_KEYS[kind], f"in a {kind} target")
        health_http = health_command = None
        if "health" in found:
            health_http, health_command = self.health(found["health"][1], kind)
        if kind == "process":
            command = self.required_script(found, "command", node, environment)
            if command is None:
                return None
            return TargetSpec(
                "process", command=command, health_http=health_http, health_command=health_command
            )
        deploy = self.required_script(found, "deploy", node, environment)
        rollback = self.text("rollback", found["rollback"][1]) if "rollback" in found else None
        if rollback is not None and self.too_long("'rollback'", found["rollback"][1], rollback):
            return None
        if deploy is None:
            return None
        return TargetSpec(
            "command", deploy=deploy, health_command=health_command, rollback=rollback
        )

    def required_script(
        self,
        found: Mapping[str, tuple[ScalarNode, Node]],
        key: str,
        node: MapNode,
        environment: str,
    ) -> str | None:
        if key not in found:
            self.add(node, f"missing required key '{key}' in the target of '{environment}'")
            return None
        script = self.text(key, found[key][1])
        if script is not None and not script.strip():
            self.add(found[key][1], f"'{key}' of environment '{environment}' is empty")
            return None
        if script is not None and self.too_long(
            f"'{key}' of environment '{environment}'", found[key][1], script
        ):
            return None
        return script

    def health(self, node: Node, kind: str) -> tuple[str | None, str | None]:
        """``{http: /path}``, ``{command: script}`` or a script (HTTP for process targets only)."""
        if isinstance(node, ScalarNode) and isinstance(node.value, str):
            if not node.value.strip():
                self.add(node, "'health' is empty", hint="give a script, or leave 'health' out")
                return None, None
            return None, None if self.too_long("'health'", node, node.value) else node.value
        if not isinstance(node, MapNode):
            self.wrong_type("health", "{http: /healthz}, {command: ...} or a script", node)
            return None, None
        found = self.fields(node, HEALTH_KEYS if kind == "process" else ("command",), "in health")
        if len(found) != 1:
            if not found:
                self.add(node, "'health' needs 'http' or 'command'")
            else:
                self.add(node, "'health' takes either 'http' or 'command', not both")
            return None, None
        if "http" in found:
            path = self.text("http", found["http"][1])
            if path is not None and not path.startswith("/"):
                self.add(
                    found["http"][1],
                    f"health path '{path}' must start with '/'",
                    hint="it is requested from http://127.0.0.1:$PORT, e.g. /healthz",
                )
                return None, None
            return path, None
        command = self.text("command", found["command"][1])
        if command is not None and not command.strip():
            self.add(found["command"][1], "'command' of 'health' is empty", hint="give a script")
            return None, None
        if command is not None and self.too_long("'health'", found["command"][1], command):
            return None, None
        return None, command

    def run(self, job: _JobDraft, node: Node) -> None:
        if isinstance(node, SeqNode):
            self.wrong_type(
                "run",
                "a string (a shell script)",
                node,
                hint="write the commands as one block:\nrun: |\n  first command\n  second command",
            )
            return
        script = self.text("run", node)
        if script is not None and not script.strip():
            self.add(node, f"'run' of job '{job.name}' is empty", hint="give the shell script")
        elif script is not None and not self.too_long(f"'run' of job '{job.name}'", node, script):
            job.run = script

    def reports(self, job: _JobDraft, node: Node) -> None:
        if isinstance(node, ScalarNode) and node.value is None and not node.quoted:
            return
        if not isinstance(node, MapNode):
            self.wrong_type("reports", 'a mapping such as {junit: "reports/*.xml"}', node)
            return
        found = self.fields(node, REPORT_KEYS, f"in the reports of job '{job.name}'")
        if "junit" in found:
            patterns = self.path_patterns("junit", found["junit"][1])
            if patterns is not None:
                job.junit = patterns
        for key in ("coverage", "metrics"):
            if key in found:
                setattr(job, key, self.report_path(key, found[key][1]))

    def report_path(self, key: str, node: Node) -> str | None:
        """One file in the workspace (no wildcards): ``coverage.xml``, ``reports/perf.json``."""
        patterns = self.path_patterns(key, node)
        if patterns is None:
            return None
        if len(patterns) != 1 or any(c in patterns[0] for c in "*?["):
            self.add(
                node,
                f"'{key}' names one file, got {describe(node)}",
                hint="e.g. coverage: coverage.xml or metrics: reports/perf.json",
            )
            return None
        return patterns[0]

    def timeout(self, job: _JobDraft, node: Node) -> None:
        value = node.value if isinstance(node, ScalarNode) else None
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            self.wrong_type("timeout", "a duration such as 90s, 10m or 1h30m", node)
            return
        try:
            job.timeout_s = parse_duration(value)
        except ValueError as exc:
            self.add(node, f"'timeout': {exc}")

    # -- across jobs -----------------------------------------------------------------------

    def link(
        self, stages: list[_StageDraft], artifacts: Mapping[str, ArtifactSpec]
    ) -> tuple[StageSpec, ...]:
        """Check job names across the pipeline, ``needs``, cycles and ``outputs``; build the
        stages."""
        outputs = self.outputs(stages, artifacts)
        owner: dict[str, _JobDraft] = {}
        stage_order = {stage.name: index for index, stage in enumerate(stages)}
        for stage in stages:
            for job in stage.jobs:
                first = owner.get(job.name)
                if first is None:
                    owner[job.name] = job
                    continue
                if job.key is first.key:
                    self.add(
                        job.key,
                        f"job '{job.name}' is in stages '{first.stage}' and '{job.stage}':"
                        " an alias repeats the jobs of a stage",
                        hint="job names must be unique across the whole pipeline",
                    )
                    continue
                self.add(
                    job.key,
                    f"duplicate job name '{job.name}': already defined in stage "
                    f"'{first.stage}' at line {first.key.line}",
                    hint="job names must be unique across the whole pipeline",
                )
        specs: list[StageSpec] = []
        for stage in stages:
            names = [job.name for job in stage.jobs]
            members = set(names)
            edges: dict[str, list[str]] = {}
            for job in stage.jobs:
                edges[job.name] = self.needs(job, names, members, owner, stage_order)
            for cycle in find_cycles(edges):
                ring = cycle[:-1]
                start = min(range(len(ring)), key=lambda i: names.index(ring[i]))
                ring = ring[start:] + ring[:start]
                first_job = next(job for job in stage.jobs if job.name == ring[0])
                self.add(
                    first_job.key,
                    "dependency cycle: " + " -> ".join([*ring, ring[0]]),
                    hint="remove one of these needs",
                )
            specs.append(
                StageSpec(
                    name=stage.name,
                    jobs=tuple(
                        JobSpec(
                            name=job.name,
                            stage=stage.name,
                            run=job.run,
                            needs=tuple(edges[job.name]),
                            env=job.env,
                            timeout_s=job.timeout_s,
                            retries=job.retries,
                            junit=job.junit,
                            inputs=job.inputs,
                            cache=job.cache,
                            allow_failure=job.allow_failure,
                            outputs=outputs.get(job.name, ()),
                            coverage=job.coverage,
                            metrics=job.metrics,
                            location=Location(job.key.line, job.key.column),
                        )
                        for job in stage.jobs
                    ),
                    location=Location(stage.node.line, stage.node.column),
                    gates=stage.gates,
                )
            )
        self.check_report_refs(stages)
        return tuple(specs)

    def check_report_refs(self, stages: list[_StageDraft]) -> None:
        """A gate reads a coverage or metrics file only if some job declares it as a report."""
        declared = {
            (kind, getattr(job, kind))
            for stage in stages
            for job in stage.jobs
            for kind in ("coverage", "metrics")
            if getattr(job, kind)
        }
        for kind, path, node in self._report_refs:
            if path is not None and (kind, path) not in declared:
                self.add(
                    node,
                    f"no job declares '{path}' as its {kind} report",
                    hint=f"add reports: {{{kind}: {path}}} to the job that writes it",
                )

    def deploy_stages(
        self,
        drafts: list[_StageDraft],
        specs: tuple[StageSpec, ...],
        artifacts: Mapping[str, ArtifactSpec],
        environments: Mapping[str, EnvironmentSpec],
    ) -> tuple[StageSpec, ...]:
        """Check deploy stages and environments' ``requires`` against the stages; attach them."""
        order = {draft.name: index for index, draft in enumerate(drafts)}
        for requiring, nodes in self._requires_nodes.items():
            for stage, item in nodes:
                if stage not in order:
                    hint = self.suggest(stage, list(order))
                    self.add(
                        item,
                        f"environment '{requiring}' requires stage '{stage}', which is not a stage",
                        hint=hint or "stages: " + _quote_list(list(order)),
                    )
        producers: dict[str, str] = {}
        for draft in drafts:
            for job in draft.jobs:
                for name, _ in job.outputs:
                    producers.setdefault(name, draft.name)
        result = []
        for draft, spec in zip(drafts, specs, strict=True):
            if draft.deploy is None:
                result.append(spec)
                continue
            env_name, artifact, node = draft.deploy
            environment = environments.get(env_name) if env_name else None
            if env_name and environment is None:
                self.add(
                    node,
                    f"stage '{draft.name}' deploys to '{env_name}', which is not an environment",
                    hint=self.suggest(env_name, list(environments))
                    or "declare it under the top-level 'environments:' key",
                )
            if artifact is None:
                if len(artifacts) == 1:
                    artifact = next(iter(artifacts))
                else:
                    self.add(
                        node,
                        f"the deploy of stage '{draft.name}' needs 'artifact'",
                        hint="which artifact to deploy: "
                        + (_quote_list(list(artifacts)) or "declare one under 'artifacts:'"),
                    )
            elif artifact not in artifacts:
                self.add(
                    node,
                    f"stage '{draft.name}' deploys artifact '{artifact}', which is not declared",
                    hint=self.suggest(artifact, list(artifacts))
                    or "declare it under the top-level 'artifacts:' key",
                )
                artifact = None
            if artifact is not None:
                built = producers.get(artifact)
                if built is None or order[built] >= order[draft.name]:
                    self.add(
                        node,
                        f"stage '{draft.name}' deploys '{artifact}',"
                        " but no earlier stage builds it",
                        hint=f"list '{artifact}' in the outputs of a job of an earlier stage",
                    )
            if environment is not None:
                for required in environment.requires:
                    if required == draft.name:
                        self.add(
                            node,
                            f"environment '{environment.name}' requires stage '{required}',"
                            f" the stage that deploys to it: a stage cannot require itself",
                            hint="require the stages whose jobs must pass before the deployment",
                        )
                    elif required in order and order[required] >= order[draft.name]:
                        self.add(
                            node,
                            f"environment '{environment.name}' requires stage '{required}',"
                            f" which does not run before stage '{draft.name}'",
                            hint=f"move stage '{draft.name}' after '{required}'",
                        )
            if env_name and artifact:
                result.append(
                    StageSpec(
                        spec.name,
                        (),
                        spec.location,
                        DeploySpec(env_name, artifact, Location(node.line, node.column)),
                        spec.gates,
                    )
                )
        return tuple(result)

    def outputs(
        self, stages: list[_StageDraft], artifacts: Mapping[str, ArtifactSpec]
    ) -> dict[str, tuple[str, ...]]:
        """Each job's valid ``outputs``: declared artifacts, each published by one job."""
        producer: dict[str, _JobDraft] = {}
        result: dict[str, tuple[str, ...]] = {}
        for stage in stages:
            for job in stage.jobs:
                valid: list[str] = []
                for name, node in job.outputs:
                    if name not in artifacts and name in self.declared_artifacts:
                        continue  # declared, but its entry has a problem of its own
                    if name not in artifacts:
                        declared = list(artifacts)
                        suggestion = self.suggest(name, declared)
                        listing = (
                            "declared artifacts: " + _quote_list(declared)
                            if declared
                            else "declare it under the top-level 'artifacts:' key, e.g.\n"
                            f"artifacts:\n  {name}: {{path: dist/{name}.tar.gz}}"
                        )
                        self.add(
                            node,
                            f"job '{job.name}' outputs '{name}', which is not a declared artifact",
                            hint=f"{suggestion} ({listing})" if suggestion else listing,
                        )
                    elif name in valid:
                        self.add(node, f"'{name}' is listed twice in the outputs of '{job.name}'")
                    elif name in producer and producer[name].key is not job.key:
                        first = producer[name]
                        self.add(
                            node,
                            f"artifact '{name}' is already an output of job '{first.name}'"
                            f" (line {first.key.line})",
                            hint="an artifact is built once, by one job; later jobs receive it",
                        )
                    else:
                        producer[name] = job
                        valid.append(name)
                result[job.name] = tuple(valid)
        return result

    def needs(
        self,
        job: _JobDraft,
        stage_jobs: list[str],
        members: Collection[str],
        owner: Mapping[str, _JobDraft],
        stage_order: Mapping[str, int],
    ) -> list[str]:
        """The valid needs of a job; every other one is a problem."""
        valid: list[str] = []
        seen: set[str] = set()
        for need, node in job.needs:
            if need == job.name:
                self.add(node, f"job '{job.name}' needs itself", hint="remove it from needs")
            elif need in seen:
                self.add(node, f"'{need}' is listed twice in the needs of job '{job.name}'")
            elif need in members:
                valid.append(need)
            elif need in self.refused_jobs:
                pass  # its name is reported where the job is written
            elif need in owner:
                other = owner[need].stage
                if stage_order.get(other, 0) < stage_order.get(job.stage, 0):
                    hint = (
                        f"remove it: stage '{other}' always finishes before "
                        f"stage '{job.stage}' starts"
                    )
                else:
                    hint = f"stage '{other}' runs after stage '{job.stage}'; move one of the jobs"
                self.add(
                    node,
                    f"job '{need}' is in stage '{other}'; needs only links jobs of the same "
                    "stage: earlier stages always finish first",
                    hint=hint,
                )
            else:
                others = [name for name in stage_jobs[:21] if name != job.name][:20]
                listing = (
                    f"jobs of stage '{job.stage}': {_quote_list(others)}"
                    + (f", ... ({len(stage_jobs) - 21} more)" if len(stage_jobs) > 21 else "")
                    if others
                    else f"stage '{job.stage}' has no other jobs"
                )
                suggestion = self.suggest(need, stage_jobs, besides=job.name)
                self.add(
                    node,
                    f"job '{job.name}' needs '{need}', which is not a job",
                    hint=f"{suggestion} ({listing})" if suggestion else listing,
                )
            seen.add(need)
        return valid


def build_pipeline(root: Node, source: str, digest: str) -> PipelineSpec:
    """Validate a pipeline file's node tree and build its :class:`PipelineSpec`.

    Args:
        root: The document, from :func:`conveyor.spec.loader.load_document`.
        source: The file name used in problems and recorded in the spec.
        digest: ``sha256:<hex>`` of the file's bytes.

    Returns:
        The validated pipeline.

    Raises:
        SpecError: With every problem found in the file.
    """
    schema = _Schema(source)
    spec = schema.pipeline(root, digest)
    if schema.problems or spec is None:
        raise SpecError(schema.problems)
    return spec
