"""Secret masking for streams and records.

Masking is best effort, as in every CI system: it replaces the exact value of each secret, its
base64 and URL-encoded forms and, for multi-line secrets, each line of 4 or more characters.
Values derived in other ways (hashes, slices, other encodings) are not recognised; that is
documented for users. ``StreamMasker`` also masks a secret that arrives split across writes, by
holding back only the tail that could still become a secret.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

MASK = b"***"
MIN_LINE = 4


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
        found.add(quote(value, safe="").encode())
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
        """``data`` with every secret variant replaced by ``***``."""
        for variant in self.variants:
            if variant in data:
                data = data.replace(variant, MASK)
        return data

    def mask_text(self, text: str) -> str:
        """``text`` with every secret variant replaced by ``***``."""
        for variant in self._text_variants:
            if variant in text:
                text = text.replace(variant, "***")
        return text

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
        best = 0
        for variant in self._masker.variants:
            for size in range(min(len(variant) - 1, len(buffer)), best, -1):
                if buffer.endswith(variant[:size]):
                    best = size
                    break
        return best
