"""SQL for messages: the persist step's turn write, the single finish write, reads."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from gateway.errors import Conflict, NotFound
from gateway.store.usage import USAGE_CTES, UsageRecord, usage_arrays
from gateway.vocabulary import MessageStatus

MESSAGE_COLUMNS = """id, thread_id, role, content, status, reply_to, slot, client_message_id, model, provider,
    prompt_tokens, completion_tokens, ttft_ms, latency_ms, error, metadata, created_at, finished_at, parts"""


@dataclass(slots=True, kw_only=True)
class StoredTurn:
    """The outcome of the persist step: the stored user message and its assistant placeholder."""

    thread_id: uuid.UUID
    user_message: dict[str, Any]
    assistant_message_id: uuid.UUID
    duplicate: bool
    # a new turn in an existing thread: the thread's history before this message (oldest first, as
    # the upstream gets it), read by the persist statement itself; None otherwise
    history: list[dict[str, Any]] | None = None


HISTORY_LIMIT = 50  # messages of a thread's history sent upstream (the newest)


# The conversation as the upstream sees it: complete messages, a reply placed right after the
# message it answers (`ord`: a regenerated reply is newer than later turns, but belongs to its
# own), and of a message's complete replies only the newest (the one the thread shows), newest
# first. `before_seq`/`before_id` bound it for a regenerate: what precedes that user message
# (which the caller appends). Only the rows from the `limit`-th newest user message on are read
# (an index range, whatever the thread's length): every reply comes after the message it
# answers, so none of theirs is missed. The arguments are SQL expressions (parameters, columns).
def _history_rows(thread: str, limit: str, before_seq: str, before_id: str) -> str:
    return f"""
    SELECT m.role, m.content, m.parts, m.metadata -> 'messages' AS messages, m.metadata -> 'tool_calls' AS tool_calls,
           coalesce(p.seq, m.seq) AS ord, m.seq FROM messages m
    LEFT JOIN messages p ON p.id = m.reply_to
    WHERE m.thread_id = {thread} AND m.status = 'complete' AND m.slot IS NULL
      AND m.seq >= coalesce((SELECT u.seq FROM messages u
                             WHERE u.thread_id = {thread} AND u.role = 'user'
                               AND ({before_seq} IS NULL OR u.seq <= {before_seq})
                             ORDER BY u.seq DESC OFFSET {limit} - 1 LIMIT 1), 0)
      AND ({before_seq} IS NULL OR coalesce(p.seq, m.seq) <= {before_seq})
      AND ({before_id} IS NULL OR (m.id <> {before_id} AND m.reply_to IS DISTINCT FROM {before_id}))
      AND NOT (m.role = 'assistant' AND EXISTS (
          SELECT 1 FROM messages n WHERE n.reply_to = m.reply_to AND n.role = 'assistant' AND n.slot IS NULL
                                     AND n.status = 'complete' AND n.seq > m.seq))
    ORDER BY ord DESC, m.seq DESC LIMIT {limit}"""


# the history of the caller's thread (NotFound when no row: not the caller's)
_HISTORY = f"""
SELECT m.role, m.content, m.parts, m.messages, m.tool_calls FROM threads t
LEFT JOIN LATERAL ({_history_rows("t.id", "$3", "$4::bigint", "$5::uuid")}) m ON true
WHERE t.id = $1 AND t.user_id = $2
"""

# the messages of that history with content parts (the rest is text, which every upstream takes)
_HISTORY_PARTS = f"""
SELECT m.role, m.parts FROM threads t
LEFT JOIN LATERAL ({_history_rows("t.id", "$3", "NULL::bigint", "NULL::uuid")}) m ON m.parts IS NOT NULL
WHERE t.id = $1 AND t.user_id = $2
"""


# One statement persists any number of turns (concurrent requests group-commit together): per
# turn, the user's row when it is missing (a JWT user whose upsert at sign-in failed still keeps
# their message: the foreign keys are checked at the end of the statement, after this insert;
# only the id, the least that can fail: the sign-in upsert fills the rest when it next succeeds),
# the thread (created, or touched — which also proves it is the caller's), the user message and
# the assistant placeholder (status streaming). The unique index on (user_id, client_message_id)
# makes a retry insert nothing; ids are made up front so each returned row maps back to its turn
# (`i`) and a thread left empty by a lost race can be removed.
# A turn in an existing thread also gets the thread's history back (`history`, as thread_history
# reads it), so that the commit is the turn's one round trip before the upstream call. Every
# part of one statement sees the same snapshot, taken when it starts: the history is
# what was committed then, by any instance, without this statement's own new message.
# The turns come as one jsonb array of objects, not as one array per column: unnest() of arrays
# tells a custom plan their exact length but a generic one only a guess, so once the table has
# statistics PostgreSQL (15 here) judged the custom plan cheaper and planned the statement afresh
# on every call (~0.5 ms a turn, before the upstream call); jsonb_to_recordset is estimated alike
# either way, so the plan is made once per connection and kept.
_TURNS = f"""
WITH x AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb)
    AS x(i integer, user_id uuid, content text, client_message_id text, thread_id uuid, title text,
         instance_id uuid, tid uuid, umid uuid, reservation jsonb, parts jsonb, messages jsonb)
),
usr AS (INSERT INTO users (id) SELECT DISTINCT user_id FROM x ON CONFLICT (id) DO NOTHING),
t_new AS (
    INSERT INTO threads (id, user_id, title) SELECT tid, user_id, title FROM x WHERE thread_id IS NULL
    RETURNING id, user_id
),
t_old AS (
    UPDATE threads SET updated_at = clock_timestamp() FROM x
    WHERE threads.id = x.thread_id AND threads.user_id = x.user_id
    RETURNING threads.id, threads.user_id
),
-- a turn goes on only in a thread of its own user: another turn of the batch may own the thread
-- (and so return it from t_old) without this one's user owning it
ok AS (SELECT * FROM x WHERE (tid, user_id) IN (SELECT id, user_id FROM t_new UNION ALL SELECT id, user_id FROM t_old)),
u AS (
    INSERT INTO messages (id, thread_id, user_id, role, content, status, client_message_id, parts, metadata)
    SELECT umid, tid, user_id, 'user', content, 'complete', client_message_id, parts,
           CASE WHEN messages IS NULL THEN '{{}}'::jsonb ELSE jsonb_build_object('messages', messages) END
    FROM ok ORDER BY i
    ON CONFLICT (user_id, client_message_id) WHERE client_message_id IS NOT NULL DO NOTHING
    RETURNING {MESSAGE_COLUMNS}
),
a AS (
    INSERT INTO messages (thread_id, user_id, role, status, reply_to, instance_id, metadata)
    SELECT ok.tid, ok.user_id, 'assistant', 'streaming', ok.umid, ok.instance_id,
           CASE WHEN ok.reservation IS NULL THEN '{{}}'::jsonb
                ELSE jsonb_build_object('reservation', ok.reservation) END
    FROM ok JOIN u ON u.id = ok.umid
    RETURNING id, reply_to
)
SELECT ok.i, u.*, a.id AS assistant_id,
       CASE WHEN ok.thread_id IS NOT NULL THEN (
           SELECT coalesce(json_agg(CASE WHEN h.messages IS NULL AND h.tool_calls IS NULL
                                         THEN json_build_object('role', h.role,
                                                                'content', coalesce(h.parts, to_jsonb(h.content)))
                                         ELSE json_build_object('role', h.role, 'content', h.content,
                                                                'messages', h.messages, 'tool_calls', h.tool_calls)
                                    END ORDER BY h.ord, h.seq), '[]')
           FROM ({_history_rows("ok.tid", str(HISTORY_LIMIT), "NULL::bigint", "NULL::uuid")}) h) END AS history
FROM ok JOIN u ON u.id = ok.umid JOIN a ON a.reply_to = u.id
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnRequest:
    user_id: uuid.UUID
    content: str
    client_message_id: str | None
    thread_id: uuid.UUID | None
    instance_id: uuid.UUID
    # who and what the reply is for (model, prices, prompt estimate; turns.Turns.attribution), kept
    # on the assistant row until its finish: the sweep of a dead instance estimates its usage from
    # it; the admission's reservations are added once decided (hold_reservation)
    reservation: dict[str, Any] | None = None
    parts: list[dict[str, Any]] | None = None  # content parts as sent (content: their text)
    # a prompt that is more than one user message (a tool round: the tools' results, the calls they
    # answer when the caller sent those too, the user's words): its canonical messages, kept in the
    # row's metadata (`messages`); content is the text of its user messages
    messages: list[dict[str, Any]] | None = None


# a retry answers with the turn's first reply, as the first request did (regenerated ones follow it)
_DUPLICATE = f"""
SELECT {', '.join('u.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}, a.id AS assistant_id
FROM messages u
JOIN LATERAL (SELECT id FROM messages WHERE reply_to = u.id AND role = 'assistant' AND slot IS NULL
              ORDER BY seq LIMIT 1) a ON true
WHERE u.user_id = $1 AND u.client_message_id = $2
"""


def _turn(row: Mapping[str, Any], duplicate: bool) -> StoredTurn:
    message = dict(row)
    assistant_id = message.pop("assistant_id")
    history = message.pop("history", None)  # json text; absent from a duplicate's row
    return StoredTurn(thread_id=message["thread_id"], user_message=message, assistant_message_id=assistant_id,
                      duplicate=duplicate, history=conversation(orjson.loads(history)) if history is not None else None)


def conversation(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History rows as the canonical turn's messages: a row is its message ({"role", "content"}),
    except a prompt stored with its canonical messages (a tool round: `messages`), which is those,
    and a reply that called tools (`tool_calls`), which carries them (its content None when it said
    nothing)."""
    if all(len(row) == 2 for row in rows):
        return rows  # the common case: no tool rounds
    out: list[dict[str, Any]] = []
    for row in rows:
        if len(row) == 2:
            out.append(row)
        elif row["messages"] is not None:
            out.extend(row["messages"])
        else:  # a row has the two more keys only when one of them holds something
            out.append({"role": row["role"], "content": row["content"] or None, "tool_calls": row["tool_calls"]})
    return out


def prompt_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored user message as the canonical messages it stands for (see TurnRequest.messages)."""
    stored = (message.get("metadata") or {}).get("messages")
    if stored is not None:
        return list(stored)
    return [{"role": "user", "content": message["content"] if message["parts"] is None else message["parts"]}]


async def find_duplicate(pool: asyncpg.Pool, user_id: uuid.UUID, client_message_id: str) -> StoredTurn | None:
    row = await pool.fetchrow(_DUPLICATE, user_id, client_message_id)
    return _turn(row, duplicate=True) if row is not None else None


async def thread_history(pool: asyncpg.Pool, user_id: uuid.UUID, thread_id: uuid.UUID,
                         limit: int = HISTORY_LIMIT,
                         before: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The thread's conversation so far (complete messages, oldest first); NotFound if not the
    user's. `before`: a user message row; only what precedes it (for a regenerate of it)."""
    rows = await pool.fetch(_HISTORY, thread_id, user_id, limit, before["seq"] if before else None,
                            before["id"] if before else None)
    if not rows:
        raise NotFound("thread not found")
    return conversation([_history_row(r) for r in reversed(rows) if r["role"] is not None])


def _history_row(row: Mapping[str, Any]) -> dict[str, Any]:
    content = row["content"] if row["parts"] is None else row["parts"]
    if row["messages"] is None and row["tool_calls"] is None:
        return {"role": row["role"], "content": content}
    return {"role": row["role"], "content": content, "messages": row["messages"], "tool_calls": row["tool_calls"]}


async def history_parts(pool: asyncpg.Pool, user_id: uuid.UUID, thread_id: uuid.UUID,
                        limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
    """The messages of the thread's conversation (as `thread_history` reads it) that have content
    parts, oldest first, as the upstream gets them; NotFound if not the user's thread. A thread of
    text alone answers one row of nulls: nothing comes back to look at."""
    rows = await pool.fetch(_HISTORY_PARTS, thread_id, user_id, limit)
    if not rows:
        raise NotFound("thread not found")
    return [{"role": r["role"], "content": r["parts"]} for r in reversed(rows) if r["role"] is not None]


async def persist_turns(pool: asyncpg.Pool, turns: list[TurnRequest]) -> list[StoredTurn | Exception]:
    """Persist the turns in one statement; per turn, its StoredTurn (a duplicate's is the stored one)
    or the error to raise (NotFound, Conflict)."""
    thread_ids = [t.thread_id or uuid.uuid4() for t in turns]
    rows_in = [{"i": i, "user_id": t.user_id, "content": t.content, "client_message_id": t.client_message_id,
                "thread_id": t.thread_id, "title": thread_title(t.content) if t.thread_id is None else None,
                "instance_id": t.instance_id, "tid": thread_ids[i], "umid": uuid.uuid4(),
                "reservation": t.reservation or None, "parts": t.parts, "messages": t.messages}
               for i, t in enumerate(turns)]
    results: dict[int, StoredTurn | Exception] = {}  # by the turn's index
    async with pool.acquire() as conn:
        # the statement is atomic on its own: no BEGIN/COMMIT round trips
        rows = await conn.fetch(_TURNS, rows_in)
        made = {r["i"] for r in rows}
        # a turn that lost to a duplicate leaves the thread it made empty: drop that thread (right
        # after, not atomically: at worst an empty thread is listed for a moment, or stays if the
        # process dies in between, which is what the rare race of two identical requests costs)
        orphans = [thread_ids[i] for i, t in enumerate(turns) if i not in made and t.thread_id is None]
        if orphans:
            await conn.execute("DELETE FROM threads WHERE id = ANY($1::uuid[]) AND NOT EXISTS "
                               "(SELECT 1 FROM messages m WHERE m.thread_id = threads.id)", orphans)
        for row in rows:
            turn = dict(row)
            i = turn.pop("i")
            results[i] = _turn(turn, duplicate=False)
        for i, t in enumerate(turns):
            if i in results:
                continue
            if t.client_message_id is not None:
                # the conflicting insert has committed by now (ON CONFLICT waited for it)
                row = await conn.fetchrow(_DUPLICATE, t.user_id, t.client_message_id)
                if row is not None:
                    results[i] = _turn(row, duplicate=True)
                    continue
                if await conn.fetchval("SELECT 1 FROM messages WHERE user_id = $1 AND client_message_id = $2",
                                       t.user_id, t.client_message_id):
                    results[i] = Conflict("client_message_id already names an arena turn")
                    continue
            results[i] = NotFound("thread not found")
    return [results[i] for i in range(len(turns))]


def thread_title(content: str) -> str:
    line = content.strip().splitlines()[0] if content.strip() else ""
    return line[:80]


@dataclass(slots=True, kw_only=True)
class FinishRecord:
    """Everything the finish write needs (the reply and its usage); also what the journal keeps."""

    usage: UsageRecord
    status: MessageStatus
    content: str
    ttft_ms: int | None
    latency_ms: int
    error: dict[str, Any] | None
    metadata: dict[str, Any]

    @property
    def message_id(self) -> uuid.UUID:
        return self.usage.message_id


# One statement, so one round trip and atomic: the message (only if still live, or marked
# interrupted by a peer's sweep while its owner was merely cut off), its usage row (only if
# absent), and the daily total (only when the usage row was new). Replaying a finish therefore
# changes nothing the second time.
_FINISH = """
WITH x AS (
    SELECT * FROM unnest($1::uuid[], $4::text[], $5::text[], $6::integer[], $7::integer[], $16::text[],
                         $17::text[], $18::integer[], $19::integer[], $20::jsonb[], $21::jsonb[])
    AS x(id, model, provider, prompt_tokens, completion_tokens, status, content, ttft_ms, latency_ms, error,
         metadata)
),
m AS (
    UPDATE messages SET status = x.status, content = x.content, model = x.model, provider = x.provider,
        prompt_tokens = x.prompt_tokens, completion_tokens = x.completion_tokens, ttft_ms = x.ttft_ms,
        latency_ms = x.latency_ms, error = x.error,
        -- a finish states its own text's chunks and reasoning (a form saved without its text has
        -- neither): a checkpoint's must not outlive it, or a replay makes events of text not kept
        metadata = (messages.metadata - 'swept' - 'checkpoint_seq' - 'chunks' - 'reasoning' - 'reservation'
                    - 'estimated') || x.metadata,
        finished_at = clock_timestamp()
    FROM x
    WHERE messages.id = x.id
      AND (messages.status IN ('pending', 'streaming')
           OR (messages.status = 'interrupted' AND messages.metadata ? 'swept'))
    RETURNING messages.id
),""" + USAGE_CTES + """
SELECT (SELECT count(*) FROM m) AS messages, (SELECT count(*) FROM u) AS usage
"""


async def finish_many(pool: asyncpg.Pool, records: list[FinishRecord]) -> tuple[int, int]:
    """Save finished replies in one statement; returns (message rows, usage rows) written, so a
    replay of records already saved returns (0, 0)."""
    columns = [[r.status for r in records], [r.content for r in records], [r.ttft_ms for r in records],
               [r.latency_ms for r in records], [r.error for r in records], [r.metadata for r in records]]
    row = await pool.fetchrow(_FINISH, *usage_arrays([r.usage for r in records]), *columns)
    return row["messages"], row["usage"]


async def get_message(pool: asyncpg.Pool, user_id: uuid.UUID, message_id: uuid.UUID) -> dict[str, Any]:
    row = await pool.fetchrow(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1 AND user_id = $2",
                              message_id, user_id)
    if row is None:
        raise NotFound("message not found")
    return dict(row)


async def delete_turn(pool: asyncpg.Pool, user_id: uuid.UUID, assistant_id: uuid.UUID) -> bool:
    """Delete the turn an assistant reply answers (the user message; the reply goes with it by the
    reply_to cascade) and its thread if that leaves it empty. False if no such reply of this user."""
    async with pool.acquire() as conn, conn.transaction():
        thread_id = await conn.fetchval("""
            DELETE FROM messages u USING messages a
            WHERE a.id = $1 AND a.user_id = $2 AND a.role = 'assistant' AND a.slot IS NULL AND u.id = a.reply_to
            RETURNING u.thread_id""", assistant_id, user_id)
        if thread_id is None:
            return False
        await conn.execute("""
            DELETE FROM threads t WHERE t.id = $1 AND NOT EXISTS (SELECT 1 FROM messages WHERE thread_id = t.id)""",
            thread_id)
    return True


async def thread_messages(conn: asyncpg.Connection, thread_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every message of the thread, each reply (all of a message's replies, regenerated ones too,
    oldest first) right after the message it answers."""
    columns = ", ".join("m." + c.strip() for c in MESSAGE_COLUMNS.split(","))
    rows = await conn.fetch(f"""
        SELECT {columns} FROM messages m LEFT JOIN messages p ON p.id = m.reply_to
        WHERE m.thread_id = $1 ORDER BY coalesce(p.seq, m.seq), m.seq""", thread_id)
    return [dict(r) for r in rows]


# -- replies that never reach a provider, regenerate --------------------------------------------

async def close_unstarted(pool: asyncpg.Pool, message_id: uuid.UUID, *, status: MessageStatus, model: str | None,
                          error: dict[str, Any], metadata: dict[str, Any]) -> bool:
    """End a reply before any provider call (the policy refused it, or deciding broke): the row
    says why. No usage row: nothing was consumed. Only a live row changes; False otherwise."""
    done = await pool.fetchval("""
        UPDATE messages SET status = $2, model = $3, error = $4, metadata = (metadata - 'reservation') || $5,
            finished_at = clock_timestamp()
        WHERE id = $1 AND status IN ('pending', 'streaming') RETURNING id""",
        message_id, status, model, error, metadata)
    return done is not None


async def hold_reservation(pool: asyncpg.Pool, message_id: uuid.UUID, reservation: dict[str, Any]) -> None:
    """Add what a reply's admission reserved to its row's `reservation` (until the finish write
    removes it), so a reply whose instance died is still settled by the sweep (store/instances.py)."""
    # the admission named here replaces whatever the row named before (a slice given back: `quota`)
    await pool.execute("""
        UPDATE messages SET metadata = metadata || jsonb_build_object(
            'reservation', (coalesce(metadata -> 'reservation', '{}'::jsonb) - 'quota') || $2::jsonb)
        WHERE id = $1 AND status IN ('pending', 'streaming')""", message_id, reservation)


@dataclass(slots=True, kw_only=True)
class Regeneration:
    """A new reply to a saved user message (or, for a retry of its client_request_id, the one made)."""

    user_message: dict[str, Any]
    assistant_message_id: uuid.UUID
    duplicate: bool


_USER_MESSAGE = f"""
SELECT {MESSAGE_COLUMNS}, seq, client_request_id FROM messages WHERE id = $1 AND user_id = $2
"""

_BY_REQUEST = "SELECT id, reply_to FROM messages WHERE user_id = $1 AND client_request_id = $2"


async def regeneration_target(pool: asyncpg.Pool, user_id: uuid.UUID,
                              user_message_id: uuid.UUID) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The user message to answer again and its newest reply (None if it has none). NotFound if it
    is not this user's user message; Conflict for an arena turn or while a reply is live."""
    row = await pool.fetchrow(_USER_MESSAGE, user_message_id, user_id)
    if row is None or row["role"] != "user":
        raise NotFound("message not found")
    last = await pool.fetchrow(f"""
        SELECT {MESSAGE_COLUMNS} FROM messages WHERE reply_to = $1 AND role = 'assistant'
        ORDER BY seq DESC LIMIT 1""", user_message_id)
    if last is not None and last["slot"] is not None:
        raise Conflict("an arena turn cannot be regenerated")
    if last is not None and MessageStatus(last["status"]).live:
        raise Conflict("this message's reply is still being generated; cancel it or wait for it to finish")
    return dict(row), dict(last) if last is not None else None


async def find_regeneration(pool: asyncpg.Pool, user_id: uuid.UUID, user_message_id: uuid.UUID,
                            client_request_id: str) -> Regeneration | None:
    """The reply a retry of `client_request_id` already made; Conflict if it names another message's."""
    row = await pool.fetchrow(_BY_REQUEST, user_id, client_request_id)
    if row is None:
        return None
    if row["reply_to"] != user_message_id:
        raise Conflict("client_request_id already names a reply to another message")
    user_message = await get_message(pool, user_id, user_message_id)
    return Regeneration(user_message=user_message, assistant_message_id=row["id"], duplicate=True)


async def insert_regeneration(pool: asyncpg.Pool, user_id: uuid.UUID, user_message: dict[str, Any],
                              client_request_id: str | None, instance_id: uuid.UUID,
                              note: dict[str, Any]) -> Regeneration:
    """The new reply's placeholder (status streaming) and the thread touched, in one statement. The
    one-live-reply index turns a race with another regenerate into Conflict; the client_request_id
    index turns a race with its own retry into that retry's reply."""
    try:
        new_id = await pool.fetchval("""
            WITH a AS (
                INSERT INTO messages (thread_id, user_id, role, status, reply_to, instance_id, client_request_id,
                                      metadata)
                VALUES ($1, $2, 'assistant', 'streaming', $3, $4, $5, jsonb_build_object('reservation', $6::jsonb))
                RETURNING id, thread_id
            ),
            t AS (UPDATE threads SET updated_at = clock_timestamp() FROM a WHERE threads.id = a.thread_id)
            SELECT id FROM a""", user_message["thread_id"], user_id, user_message["id"], instance_id,
            client_request_id, note)
    except asyncpg.UniqueViolationError:
        # whichever index fired first: a retry of this client_request_id that committed meanwhile
        # (the insert waited for it) is that retry's reply, anything else a live reply
        if client_request_id is not None:
            found = await find_regeneration(pool, user_id, user_message["id"], client_request_id)
            if found is not None:
                return found
        raise Conflict("this message's reply is still being generated; cancel it or wait for it to finish") from None
    except asyncpg.ForeignKeyViolationError:
        raise NotFound("message not found") from None  # deleted meanwhile
    message = {k: v for k, v in user_message.items() if k not in ("seq", "client_request_id")}
    return Regeneration(user_message=message, assistant_message_id=new_id, duplicate=False)



# A live reply's partial content, so a crash loses at most the last checkpoint's window. Only rows
# still streaming are touched: a finish (or a sweep) that got there first wins. `checkpoint_seq` is
# the seq of the last event saved; the chunk boundaries and the reasoning events' seqs (as the
# finish saves them) keep a replay's ids equal to the live ones. A reply without reasoning gets no
# `reasoning` key (its NULL is stripped).
_CHECKPOINT = """
UPDATE messages m SET content = x.content,
    metadata = m.metadata || jsonb_strip_nulls(jsonb_build_object(
        'chunks', x.chunks::jsonb, 'checkpoint_seq', x.seq, 'reasoning', x.reasoning::jsonb))
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::integer[], $5::text[]) AS x(id, content, chunks, seq, reasoning)
WHERE m.id = x.id AND m.status = 'streaming'
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    message_id: uuid.UUID
    content: str
    chunks: list[int]
    seq: int  # the seq of the last event saved: a delta (one per chunk) or a reasoning event
    reasoning: list[list[Any]]  # the reasoning events so far, [seq, text(, signature)]


async def checkpoint_many(pool: asyncpg.Pool, checkpoints: list[Checkpoint]) -> int:
    """Save live replies' partial content in one statement; returns how many rows were updated."""
    # chunk and reasoning lists go as JSON text: a list of lists would be taken for a two-dimensional array
    status = await pool.execute(_CHECKPOINT, [c.message_id for c in checkpoints], [c.content for c in checkpoints],
                                [orjson.dumps(c.chunks).decode() for c in checkpoints],
                                [c.seq for c in checkpoints],
                                [orjson.dumps(c.reasoning).decode() if c.reasoning else None for c in checkpoints])
    return int(status.rpartition(" ")[2])
