"""The samples DALI failed to decode, excluded from every later batch (and, kept in a file,
from every later run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megavid.errors import DataError


class Quarantine:
    """Samples that failed to decode: excluded from every later batch.

    Stored as JSON ``{"samples": [{"shard", "key", "reason", "detail"}, ...]}`` when ``path``
    is given, read at start (a resumed run skips what the last one found) and rewritten
    atomically on every addition.

    Args:
        path: the JSON file (e.g. ``<run_dir>/quarantine.json``); None keeps it in memory.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.samples: list[dict[str, str]] = []
        if self.path is not None and self.path.is_file():
            try:
                self.samples = list(json.loads(self.path.read_text())["samples"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"quarantine file {self.path} is not valid ({e}); delete it "
                                "to start with an empty quarantine") from e
        self._keys = {(s["shard"], s["key"]): s for s in self.samples}

    def __contains__(self, shard_key: tuple[str, str]) -> bool:
        return shard_key in self._keys

    def get(self, shard: str, key: str) -> dict[str, str] | None:
        """The record {"shard", "key", "reason", "detail"} of a quarantined sample, or None."""
        return self._keys.get((shard, key))

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, shard: str, key: str, reason: str, detail: str = "") -> None:
        """Record one bad sample (no-op if already there) and save."""
        if (shard, key) in self._keys:
            return
        record = {"shard": shard, "key": key, "reason": reason, "detail": detail}
        self._keys[(shard, key)] = record
        self.samples.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps({"samples": self.samples}, indent=1))
            os.replace(tmp, self.path)
