"""Canonical JSON: the one text form of a value that the record hashes and stores."""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]

_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
"""Built once: ``json.dumps`` with these options builds a new encoder at every call."""

_C_ENCODE = (
    None
    if c_make_encoder is None
    else c_make_encoder(
        None, _ENCODER.default, encode_basestring, None, ":", ",", True, False, False
    )
)
"""The C encoder behind ``_ENCODER``, built once too (``encode`` builds one per call), without
the circular-reference markers: payloads are trees built from events' fields."""


def canonical_json(value: object) -> str:
    """Sorted keys, no spaces, UTF-8 as is."""
    if _C_ENCODE is None:
        return _ENCODER.encode(value)
    return "".join(_C_ENCODE(value, 0))
