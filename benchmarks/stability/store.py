"""The stability benchmark's results, one record per training run, keyed by its spec's hash.

runs.jsonl, committed with the results: one JSON object per line, {"key", "spec", "config",
"result", "trace", "versions", "sha"}, where "sha" is the SHA-256 of the rest of the record
(canonical JSON). Every write replaces the whole file atomically (checkpoint.atomic_write), so
a kill leaves the previous file; a record whose checksum does not match, or a line that is not
JSON, is an error naming the line: never a silently dropped or altered result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stableblocks.checkpoint import atomic_write

FILE = "runs.jsonl"


class StoreError(ValueError):
    """The results file is damaged."""


def _sha(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "sha"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Store:
    def __init__(self, folder: Path):
        self.path = Path(folder) / FILE
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise StoreError(f"{self.path}:{n}: not a JSON record ({exc.msg})") from None
                if isinstance(record, dict) and "key" not in record:
                    raise StoreError(f"{self.path}:{n}: a record without a key")
                if not isinstance(record, dict) or record.get("sha") != _sha(record):
                    raise StoreError(f"{self.path}:{n}: checksum mismatch: the record was altered or damaged")
                self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        record = {**record, "sha": ""}
        record["sha"] = _sha(record)
        self.records[record["key"]] = record
        atomic_write(self.path, lambda f: f.writelines((json.dumps(r, sort_keys=True) + "\n").encode()
                                                        for r in self.records.values()))
