"""The finish journal: where a finished reply waits when the database is away for long.

One JSON line per FinishRecord, appended and fsync'd, in files under `<data_dir>/journal/`.
Replaying a file re-applies each record through the normal finish write, which is
idempotent, so a record replayed twice (or by two instances) changes nothing the second
time; a file is removed once every record in it is in the database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import asdict
from datetime import date
from pathlib import Path

import asyncpg
import orjson

from .store.messages import FinishRecord, finish_assistant
from .store.usage import UsageRecord

log = logging.getLogger(__name__)


class FinishJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # one file per process: appends from one writer never interleave with another's
        self._path = directory / f"finish-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._lock = asyncio.Lock()

    async def append(self, record: FinishRecord) -> None:
        line = orjson.dumps(asdict(record)) + b"\n"
        async with self._lock:
            await asyncio.to_thread(self._write, line)
        log.warning("message %s journaled to %s until the database is back", record.message_id, self._path)

    def _write(self, line: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self._path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def pending(self) -> list[Path]:
        return sorted(self.directory.glob("finish-*.jsonl")) if self.directory.exists() else []

    async def replay(self, pool: asyncpg.Pool) -> int:
        """Apply every journaled record; returns how many were replayed. Stops at the first
        database error (the rest waits for the next replay)."""
        replayed = 0
        for path in self.pending():
            async with self._lock:
                try:
                    lines = path.read_bytes().splitlines()
                except FileNotFoundError:
                    continue  # another instance replayed it first
                for line in lines:
                    if line.strip():
                        await finish_assistant(pool, record_from_json(line))
                        replayed += 1
                path.unlink(missing_ok=True)
        if replayed:
            log.info("replayed %d journaled finish records", replayed)
        return replayed


def record_from_json(line: bytes) -> FinishRecord:
    obj = orjson.loads(line)
    usage = obj.pop("usage")
    for key in ("message_id", "user_id", "api_key_id"):
        if usage[key] is not None:
            usage[key] = uuid.UUID(usage[key])
    usage["day"] = date.fromisoformat(usage["day"])
    return FinishRecord(usage=UsageRecord(**usage), **obj)
