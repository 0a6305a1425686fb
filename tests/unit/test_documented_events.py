"""Every event type, and every field of its payload, is in the table of docs/cli.md."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from conveyor.domain import delivery_events, events
from conveyor.domain.events import Event

CLI_DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _event_classes() -> list[type[Event]]:
    found = []
    for module in (events, delivery_events):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Event) and value is not Event:
                found.append(value)
    return found


def test_every_event_type_and_payload_field_is_documented() -> None:
    rows = {
        match[1]: match[2]
        for match in re.finditer(r"^\| `([a-z_.]+)` \| (.*) \|$", CLI_DOC.read_text(), re.M)
    }
    missing = []
    for cls in _event_classes():
        row = rows.get(cls.kind)
        if row is None:
            missing.append(cls.kind)
            continue
        for f in dataclasses.fields(cls):
            if f.name != "run_id" and f"`{f.name}`" not in row:
                missing.append(f"{cls.kind}.{f.name}")
    assert missing == []
