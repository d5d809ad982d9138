"""The hardening property: random interleavings of every door, on two instances, never break the
invariants the database must keep.

Three users with small caps (per user from [limits], per key on the key's row) send a seeded random
schedule of operations, in bursts, to two gateway instances on one PostgreSQL, each with its own
instance id and policy (quota slices on), against one fake upstream on loopback that streams with
exact usage (OpenAI-compatible chat and embeddings, and an Anthropic-kind provider) and honours the
max_tokens it is sent. The doors: native /api/chat (streamed and not, new thread and existing,
retried, cancelled from either instance, followed through its stream_url on the other instance, the
client hanging up after the first event), the WebSocket (cancel frames, sockets closed after
acceptance), the arena, regenerate (retried, cancelled), /v1/chat/completions, /v1/responses (stored
and not), /v1/messages, /v1/embeddings (and clients leaving mid-call), votes; strangers aiming at
another user's thread, message, response or comparison, also in bursts with the owner's own turns
into that thread on one instance (so they share a group commit); and, per user, a burst of long
replies whose requests name no max_tokens while the budgets are still wide.

After the run (every reply settled, then both instances shut down cleanly) the database must show:
  (a) nothing crossed users: no message in another user's thread, no reply to another user's
      message or carrying another turn's text, no usage row, comparison or vote of another user;
      every stranger answered 404;
  (b) no cap exceeded: per user and per key, the day's tokens and cost within the caps and equal to
      the sum of the usage rows; no rate window or stream counter over its limit; no user with more
      upstream streams in flight than its cap;
  (c) every user message that got a 2xx saved exactly once, in the right thread, with exactly its
      replies; nothing written for a refusal at the edge, a stranger, or a stateless door;
  (d) nothing left reserved: day rows' reserved and cost_reserved 0, stream counters 0, no stream
      lease left, no quota slice open or holding anything (a closed, empty row is harmless);
  (e) no message left pending or streaming.

Every violation is reported (not just the first), each naming the user, the row and expected vs
found; the seed and run tag head the report. GATEWAY_PROPERTY_SEEDS=1,2,3 runs other seeds.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import Settings
from gateway.state import INSTANCE
from gateway.store.keys import issue_key, upsert_user
from tests.support.properties import (
    KEY_CAPS,
    Checker,
    Models,
    Outcome,
    Person,
    PropertyUpstream,
    Runner,
    Violations,
    gateway_toml,
    sample_stream_counts,
    schedule,
)

SEEDS = [int(s) for s in os.environ.get("GATEWAY_PROPERTY_SEEDS", "1103,2718,31337").split(",")]
OPS = 90  # random operations, plus the bursts (schedule())
PAIR_BURSTS = 6  # each: three owner turns and two stranger turns into one thread, one instance, one moment
WINDOW_S = 6.0  # the schedule's start times spread over this
PIECE_DELAY_S = 0.03  # between the upstream's stream pieces: cancels and hang-ups land mid-stream
OP_TIMEOUT_S = 30.0
SETTLE_S = 30.0


async def person(db: asyncpg.Pool, index: int, tag: str) -> Person:
    user_id = uuid.uuid4()
    async with db.acquire() as conn, conn.transaction():
        await upsert_user(conn, user_id, None)
        row, key = await issue_key(conn, user_id, f"prop-{tag}-u{index}", ["chat", "arena"],
                                   limits=KEY_CAPS[index] or None)
    return Person(index, user_id, key, row["id"], KEY_CAPS[index])


async def live_rows(db: asyncpg.Pool, people: list[Person]) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM messages WHERE user_id = ANY($1) "
                                   "AND status IN ('pending', 'streaming')", [p.id for p in people])
    return count


async def settle(db: asyncpg.Pool, people: list[Person], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while await live_rows(db, people):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def set_up(client: TestClient, db: asyncpg.Pool, people: list[Person], models: Models, tag: str) -> None:
    """Per user: two threads (one turn each), one arena comparison, one stored response; all finished
    (one at a time: the stream caps are small)."""

    async def finished() -> None:
        assert await settle(db, people, SETTLE_S), "a setup turn did not finish"

    for p in people:
        for k in range(2):
            resp = await client.post("/api/chat", headers=p.headers, json={
                "content": f"[{tag}.u{p.index}.s{k}] len=10 setup", "max_tokens": 20, "model": models.a})
            assert resp.status == 202, await resp.text()
            answer = await resp.json()
            p.threads.append(uuid.UUID(answer["thread_id"]))
            p.user_messages.append(uuid.UUID(answer["message"]["id"]))
            p.replies.append(uuid.UUID(answer["assistant_message_id"]))
            await finished()
        resp = await client.post("/api/arena", headers=p.headers, json={
            "content": f"[{tag}.u{p.index}.s2] len=10 setup", "max_tokens": 20, "models": [models.a, models.b]})
        assert resp.status == 202, await resp.text()
        p.comparison = uuid.UUID((await resp.json())["comparison_id"])
        await finished()
        resp = await client.post("/v1/responses", headers=p.headers, json={
            "model": models.a, "input": f"[{tag}.u{p.index}.s3] len=10 setup", "max_output_tokens": 20})
        assert resp.status == 200, await resp.text()
        p.response_id = (await resp.json())["id"]
        await finished()
    statuses = await db.fetch("SELECT status, count(*) FROM messages WHERE user_id = ANY($1) AND role = 'assistant' "
                              "GROUP BY status", [p.id for p in people])
    assert {r["status"]: r["count"] for r in statuses} == {"complete": 3 * 5}


def summary(outcomes: list[Outcome]) -> str:
    counts = Counter(f"{o.op.door}{'(stranger)' if o.op.stranger else ''}:{o.status}" for o in outcomes)
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS)
async def test_property_random_interleavings_of_every_door_on_two_instances_keep_the_invariants(
        seed: int, aiohttp_client: Any, aiohttp_server: Any, make_settings: Callable[..., Settings],
        config_file: Callable[[str], str], db: asyncpg.Pool) -> None:
    tag = f"p{uuid.uuid4().hex[:6]}"
    people = [await person(db, i, tag) for i in range(3)]
    up = PropertyUpstream(PIECE_DELAY_S, {p.index: p.stream_cap for p in people})
    up.server = await aiohttp_server(up.app)  # TestServer cancels a handler whose client left
    models = Models(a=f"{tag}_a", b=f"{tag}_b", claude=f"{tag}_claude", embed=f"{tag}_embed")
    # no periodic sweep: what a clean shutdown leaves behind is what the checks see (a peer's sweep would
    # give a closed instance's leftovers back and hide them)
    settings = make_settings(GATEWAY_CONFIG=config_file(gateway_toml(up, models)), SWEEP_S="1000")
    # two instances on one database, each its own instance id and policy (TestServer cancels a handler
    # whose client left, as `serve` runs them)
    clients: list[TestClient] = [await aiohttp_client(create_app(settings)) for _ in range(2)]
    instance_ids = [c.app[INSTANCE].id for c in clients]
    assert instance_ids[0] != instance_ids[1]
    await set_up(clients[0], db, people, models, tag)

    ops = schedule(seed, tag, models, OPS, PAIR_BURSTS, WINDOW_S)
    violations = Violations()
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_stream_counts(db, people, violations, stop))
    runner = Runner(clients, people, models)
    started = time.monotonic()
    t0 = started + 0.05
    outcomes = list(await asyncio.gather(*(runner.run(op, t0, OP_TIMEOUT_S) for op in ops)))
    ran_s = time.monotonic() - started
    checker = Checker(db, people, outcomes, up, instance_ids, tag, violations)
    if not await settle(db, people, SETTLE_S):
        await checker.live(f"{SETTLE_S:.0f} s after the last operation, before shutdown")
    stop.set()
    await sampler
    for client in clients:
        await client.close()  # a clean shutdown: replies finish, usage drains, the slices go back

    await checker.live("after both instances shut down")
    checker.answers()
    await checker.crossing()
    await checker.saved()
    await checker.caps()
    await checker.nothing_reserved()
    accepted = sum(o.ok for o in outcomes)
    if accepted < len(ops) // 3:  # the schedule must exercise the doors, not only their refusals
        violations.add("schedule", f"only {accepted} of {len(ops)} operations were accepted")

    header = (f"seed {seed}, run tag {tag} (rerun: GATEWAY_PROPERTY_SEEDS={seed}): {len(ops)} operations in "
              f"{ran_s:.1f} s on instances {instance_ids}; users " + ", ".join(f"u{p.index}={p.id}" for p in people)
              + f"\nanswers: {summary(outcomes)}")
    assert not violations.found, violations.report(header)
