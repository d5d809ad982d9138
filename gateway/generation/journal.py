"""The finish journal: where a finished reply waits when the database is away for long.

One JSON line per FinishRecord, appended and fsync'd, in files under `<data_dir>/journal/`.
Replaying a file re-applies each record through the normal finish write, which is
idempotent, so a record replayed twice (or by two instances) changes nothing the second
time; a file is removed once every record in it is settled.

Replay never stops on a bad record: a line that is not a record (torn by a crash mid-write,
corrupt) or a record the database refuses for good goes to the quarantine, and replay goes on.
Only a transient failure (the database is away again) stops it: the lines not yet settled are
written back, for the next replay. Replay never raises for either reason, so a journal can
never keep the gateway from starting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import date
from pathlib import Path

import orjson

from gateway.store.failures import Failure, Quarantine, classify
from gateway.store.messages import FinishRecord
from gateway.store.usage import UsageRecord

log = logging.getLogger(__name__)

KIND = "finish"  # quarantine kind of a finish record (the same as the finish writer's)


class FinishJournal:
    def __init__(self, directory: Path, quarantine: Quarantine) -> None:
        self.directory = directory
        self.quarantine = quarantine
        # one file per process: appends from one writer never interleave with another's
        self._path = directory / f"finish-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._lock = asyncio.Lock()

    async def append(self, record: FinishRecord) -> None:
        line = record_to_json(record) + b"\n"
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

    async def replay(self, apply: Callable[[FinishRecord], Awaitable[object]]) -> int:
        """Apply every journaled record with `apply` (which raises what the write raised); returns
        how many were applied. Bad lines and refused records are quarantined and skipped; a
        transient failure stops the replay, keeping the unsettled lines for the next one."""
        replayed = 0
        for path in self.pending():
            async with self._lock:
                try:
                    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
                except FileNotFoundError:
                    continue  # another instance replayed it first
                for i, line in enumerate(lines):
                    try:
                        record = record_from_json(line)
                    except (ValueError, TypeError, KeyError, AttributeError) as e:  # torn or corrupt
                        await self.quarantine.put(KIND, line, e)
                        continue
                    try:
                        await apply(record)
                    except Exception as e:
                        if classify(e) is Failure.TRANSIENT:
                            log.warning("journal replay stopped (%s): %d records wait for the next one",
                                        type(e).__name__, len(lines) - i)
                            await asyncio.to_thread(_rewrite, path, lines[i:])
                            return replayed
                        await self.quarantine.put(KIND, orjson.loads(line), e)
                        continue
                    replayed += 1
                path.unlink(missing_ok=True)
        if replayed:
            log.info("replayed %d journaled finish records", replayed)
        return replayed


def _rewrite(path: Path, lines: list[bytes]) -> None:
    """Replace `path` by `lines`, atomically: a crash leaves the old file or the new, never half."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record_to_json(record: FinishRecord) -> bytes:
    return orjson.dumps(asdict(record))


def record_from_json(line: bytes) -> FinishRecord:
    """A journal line back into its record; ValueError, TypeError or KeyError if it is not one."""
    obj = orjson.loads(line)
    if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        raise ValueError("not a finish record")
    usage = obj.pop("usage")
    for key in ("message_id", "user_id", "api_key_id"):
        if usage[key] is not None:
            usage[key] = uuid.UUID(usage[key])
    usage["day"] = date.fromisoformat(usage["day"])
    return FinishRecord(usage=UsageRecord(**usage), **obj)
