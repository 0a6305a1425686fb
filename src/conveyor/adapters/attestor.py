"""The engine's ``Attestor``: signs provenance with this instance's key (see ``signing``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.domain.provenance import PAYLOAD_TYPE, statement_bytes


class KeyAttestor:
    """Signs statements in DSSE envelopes; the key is loaded (or created) on first use."""

    def __init__(self, key_dir: Path) -> None:
        self._key_dir = key_dir
        self._key: Any = None

    def _instance_key(self) -> Any:
        if self._key is None:
            from conveyor.adapters.signing import InstanceKey

            self._key = InstanceKey.load_or_create(self._key_dir)
        return self._key

    @property
    def builder_id(self) -> str:
        return str(self._instance_key().builder_id)

    def attest(self, statement: Mapping[str, Any]) -> str:
        envelope = self._instance_key().sign(PAYLOAD_TYPE, statement_bytes(statement))
        return json.dumps(envelope, sort_keys=True, separators=(",", ":"))
