"""An anonymous arena slot names its model nowhere before the vote, not even in an error text
the SSE error event, the replay and the stored row carry a masked message; the
real one is kept in the metadata and shown once the comparison has its vote."""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson

from tests.support.arena import (
    accept_arena,
    fake_pair_client,
    row,
    stream_arena,
    vote,
    wait_comparison_finished,
)
from tests.support.common import User
from tests.support.fakes import FakeUpstream, Reply, openai_stream

NAMES = (b"alpha", b"up-alpha", b"pa")  # the failing slot's model, upstream id and provider


def names_in(raw: bytes) -> list[bytes]:
    """The names that appear as words ("pa" inside "comparison" is no name)."""
    return [n for n in NAMES if re.search(rb"(?<![\w-])%s(?![\w-])" % re.escape(n), raw)]


async def test_an_anonymous_slots_error_names_no_model_until_the_vote(
        make_client: Any, config_file: Any, upstream: FakeUpstream, upstream_b: FakeUpstream, user: User,
        db: Any) -> None:
    # a 404 whose text names the upstream model (not retryable: no fallback), and the circuit then open
    upstream.queue(Reply(status=404, body=b'{"error":{"message":"The model up-alpha does not exist (pa)"}}'))
    upstream_b.queue(Reply(openai_stream(["fine"])), Reply(openai_stream(["again"])))
    client = await fake_pair_client(make_client, config_file, upstream, upstream_b)
    stream, cid, raw = await stream_arena(client, user, db, content="who are you", models=["alpha", "beta"])
    comparison = await db.fetchrow("SELECT * FROM comparisons WHERE id = $1", uuid.UUID(cid))
    failed = await row(db, comparison["message_a"])
    assert failed["status"] == "failed"
    error = stream.data("a", "error")[0]
    assert error["message"] == "upstream answered 404: The model (hidden) does not exist ((hidden))"
    assert names_in(raw) == []
    assert names_in(orjson.dumps(failed["error"])) == []
    # a replay of the comparison and of the slot's own stream: masked too
    replay = await (await client.get(f"/api/comparisons/{cid}/stream", headers=user.headers)).read()
    assert names_in(replay) == []
    own = await (await client.get(f"/api/messages/{failed['id']}/stream", headers=user.headers)).read()
    assert names_in(own) == []
    before = await (await client.get(f"/api/messages/{failed['id']}", headers=user.headers)).read()
    assert names_in(before) == []

    # the vote reveals the real text
    assert (await vote(client, user, cid, "b")).status == 200
    after = await (await client.get(f"/api/messages/{failed['id']}", headers=user.headers)).json()
    assert after["model"] == "alpha"
    assert after["metadata"]["error_detail"] == "upstream answered 404: The model up-alpha does not exist (pa)"


async def test_an_anonymous_slot_skipped_by_an_open_circuit_says_so_without_the_name(
        make_client: Any, config_file: Any, upstream: FakeUpstream, upstream_b: FakeUpstream, user: User,
        db: Any) -> None:
    upstream.queue(Reply(status=500, body=b'{"error":{"message":"boom"}}'))
    upstream_b.queue(Reply(openai_stream(["one"])), Reply(openai_stream(["two"])))
    client = await make_client(GATEWAY_CONFIG=config_file(_toml(upstream, upstream_b)), CIRCUIT_FAILURES="1")
    first = await accept_arena(client, user, content="first", models=["alpha", "beta"])
    await wait_comparison_finished(db, first["comparison_id"])  # alpha failed once: its circuit is open
    _, cid, raw = await stream_arena(client, user, db, content="second", models=["alpha", "beta"])
    assert b"is unavailable (circuit open)" in raw
    assert names_in(raw) == []
    comparison = await db.fetchrow("SELECT * FROM comparisons WHERE id = $1", uuid.UUID(cid))
    failed = await row(db, comparison["message_a"])
    assert failed["error"]["message"] == "model (hidden) is unavailable (circuit open)"
    assert failed["metadata"]["error_detail"] == "model alpha is unavailable (circuit open)"


def _toml(upstream: FakeUpstream, upstream_b: FakeUpstream) -> str:
    from tests.support.arena import two_upstreams_toml
    return two_upstreams_toml(upstream.base_url, upstream_b.base_url)
