"""Secret masking for streams and records.

Masking is best effort, as in every CI system: it replaces the exact value of each secret, its
base64 and URL-encoded forms and, for multi-line secrets, each line of 4 or more characters.
Values derived in other ways (hashes, slices, other encodings) are not recognised; that is
documented for users. ``StreamMasker`` also masks a secret that arrives split across writes, by
holding back only the tail that could still become a secret.

What is shown of job output has its escape sequences and control characters removed
(``conveyor.domain.text.neutralise``), which would join the parts of a secret written with
colours or control characters in between (``hunter2<ESC>[31mpass``). Secrets are therefore also
looked for in the output *as it will be shown*, and such a match masks its whole span,
escape sequences included.
"""

from __future__ import annotations

import dataclasses
import json
import re
from bisect import bisect_right
from collections.abc import Iterable
from functools import cache
from typing import TypeVar
from urllib.parse import quote, quote_plus

MASK = b"***"
_Event = TypeVar("_Event")
MIN_LINE = 4


@cache
def _invisible() -> re.Pattern[bytes]:
    """What ``neutralise`` removes from shown output (as UTF-8 bytes); compiled on first use
    (only a run with secrets needs it)."""
    return re.compile(
        rb"""
    \x1b\[[0-?]*[ -/]*[@-~]               # CSI (colours, cursor moves)
  | \x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?    # OSC, terminated or not (yet)
  | \x1b[PX^_][^\x1b]*(?:\x1b\\)?         # DCS, SOS, PM, APC
  | \x1b[@-Z\\-_]                       # other two-byte escapes
  | \x1b                                 # a lone ESC
  | \xc2\x9b[0-?]*[ -/]*[@-~]             # 8-bit CSI (UTF-8)
  | \xc2[\x80-\x9f]                       # other C1 controls (UTF-8)
  | [\x00-\x08\x0b\x0c\x0e-\x1f\x7f]        # C0 controls but tab, newline, carriage return
    """,
        re.VERBOSE,
    )


@cache
def _unfinished() -> re.Pattern[bytes]:
    """The start of an escape sequence that the next write may finish."""
    return re.compile(
        rb"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[PX^_][^\x1b]*\x1b?)?"
        rb"|\xc2(?:\x9b[0-?]*[ -/]*)?"
    )


_HOLD_ESCAPE_MAX = 4096
"""A possibly unfinished escape sequence at the end of a write is held back up to this size."""


def secret_variants(values: Iterable[str]) -> list[bytes]:
    """Every byte string to mask for the given secret values, longest first."""
    present = [value for value in values if value]
    if not present:
        return []
    import base64  # only when there are secrets

    found: set[bytes] = set()
    for value in present:
        raw = value.encode()
        found.add(raw)
        found.add(base64.b64encode(raw))
        found.add(base64.urlsafe_b64encode(raw))
        for encoded in {quote(value, safe=""), quote(value), quote_plus(value)}:
            found.add(encoded.encode())  # as URLs carry it, with upper- or lower-case hex
            found.add(re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), encoded).encode())
        stripped = value.strip()
        if stripped != value and len(stripped) >= MIN_LINE:  # `echo $SECRET` drops a newline
            found.add(stripped.encode())
        # As env dumps, `declare -p`, JSON and Python's repr quote it.
        found.add(json.dumps(value, ensure_ascii=False)[1:-1].encode())
        found.add(json.dumps(value)[1:-1].encode())  # non-ASCII as \\uXXXX
        found.add(re.sub(r'([$`"\\])', r"\\\1", value).encode())
        found.add(repr(value)[1:-1].encode())
        if "\n" in value.strip("\n"):
            found.update(
                line.strip().encode()
                for line in value.splitlines()
                if len(line.strip()) >= MIN_LINE
            )
    return sorted(found, key=lambda v: (-len(v), v))


class Masker:
    """Replaces secret values in complete texts (records, messages, test output)."""

    def __init__(self, values: Iterable[str]) -> None:
        self.variants = secret_variants(values)
        self._text_variants = [v.decode("utf-8", "replace") for v in self.variants]

    def __bool__(self) -> bool:
        return bool(self.variants)

    def mask_bytes(self, data: bytes) -> bytes:
        """``data`` with every secret variant replaced by ``***``, also where escape sequences
        or control characters split it (the whole span is replaced)."""
        for variant in self.variants:
            if variant in data:
                data = data.replace(variant, MASK)
        if not self.variants or _invisible().search(data) is None:
            return data
        shown = _Shown(data)
        spans = shown.spans_of(self.variants)
        for start, end in reversed(spans):
            data = data[:start] + MASK + data[end:]
        return data

    def mask_text(self, text: str) -> str:
        """``text`` with every secret variant replaced by ``***`` (see ``mask_bytes``)."""
        for variant in self._text_variants:
            if variant in text:
                text = text.replace(variant, "***")
        if self.variants and _invisible().search(text.encode("utf-8", "surrogateescape")):
            data = self.mask_bytes(text.encode("utf-8", "surrogateescape"))
            return data.decode("utf-8", "surrogateescape")
        return text

    def mask_cut(self, text: str) -> str:
        """``mask_text`` for a text that may have been cut short: a tail of it that begins a
        secret (at least ``MIN_LINE`` characters of it) is masked too."""
        text = self.mask_text(text)
        tail = _longest_prefix_tail(text.encode("utf-8", "surrogateescape"), self.variants)
        if tail < MIN_LINE:
            return text
        data = text.encode("utf-8", "surrogateescape")
        return (data[:-tail] + MASK).decode("utf-8", "replace")

    def mask_event(self, event: _Event) -> _Event:
        """``event`` (a dataclass) with every string in every field masked; itself if none
        changed."""
        if not self.variants:
            return event
        changes: dict[str, object] = {}
        for item in dataclasses.fields(event):  # type: ignore[arg-type]
            value = getattr(event, item.name)
            masked = self.mask_value(value)
            if masked != value:
                changes[item.name] = masked
        return dataclasses.replace(event, **changes) if changes else event  # type: ignore[type-var]

    def mask_value(self, value: object) -> object:
        """``value`` with every string in it masked (lists, tuples and dict keys and values)."""
        if isinstance(value, str):
            return self.mask_text(value)
        if isinstance(value, list):
            return [self.mask_value(item) for item in value]
        if isinstance(value, tuple):
            return tuple(self.mask_value(item) for item in value)
        if isinstance(value, dict):
            return {self.mask_value(k): self.mask_value(v) for k, v in value.items()}
        return value

    def stream(self) -> StreamMasker:
        """A masker for one output stream."""
        return StreamMasker(self)


class StreamMasker:
    """Masks a byte stream written in arbitrary chunks."""

    def __init__(self, masker: Masker) -> None:
        self._masker = masker
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """Masked bytes that are safe to emit now; a possible secret prefix is held back."""
        if not self._masker.variants:
            return data
        buffer = self._masker.mask_bytes(self._held + data)
        keep = self._partial_suffix(buffer)
        if _invisible().search(buffer) is not None or buffer.endswith(b"\xc2"):
            keep = max(keep, self._partial_shown_suffix(buffer))
        if keep:
            self._held = buffer[-keep:]
            return buffer[:-keep]
        self._held = b""
        return buffer

    def flush(self) -> bytes:
        """Whatever is still held back (the stream ended)."""
        rest, self._held = self._held, b""
        return rest

    def _partial_suffix(self, buffer: bytes) -> int:
        """Length of the longest tail of ``buffer`` that is a proper prefix of a variant."""
        return _longest_prefix_tail(buffer, self._masker.variants)

    def _partial_shown_suffix(self, buffer: bytes) -> int:
        """The tail to hold back so that a secret split by escapes is still masked: from the
        start of what, once shown, could begin a secret, or of an unfinished escape sequence."""
        end = len(buffer)
        floor = max(0, end - _HOLD_ESCAPE_MAX)
        start = max(buffer.rfind(b"\x1b", floor), buffer.rfind(b"\xc2", floor))
        if start != -1 and _unfinished().fullmatch(buffer, start):
            end = start  # held back whatever follows
        shown = _Shown(buffer[:end])
        tail = _longest_prefix_tail(shown.text, self._masker.variants)
        if tail:
            end = shown.original(len(shown.text) - tail)
        keep = len(buffer) - end
        return keep


def _longest_prefix_tail(buffer: bytes, variants: list[bytes]) -> int:
    """Length of the longest tail of ``buffer`` that is a proper prefix of one of ``variants``."""
    best = 0
    for variant in variants:
        for size in range(min(len(variant) - 1, len(buffer)), best, -1):
            if buffer.endswith(variant[:size]):
                best = size
                break
    return best


class _Shown:
    """Bytes as they will be shown (escape sequences and control characters removed), with
    the way back to positions in the original."""

    def __init__(self, data: bytes) -> None:
        pieces: list[bytes] = []
        self._starts: list[int] = []  # where each piece starts in the shown text...
        self._origins: list[int] = []  # ...and in the original
        shown = 0
        position = 0
        for match in _invisible().finditer(data):
            if match.start() > position:
                pieces.append(data[position : match.start()])
                self._starts.append(shown)
                self._origins.append(position)
                shown += match.start() - position
            position = match.end()
        if position < len(data):
            pieces.append(data[position:])
            self._starts.append(shown)
            self._origins.append(position)
        self.text = b"".join(pieces)

    def original(self, index: int) -> int:
        """The position in the original of shown byte ``index``."""
        piece = bisect_right(self._starts, index) - 1
        return self._origins[piece] + index - self._starts[piece]

    def spans_of(self, variants: list[bytes]) -> list[tuple[int, int]]:
        """Original spans (merged, in order) of every variant found in the shown text."""
        spans: list[tuple[int, int]] = []
        for variant in variants:
            start = self.text.find(variant)
            while start != -1:
                end = start + len(variant)
                spans.append((self.original(start), self.original(end - 1) + 1))
                start = self.text.find(variant, end)
        spans.sort()
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged
