"""Canonical JSON: the one text form of a value that the record hashes and stores."""

from __future__ import annotations

import json

_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
"""Built once: ``json.dumps`` with these options builds a new encoder at every call."""


def canonical_json(value: object) -> str:
    """Sorted keys, no spaces, UTF-8 as is."""
    return _ENCODER.encode(value)
