"""The system clock behind the ``Clock`` port."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class SystemClock:
    """UTC wall time (ISO 8601, microseconds, ``Z``) and ``time.monotonic``."""

    def now(self) -> str:
        """Current UTC time."""
        return datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"  # -"+00:00"

    def monotonic(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()
