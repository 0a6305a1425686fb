"""The pipeline definition: ``conveyor.yml`` read, validated and turned into typed specs.

Pure: only the standard library and ruamel.yaml's low-level parser. ``parse_pipeline`` runs the
hostile-input-safe :mod:`~conveyor.spec.loader` then the :mod:`~conveyor.spec.schema`; every
problem in a file is reported at once in one :class:`~conveyor.errors.SpecError`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from conveyor.errors import SpecError, SpecProblem
from conveyor.spec.models import JobSpec, Location, PipelineSpec, StageSpec

MAX_FILE_BYTES = 512 * 1024
"""Files larger than this are refused before parsing (the loader checks it too). Reading YAML
in pure Python takes about 1.3 s per MiB: the limit keeps the refusal of any file under 1 s."""


def too_large(size: int) -> str:
    """The problem of a pipeline file of ``size`` bytes, over ``MAX_FILE_BYTES``."""
    return f"the file is too large: {size:,} bytes, the limit is {MAX_FILE_BYTES:,} bytes (512 KiB)"


__all__ = [
    "JobSpec",
    "Location",
    "PipelineSpec",
    "StageSpec",
    "load_pipeline_file",
    "parse_pipeline",
]

_FILE_HINT = "run `conveyor init` to write a starter conveyor.yml, or pass -f PATH"


def parse_pipeline(data: bytes, source: str = "conveyor.yml") -> PipelineSpec:
    """Read and validate a pipeline file's bytes.

    Args:
        data: The file's content.
        source: The name shown in problems and recorded as ``PipelineSpec.source``.

    Returns:
        The validated pipeline; its ``digest`` is ``sha256:`` and the hex digest of ``data``.

    Raises:
        SpecError: With every problem found.
    """
    # Imported here so that ``conveyor.spec.models``/``graph`` stay cheap to import.
    from conveyor.spec.loader import read_document
    from conveyor.spec.schema import build_pipeline

    root, problems = read_document(data, source)
    try:
        spec = build_pipeline(root, source, "sha256:" + hashlib.sha256(data).hexdigest())
    except SpecError as exc:
        if not problems:
            raise
        # The reader's problems (a duplicate key...) and the schema's, all at once.
        raise SpecError([*problems, *exc.all_problems], complete=exc.complete) from None
    if problems:
        raise SpecError(problems)
    return spec


def _file_error(source: str, message: str, hint: str | None = _FILE_HINT) -> SpecError:
    return SpecError([SpecProblem(source, 1, 1, message, hint=hint)])


def _kind_of(mode: int) -> str:
    """What a file that is not a regular file is (``a FIFO``, ``a character device``...)."""
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def load_pipeline_file(path: Path, display_name: str | None = None) -> PipelineSpec:
    """Read, parse and validate the pipeline file at ``path``.

    Args:
        path: Where the file is.
        display_name: How to name the file in problems (the path as the user gave it);
            defaults to ``str(path)``.

    Returns:
        The validated pipeline.

    Raises:
        SpecError: If the file is missing or unreadable, or has any problem.
    """
    source = display_name if display_name is not None else str(path)
    if os.path.islink(path):  # `run` refuses a committed link: say so now
        raise _file_error(
            source,
            f"{path} is a symbolic link: Conveyor runs the committed pipeline file, which must"
            " be the file itself",
            hint="commit the file itself in place of the link, or pass -f with the file it names",
        )
    try:
        # Non-blocking, so that opening a FIFO does not wait for a writer; only a regular file
        # is then read (a FIFO or a device such as /dev/zero is refused, not read).
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(descriptor, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise _file_error(
                    source,
                    f"{path} is {_kind_of(mode)}, not a regular file",
                    hint="pass -f PATH naming the pipeline file itself",
                )
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise _file_error(source, f"no pipeline file at {path}") from None
    except IsADirectoryError:
        raise _file_error(
            source, f"{path} is a directory, not a pipeline file", hint="pass -f PATH/conveyor.yml"
        ) from None
    except NotADirectoryError:
        raise _file_error(source, f"no pipeline file at {path}") from None
    except PermissionError:
        raise _file_error(
            source, f"cannot read {path}: permission denied", hint="check the file's permissions"
        ) from None
    except OSError as exc:
        raise _file_error(source, f"cannot read {path}: {exc.strerror or exc}", hint=None) from None
    if len(data) > MAX_FILE_BYTES:
        size = path.stat().st_size if path.exists() else len(data)
        raise _file_error(
            source,
            too_large(size),
            hint="a pipeline file is a few kilobytes; is this the right file?",
        )
    return parse_pipeline(data, source)
