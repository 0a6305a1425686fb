"""Hand a checkpoint to the user's shipping command (``CONVEYOR_CHECKPOINT_COMMAND``).

As PostgreSQL's ``archive_command``: a shell command, given the checkpoint on its standard
input, that puts it somewhere this machine cannot rewrite (``ssh backup 'cat > ...'``, an
object store's copy command, a write-once folder). Exit status 0 means it is kept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from typing import IO

from conveyor.domain.text import inline

OUTPUT_SHOWN = 2000
"""The end of the command's output shown when it fails (characters)."""


def ship(command: str, data: bytes, env: Mapping[str, str], timeout_s: float) -> str | None:
    """Run ``command`` with ``sh -c``, ``data`` on its standard input, in a session of its
    own; ``None`` when it exits 0 within ``timeout_s``, else what went wrong ("exited with
    status 3: <the end of what it printed>"). A command that runs too long is killed, with
    its process group."""
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", command],
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=output,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            return f"cannot be started: {exc.strerror or exc}"
        try:
            proc.communicate(data, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return f"did not finish within {timeout_s:g} s and was stopped" + _tail(output)
        except BaseException:
            _kill(proc)  # a Ctrl-C: it does not run on without us
            raise
        if proc.returncode == 0:
            return None
        if proc.returncode < 0:
            return f"was killed by signal {-proc.returncode}" + _tail(output)
        return f"exited with status {proc.returncode}" + _tail(output)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.wait()


def _tail(output: IO[bytes]) -> str:
    """The end of what the command printed, on one line, escapes neutralised (``""`` if
    nothing)."""
    try:
        size = output.seek(0, os.SEEK_END)
        output.seek(max(0, size - 4 * OUTPUT_SHOWN))
        raw = output.read()
    except (OSError, ValueError):
        return ""
    text = " ".join(inline(raw.decode("utf-8", "replace")).split())[-OUTPUT_SHOWN:]
    return f": {text}" if text else ""
