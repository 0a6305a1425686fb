"""The composition root: the only module that names concrete adapters.

The CLI (and later the server) call these functions to get a record, recover orphaned runs and
assemble an engine for a run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.adapters.clock import SystemClock
from conveyor.adapters.git import (
    DirtyWorkspace,
    GitSource,
    GitWorkspace,
    without_repository_env,
)
from conveyor.adapters.home import Home
from conveyor.adapters.junit import JunitReportReader
from conveyor.adapters.logs import DEFAULT_CAP as DEFAULT_LOG_CAP
from conveyor.adapters.logs import FileLogStore
from conveyor.adapters.processes import (
    RunLock,
    acquire_run_lock,
    new_owner,
    owner_is_gone,
    run_is_live,
)
from conveyor.adapters.trash import TRASH, discard
from conveyor.domain.events import RunInterrupted
from conveyor.domain.masking import Masker
from conveyor.domain.ports import Observer, SourceSnapshot
from conveyor.domain.text import inline
from conveyor.engine.engine import Engine, RunOptions, RunRequest
from conveyor.errors import ConveyorError, DeployError, UsageError
from conveyor.executors.local import LocalExecutor, kill_tagged
from conveyor.spec.models import PipelineSpec
from conveyor.store.migrate import ensure_schema
from conveyor.store.sqlite import SqliteRecord, check_not_lost, read_head

if TYPE_CHECKING:
    from conveyor.app.deploy import Deployer
    from conveyor.domain.delivery import Release, StageGates, Target
    from conveyor.spec.delivery import EnvironmentSpec

KEEP_WORKSPACES = 5


def open_record(
    home: Home, *, recover: bool = True, say: Callable[[str], None] | None = None
) -> SqliteRecord:
    """The record of ``home`` (created and migrated if needed), orphans recovered (``say``
    tells what a recovered run left unfinished)."""
    home.ensure()
    check_not_lost(home.database)
    if home.database.exists():
        # Open the record first: the schema check's own connection then does not close last,
        # and SQLite does not checkpoint the previous command's write-ahead log into the
        # database on the way (it stays in the log until the next automatic checkpoint).
        record = SqliteRecord(home.database, SystemClock().now)
        try:
            ensure_schema(home.database, lambda: _live_runs(record, home))
        except BaseException:
            record.close()
            raise
    else:
        ensure_schema(home.database)  # a new record: created with its page size, then migrated
        record = SqliteRecord(home.database, SystemClock().now)
    # The note first: a mark is written before its note, so a note without a mark is a loss.
    if say is not None and record.head_was_written() and read_head(home.database) is None:
        say(
            f"warning: {home.database.name}.head is missing, though one was written: events"
            " removed from the end of the record would go unseen, and the next run writes a new"
            " one (`conveyor audit verify` tells, before any other command)"
        )
    if recover:
        recover_orphans(record, home, say)
    _opened.append((home, record))
    return record


def _live_runs(record: SqliteRecord, home: Home) -> list[int]:
    """Runs recorded as running whose lock a process holds now (a ``conveyor run`` holds it
    from before it records the run's start to its end). Only those are probed: a lock being
    taken is never contended, and an orphan's lock file is left for ``recover_orphans``. A
    run not recorded yet has no attempt an upgrade could move."""
    return [run["id"] for run in record.running_runs() if run_is_live(home.locks, run["id"])]


_opened: list[tuple[Home, SqliteRecord]] = []
"""The records this process opened: those it wrote to get a checkpoint shipped at its end."""

CHECKPOINT_COMMAND = "CONVEYOR_CHECKPOINT_COMMAND"
CHECKPOINT_TIMEOUT = "CONVEYOR_CHECKPOINT_TIMEOUT"
DEFAULT_CHECKPOINT_TIMEOUT_S = 60.0
_SECONDS = re.compile(r"[0-9]{1,5}(\.[0-9]{0,6})?|\.[0-9]{1,6}")


def checkpoint_command() -> str | None:
    """The shell command that ships checkpoints off this machine, if one is set."""
    command = os.environ.get(CHECKPOINT_COMMAND, "")
    return command if command.strip() else None


def wrote_records() -> bool:
    """Whether this process wrote to a record."""
    return any(record.appended for _, record in _opened)


def ship_checkpoints(say: Callable[[str], None]) -> bool:
    """At the end of a command: with ``CONVEYOR_CHECKPOINT_COMMAND`` set, ship a checkpoint
    of each record this process wrote to. What fails is said as a warning (the command's own
    outcome stands); whether every one was shipped."""
    command = checkpoint_command()
    if command is None:
        return True
    shipped = True
    homes = {home.root: home for home, record in _opened if record.appended}
    for home in homes.values():
        try:
            ship_checkpoint_of(home, command)
        except ConveyorError as exc:
            shipped = False
            with contextlib.suppress(OSError, ValueError):  # stderr closed or full
                say(f"warning: {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""))
    return shipped


def ship_checkpoint_of(
    home: Home, command: str, *, full: bool = False, again: bool = False
) -> tuple[int, str]:
    """Ship a checkpoint of ``home``'s record with ``command`` (see ``ship_checkpoint``;
    ``full``: after verifying the whole log; ``again``: even if it was shipped already)."""
    from conveyor.adapters.signing import InstanceKey
    from conveyor.app.checkpoints import ship_checkpoint

    timeout_s = checkpoint_timeout()
    clock = SystemClock()
    record = SqliteRecord(home.database, clock.now)
    try:
        key = InstanceKey.load_or_create(home.keys)
        return ship_checkpoint(
            record,
            key,
            command,
            env=without_repository_env(os.environ),  # as jobs: a hook's GIT_DIR is not theirs
            timeout_s=timeout_s,
            now=clock.now(),
            epoch=time.time(),
            full=full,
            again=again,
        )
    finally:
        record.close()


def checkpoint_timeout() -> float:
    """``CONVEYOR_CHECKPOINT_TIMEOUT`` (seconds), or the default."""
    value = os.environ.get(CHECKPOINT_TIMEOUT, "").strip()
    if not value:
        return DEFAULT_CHECKPOINT_TIMEOUT_S
    seconds = float(value) if _SECONDS.fullmatch(value) else -1.0
    if not 0 < seconds <= 86400:
        raise UsageError(
            f"{CHECKPOINT_TIMEOUT} must be a number of seconds above 0 and at most 86400, not"
            f" '{inline(value[:40])}'",
            hint=f"e.g. {CHECKPOINT_TIMEOUT}=120, or unset it for the default"
            f" ({DEFAULT_CHECKPOINT_TIMEOUT_S:g})",
        )
    return seconds


def recover_orphans(
    record: SqliteRecord, home: Home, say: Callable[[str], None] | None = None
) -> list[int]:
    """Mark runs whose owner died ``interrupted`` after killing their jobs; returns their ids.

    A deployment such a run left unfinished is not touched here (stopping what it started
    needs the environment's definition): ``say`` tells how to end it.
    """
    recovered: list[int] = []
    for run in record.running_runs():
        if not owner_is_gone(home.locks, run["id"], run["owner_pid"], run["owner_host"]):
            continue
        killed = kill_tagged(run["owner_token"])
        try:
            record.append(
                [
                    RunInterrupted(
                        run_id=run["id"],
                        reason="the conveyor process running it stopped without finishing it",
                        killed_pids=killed,
                    )
                ],
                guard=_still_running(run["id"]),
            )
        except _AlreadyEnded:
            continue  # another command recovered it meanwhile
        recovered.append(run["id"])
        if say is not None:
            for row in record.unfinished_deployments_of_run(run["id"]):
                say(
                    f"warning: run {run['id']} stopped while deploying to"
                    f" '{row['environment']}' (deployment {row['id']}); what it started may"
                    f" still run: `conveyor env stop {row['environment']}` stops it, the next"
                    " deployment replaces it"
                )
    return recovered


class _AlreadyEnded(Exception):
    """The run is no longer recorded as running (checked inside the write transaction)."""


def _still_running(run_id: int) -> Callable[[Any], None]:
    def guard(conn: Any) -> None:
        row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None or row[0] != "running":
            raise _AlreadyEnded()

    return guard


class CancelFlag:
    """``CancelToken`` set by SIGINT/SIGTERM; the executor's wakeup fd interrupts its wait."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def is_set(self) -> bool:
        return self.signal is not None

    def handler(self, signum: int, _frame: object) -> None:
        self.signal = signum


@contextmanager
def cancellation(executor: LocalExecutor) -> Iterator[CancelFlag]:
    """Install SIGINT/SIGTERM handlers that request cancellation; restore them afterwards."""
    flag = CancelFlag()
    previous = {sig: signal.signal(sig, flag.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_fd = signal.set_wakeup_fd(executor.wakeup_fd, warn_on_full_buffer=False)
    try:
        yield flag
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class PreparedRun:
    """Everything a run needs, assembled."""

    request: RunRequest
    engine: Engine
    executor: LocalExecutor
    lock: RunLock
    workspace: GitWorkspace | DirtyWorkspace


SPEC_CACHE_VERSION = "6"
SPEC_CACHE_KEEP = 32
"""Parsed pipeline files kept in the cache: the most recently used ones."""


def load_committed_spec(
    source: GitSource,
    blob: str,
    source_name: str,
    home: Home,
    *,
    commit: str | None = None,
    rel_path: str | None = None,
) -> PipelineSpec:
    """Parse and validate a committed pipeline file, reusing the result for the same blob.

    A run of an unchanged pipeline file skips reading and parsing it (YAML parsing is slow in
    pure Python for large files): the validated spec is kept as JSON under ``cache/specs/``,
    keyed by the git blob id (a content hash), the file's name and the cache version. A damaged
    entry is ignored and rewritten; the ``SPEC_CACHE_KEEP`` most recently used entries are kept.

    On a cache miss, when ``commit`` and ``rel_path`` (from the repository's root) are given, the
    entry is checked before it is read: a directory, a symbolic link or a file over the size
    limit is refused (``SpecError``) without reading its content.
    """
    import hashlib
    import json

    key_text = f"{SPEC_CACHE_VERSION}\0{source_name}\0{blob}"
    key = hashlib.sha256(key_text.encode("utf-8", "surrogateescape")).hexdigest()
    path = home.root / "cache" / "specs" / f"{key}.json"
    try:
        spec = PipelineSpec.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    else:
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept by the pruning below
        return spec
    from conveyor.spec import (
        parse_pipeline,
    )  # only on a cache miss: YAML libraries are slow to import

    if commit is not None and rel_path is not None:
        _check_committed_file(source, commit, rel_path, source_name)
    spec = parse_pipeline(source.read_blob(blob), source_name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(spec.to_dict()))
        os.replace(tmp, path)
        _prune_spec_cache(path.parent)
    except OSError:
        pass  # the cache is an optimisation only
    return spec


def _check_committed_file(source: GitSource, commit: str, path: str, source_name: str) -> None:
    """Refuse a committed pipeline "file" that is not a regular file of a readable size."""
    import posixpath

    from conveyor.errors import SpecError, SpecProblem
    from conveyor.spec import MAX_FILE_BYTES, too_large

    path = posixpath.normpath(path)
    if path == ".":
        raise SpecError(
            [
                SpecProblem(
                    source_name,
                    1,
                    1,
                    "the repository's root is a directory, not a pipeline file",
                    "pass -f with a file, e.g. -f conveyor.yml",
                )
            ]
        )
    entry = source.tree_entry(commit, path)
    if entry is None:
        return
    mode, kind, size = entry
    at = f"in commit {commit[:12]}"
    message = hint = None
    if kind == "tree":
        message, hint = (
            f"{path} is a directory {at}, not a pipeline file",
            "pass -f DIR/conveyor.yml",
        )
    elif mode == "120000":
        message = f"{path} is a symbolic link {at}: Conveyor reads a committed file, not a link"
        hint = "commit the file itself in place of the link, or pass -f with the file it names"
    elif kind != "blob":
        message, hint = f"{path} is a {kind} {at}, not a pipeline file", None
    elif size is not None and size > MAX_FILE_BYTES:
        message = too_large(size)
        hint = "a pipeline file is a few kilobytes; is this the right file?"
    if message is not None:
        raise SpecError([SpecProblem(source_name, 1, 1, message, hint)])


def _prune_spec_cache(folder: Path) -> None:
    """Delete all but the ``SPEC_CACHE_KEEP`` most recently used entries (and stray temporary
    files of writers that died)."""
    entries = []
    for entry in os.scandir(folder):
        with contextlib.suppress(OSError):
            entries.append((entry.stat().st_mtime, entry.path))
    entries.sort(reverse=True)
    now = time.time()
    kept = 0
    for mtime, name in entries:
        if name.endswith(".json"):
            kept += 1
            if kept <= SPEC_CACHE_KEEP:
                continue
        elif now - mtime < 60:  # a temporary file another writer may still be renaming
            continue
        with contextlib.suppress(OSError):
            os.unlink(name)


def source_snapshot(
    source: GitSource, commit: str | None, spec: PipelineSpec, tree: str | None = None
) -> SourceSnapshot:
    """The snapshot for cache keys; file lists only when some job declares ``inputs``."""
    if commit is None:
        return source.dirty_snapshot()
    return source.snapshot(commit, any(j.inputs is not None for j in spec.jobs), tree)


def prepare_run(
    *,
    home: Home,
    record: SqliteRecord,
    source: GitSource,
    spec: PipelineSpec,
    snapshot: SourceSnapshot,
    options: RunOptions,
    actor: str,
    secrets: Mapping[str, str],
    observer: Observer,
    cancel: CancelFlag,
    executor: LocalExecutor,
    workspace: GitWorkspace | None = None,
    branch: str = "",
) -> PreparedRun:
    """Allocate a run id, take its lock, and build the engine with local adapters.

    ``workspace`` is a checkout already under way (started as soon as the commit was known);
    it moves to ``workspaces/<run id>`` when it is complete.
    """
    cap = log_cap()  # first: a bad setting allocates no run id
    run_id = record.allocate_run_id()
    lock = acquire_run_lock(home.locks, run_id)
    owner = new_owner()
    directory = home.workspaces / str(run_id)
    chosen: GitWorkspace | DirtyWorkspace
    if snapshot.dirty:
        chosen = DirtyWorkspace(source, directory)
    elif workspace is not None:
        workspace.final_directory = directory
        chosen = workspace
    else:
        chosen = GitWorkspace(source, snapshot.revision, directory)
    chosen.cancelled = cancel.is_set  # Ctrl-C stops a long checkout, not only the jobs after it
    # Jobs get the environment conveyor was started with, but not Conveyor's own variables nor
    # those that point git at the user's repository (set when conveyor runs from a git hook).
    base_env = {
        k: v for k, v in without_repository_env(os.environ).items() if not k.startswith("CONVEYOR_")
    }
    request = RunRequest(
        run_id=run_id,
        spec=spec,
        source=snapshot,
        actor=actor,
        owner=owner,
        base_env=base_env,
        secrets=secrets,
        home=str(home.root),
        options=options,
        repository=source.repository_uri() if spec.artifacts else "",
        branch=branch,
    )
    artifacts, attestor, deployer = None, None, None
    if any(stage.deploy for stage in spec.stages):
        deployer = make_deployer(
            home,
            record,
            source,
            observer.on_note,
            secrets=secrets.values(),
            cancelled=cancel.is_set,
            reserved_ports=declared_ports(spec),
        )
    if spec.artifacts:
        from conveyor.adapters.artifacts import FileArtifactStore
        from conveyor.adapters.attestor import KeyAttestor

        artifacts = FileArtifactStore(home.artifacts)
        attestor = KeyAttestor(home.keys)
    engine = Engine(
        record=record,
        executor=executor,
        logs=FileLogStore(home.root, cap),
        reports=JunitReportReader(),
        workspace=chosen,
        clock=SystemClock(),
        observer=observer,
        cancel=cancel,
        artifacts=artifacts,
        attestor=attestor,
        deployer=deployer,
        stage_gates=_stage_gates(record) if any(stage.gates for stage in spec.stages) else None,
    )
    chosen.start()
    return PreparedRun(request, engine, executor, lock, chosen)


def _stage_gates(record: SqliteRecord) -> StageGates:
    from conveyor.app.gates import RecordStageGates

    return RecordStageGates(record)


def declared_ports(spec: PipelineSpec) -> frozenset[int]:
    """The ports the pipeline's environments declare (``port:``)."""
    return frozenset(env.port for env in spec.environments if env.port is not None)


def environment_port(
    env_dir: Path, fixed: int | None, reserved: Collection[int] = frozenset()
) -> int:
    """The environment's port: the declared one, or one allocated once and kept, which is
    none of ``reserved`` (the pipeline's declared ports) nor another environment's kept one."""
    if fixed is not None:
        return fixed
    path = env_dir / "port"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        pass
    from conveyor.adapters.targets.process import allocate_port

    kept = set(reserved)  # and the other environments' ports: free only while they are stopped
    for other in env_dir.parent.glob("*/port"):
        try:
            kept.add(int(other.read_text().strip()))
        except (OSError, ValueError):
            continue
    port = allocate_port(avoid=kept)
    env_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)
    return port


def make_target(
    home: Home,
    source: GitSource | None,
    environment: EnvironmentSpec,
    release: Release,
    cancelled: Callable[[], bool] = lambda: False,
    reserved_ports: Collection[int] = frozenset(),
) -> Target:
    """The adapter for an environment's target; ``cancelled()`` stops a script it runs;
    ``reserved_ports`` are never allocated to it (the ports the pipeline declares)."""
    env_dir = home.environments / environment.name
    # Releases get the environment conveyor was started with, less the same variables.
    base_env = {
        k: v for k, v in without_repository_env(os.environ).items() if not k.startswith("CONVEYOR_")
    }
    target = environment.target
    from conveyor.adapters.targets.process import LogLimits

    logs = LogLimits(environment.log_max_bytes, environment.log_files)
    if target.type == "process":
        from conveyor.adapters.targets.process import ProcessTarget

        return ProcessTarget(
            env_dir,
            target.command,
            port=environment_port(env_dir, environment.port, reserved_ports),
            health_http=target.health_http,
            health_command=target.health_command,
            base_env=base_env,
            logs=logs,
        )
    from conveyor.adapters.targets.command import CommandTarget

    if source is None:
        raise DeployError(
            f"environment '{environment.name}' runs scripts from the repository",
            hint="run this command inside the git repository",
        )
    checkout = env_dir / "checkouts" / str(release.deployment_id)
    complete = checkout / ".git" / "conveyor-complete"
    if not complete.exists():  # a checkout that was interrupted is made again
        GitWorkspace(source, release.revision, checkout).path()
        complete.touch()
    return CommandTarget(
        env_dir,
        deploy=target.deploy,
        health=target.health_command,
        rollback=target.rollback,
        workdir=checkout,
        base_env=base_env,
        cancelled=cancelled,
        logs=logs,
    )


def make_deployer(
    home: Home,
    record: SqliteRecord,
    source: GitSource | None,
    say: Callable[[str], None],
    wait_s: float = 0.0,
    secrets: Iterable[str] = (),
    cancelled: Callable[[], bool] = lambda: False,
    reserved_ports: Collection[int] = frozenset(),
) -> Deployer:
    """A deployer with the local adapters: the store, this instance's key, local targets;
    ``secrets`` (values) are masked in what it says and records; ``reserved_ports`` (the
    pipeline's declared ports) are never allocated to an environment."""
    from conveyor.adapters.artifacts import FileArtifactStore
    from conveyor.adapters.signing import InstanceKey
    from conveyor.app.deploy import Deployer

    key = InstanceKey.load_or_create(home.keys)
    return Deployer(
        record=record,
        store=FileArtifactStore(home.artifacts),
        public_pem=key.public_pem,
        builder_id=key.builder_id,
        environments_dir=home.environments,
        make_target=lambda env, release: make_target(
            home, source, env, release, cancelled, reserved_ports
        ),
        wait_s=wait_s,
        say=say,
        commits=source.commits_since if source is not None else None,
        authors=source.authors_of if source is not None else None,
        masker=Masker(secrets),
        cancelled=cancelled,
        finished=_release_target_resources,
    )


def _release_target_resources() -> None:
    """What targets hold for a deployment, released once it is over (loaded targets only)."""
    command = sys.modules.get("conveyor.adapters.targets.command")
    if command is not None:
        command.release_script_logs()


def log_cap() -> int:
    """The per-attempt log cap in bytes: ``CONVEYOR_LOG_MAX_BYTES``, default 50 MB.

    Raises:
        UsageError: the variable is set but is not a whole number of bytes above 0.
    """
    value = os.environ.get("CONVEYOR_LOG_MAX_BYTES", "").strip()
    if not value:
        return DEFAULT_LOG_CAP
    if len(value) > 18 and value.isascii() and value.isdigit():
        raise UsageError(
            f"CONVEYOR_LOG_MAX_BYTES is too large: {value[:40]}",
            hint=f"at most 999999999999999999; unset it for the default ({DEFAULT_LOG_CAP}, 50 MB)",
        )
    if not (value.isascii() and value.isdigit()) or int(value) == 0:
        raise UsageError(
            f"CONVEYOR_LOG_MAX_BYTES must be a whole number of bytes above 0, not '{value[:40]}'",
            hint=f"e.g. CONVEYOR_LOG_MAX_BYTES=10000000 (10 MB), or unset it for the default"
            f" ({DEFAULT_LOG_CAP})",
        )
    return int(value)


def prune_workspaces(home: Home, keep: int = KEEP_WORKSPACES) -> None:
    """Remove the workspaces of all but the ``keep`` newest runs, and abandoned checkouts.

    They are moved aside at once (a rename) and deleted by a detached ``rm -rf``, so that the
    command does not wait for large trees (``node_modules``) to be deleted.
    """
    if not home.workspaces.is_dir():
        return
    stale: list[Path] = []
    ids: list[int] = []
    for entry in home.workspaces.iterdir():
        name = entry.name
        if name.startswith(".checkout-"):
            pid = name.removeprefix(".checkout-")
            if pid.isascii() and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                stale.append(entry)
        elif name.isascii() and name.isdigit():
            ids.append(int(name))
    ids.sort(reverse=True)
    stale.extend(
        home.workspaces / str(run_id)
        for run_id in ids[keep:]
        if not run_is_live(home.locks, run_id)  # an older run that is still going keeps it
    )
    trash = home.workspaces / TRASH
    if stale or trash.is_dir():
        discard(stale, trash)  # and what an rm that did not finish left there
