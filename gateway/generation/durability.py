"""The finish write of a reply, and what makes it durable whatever the database does.

`FinishWriter.save(record)` returns only once the reply is durable, in one of three places:
- saved: in the database (finishes that pile up share one statement and one commit);
- journaled: the database has been away longer than `retry_s` (transient failures are retried
  with backoff until then); the journal is replayed at start and whenever the database is back;
- quarantined: the database refused the record for good (a NUL in the text, a count out of
  range). The record is kept as sent in the quarantine, and the message is saved as `failed`
  with what can be saved, so that it is not left live and its reservations go back: the record
  salvaged (text with NUL replaced, counts clamped), else the bare reply (no text, no metadata),
  else the least (no usage either: an estimated zero, as generation.py saves a broken finish).
  Each is one finish write, which also releases what the reply's admission reserved. If the
  database refuses all of them, the row is at least closed (failed).
A refused record is never journaled: replaying it could only be refused again. A transient
failure (the connection lost or refused, see failures.py) never quarantines anything.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from typing import Any

import asyncpg

from gateway.generation.journal import KIND, FinishJournal
from gateway.store.background import GroupCommit
from gateway.store.failures import Failure, Quarantine, classify
from gateway.store.messages import FinishRecord, close_unstarted, finish_many
from gateway.vocabulary import MessageStatus

log = logging.getLogger(__name__)

INT4_MAX = 2**31 - 1  # PostgreSQL `integer`
INT8_MAX = 2**63 - 1  # `bigint`, and the widest integer orjson writes
# what a salvaged reply says instead of its own outcome
NOT_STORED = {"type": "internal", "message": "the reply could not be stored as sent", "retryable": False}


class Refused(Exception):
    """The database refused a record for good (`error` says why)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class FinishWriter:
    """Every reply's finish write (group-committed), and its retry, journal and quarantine."""

    def __init__(self, pool: asyncpg.Pool, journal: FinishJournal, quarantine: Quarantine, *,
                 retry_s: float = 30.0, max_backoff_s: float = 2.0) -> None:
        self._pool = pool
        self._journal = journal
        self._quarantine = quarantine
        self._retry_s = retry_s
        self._max_backoff = max_backoff_s
        self._commit: GroupCommit[FinishRecord, None] = GroupCommit(self._write_batch)

    async def _write_batch(self, batch: list[FinishRecord]) -> None:
        await finish_many(self._pool, batch)

    async def save(self, record: FinishRecord) -> FinishRecord:
        """The one finish write: returns once the reply is saved, journaled or quarantined, with
        what was kept as the reply's row (`record` itself, or the `failed` form saved in its place:
        `fallbacks`), so the client is told what was actually stored."""
        try:
            await self._save_or_journal(record)
            return record
        except Refused as e:
            return await self._instead(record, e.error, self._save_or_journal)

    async def _instead(self, record: FinishRecord, error: Exception,
                       write: Callable[[FinishRecord], Awaitable[None]]) -> FinishRecord:
        """`record` was refused for good: quarantined, and the first of its `fallbacks` that `write`
        gets saved in its place (returned). A row none of them could close is closed bare."""
        await self._set_aside(record, error)
        kept = record
        for form, kept in zip(FALLBACKS, fallbacks(record), strict=True):
            try:
                await write(kept)
                return kept
            except Refused as again:
                log.warning("message %s: its %s form was refused too (%s)", record.message_id, form,
                            type(again.error).__name__)
        log.error("message %s: every form of it was refused; only the quarantine keeps the reply",
                  record.message_id)
        await self._close(record)
        return kept

    async def _close(self, record: FinishRecord) -> None:
        """The last resort: the row closed (failed) so that it is not left live, without a usage row
        (what its admission reserved stays on its day's rows, which the next day leaves behind)."""
        try:
            await close_unstarted(self._pool, record.message_id, status=MessageStatus.FAILED,
                                  model=_text(record.usage.model), error=dict(NOT_STORED),
                                  metadata={"finish_reason": "error", "quarantined": True, "kept": "closed"})
        except Exception as e:
            if classify(e) is Failure.TRANSIENT:
                raise
            log.error("message %s: its row could not be closed either (%s)", record.message_id, type(e).__name__)

    async def _set_aside(self, record: FinishRecord, error: Exception) -> None:
        try:
            await self._quarantine.put(KIND, asdict(record), error)
        except Exception:  # the disk failed too: the log is all that is left
            log.exception("message %s: refused (%s) and could not be quarantined", record.message_id,
                          type(error).__name__)

    async def _save_or_journal(self, record: FinishRecord) -> None:
        """Saved, or journaled once the database has been away for `retry_s`; Refused if the
        database refuses it for good. (If the journal's disk fails too, that error is raised.)"""
        delay, deadline = 0.1, time.monotonic() + self._retry_s
        while True:
            try:
                await self._commit.submit(record)
                return
            except Exception as e:
                if classify(e) is Failure.PERMANENT:
                    raise Refused(e) from e
                if time.monotonic() >= deadline:
                    await self._journal.append(record)
                    return
                log.warning("finish write for %s failed (%s), retrying", record.message_id, type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    async def replay_journal(self) -> int:
        """Re-apply what the journal holds (see FinishJournal.replay); returns how many were applied."""
        if not self._journal.pending():
            return 0
        return await self._journal.replay(self._apply_replayed)

    async def _apply_replayed(self, record: FinishRecord) -> None:
        # a record refused for good is quarantined and saved in a lesser form here, as a live one
        # would be; a transient failure is raised, so replay stops and keeps the line
        try:
            await self._write_now(record)
        except Refused as e:
            await self._instead(record, e.error, self._write_now)

    async def _write_now(self, record: FinishRecord) -> None:
        """One finish write, at once: Refused if refused for good; a transient failure is raised."""
        try:
            await finish_many(self._pool, [record])
        except Exception as e:
            if classify(e) is Failure.TRANSIENT:
                raise
            raise Refused(e) from e


FALLBACKS = ("salvaged", "bare", "least")  # the forms `fallbacks` gives, in order (a bare one says so: `kept`)


def fallbacks(record: FinishRecord) -> list[FinishRecord]:
    """What may be saved instead of a refused record, each less than the one before, each failed
    with NOT_STORED and marked `quarantined`: the record salvaged; the bare reply (no text, no
    metadata, the salvaged counts); the least (an estimated zero usage, which still hands the
    reservations back). Each carries the admission's reservations, so its finish releases them."""
    salvaged = salvage(record)
    marks = {"finish_reason": "error", "quarantined": True}
    suspect = {"usage_suspect": True} if salvaged.metadata.get("usage_suspect") else {}
    bare = replace(salvaged, content="", ttft_ms=None, metadata={**marks, **suspect, "kept": FALLBACKS[1]})
    least = replace(bare, usage=replace(bare.usage, prompt_tokens=0, completion_tokens=0, cost_usd=0.0,
                                        estimated=True),
                    metadata={**marks, "estimated": True, "kept": FALLBACKS[2]})
    return [salvaged, bare, least]


def salvage(record: FinishRecord) -> FinishRecord:
    """What can be saved of a refused record: status failed, text without NUL (or unpaired
    surrogates, which are not UTF-8), counts clamped into their columns (and flagged)."""
    usage = record.usage
    prompt, completion = _clamp(usage.prompt_tokens, INT4_MAX), _clamp(usage.completion_tokens, INT4_MAX)
    suspect = (prompt, completion) != (usage.prompt_tokens, usage.completion_tokens)
    cost = usage.cost_usd
    if not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
        cost = 0.0
    usage = replace(usage, model=_text(usage.model), provider=_text(usage.provider), prompt_tokens=prompt,
                    completion_tokens=completion, cost_usd=cost, estimated=bool(usage.estimated),
                    user_reserved=_clamp(usage.user_reserved, INT8_MAX),
                    key_reserved=_clamp(usage.key_reserved, INT8_MAX))
    metadata = _clean(record.metadata) if isinstance(record.metadata, dict) else {}
    metadata.update({"finish_reason": "error", "quarantined": True})
    if suspect:
        metadata["usage_suspect"] = True
    return replace(record, usage=usage, status=MessageStatus.FAILED, content=_text(record.content),
                   ttft_ms=None if record.ttft_ms is None else _clamp(record.ttft_ms, INT4_MAX),
                   latency_ms=_clamp(record.latency_ms, INT4_MAX), error=dict(NOT_STORED), metadata=metadata)


def _clamp(value: object, top: int) -> int:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return 0
    return max(0, min(int(value), top))


def _text(value: object) -> str:
    # one character for one: the reply's chunk lengths (kept in metadata) still add up
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _clean(value: Any) -> Any:
    """A JSON value jsonb accepts: no NUL in any string, integers within 64 bits."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return max(-INT8_MAX, min(value, INT8_MAX))
    return value
