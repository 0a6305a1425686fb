"""Deploys with the user's own scripts: a deploy script, an optional health and rollback script.

Each script runs with ``bash --noprofile --norc -eo pipefail -c SCRIPT`` in ``workdir`` (the
checkout of the repository at the deployment's revision, prepared by the caller), in a new
session, with stdin from ``/dev/null`` and its output appended, through a log keeper (rotated
at ``logs.max_size``), to ``<env>/logs/<deployment>.log``. A script that runs longer than
``timeout_s`` has its whole process group terminated (SIGTERM, two seconds, SIGKILL) and
fails. Processes a script leaves running after it exits are left alone: the scripts own the
service they deploy. A script that runs when the deployment is cancelled (Ctrl-C or SIGTERM)
is terminated the same way.

Script contract:

* **deploy** puts the artifact in place and exits 0 once it is; it must be *idempotent*: it is
  run again with the previous release to restore it when there is no rollback script.
* **health** exits 0 when the release is healthy; it is retried (every ``health_interval_s``)
  until it does or the check's deadline passes.
* **rollback** brings the previous release back after a failed one.

Variables (besides the inherited environment, without ``CONVEYOR_RUN_TOKEN``):

=================================== ===========================================================
``CONVEYOR_ARTIFACT_PATH``          the artifact of the release the script is about: the one
                                    deployed or checked, or, for a rollback (or a deploy run to
                                    restore), the release to bring back
``CONVEYOR_ARTIFACT_DIGEST``        its digest (``sha256:...``)
``CONVEYOR_ENVIRONMENT``            the environment's name
``CONVEYOR_DEPLOYMENT_ID``          the deployment that made that release
``CONVEYOR_REVISION``               the revision it was built from
``CONVEYOR_PREVIOUS_DIGEST``        deploy only: the release it replaces ("" if none)
``CONVEYOR_PREVIOUS_ARTIFACT_PATH`` deploy only: that release's artifact ("" if none)
``CONVEYOR_FAILED_DIGEST``          when restoring: the digest of the release that failed
                                    ("" otherwise)
=================================== ===========================================================

Every variable is always set (possibly empty), so scripts may use ``set -u``. The output of a
restore goes to the failed deployment's log, where it is looked for.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import subprocess
import termios
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conveyor.adapters.logkeeper import say
from conveyor.adapters.targets.process import (
    BASH,
    CUT_SHORT,
    DEFAULT_LOG_LIMITS,
    LogLimits,
    describe_exit,
    forget_keeper,
    keep_child,
    record_keeper,
    release_env,
    run_bounded,
    start_log_keeper,
)
from conveyor.domain.delivery import Health, Release
from conveyor.errors import DeployCancelled, DeployError, NotStarted


class CommandTarget:
    """Target port implementation that delegates to user scripts (see the module docstring).

    ``timeout_s`` bounds each script run; ``health_interval_s`` is the pause between tries of
    the health script; ``cancelled()`` stops a script that runs (``DeployCancelled``).
    """

    stops_releases = False

    def __init__(
        self,
        env_dir: Path,
        *,
        deploy: str,
        health: str | None,
        rollback: str | None,
        workdir: Path,
        timeout_s: float = 600,
        base_env: Mapping[str, str] | None = None,
        health_interval_s: float = 1.0,
        cancelled: Callable[[], bool] = lambda: False,
        logs: LogLimits = DEFAULT_LOG_LIMITS,
    ) -> None:
        self._cancelled = cancelled
        self._logs = logs
        self._env_dir = Path(env_dir)
        self._deploy = deploy
        self._health = health
        self._rollback = rollback
        self._workdir = Path(workdir)
        self._timeout_s = timeout_s
        self._base_env = base_env
        self._health_interval_s = health_interval_s

    def start(self, release: Release, previous: Release | None) -> None:
        """Run the deploy script for ``release``; raises ``DeployError`` unless it exits 0."""
        env = self._env(release, previous=previous, failed=None)
        self._run_or_fail("deploy", self._deploy, env, self._log_path(release))

    def check(
        self, release: Release, timeout_s: float, cancelled: Callable[[], bool] = lambda: False
    ) -> Health:
        """Run the health script until it exits 0, ``timeout_s`` has passed or ``cancelled()``
        (looked at between tries)."""
        if self._health is None:
            return Health(True, "no health script; the deploy script succeeded")
        log = self._log_path(release)
        env = self._env(release, previous=None, failed=None)
        began = time.monotonic()
        deadline = began + timeout_s
        tries = 0
        while True:
            if cancelled() or self._cancelled():
                return Health(False, CUT_SHORT, cut_short=True)
            tries += 1
            remaining = deadline - time.monotonic()
            try:
                code = self._run(
                    "health",
                    self._health,
                    env,
                    log,
                    min(self._timeout_s, remaining),
                    lambda: cancelled() or self._cancelled(),
                )
            except DeployCancelled:
                return Health(False, CUT_SHORT, cut_short=True)
            elapsed = time.monotonic() - began
            if code == 0:
                return Health(True, f"the health script succeeded (try {tries}, {elapsed:.1f} s)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(self._health_interval_s, remaining))
        plural = "y" if tries == 1 else "ies"
        return Health(
            False,
            f"the health script did not succeed within {timeout_s:g} s ({tries} tr{plural}; "
            f"last: {describe_exit(code)}); see {log}",
        )

    def stop(self, release: Release) -> None:
        """Nothing to do: the scripts own the service (the next deploy or rollback replaces it)."""
        del release

    def restore(self, previous: Release, failed: Release) -> None:
        """Run the rollback script, or else the deploy script again, to bring ``previous`` back."""
        env = self._env(previous, previous=None, failed=failed)
        log = self._log_path(failed)
        # A restore is the recovery: a cancel does not stop it (the timeout still does).
        if self._rollback is not None:
            self._run_or_fail("rollback", self._rollback, env, log, cancellable=False)
        else:
            self._run_or_fail("deploy", self._deploy, env, log, cancellable=False)

    def describe(self, release: Release) -> dict[str, Any]:
        """``running`` is unknown (``None``) here; ``log`` is the deployment's log."""
        return {"running": None, "log": str(self._log_path(release))}

    # -- internals ----------------------------------------------------------------------------

    def _log_path(self, release: Release) -> Path:
        return self._env_dir / "logs" / f"{release.deployment_id}.log"

    def _env(
        self, release: Release, *, previous: Release | None, failed: Release | None
    ) -> dict[str, str]:
        return release_env(
            self._base_env,
            release,
            {
                "CONVEYOR_PREVIOUS_DIGEST": previous.digest if previous else "",
                "CONVEYOR_PREVIOUS_ARTIFACT_PATH": previous.artifact_path if previous else "",
                "CONVEYOR_FAILED_DIGEST": failed.digest if failed else "",
            },
        )

    def _run_or_fail(
        self,
        what: str,
        script: str,
        env: Mapping[str, str],
        log: Path,
        *,
        cancellable: bool = True,
    ) -> None:
        code = self._run(
            what, script, env, log, self._timeout_s, None if cancellable else (lambda: False)
        )
        if code is None:
            raise DeployError(
                f"{what} script did not finish within {self._timeout_s:g} s and was killed; "
                f"see {log}",
                hint="find where it waits in the log, or raise the environment's timeout",
            )
        if code != 0:
            raise DeployError(
                f"{what} script {describe_exit(code)}; see {log}",
                hint=f"the {what} script must exit 0 when it has done its part",
            )

    def _run(
        self,
        what: str,
        script: str,
        env: Mapping[str, str],
        log: Path,
        timeout_s: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> int | None:
        """Run one script with its output appended to ``log``; its exit code, None on timeout.

        Raises ``DeployCancelled`` once the deployment is cancelled (the script is stopped),
        or, given, once ``cancelled()`` says so (instead).
        """
        also = cancelled

        def stop() -> bool:
            return also() if also is not None else self._cancelled()

        if stop():
            raise NotStarted(f"the {what} script was not started")
        release = f"{env['CONVEYOR_ARTIFACT_DIGEST']} of deployment {env['CONVEYOR_DEPLOYMENT_ID']}"
        out = _script_output(log, self._logs, env, self._env_dir)
        # Conveyor's own lines go through the keeper too: they stay in order with the script's.
        say(out, f"{_now()}: {what} script for {release}")
        try:
            code = run_bounded(
                [*BASH, "-eo", "pipefail", "-c", script],
                cwd=str(self._workdir),
                env=env,
                stdout=out,
                timeout_s=max(0.1, timeout_s),
                cancelled=stop,
            )
        except OSError as exc:
            raise DeployError(
                f"cannot run the {what} script in {self._workdir}: {exc.strerror or exc}",
                hint="check that the checkout exists and that bash is installed",
            ) from exc
        except DeployCancelled:
            say(out, f"{_now()}: {what} script stopped: the deployment was cancelled")
            raise DeployCancelled(f"the {what} script was stopped partway (see {log})") from None
        finally:
            _wait_read(out)
        if code is None:
            say(out, f"{_now()}: {what} script killed after {timeout_s:g} s")
            _wait_read(out)
        return code


_script_logs: dict[Path, tuple[int, subprocess.Popen[bytes], Path, int, int]] = {}
"""The keepers of the logs this process's scripts write, by path (write end, keeper, env
folder, deployment, keeper's start time): one per log, so that the scripts of a deployment,
Conveyor's lines and whatever a script leaves running write through one keeper, in order,
under one cap. Their write ends are closed when the deployment is over
(``release_script_logs``)."""


def release_script_logs() -> None:
    """Close this process's ends of its scripts' log pipes (a deployment is over): each keeper
    ends once what its scripts left running ends too, and its line in the record with it."""
    for log, (out, keeper, env_dir, deployment_id, start_time) in list(_script_logs.items()):
        del _script_logs[log]
        with contextlib.suppress(OSError):
            os.close(out)
        with contextlib.suppress(subprocess.TimeoutExpired):
            keeper.wait(timeout=0.2)
        if keeper.poll() is not None:
            forget_keeper(env_dir, deployment_id, keeper.pid, start_time)


def _script_output(log: Path, limits: LogLimits, env: Mapping[str, str], env_dir: Path) -> int:
    """The write end of the pipe to ``log``'s keeper (started on first use, or again if it
    died). The keeper is recorded in ``<env>/run/<deployment>.keeper`` (``env logs -F``
    follows the log while it runs)."""
    entry = _script_logs.get(log)
    if entry is not None and entry[1].poll() is None:
        return entry[0]
    if entry is not None:
        os.close(entry[0])
        forget_keeper(entry[2], entry[3], entry[1].pid, entry[4])
        del _script_logs[log]
    deployment_id = int(env["CONVEYOR_DEPLOYMENT_ID"])
    out, keeper = start_log_keeper(log, limits, env["CONVEYOR_ENVIRONMENT"], deployment_id)
    start_time = keep_child(keeper)
    _script_logs[log] = (out, keeper, env_dir, deployment_id, start_time)
    record_keeper(env_dir, deployment_id, keeper.pid, start_time)
    return out


def _wait_read(out: int, timeout_s: float = 1.0) -> None:
    """Wait, a short while at most, until the keeper has read what the pipe holds (it writes
    it to the log at once): a script's output is in its log when its result is told."""
    unread = array.array("i", [0])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.ioctl(out, termios.FIONREAD, unread, True)
        except OSError:
            return
        if unread[0] == 0 or time.monotonic() >= deadline:
            return
        time.sleep(0.002)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
