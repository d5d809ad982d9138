"""The arena: one prompt, two models in parallel on one SSE stream, the comparison row, the vote
and the leaderboard.

Expected frames are built here from the protocol (DESIGN.md "SSE protocol", the docstring of
gateway/api/native/arena.py), independently of the gateway's encoder: each slot's frames are its
single-chat frames with `"slot"` first in every data object, and every id is
`<comparison_id>:<last seq of a>:<last seq of b>`. The two slots interleave as they please, so
the stream is checked per slot, byte for byte, and the ids event by event.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.providers.base import estimate_tokens
from gateway.providers.demo import demo_reply
from gateway.service.leaderboard import PSEUDO_WIN, fit, fit_penalised, leaderboard
from tests.support.arena import (
    RETRY,
    SLOTS,
    ArenaStream,
    accept_arena,
    comparison_id_of,
    demo_models_toml,
    fake_pair_client,
    row,
    split_frames,
    stream_arena,
    two_upstreams_toml,
    unique,
    vote,
    wait_comparison_finished,
)
from tests.support.common import User, wait_for
from tests.support.fakes import Reply, openai_chunk, openai_stream

STREAM_ERROR = b'data: {"error":{"message":"Overloaded","type":"overloaded_error","param":null,"code":null}}\n\n'


# -- configuration ---------------------------------------------------------------------------------


# -- building the expected frames ------------------------------------------------------------------

def frame_body(slot: str, data: dict[str, Any], event: str | None = None) -> bytes:
    """One slot frame without its id line: what follows `id: ...\\n`."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps({"slot": slot, **data}) + b"\n\n"


def expected_metadata(meta: dict[str, Any], model: str | None, provider: str | None,
                      fallback_from: str | None = None) -> dict[str, Any]:
    return {"thread_id": meta["thread_id"], "user_message_id": meta["user_message_id"],
            "message_id": meta["message_id"], "model": model, "provider": provider, "category": None,
            "auto": False, "fallback_from": fallback_from}


def expected_slot(slot: str, meta: dict[str, Any], model: str | None, provider: str | None, texts: list[str],
                  prompt_tokens: int, completion_tokens: int, attempts: list[dict[str, Any]] | None,
                  fallback_from: str | None = None) -> list[bytes]:
    """A successful slot: metadata, deltas, usage, done (attempts None: anonymous, none shown)."""
    frames = [frame_body(slot, expected_metadata(meta, model, provider, fallback_from), "metadata")]
    frames += [frame_body(slot, {"delta": t}) for t in texts]
    frames.append(frame_body(slot, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                    "total_tokens": prompt_tokens + completion_tokens}, "usage"))
    done: dict[str, Any] = {"finish_reason": "stop", "message_id": meta["message_id"]}
    if attempts is not None:
        done["attempts"] = attempts
    frames.append(frame_body(slot, done, "done"))
    return frames


def saved_attempts(row: asyncpg.Record) -> list[dict[str, Any]]:
    """The done event's attempts as the live stream sent them (the row keeps the same values)."""
    return [{"model": a["model"], "provider": a["provider"], "outcome": a["outcome"], "ms": a["ms"]}
            for a in row["metadata"]["attempts"]]


# -- reading the stream ----------------------------------------------------------------------------


async def comparison_row(db: asyncpg.Pool, comparison_id: str) -> asyncpg.Record:
    return await db.fetchrow("SELECT * FROM comparisons WHERE id = $1", uuid.UUID(comparison_id))


async def user_counts(db: asyncpg.Pool, user_id: uuid.UUID) -> tuple[int, int, int]:
    """(messages, comparisons, threads) of one user."""
    return (await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user_id),
            await db.fetchval("SELECT count(*) FROM comparisons WHERE user_id = $1", user_id),
            await db.fetchval("SELECT count(*) FROM threads WHERE user_id = $1", user_id))


# -- 1. both slots succeed ---------------------------------------------------------------------------

async def test_both_slots_stream_on_one_sse_response_with_exact_frames_and_rows(
        make_client, config_file, upstream, upstream_b, user, db):
    upstream.queue(Reply(openai_stream(["Hel", "lo", " from A"], prompt_tokens=7)))
    upstream_b.queue(Reply(openai_stream(["Bon", "jour"], prompt_tokens=8)))
    client = await fake_pair_client(make_client, config_file, upstream, upstream_b)
    stream, cid, _ = await stream_arena(client, user, db, content="Greet me", models=["alpha", "beta"],
                                        anonymous=False)

    comparison = await comparison_row(db, cid)
    replies = {"a": await row(db, comparison["message_a"]), "b": await row(db, comparison["message_b"])}
    user_message = await row(db, comparison["user_message_id"])
    meta = {s: {"thread_id": str(comparison["thread_id"]), "user_message_id": str(user_message["id"]),
                "message_id": str(replies[s]["id"])} for s in SLOTS}
    assert stream.slots["a"] == expected_slot("a", meta["a"], "alpha", "pa", ["Hel", "lo", " from A"], 7, 3,
                                              [{"model": "alpha", "provider": "pa", "outcome": "ok",
                                                "ms": replies["a"]["metadata"]["attempts"][0]["ms"]}])
    assert stream.slots["b"] == expected_slot("b", meta["b"], "beta", "pb", ["Bon", "jour"], 8, 2,
                                              [{"model": "beta", "provider": "pb", "outcome": "ok",
                                                "ms": replies["b"]["metadata"]["attempts"][0]["ms"]}])
    assert [e for s, e in stream.order if s == "a"] == ["metadata", "message", "message", "message", "usage", "done"]

    # the rows: one user message, one reply per slot whose content is what that slot streamed
    assert (user_message["user_id"], user_message["role"], user_message["content"]) == (user.id, "user", "Greet me")
    for slot, model, provider in (("a", "alpha", "pa"), ("b", "beta", "pb")):
        reply = replies[slot]
        assert (reply["role"], reply["slot"], reply["status"], reply["reply_to"], reply["model"],
                reply["provider"], reply["thread_id"]) == ("assistant", slot, "complete", user_message["id"], model,
                                                           provider, comparison["thread_id"])
        assert reply["content"] == stream.text(slot)
        assert reply["metadata"]["comparison_id"] == cid
    assert (replies["a"]["content"], replies["b"]["content"]) == ("Hello from A", "Bonjour")
    assert (comparison["user_id"], comparison["thread_id"], comparison["model_a"], comparison["model_b"],
            comparison["anonymous"], comparison["winner"]) == (user.id, user_message["thread_id"], "alpha", "beta",
                                                               False, None)
    usage = await db.fetch("SELECT message_id, model, provider, prompt_tokens, completion_tokens FROM usage "
                           "WHERE user_id = $1 ORDER BY model", user.id)
    assert [tuple(u) for u in usage] == [(replies["a"]["id"], "alpha", "pa", 7, 3),
                                         (replies["b"]["id"], "beta", "pb", 8, 2)]
    assert [r["model"] for r in upstream.requests] == ["up-alpha"]
    assert [r["model"] for r in upstream_b.requests] == ["up-beta"]
    assert upstream.requests[0]["messages"] == [{"role": "user", "content": "Greet me"}]
    # replayed from the rows, each slot's frames are byte-identical to the live ones
    replay = await client.get(f"/api/comparisons/{cid}/stream", headers=user.headers)
    assert ArenaStream(await replay.read(), cid).slots == stream.slots


async def test_arena_stream_sends_its_headers_before_either_slot_has_a_token(
        make_client, config_file, upstream, upstream_b, user, db):
    # both upstreams hold their replies until the test has seen the response head: a gateway that
    # waited for a first token before answering would never get there
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["A"]), on_request=lambda _: release.wait()))
    upstream_b.queue(Reply(openai_stream(["B"]), on_request=lambda _: release.wait()))
    client = await make_client(SSE_PING_S="0.05", GATEWAY_CONFIG=config_file(two_upstreams_toml(
        upstream.base_url, upstream_b.base_url)))
    resp = await asyncio.wait_for(client.post("/api/arena", headers=user.headers, json={
        "content": "wait", "models": ["alpha", "beta"], "stream": True}), 3)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    # the first ping proves the response is open (the retry line waits for the first event)
    assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 3) == b": ping\n\n"
    release.set()
    rest = (await resp.read()).replace(b": ping\n\n", b"")
    meta = orjson.loads(split_frames(rest)[0].rpartition(b"data: ")[2])
    stream = ArenaStream(rest, await comparison_id_of(db, meta["user_message_id"]))
    assert (stream.text("a"), stream.text("b")) == ("A", "B")


# -- 2. anonymous battles ------------------------------------------------------------------------------

async def test_anonymous_arena_names_no_model_until_the_vote(make_client, config_file, user, db):
    x, y = unique("anon_x"), unique("anon_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="4")
    prompt = "Who are you"
    stream, cid, raw = await stream_arena(client, user, db, content=prompt, models=[x, y])  # anonymous by default
    assert x.encode() not in raw and y.encode() not in raw and b'"attempts"' not in raw
    comparison = await comparison_row(db, cid)
    assert comparison["anonymous"] is True
    # each demo model's reply is seeded by its upstream id too: the two slots differ
    texts = {slot: demo_reply(prompt, 4, model) for slot, model in zip(SLOTS, (x, y), strict=True)}
    assert texts["a"] != texts["b"]
    for slot in SLOTS:
        meta = {"thread_id": str(comparison["thread_id"]), "user_message_id": str(comparison["user_message_id"]),
                "message_id": str(comparison[f"message_{slot}"])}
        assert stream.slots[slot] == expected_slot(slot, meta, None, None, texts[slot], estimate_tokens(prompt), 4,
                                                   None)

    got = await (await client.get(f"/api/comparisons/{cid}", headers=user.headers)).json()
    assert got["anonymous"] is True and got["winner"] is None
    assert got["slots"] == {s: {"message_id": str(comparison[f"message_{s}"]), "status": "complete", "model": None,
                                "provider": None} for s in SLOTS}
    reply_a = str(comparison["message_a"])
    message = await (await client.get(f"/api/messages/{reply_a}", headers=user.headers)).json()
    assert (message["model"], message["provider"], message["content"]) == (None, None, "".join(texts["a"]))
    assert "attempts" not in message["metadata"] and "fallback_from" not in message["metadata"]
    thread = await (await client.get(f"/api/threads/{comparison['thread_id']}", headers=user.headers)).json()
    assert [(m["role"], m["slot"], m["model"], m["provider"]) for m in thread["messages"]] == [
        ("user", None, None, None), ("assistant", "a", None, None), ("assistant", "b", None, None)]
    assert x not in orjson.dumps(thread).decode() and y not in orjson.dumps(thread).decode()
    usage = await (await client.get("/api/usage?group_by=model", headers=user.headers)).json()
    assert [(r["model"], r["requests"]) for r in usage["rows"]] == [("(anonymous arena reply, vote pending)", 2)]

    voted = await vote(client, user, cid, "tie")
    assert voted.status == 200
    revealed = await voted.json()
    assert revealed["winner"] == "tie" and revealed["voted_at"] is not None
    assert {s: (v["model"], v["provider"]) for s, v in revealed["slots"].items()} == {"a": (x, "demo"),
                                                                                   "b": (y, "demo")}
    again = await (await client.get(f"/api/comparisons/{cid}", headers=user.headers)).json()
    assert again == revealed
    message = await (await client.get(f"/api/messages/{reply_a}", headers=user.headers)).json()
    assert (message["model"], message["provider"]) == (x, "demo")
    assert [a["model"] for a in message["metadata"]["attempts"]] == [x]
    usage = await (await client.get("/api/usage?group_by=model", headers=user.headers)).json()
    assert sorted((r["model"], r["requests"]) for r in usage["rows"]) == sorted([(x, 1), (y, 1)])


async def test_named_comparison_shows_its_models_before_any_vote(make_client, config_file, user, db):
    x, y = unique("named_x"), unique("named_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="2")
    stream, cid, _ = await stream_arena(client, user, db, content="hi", models=[x, y], anonymous=False)
    assert (stream.metadata("a")["model"], stream.metadata("b")["model"]) == (x, y)
    got = await (await client.get(f"/api/comparisons/{cid}", headers=user.headers)).json()
    assert {s: v["model"] for s, v in got["slots"].items()} == {"a": x, "b": y}


# -- 3. one slot failing ---------------------------------------------------------------------------------

async def test_a_slot_failing_mid_stream_leaves_the_other_complete(
        make_client, config_file, upstream, upstream_b, user, db):
    upstream.queue(Reply([openai_chunk({"role": "assistant", "content": ""}), openai_chunk({"content": "Par"}),
                          STREAM_ERROR]))
    upstream_b.queue(Reply(openai_stream(["Who", "le"], prompt_tokens=4)))
    client = await fake_pair_client(make_client, config_file, upstream, upstream_b)
    stream, cid, _ = await stream_arena(client, user, db, content="go", models=["alpha", "beta"], anonymous=False)

    comparison = await comparison_row(db, cid)
    failed, complete = await row(db, comparison["message_a"]), await row(db, comparison["message_b"])
    meta_a = {"thread_id": str(comparison["thread_id"]), "user_message_id": str(comparison["user_message_id"]),
              "message_id": str(failed["id"])}
    error = {"type": "upstream_stream_error", "message": "upstream error mid-stream: Overloaded", "retryable": True}
    assert stream.slots["a"] == [frame_body("a", expected_metadata(meta_a, "alpha", "pa"), "metadata"),
                                 frame_body("a", {"delta": "Par"}), frame_body("a", error, "error")]
    assert [e for s, e in stream.order if s == "b"] == ["metadata", "message", "message", "usage", "done"]
    assert stream.data("b", "done")[0]["finish_reason"] == "stop"
    assert (failed["status"], failed["content"], failed["error"]) == ("failed", "Par", error)
    assert (complete["status"], complete["content"]) == ("complete", "Whole")
    assert (comparison["user_id"], comparison["model_a"], comparison["model_b"]) == (user.id, "alpha", "beta")
    # both replies are accounted, the failed one by estimate
    assert await db.fetchval("SELECT count(*) FROM usage WHERE message_id IN ($1, $2)", failed["id"],
                             complete["id"]) == 2


async def test_a_slot_timing_out_falls_back_without_delaying_the_other(
        make_client, config_file, upstream, upstream_b, user, db):
    upstream.queue(Reply(openai_stream(["late"]), delay_s=1.0))  # well after alpha's first-token timeout
    upstream_b.queue(Reply(openai_stream(["quick"], prompt_tokens=3)))
    client = await make_client(GATEWAY_CONFIG=config_file(two_upstreams_toml(
        upstream.base_url, upstream_b.base_url, fallbacks=("demo",), first_token_timeout_s=0.5)), DEMO_CHUNKS="3")
    stream, cid, _ = await stream_arena(client, user, db, content="race me", models=["alpha", "beta"],
                                        anonymous=False)

    meta = stream.metadata("a")
    assert (meta["model"], meta["provider"], meta["fallback_from"]) == ("demo", "demo", "alpha")
    assert stream.text("a") == "".join(demo_reply("race me", 3))
    assert (stream.metadata("b")["model"], stream.text("b")) == ("beta", "quick")
    # b finished (done) before a sent anything at all: a's hang held nothing of b's up
    assert stream.order.index(("b", "done")) < stream.order.index(("a", "metadata"))
    assert stream.order[:5] == [("b", "metadata"), ("b", "message"), ("b", "usage"), ("b", "done"),
                                ("a", "metadata")]
    saved = await row(db, (await comparison_row(db, cid))["message_a"])
    assert [(a["model"], a["outcome"]) for a in saved["metadata"]["attempts"]] == [
        ("alpha", "upstream_timeout"), ("demo", "ok")]
    assert (saved["model"], saved["metadata"]["fallback_from"]) == ("demo", "alpha")
    assert stream.data("a", "done")[0]["attempts"] == saved_attempts(saved)


async def test_cancelling_one_slot_leaves_the_other_running(make_client, config_file, upstream, upstream_b, user, db):
    release, release_b = asyncio.Event(), asyncio.Event()
    upstream.queue(Reply(openai_stream(["never"]), on_request=lambda _: release.wait()))
    pieces_b = openai_stream(["kept"])
    upstream_b.queue(Reply(pieces_b, hold_at=1, release=release_b))  # b is mid-reply (role chunk out) throughout
    client = await fake_pair_client(make_client, config_file, upstream, upstream_b)
    answer = await accept_arena(client, user, content="stop a", models=["alpha", "beta"], anonymous=False)
    ids = answer["assistant_message_ids"]

    async def both_in_flight() -> bool:
        return len(upstream.requests) == 1 and upstream_b.sent == [1]

    await wait_for(both_in_flight)
    resp = await client.post(f"/api/messages/{ids['a']}/cancel", headers=user.headers)
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    assert (await row(db, ids["b"]))["status"] == "streaming"  # a's cancel, saved, stopped nothing of b's
    release_b.set()
    release.set()
    await wait_comparison_finished(db, answer["comparison_id"])
    assert upstream_b.sent == [len(pieces_b)]
    assert [(r["status"], r["content"]) for r in (await row(db, ids["a"]), await row(db, ids["b"]))] == [
        ("cancelled", ""), ("complete", "kept")]
    stream = ArenaStream(await (await client.get(answer["stream_url"])).read(), answer["comparison_id"])
    assert [d["finish_reason"] for d in stream.data("a", "done")] == ["cancelled"]
    assert stream.text("b") == "kept"
    assert (await vote(client, user, answer["comparison_id"], "b")).status == 200


async def test_a_client_leaving_the_arena_stream_stops_neither_slot(
        make_client, config_file, upstream, upstream_b, user, db):
    release = asyncio.Event()  # both replies held after their first text until the client has gone
    pieces_a, pieces_b = openai_stream(["one ", "two ", "three"]), openai_stream(["uno ", "dos ", "tres"])
    upstream.queue(Reply(pieces_a, hold_at=2, release=release))
    upstream_b.queue(Reply(pieces_b, hold_at=2, release=release))
    client = await fake_pair_client(make_client, config_file, upstream, upstream_b)
    resp = await client.post("/api/arena", headers=user.headers, json={
        "content": "count", "models": ["alpha", "beta"], "stream": True})
    head = await resp.content.readuntil(b"\n\n")
    assert head.startswith(RETRY + b"id: ")
    first = orjson.loads(head.rpartition(b"data: ")[2])
    resp.close()  # gone with both replies mostly unsent
    cid = await comparison_id_of(db, first["user_message_id"])
    saved = await comparison_row(db, cid)
    ids = (saved["message_a"], saved["message_b"])
    assert [(await row(db, i))["status"] for i in ids] == ["streaming", "streaming"]
    release.set()
    await wait_comparison_finished(db, cid)
    assert [(r["status"], r["content"]) for r in [await row(db, i) for i in ids]] == [
        ("complete", "one two three"), ("complete", "uno dos tres")]
    assert (upstream.sent, upstream_b.sent) == ([len(pieces_a)], [len(pieces_b)])


# -- 4. votes -------------------------------------------------------------------------------------------

async def test_vote_rules_after_both_finished_once_and_only_by_the_owner(
        make_client, config_file, upstream, upstream_b, make_user, user, db):
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["slow"]), on_request=lambda _: release.wait()))
    upstream_b.queue(Reply(openai_stream(["fast"])))
    client = await fake_pair_client(make_client, config_file, upstream, upstream_b)
    answer = await accept_arena(client, user, content="vote on me", models=["alpha", "beta"])
    cid = answer["comparison_id"]

    async def b_finished() -> bool:  # one slot done, the other held: still too early
        return (await row(db, answer["assistant_message_ids"]["b"]))["status"] == "complete"

    await wait_for(b_finished)
    early = await vote(client, user, cid, "a")
    assert early.status == 409 and (await early.json())["error"]["type"] == "conflict"
    assert (await comparison_row(db, cid))["winner"] is None
    release.set()
    await wait_comparison_finished(db, cid)

    first = await vote(client, user, cid, "a")
    assert first.status == 200
    body = await first.json()
    assert (body["id"], body["winner"]) == (cid, "a")
    assert {s: (v["model"], v["provider"], v["status"]) for s, v in body["slots"].items()} == {
        "a": ("alpha", "pa", "complete"), "b": ("beta", "pb", "complete")}
    saved = await comparison_row(db, cid)
    assert (saved["winner"], saved["voted_at"]) == ("a", datetime.fromisoformat(body["voted_at"]))

    same = await vote(client, user, cid, "a")
    assert same.status == 200 and await same.json() == body
    other = await vote(client, user, cid, "b")
    assert other.status == 409
    assert (await comparison_row(db, cid))["winner"] == "a"

    bad = await vote(client, user, cid, "nope")
    assert bad.status == 400 and (await bad.json())["error"]["type"] == "invalid_request"
    stranger = await make_user()
    theirs = await vote(client, stranger, cid, "b")
    assert theirs.status == 404
    assert (await client.get(f"/api/comparisons/{cid}", headers=stranger.headers)).status == 404
    assert (await vote(client, user, "not-a-uuid", "a")).status == 400
    assert (await client.get("/api/comparisons/not-a-uuid", headers=user.headers)).status == 400
    assert (await vote(client, user, str(uuid.uuid4()), "a")).status == 404
    assert (await comparison_row(db, cid))["winner"] == "a"


async def test_vote_is_accepted_when_a_slot_failed(make_client, config_file, upstream, upstream_b, user, db):
    upstream.queue(Reply(status=400, body=b'{"error":{"message":"bad"}}'))  # not retryable: no fallback
    upstream_b.queue(Reply(openai_stream(["fine"])))
    client = await fake_pair_client(make_client, config_file, upstream, upstream_b)
    answer = await accept_arena(client, user, content="one fails", models=["alpha", "beta"])
    await wait_comparison_finished(db, answer["comparison_id"])
    resp = await vote(client, user, answer["comparison_id"], "b")
    assert resp.status == 200
    assert {s: v["status"] for s, v in (await resp.json())["slots"].items()} == {"a": "failed", "b": "complete"}


# -- 5. ratings ------------------------------------------------------------------------------------------

def battles_of(a: str, b: str, wins_a: int, wins_b: int, ties: int = 0) -> list[tuple[str, str, str]]:
    return [(a, b, "a")] * wins_a + [(a, b, "b")] * wins_b + [(a, b, "tie")] * ties


def test_fit_matches_the_hand_solved_three_model_cycle():
    battles = battles_of("A", "B", 3, 1) + battles_of("B", "C", 3, 1) + battles_of("A", "C", 3, 1)
    # by symmetry p_B = 1, p_A = x, p_C = 1/x, and A's 6 wins give 6 = 4x/(x+1) + 4x²/(x²+1)
    lo, hi = 1.0, 10.0
    for _ in range(100):
        x = (lo + hi) / 2
        lo, hi = (x, hi) if 4 * x / (x + 1) + 4 * x * x / (x * x + 1) < 6 else (lo, x)
    ratings = fit(battles)
    hand = {"A": 1000 + 400 * math.log10(x), "B": 1000.0, "C": 1000 - 400 * math.log10(x)}
    assert ratings == pytest.approx(hand, abs=0.1)  # the pseudo-win moves them by ~0.04
    # the leaderboard shows the fit with a weak prior (tests/test_leaderboard_stats.py): the same order, pulled in
    assert [(e.model, e.rating) for e in leaderboard(battles)] == [("A", 1091.1), ("B", 1000.0), ("C", 908.9)]


def test_fit_of_two_models_is_400_log10_of_the_win_ratio():
    ratings = fit(battles_of("p", "q", 3, 1))
    expected = 400 * math.log10((3 + PSEUDO_WIN) / (1 + PSEUDO_WIN))
    assert ratings["p"] - ratings["q"] == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(400 * math.log10(3), abs=0.2)
    # the geometric mean of the strengths is 1: the two ratings sit symmetrically around 1000
    assert ratings["p"] + ratings["q"] == pytest.approx(2000, abs=1e-6)
    # who sits in slot a does not matter
    assert fit([("q", "p", "b")] * 3 + [("q", "p", "a")]) == pytest.approx(ratings, abs=1e-6)


@pytest.mark.parametrize("draw", ["tie", "both_bad"])
def test_a_tie_or_both_bad_counts_half_a_win_each(draw: str):
    # 2 wins + 2 draws against none: W_p = 3, W_q = 1, the closed form p_p / p_q = W_p / W_q
    battles = battles_of("p", "q", 2, 0) + [("p", "q", draw)] * 2
    ratings = fit(battles)
    assert ratings["p"] - ratings["q"] == pytest.approx(400 * math.log10((3 + PSEUDO_WIN) / (1 + PSEUDO_WIN)),
                                                        abs=1e-6)
    even = fit(battles_of("p", "q", 1, 1) + [("p", "q", draw)] * 2)
    assert even["p"] == pytest.approx(even["q"], abs=1e-6)


def test_leaderboard_counts_battles_wins_and_win_rates_exactly():
    battles = [*battles_of("p", "q", 2, 1, ties=1), ("r", "p", "both_bad"), ("q", "r", "b")]
    entries = {e.model: e for e in leaderboard(battles, rounds=50)}
    assert {m: (e.battles, e.wins, e.win_rate) for m, e in entries.items()} == {
        "p": (5, 3.0, 0.6), "q": (5, 1.5, 0.3), "r": (2, 1.5, 0.75)}
    assert [e.model for e in leaderboard(battles, rounds=50)] == sorted(entries, key=lambda m: -entries[m].rating)
    assert leaderboard([]) == []


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_battles():
    few = battles_of("p", "q", 6, 3, ties=1) + battles_of("q", "r", 5, 4, ties=1)
    many = few * 10
    width: dict[str, dict[str, float]] = {}
    for name, battles in (("few", few), ("many", many)):
        for e in leaderboard(battles, rounds=200, seed=1):
            assert e.ci_low <= e.rating <= e.ci_high, e
            width.setdefault(name, {})[e.model] = e.ci_high - e.ci_low
    for model in ("p", "q", "r"):
        assert width["many"][model] < width["few"][model], (model, width)
    # the same seed gives the same intervals
    assert leaderboard(few, rounds=50, seed=3) == leaderboard(few, rounds=50, seed=3)


async def battle(client: TestClient, user: User, db: asyncpg.Pool, models: list[str], winner: str,
                 anonymous: bool = True) -> None:
    answer = await accept_arena(client, user, content=f"battle {uuid.uuid4().hex[:6]}", models=models,
                                anonymous=anonymous)
    await wait_comparison_finished(db, answer["comparison_id"])
    assert (await vote(client, user, answer["comparison_id"], winner)).status == 200


async def board_entries(client: TestClient, user: User, names: tuple[str, ...], battles: int,
                        include_named: bool = False) -> dict[str, dict[str, Any]]:
    """Our models' entries, once the background refit has seen `battles` battles of the first one."""
    found: dict[str, dict[str, Any]] = {}
    query = "?include_named=true" if include_named else ""

    async def refitted() -> bool:
        resp = await client.get(f"/api/leaderboard{query}", headers=user.headers)
        assert resp.status == 200
        body = await resp.json()
        assert body["anonymous_only"] is (not include_named)
        found.clear()
        found.update({e["model"]: e for e in body["models"] if e["model"] in names})
        return names[0] in found and found[names[0]]["battles"] == battles

    await wait_for(refitted)
    return found


async def test_leaderboard_rates_voted_anonymous_battles(make_client, config_file, user, db):
    # uniquely named models: other tests' battles share the database but never these models
    x, y = unique("lb_x"), unique("lb_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="2",
                               LEADERBOARD_BOOTSTRAP_ROUNDS="50")
    await battle(client, user, db, [x, y], "a")  # x
    await battle(client, user, db, [y, x], "b")  # x
    await battle(client, user, db, [x, y], "b")  # y
    board = await board_entries(client, user, (x, y), 3)
    assert [board[m]["battles"] for m in (x, y)] == [3, 3]
    assert [(board[m]["wins"], board[m]["win_rate"]) for m in (x, y)] == [(2.0, 0.6667), (1.0, 0.3333)]
    three = fit_penalised([(x, y, "a"), (y, x, "b"), (x, y, "b")])  # the shown fit, with its weak prior
    assert board[x]["rating"] - board[y]["rating"] == pytest.approx(
        three.rating(x) - three.rating(y), abs=0.11)  # ratings are rounded to 0.1
    for entry in board.values():
        assert entry["ci_low"] <= entry["rating"] <= entry["ci_high"]

    # a named battle is left out by default and counted on request
    await battle(client, user, db, [x, y], "a", anonymous=False)
    named = await board_entries(client, user, (x, y), 4, include_named=True)
    assert [(named[m]["battles"], named[m]["wins"]) for m in (x, y)] == [(4, 3.0), (4, 1.0)]
    four = fit_penalised([(x, y, "a"), (y, x, "b"), (x, y, "b"), (x, y, "a")])
    assert named[x]["rating"] - named[y]["rating"] == pytest.approx(four.rating(x) - four.rating(y), abs=0.11)
    # a fresh app fits on its first read: the named vote is in the database, and left out
    fresh = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), LEADERBOARD_BOOTSTRAP_ROUNDS="50")
    default = await board_entries(fresh, user, (x, y), 3)
    assert [(default[m]["battles"], default[m]["wins"]) for m in (x, y)] == [(3, 2.0), (3, 1.0)]


async def test_an_unvoted_comparison_is_no_battle(make_client, config_file, user, db):
    x, y = unique("nv_x"), unique("nv_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="2")
    answer = await accept_arena(client, user, content="no vote", models=[x, y])
    await wait_comparison_finished(db, answer["comparison_id"])
    body = await (await client.get("/api/leaderboard?include_named=true", headers=user.headers)).json()
    assert [e for e in body["models"] if e["model"] in (x, y)] == []
    assert (await client.get("/api/leaderboard?include_named=maybe", headers=user.headers)).status == 400


# -- 6. policy per slot ------------------------------------------------------------------------------------

# prompt "hello" (2 tokens) + max_tokens 10: each slot reserves 12 and the 10-chunk demo reply uses 12
CAP = "[limits]\ndaily_tokens = {cap}\n"


async def day_row(db: asyncpg.Pool, user_id: uuid.UUID) -> dict[str, int] | None:
    found = await db.fetchrow("SELECT tokens, reserved, requests FROM daily_usage WHERE user_id = $1 AND day = $2",
                              user_id, datetime.now(UTC).date())
    return dict(found) if found else None


async def test_a_slot_the_cap_refuses_is_saved_refused_the_other_runs_and_the_comparison_takes_no_vote(
        make_client, config_file, user, db):
    x, y = unique("cap_x"), unique("cap_y")
    # 5 tokens left: slot a may take half (2), which does not even cover the 2-token prompt;
    # slot b, decided after it, may take all 5 (the 2-token prompt and 3 of reply)
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y, limits=CAP.format(cap=5))),
                               DEMO_CHUNKS="10")
    stream, cid, _ = await stream_arena(client, user, db, content="hello", max_tokens=10, models=[x, y],
                                        client_message_id="capped")
    [error] = stream.data("a", "error")
    assert (error["slot"], error["type"], error["reason"], error["retryable"]) == ("a", "policy", "daily_tokens",
                                                                                   True)
    assert x not in error["message"]  # anonymous: the refused slot's model stays hidden too
    assert stream.metadata("a")["model"] is None and stream.text("a") == ""
    assert len(stream.data("b", "message")) == 3 and stream.data("b", "done")
    assert await user_counts(db, user.id) == (3, 1, 1)  # the user message and both slots are kept
    await wait_comparison_finished(db, cid)
    assert await day_row(db, user.id) == {"tokens": 5, "reserved": 0, "requests": 1}
    comparison = await comparison_row(db, cid)
    assert (await row(db, comparison["message_a"]))["status"] == "refused"
    # a refused model never answered: no vote rates it
    vote = await client.post(f"/api/comparisons/{cid}/vote", headers=user.headers, json={"winner": "b"})
    assert vote.status == 409 and "refused" in (await vote.json())["error"]["message"]
    assert (await comparison_row(db, cid))["winner"] is None
    # a retry of the same id returns the same comparison: never a second decision
    again = await accept_arena(client, user, content="hello", max_tokens=10, models=[x, y],
                               client_message_id="capped")
    assert (again["duplicate"], again["comparison_id"]) == (True, cid)


async def test_the_slots_share_what_remains_so_the_second_is_not_starved(make_client, config_file, user, db):
    x, y = unique("share_x"), unique("share_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y, limits=CAP.format(cap=12))),
                               DEMO_CHUNKS="10")
    # each slot's worst case is 12 (2 prompt + 10): a takes half of the 12 left, b the other half
    answer = await accept_arena(client, user, content="hello", max_tokens=10, models=[x, y])
    await wait_comparison_finished(db, answer["comparison_id"])
    usage = await db.fetch("SELECT model, prompt_tokens, completion_tokens FROM usage WHERE user_id = $1 "
                           "ORDER BY model", user.id)
    assert [tuple(u) for u in usage] == sorted([(x, 2, 4), (y, 2, 4)])
    assert await day_row(db, user.id) == {"tokens": 12, "reserved": 0, "requests": 2}


async def test_both_slots_count_toward_the_daily_total(make_client, config_file, user, db):
    x, y = unique("cap_x"), unique("cap_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y, limits=CAP.format(cap=24))),
                               DEMO_CHUNKS="10")
    answer = await accept_arena(client, user, content="hello", max_tokens=10, models=[x, y])
    await wait_comparison_finished(db, answer["comparison_id"])
    assert await day_row(db, user.id) == {"tokens": 24, "reserved": 0, "requests": 2}
    usage = await db.fetch("SELECT model, total_tokens FROM usage WHERE user_id = $1 ORDER BY model", user.id)
    assert [tuple(u) for u in usage] == sorted([(x, 12), (y, 12)])
    # the day is spent: the next turn is kept, both its slots refused, nothing more counted
    refused = await accept_arena(client, user, content="hello", max_tokens=10, models=[x, y])
    assert await user_counts(db, user.id) == (6, 2, 2)
    for message_id in refused["assistant_message_ids"].values():
        assert (await row(db, message_id))["status"] == "refused"
    assert await day_row(db, user.id) == {"tokens": 24, "reserved": 0, "requests": 2}


async def test_concurrency_cap_of_one_runs_slot_a_and_refuses_slot_b(make_client, config_file, user, db):
    x, y = unique("conc_x"), unique("conc_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(
        x, y, limits="[limits]\nmax_concurrent_streams = 1\n")), DEMO_CHUNKS="2")
    answer = await accept_arena(client, user, content="hi", models=[x, y])
    await wait_comparison_finished(db, answer["comparison_id"])
    a, b = [await row(db, answer["assistant_message_ids"][s]) for s in "ab"]
    assert (a["status"], b["status"], b["error"]["reason"]) == ("complete", "refused", "concurrent_streams")
    # slot a's stream slot was handed back at its finish: a single chat fits
    chat = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "model": x})
    assert chat.status == 202


# -- 7. idempotency and the draw -------------------------------------------------------------------------

async def test_duplicate_client_message_id_returns_the_same_comparison_and_runs_nothing_new(
        make_client, config_file, upstream, upstream_b, user, db):
    client = await fake_pair_client(make_client, config_file, upstream, upstream_b)
    first = await accept_arena(client, user, content="once", models=["alpha", "beta"], client_message_id="arena-1")
    await wait_comparison_finished(db, first["comparison_id"])
    again = await accept_arena(client, user, content="once", models=["alpha", "beta"], client_message_id="arena-1")
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    for key in ("comparison_id", "message", "thread_id", "assistant_message_ids"):
        assert again[key] == first[key], key
    # streamed, the retry replays the stored comparison rather than starting one
    resp = await client.post("/api/arena", headers=user.headers, json={
        "content": "once", "models": ["alpha", "beta"], "client_message_id": "arena-1", "stream": True})
    stream = ArenaStream(await resp.read(), first["comparison_id"])
    assert (stream.text("a"), stream.text("b")) == ("Hello", "Hello")
    assert (len(upstream.requests), len(upstream_b.requests)) == (1, 1)
    assert await user_counts(db, user.id) == (3, 1, 1)
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 2


async def test_client_message_id_of_a_single_chat_turn_is_a_conflict(make_client, config_file, user, db):
    x, y = unique("dup_x"), unique("dup_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="2")
    chat = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "client_message_id": "one"})
    assert chat.status == 202
    resp = await client.post("/api/arena", headers=user.headers, json={
        "content": "hi", "models": [x, y], "client_message_id": "one"})
    assert resp.status == 409
    assert await db.fetchval("SELECT count(*) FROM comparisons WHERE user_id = $1", user.id) == 0


async def test_ten_concurrent_identical_arena_requests_make_one_comparison(make_client, config_file, user, db):
    x, y = unique("race_x"), unique("race_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="3",
                               DEMO_DELAY_MS="20")
    answers = await asyncio.gather(*(accept_arena(client, user, content="race", models=[x, y],
                                                  client_message_id="race-1") for _ in range(10)))
    assert len({(a["comparison_id"], a["message"]["id"], a["thread_id"],
                 tuple(a["assistant_message_ids"].values())) for a in answers}) == 1
    assert sorted(a["duplicate"] for a in answers) == [False] + [True] * 9
    await wait_comparison_finished(db, answers[0]["comparison_id"])
    assert await user_counts(db, user.id) == (3, 1, 1)
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 2


async def test_without_models_the_two_enabled_models_are_drawn(make_client, config_file, user, db):
    x, y = unique("pair_x"), unique("pair_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y, disable_demo=True)),
                               DEMO_CHUNKS="2")
    for i in range(3):
        answer = await accept_arena(client, user, content=f"pair {i}")
        saved = await comparison_row(db, answer["comparison_id"])
        assert {saved["model_a"], saved["model_b"]} == {x, y}
        assert saved["anonymous"] is True


async def test_without_models_two_distinct_enabled_models_are_drawn(make_client, config_file, user, db):
    names = (unique("draw_x"), unique("draw_y"), unique("draw_z"))
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(*names, disable_demo=True)),
                               DEMO_CHUNKS="2")
    drawn = []
    for i in range(6):
        answer = await accept_arena(client, user, content=f"draw {i}", anonymous=False)
        saved = await comparison_row(db, answer["comparison_id"])
        drawn.append((saved["model_a"], saved["model_b"]))
    for a, b in drawn:
        assert a != b and {a, b} <= set(names), drawn
    await wait_comparison_finished(db, answer["comparison_id"])
    got = await (await client.get(f"/api/comparisons/{answer['comparison_id']}", headers=user.headers)).json()
    assert (got["slots"]["a"]["model"], got["slots"]["b"]["model"]) == drawn[-1]


async def test_a_draw_from_fewer_than_two_enabled_models_is_a_503_that_writes_nothing(
        make_client, config_file, user, db):
    solo = unique("solo")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(solo, disable_demo=True)))
    resp = await client.post("/api/arena", headers=user.headers, json={"content": "anyone?", "stream": True})
    assert resp.status == 503
    assert resp.headers["Content-Type"].startswith("application/json")
    error = (await resp.json())["error"]
    assert error["type"] == "unavailable" and "two" in error["message"]
    assert await user_counts(db, user.id) == (0, 0, 0)


# -- 8. the non-streaming form and resume -------------------------------------------------------------

async def test_non_streaming_arena_answers_202_with_a_resumable_stream_url(make_client, config_file, user, db):
    x, y = unique("ns_x"), unique("ns_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="3")
    answer = await accept_arena(client, user, content="later please", models=[x, y], client_message_id="ns-1")
    assert set(answer) == {"status", "comparison_id", "message", "duplicate", "thread_id", "assistant_message_ids",
                           "stream_url"}
    cid = answer["comparison_id"]
    saved = await comparison_row(db, cid)
    assert (answer["status"], answer["duplicate"], answer["thread_id"]) == ("accepted", False,
                                                                             str(saved["thread_id"]))
    assert answer["assistant_message_ids"] == {"a": str(saved["message_a"]), "b": str(saved["message_b"])}
    message = answer["message"]
    assert (message["id"], message["role"], message["content"], message["client_message_id"]) == (
        str(saved["user_message_id"]), "user", "later please", "ns-1")
    assert answer["stream_url"].startswith(f"/api/comparisons/{cid}/stream?token=")

    await wait_comparison_finished(db, cid)
    resp = await client.get(answer["stream_url"])  # no Authorization: the token is the credential
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    full = ArenaStream(await resp.read(), cid)
    texts = {slot: demo_reply("later please", 3, model) for slot, model in zip(SLOTS, (x, y), strict=True)}
    for slot in SLOTS:
        meta = {"thread_id": answer["thread_id"], "user_message_id": message["id"],
                "message_id": answer["assistant_message_ids"][slot]}
        assert full.slots[slot] == expected_slot(slot, meta, None, None, texts[slot],
                                                 estimate_tokens("later please"), 3, None)
    assert len(full.ids) == 12

    # resume after an id in the middle: exactly the events neither slot had reached, both slots
    for k in (0, 4, 7):
        last = full.ids[k]
        _, seen_a, seen_b = last.split(":")
        resumed = await client.get(answer["stream_url"], headers={"Last-Event-ID": last})
        assert resumed.status == 200
        rest = ArenaStream(await resumed.read(), cid, start=(int(seen_a), int(seen_b)))
        for slot, seen in (("a", int(seen_a)), ("b", int(seen_b))):
            assert rest.slots[slot] == full.slots[slot][seen + 1:], (k, slot)
        assert len(rest.ids) == 12 - (int(seen_a) + 1) - (int(seen_b) + 1)
    # the query-parameter form works too, and the last id leaves nothing: 204 (EventSource stops)
    done = await client.get(answer["stream_url"] + f"&lastEventId={cid}:5:5")
    assert done.status == 204 and await done.read() == b""
    # a token is bound to its comparison and user
    wrong = await client.get(f"/api/comparisons/{uuid.uuid4()}/stream?" + answer["stream_url"].partition("?")[2])
    assert wrong.status == 401


async def test_comparison_stream_follows_a_live_comparison(make_client, config_file, upstream, upstream_b, user, db):
    release = asyncio.Event()
    upstream.queue(Reply(openai_stream(["la", "te"]), on_request=lambda _: release.wait()))
    upstream_b.queue(Reply(openai_stream(["now"])))
    client = await fake_pair_client(make_client, config_file, upstream, upstream_b)
    answer = await accept_arena(client, user, content="live", models=["alpha", "beta"], anonymous=False)
    cid = answer["comparison_id"]
    resp = await client.get(f"/api/comparisons/{cid}/stream", headers=user.headers)
    assert resp.status == 200
    release.set()
    stream = ArenaStream(await resp.read(), cid)
    assert (stream.text("a"), stream.text("b")) == ("late", "now")
    assert stream.order[-1][1] == "done"
    assert (await client.get(f"/api/comparisons/{cid}/stream")).status == 401


async def test_client_message_id_of_an_arena_turn_is_a_conflict_for_single_chat(make_client, config_file, user, db):
    x, y = unique("dup_x"), unique("dup_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="2")
    answer = await accept_arena(client, user, content="hi", models=[x, y], client_message_id="two")
    await wait_comparison_finished(db, answer["comparison_id"])
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "client_message_id": "two"})
    assert resp.status == 409, await resp.text()
    assert await user_counts(db, user.id) == (3, 1, 1)
