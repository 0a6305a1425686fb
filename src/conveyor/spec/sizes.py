"""Sizes such as ``50MB``, ``10 MiB`` or ``4096`` (bytes), as a number of bytes."""

from __future__ import annotations

import re
from fractions import Fraction

MIN_SIZE = 1000
"""Smallest size accepted (1 KB): a smaller log file would be rotated at almost every line."""
MAX_SIZE = 10**12
"""Largest size accepted (1 TB)."""

_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*([0-9]{1,15}(?:\.[0-9]{1,6})?)\s*([A-Za-z]{1,3})?\s*")
_EXPECTED = "expected a size such as 50MB, 10MiB or 4096 (bytes)"


def parse_size(value: str | int | float) -> int:
    """Bytes in a size: a whole number of bytes, or a number and a unit (``B``; ``KB``,
    ``MB``, ``GB``, ``TB`` in powers of 1000; ``KiB``, ``MiB``, ``GiB``, ``TiB`` in powers of
    1024; case does not matter).

    Raises:
        ValueError: With a message for the user when ``value`` is not such a size, or is not
            between 1 KB and 1 TB.
    """
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{_EXPECTED}, got {str(value).lower()}")
    if isinstance(value, int | float):
        size = int(value)
        shown = str(size) if abs(size) < 10**15 else "a very large number"
    else:
        match = _SIZE.fullmatch(value)
        unit = (match.group(2) or "b").lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(f"{_EXPECTED}, got '{value[:40]}'")
        exact = Fraction(match.group(1)) * _UNITS[unit]
        if unit == "b" and exact.denominator != 1:
            raise ValueError(f"a number of bytes is a whole number, got '{value.strip()}'")
        size, shown = int(exact), f"'{value.strip()}'"
    if size < MIN_SIZE:
        raise ValueError(f"a size must be at least 1KB (1000 bytes), got {shown}")
    if size > MAX_SIZE:
        raise ValueError(f"a size can be at most 1TB, got {shown}")
    return size
