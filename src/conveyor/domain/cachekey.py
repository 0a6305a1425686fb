"""Content-addressed job cache keys (pure).

A job's key covers everything that can change what it does: its script, its resolved environment
(secret *values* only as digests), the keys of the jobs it needs, and the digest of its inputs
(the files its ``inputs`` patterns match in the revision, or the whole tree).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

from conveyor.domain.canonical import canonical_json

KEY_VERSION = 2


def digest_json(value: object) -> str:
    """``sha256:<hex>`` of the canonical JSON form of ``value``."""
    data = canonical_json(value)
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob: ``**`` crosses directories, ``*`` and ``?`` do not.

    A pattern ending in ``/`` or ``/**`` matches everything below that directory.
    """
    if pattern.endswith("/"):
        pattern += "**"
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def inputs_digest(files: Mapping[str, str], patterns: Sequence[str] | None, tree_id: str) -> str:
    """Digest of the files a job depends on.

    Args:
        files: path -> content id (git blob id or sha256) of every file of the revision.
        patterns: the job's ``inputs`` globs; ``None`` means the whole tree.
        tree_id: an id of the whole tree, used when ``patterns`` is ``None``.
    """
    if patterns is None:
        return "tree:" + tree_id
    regexes = [glob_regex(p.removeprefix("./")) for p in patterns]
    chosen = sorted(
        (path, blob) for path, blob in files.items() if any(r.match(path) for r in regexes)
    )
    return digest_json(chosen)


def job_cache_key(
    *,
    script: str,
    env: Mapping[str, str],
    secret_digests: Mapping[str, str],
    needs_keys: Mapping[str, str],
    inputs: str,
    outputs: Mapping[str, Sequence[str]] | None = None,
    artifact_keys: Mapping[str, str] | None = None,
) -> str:
    """The cache key of one job of one run.

    ``outputs`` maps each artifact the job publishes to its ``[path, kind]``;
    ``artifact_keys`` maps each artifact it receives to the key of the job that builds it.
    """
    return digest_json(
        {
            "v": KEY_VERSION,
            "script": script,
            "env": dict(env),
            "secrets": dict(secret_digests),
            "needs": dict(needs_keys),
            "inputs": inputs,
            "outputs": {k: list(v) for k, v in (outputs or {}).items()},
            "artifacts": dict(artifact_keys or {}),
        }
    )
