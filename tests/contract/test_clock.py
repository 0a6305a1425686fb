"""The system clock writes the record's timestamp format."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from conveyor.adapters.clock import SystemClock


def test_now_is_utc_iso_8601_with_microseconds_and_z() -> None:
    before = datetime.now(UTC)
    stamp = SystemClock().now()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert before <= datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC) <= after
