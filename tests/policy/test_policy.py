"""The policy step: limits that hold under concurrency, abuse limits at the edge that persist
nothing, caps decided after the commit (a refused reply, the user's message kept), settlement
exactly once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta

import asyncpg
import orjson
import pytest

from gateway.config import LimitsConfig
from gateway.edge.auth import Principal
from gateway.errors import TooManyRequests
from gateway.generation.journal import record_from_json
from gateway.policy.admission import Admission, Policy
from gateway.providers.demo import demo_reply
from gateway.store import limits as store_limits
from gateway.store.limits import SQLSTATES, KeyCap, Limit, LimitReached
from gateway.store.messages import finish_many
from gateway.vocabulary import PolicyAction
from tests.support.common import clear_of_a_minute_s_end, wait_for
from tests.support.fakes import parse_sse

# each demo turn below: prompt "hello" (2 tokens, estimated) + max_tokens 10 = a worst case of 12,
# and the demo reply is exactly 10 chunks = 10 completion tokens: actual use = reservation
CAP_TOML = """
[limits]
daily_tokens = {cap}
"""


async def day_row(db, user_id: uuid.UUID) -> dict | None:
    row = await db.fetchrow("SELECT tokens, reserved, requests FROM daily_usage WHERE user_id = $1 AND day = $2",
                            user_id, datetime.now(UTC).date())
    return dict(row) if row else None


async def message_count(db, user_id: uuid.UUID) -> int:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user_id)


async def replies(db, user_id: uuid.UUID) -> list[tuple[str, str | None]]:
    """(status, refusal reason) of the user's assistant rows, sorted."""
    rows = await db.fetch("SELECT status, error ->> 'reason' AS reason FROM messages "
                          "WHERE user_id = $1 AND role = 'assistant'", user_id)
    return sorted((r["status"], r["reason"]) for r in rows)


async def all_finished(db, user_id: uuid.UUID) -> bool:
    return await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND status = 'streaming'",
                             user_id) == 0


async def test_fifty_concurrent_requests_never_exceed_a_cap_that_fits_ten(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(CAP_TOML.format(cap=120)), DEMO_CHUNKS="10")
    answers = await asyncio.gather(*(client.post("/api/chat", headers=user.headers,
                                                 json={"content": "hello", "max_tokens": 10}) for _ in range(50)))
    # persist first: every message is kept and answered 202; the cap is decided after the commit
    assert [a.status for a in answers] == [202] * 50
    await wait_for(lambda: all_finished(db, user.id))
    assert await day_row(db, user.id) == {"tokens": 120, "reserved": 0, "requests": 10}
    assert await db.fetchval("SELECT sum(total_tokens) FROM usage WHERE user_id = $1", user.id) == 120
    assert await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 10  # 10 generations
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1 AND role = 'user'", user.id) == 50
    assert await replies(db, user.id) == [("complete", None)] * 10 + [("refused", "daily_tokens")] * 40


async def test_a_cap_refusal_keeps_the_message_and_saves_a_refused_reply_with_its_reset(
        make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(CAP_TOML.format(cap=12)), DEMO_CHUNKS="10")
    first = await client.post("/api/chat", headers=user.headers, json={"content": "hello", "max_tokens": 10})
    assert first.status == 202
    await wait_for(lambda: all_finished(db, user.id))
    refused = await client.post("/api/chat", headers=user.headers,
                                json={"content": "hello", "max_tokens": 10, "client_message_id": "later"})
    assert refused.status == 202
    body = await refused.json()
    row = await db.fetchrow("SELECT status, error, metadata, content FROM messages WHERE id = $1::uuid",
                            body["assistant_message_id"])
    tomorrow = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(),
                                UTC)
    assert (row["status"], row["content"], row["error"]["type"]) == ("refused", "", "policy")
    assert row["metadata"]["reason"] == "daily_tokens"
    assert datetime.fromisoformat(row["metadata"]["reset_at"]) == tomorrow  # the cap resets at UTC midnight
    assert row["error"]["reset_at"] == row["metadata"]["reset_at"] and row["error"]["retryable"] is True
    assert await message_count(db, user.id) == 4  # the message is kept, with its refused reply
    # the same client_message_id, even once the limit would allow it (here: a larger cap), returns
    # the same rows: a retry never gets a second decision (regenerate asks for one)
    roomier = await make_client(GATEWAY_CONFIG=config_file(CAP_TOML.format(cap=100)), DEMO_CHUNKS="10")
    retry = await roomier.post("/api/chat", headers=user.headers,
                               json={"content": "hello", "max_tokens": 10, "client_message_id": "later"})
    again = await retry.json()
    assert retry.status == 202 and again["duplicate"] is True
    assert again["assistant_message_id"] == body["assistant_message_id"]
    assert await message_count(db, user.id) == 4


async def test_requests_per_minute_per_user(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file("[limits]\nrequests_per_minute = 2\n"))
    await clear_of_a_minute_s_end()
    codes = [(await client.post("/api/threads", headers=user.headers)).status for _ in range(1)]
    chats = [await client.post("/api/chat", headers=user.headers, json={"content": "hi"}) for _ in range(3)]
    assert codes == [201] and [c.status for c in chats] == [202, 202, 429]
    assert 1 <= int(chats[2].headers["Retry-After"]) <= 61
    assert "per minute" in (await chats[2].json())["error"]["message"]
    assert await message_count(db, user.id) == 4  # an abuse limit is at the edge: nothing of the third


async def test_a_reply_bigger_than_what_remains_is_clamped_to_fit(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(CAP_TOML.format(cap=8)), DEMO_CHUNKS="10")
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "hello", "max_tokens": 10, "stream": True})
    events = parse_sse(await resp.read())
    deltas = [orjson.loads(e.data)["delta"] for e in events if e.event == "message" and e.data != "[DONE]"]
    assert deltas == demo_reply("hello", 10)[:6]  # 8 left - 2 prompt = 6 tokens of reply
    row = await day_row(db, user.id)
    assert row == {"tokens": 8, "reserved": 0, "requests": 1}
    saved = await db.fetchval("SELECT metadata FROM messages WHERE user_id = $1 AND role = 'assistant'", user.id)
    assert saved["policy"]["action"] == "downgrade"


async def test_max_tokens_ceiling_clamps_the_request(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file("[limits]\nmax_tokens = 3\n"), DEMO_CHUNKS="10")
    resp = await client.post("/api/chat", headers=user.headers,
                             json={"content": "hello", "max_tokens": 50, "stream": True})
    events = parse_sse(await resp.read())
    assert sum(1 for e in events if e.event == "message" and e.data != "[DONE]") == 3
    done = orjson.loads(next(e.data for e in events if e.event == "done"))
    assert done["finish_reason"] == "length"


async def test_concurrent_streams_per_user(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file("[limits]\nmax_concurrent_streams = 1\n"),
                               DEMO_CHUNKS="20", DEMO_DELAY_MS="20")
    first = await client.post("/api/chat", headers=user.headers, json={"content": "slow"})
    assert first.status == 202
    second = await client.post("/api/chat", headers=user.headers, json={"content": "too many"})
    assert second.status == 202  # kept, and refused after the commit
    await wait_for(lambda: all_finished(db, user.id))
    assert await replies(db, user.id) == [("complete", None), ("refused", "concurrent_streams")]
    third = await client.post("/api/chat", headers=user.headers, json={"content": "now fine"})
    assert third.status == 202


async def test_models_allowed_per_key(client, make_user, db):
    user = await make_user()
    await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id, {"models": ["other"]})
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hi", "model": "demo"})
    assert resp.status == 202
    assert await message_count(db, user.id) == 2
    assert await replies(db, user.id) == [("refused", "model_not_allowed")]
    error = await db.fetchval("SELECT error FROM messages WHERE user_id = $1 AND role = 'assistant'", user.id)
    assert error == {"type": "policy", "message": "this key may not use model 'demo'", "retryable": False,
                     "reason": "model_not_allowed", "reset_at": None}


async def test_key_requests_per_minute(client, make_user, db):
    user = await make_user()
    await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id, {"requests_per_minute": 1})
    await clear_of_a_minute_s_end()
    assert (await client.post("/api/chat", headers=user.headers, json={"content": "a"})).status == 202
    assert (await client.post("/api/chat", headers=user.headers, json={"content": "b"})).status == 429


DOWNGRADE_TOML = """
[models.cheap]
provider = "demo"
upstream = "demo-cheap"
[limits]
daily_tokens = 100
downgrade_model = "cheap"
downgrade_at = 0.2
"""


async def test_downgrade_to_the_cheaper_model_when_the_budget_is_nearly_spent(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(DOWNGRADE_TOML), DEMO_CHUNKS="10")
    models = []
    for _ in range(3):
        resp = await client.post("/api/chat", headers=user.headers,
                                 json={"content": "hello", "model": "demo", "max_tokens": 10, "stream": True})
        models.append(orjson.loads(parse_sse(await resp.read())[0].data)["model"])
    assert models == ["demo", "demo", "cheap"]  # 24 of 100 used after two: past 20%


async def test_replayed_finish_changes_nothing(client, user, db):
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hello", "stream": True})
    meta = orjson.loads(parse_sse(await resp.read())[0].data)
    before = await day_row(db, user.id)
    row = await db.fetchrow("SELECT * FROM usage WHERE message_id = $1::uuid", meta["message_id"])
    line = orjson.dumps({"usage": {"message_id": str(row["message_id"]), "user_id": str(user.id),
                                   "api_key_id": str(row["api_key_id"]), "model": "demo", "provider": "demo",
                                   "prompt_tokens": 99, "completion_tokens": 99, "estimated": False,
                                   "cost_usd": 0.0, "day": datetime.now(UTC).date().isoformat(),
                                   "user_reserved": 5, "key_reserved": 0},
                         "status": "complete", "content": "something else", "ttft_ms": 1, "latency_ms": 1,
                         "error": None, "metadata": {}})
    for _ in range(2):
        assert await finish_many(db, [record_from_json(line)]) == (0, 0)
    assert await day_row(db, user.id) == before
    saved = await db.fetchrow("SELECT content, prompt_tokens FROM messages WHERE id = $1::uuid", meta["message_id"])
    assert saved["content"] != "something else" and saved["prompt_tokens"] != 99


async def test_openai_route_refusal_and_settlement(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(CAP_TOML.format(cap=12)), DEMO_CHUNKS="10")
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}
    ok = await client.post("/v1/chat/completions", headers=user.headers, json=body)
    assert ok.status == 200
    await wait_for(lambda: _settled(db, user.id, 12))
    refused = await client.post("/v1/chat/completions", headers=user.headers, json=body)
    assert refused.status == 429
    error = (await refused.json())["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "Retry-After" in refused.headers


async def _settled(db, user_id: uuid.UUID, tokens: int) -> bool:
    return await day_row(db, user_id) == {"tokens": tokens, "reserved": 0, "requests": 1}


@pytest.mark.parametrize("toml, message", [
    ("[limits]\ndaily_tokens = 0\n", "daily_tokens"),
    ("[limits]\ndowngrade_model = \"nope\"\n", "downgrade_model"),
])
def test_limits_config_errors_name_the_key(make_settings, config_file, toml, message):
    from gateway.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        make_settings(GATEWAY_CONFIG=config_file(toml))


async def test_me_shows_limits_today_and_what_remains(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(CAP_TOML.format(cap=100)), DEMO_CHUNKS="10")
    resp = await client.post("/api/chat", headers=user.headers, json={"content": "hello", "max_tokens": 10})
    assert resp.status == 202
    await wait_for(lambda: all_finished(db, user.id))
    me = await (await client.get("/api/me", headers=user.headers)).json()
    assert me["user"] == {"id": str(user.id), "email": None}
    assert me["key"]["scopes"] == ["arena", "chat"]
    assert me["limits"]["daily_tokens"] == 100
    assert (me["today"]["tokens"], me["today"]["reserved"], me["today"]["requests"]) == (12, 0, 1)
    assert me["remaining"] == {"daily_tokens": 88}


async def test_usage_report_by_day_and_by_model(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file("[models.cheap]\nprovider = \"demo\"\n"),
                               DEMO_CHUNKS="10")
    for model in ("demo", "demo", "cheap"):
        resp = await client.post("/api/chat", headers=user.headers,
                                 json={"content": "hello", "model": model, "max_tokens": 10})
        assert resp.status == 202
    await wait_for(lambda: all_finished(db, user.id))
    today = datetime.now(UTC).date().isoformat()
    by_model = await (await client.get("/api/usage?group_by=model", headers=user.headers)).json()
    assert [(r["model"], r["total_tokens"], r["requests"]) for r in by_model["rows"]] == [("cheap", 12, 1),
                                                                                          ("demo", 24, 2)]
    by_day = await (await client.get(f"/api/usage?from={today}&to={today}", headers=user.headers)).json()
    assert [(r["day"], r["total_tokens"], r["requests"]) for r in by_day["rows"]] == [(today, 36, 3)]
    assert by_day["totals"]["total_tokens"] == 36
    other = await client.get("/api/usage?from=2020-01-01&to=2020-01-02", headers=user.headers)
    assert (await other.json())["rows"] == []
    for bad in ("group_by=week", "from=yesterday", "from=2026-02-01&to=2026-01-01", "from=2020-01-01&to=2026-01-01"):
        assert (await client.get(f"/api/usage?{bad}", headers=user.headers)).status == 400


# -- which limit fired: one SQLSTATE per limit ----------------------------------------------------

# (limit, its SQLSTATE, gateway_admit's arguments after (user, key, day, window): a first call
# that fits, then the same call again, which the limit refuses)
LIMIT_CALLS = [
    (Limit.USER_REQUESTS_PER_MINUTE, "GW4R1", dict(user_rpm=1, key_rpm=None, want=5, user_cap=None, key_cap=None)),
    (Limit.KEY_REQUESTS_PER_MINUTE, "GW4R2", dict(user_rpm=None, key_rpm=1, want=5, user_cap=None, key_cap=None)),
    (Limit.USER_DAILY_TOKENS, "GW4D1", dict(user_rpm=None, key_rpm=None, want=5, user_cap=5, key_cap=None)),
    (Limit.KEY_DAILY_TOKENS, "GW4D2", dict(user_rpm=None, key_rpm=None, want=5, user_cap=None, key_cap=5)),
]


async def admission_rows(db, user_id: uuid.UUID, key_id: uuid.UUID) -> dict[str, list[tuple]]:
    return {
        "windows": [tuple(r) for r in await db.fetch(
            "SELECT subject, count FROM rate_windows WHERE subject = ANY($1::text[]) ORDER BY subject",
            [f"u:{user_id}", f"k:{key_id}"])],
        "user_days": [tuple(r) for r in await db.fetch(
            "SELECT tokens, reserved FROM daily_usage WHERE user_id = $1", user_id)],
        "key_days": [tuple(r) for r in await db.fetch(
            "SELECT tokens, reserved FROM key_daily_usage WHERE api_key_id = $1", key_id)],
    }


@pytest.mark.parametrize("limit, sqlstate, args", LIMIT_CALLS, ids=[c[0].value for c in LIMIT_CALLS])
async def test_gateway_admit_refuses_with_the_sqlstate_of_the_limit_that_fired_and_changes_nothing(
        db, limit: Limit, sqlstate: str, args: dict):
    user_id, key_id = uuid.uuid4(), uuid.uuid4()
    day, window = date(2030, 1, 2), datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
    call = ("SELECT gateway_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, 1)", user_id, key_id, day, window,
            args["user_rpm"], args["key_rpm"], args["want"], args["user_cap"], args["key_cap"])
    assert await db.fetchval(*call) == 5
    before = await admission_rows(db, user_id, key_id)
    with pytest.raises(asyncpg.PostgresError) as raised:
        await db.fetchval(*call)
    assert (raised.value.sqlstate, str(raised.value)) == (sqlstate, limit.value)
    assert SQLSTATES[sqlstate] is limit
    assert await admission_rows(db, user_id, key_id) == before  # the refusal rolled everything back
    # the store (through gateway_admit_chain, with a chain of one key) names the limit from the code
    keys = [KeyCap(key_id=key_id, rpm=args["key_rpm"], daily=args["key_cap"])]
    with pytest.raises(LimitReached) as named:
        await store_limits.admit(db, user_id=user_id, keys=keys, day=day, window=window, share=1,
                                 user_rpm=args["user_rpm"], want=args["want"], user_cap=args["user_cap"])
    assert named.value.limit is limit


def test_every_limit_has_exactly_one_sqlstate():
    assert sorted(SQLSTATES.values()) == sorted(Limit)
    assert all(len(code) == 5 and code.isalnum() and code.isupper() for code in SQLSTATES)


# each case: the gateway's [limits], the key's own limits, and the message the third request gets:
# a 429 for a per-minute limit (at the edge), the refused reply's error for a daily cap (after the
# commit). Every turn below reserves 2 + 10 = 12 tokens; two fit, the third does not.
REFUSALS = [
    ("[limits]\nrequests_per_minute = 2\n", {}, "rate limit: user requests per minute"),
    ("", {"requests_per_minute": 2}, "rate limit: key requests per minute"),
    ("[limits]\ndaily_tokens = 24\n", {}, "daily token cap reached (user daily tokens)"),
    ("", {"daily_tokens": 24}, "daily token cap reached (key daily tokens)"),
]


@pytest.mark.parametrize("toml, key_limits, message", REFUSALS, ids=["user_rpm", "key_rpm", "user_daily", "key_daily"])
async def test_each_limit_reports_its_own_reason_and_reset(make_client, config_file, make_user, db,
                                                           toml: str, key_limits: dict, message: str):
    client = await make_client(GATEWAY_CONFIG=config_file(toml), DEMO_CHUNKS="10")
    user = await make_user()
    if key_limits:
        await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id, key_limits)
    body = {"content": "hello", "max_tokens": 10}
    await clear_of_a_minute_s_end()
    answers = [await client.post("/api/chat", headers=user.headers, json=body) for _ in range(3)]
    if "per minute" in message:
        assert [a.status for a in answers] == [202, 202, 429]
        error = (await answers[2].json())["error"]
        assert (error["type"], error["message"]) == ("rate_limited", message)
        reset = datetime.fromisoformat(error["reset_at"])
        assert reset.second == 0 and reset.microsecond == 0
        assert timedelta(0) < reset - datetime.now(UTC) <= timedelta(minutes=1)
    else:
        assert [a.status for a in answers] == [202, 202, 202]
        error = await db.fetchval("SELECT error FROM messages WHERE id = $1::uuid",
                                  (await answers[2].json())["assistant_message_id"])
        assert (error["type"], error["message"], error["reason"]) == ("policy", message, "daily_tokens")
        reset = datetime.fromisoformat(error["reset_at"])
        assert reset == datetime.combine(datetime.now(UTC).date() + timedelta(days=1),
                                         datetime.min.time(), UTC)
    await wait_for(lambda: all_finished(db, user.id))


# -- the Admission record --------------------------------------------------------------------------

def test_admission_is_keyword_only_and_done_calls_its_callback_once():
    calls: list[str] = []
    with pytest.raises(TypeError):
        Admission(PolicyAction.APPROVE, "demo", None, date(2030, 1, 1))  # type: ignore[misc]
    admission = Admission(action=PolicyAction.APPROVE, model="demo", max_tokens=None, day=date(2030, 1, 1),
                          on_done=lambda: calls.append("done"))
    admission.done()
    admission.done()
    assert calls == ["done"]


async def test_policy_counts_a_stream_until_done_and_a_prompt_that_does_not_fit_takes_no_slot(db, make_user):
    user = await make_user()
    principal = Principal(user_id=user.id, email=None, api_key_id=None, scopes=frozenset({"chat"}))
    policy = Policy(LimitsConfig(daily_tokens=10, max_concurrent_streams=2), db)
    streams = "SELECT streams FROM stream_counts WHERE subject = $1"
    admission = await policy.admit(principal, "demo", prompt_tokens=2, max_tokens=4)
    assert (admission.action, admission.user_reserved, admission.max_tokens) == (PolicyAction.APPROVE, 6, 4)
    assert admission.lease_id is not None
    assert (policy.active_streams(user.id), await db.fetchval(streams, f"u:{user.id}")) == (1, 1)
    admission.done()  # this process's count; the lease (all instances' count) waits for the release
    assert (policy.active_streams(user.id), await db.fetchval(streams, f"u:{user.id}")) == (0, 1)
    # 4 tokens left today, and the prompt alone needs 5: refused, reservation and lease handed back
    with pytest.raises(TooManyRequests, match="too little left"):
        await policy.admit(principal, "demo", prompt_tokens=5, max_tokens=4)
    assert (policy.active_streams(user.id), await db.fetchval(streams, f"u:{user.id}")) == (0, 1)
    assert await day_row(db, user.id) == {"tokens": 0, "reserved": 6, "requests": 0}
    await policy.release(admission, user.id, None)
    assert await day_row(db, user.id) == {"tokens": 0, "reserved": 0, "requests": 0}
    assert (admission.user_reserved, policy.active_streams(user.id)) == (0, 0)
    assert (admission.lease_id, await db.fetchval(streams, f"u:{user.id}")) == (None, 0)
    assert await db.fetchval("SELECT count(*) FROM stream_leases") == 0


async def test_the_rate_limit_may_be_taken_at_the_edge_and_the_rest_after(db, make_user):
    """admit_rate takes the per-minute slots alone; admit(rate=False) then takes everything else."""
    user = await make_user()
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    principal = Principal(user_id=user.id, email=None, api_key_id=key_id, scopes=frozenset({"chat"}),
                          limits={"requests_per_minute": 5})
    now = datetime(2030, 6, 1, 12, 0, 30, tzinfo=UTC)
    policy = Policy(LimitsConfig(requests_per_minute=2, daily_tokens=100), db, clock=lambda: now)
    windows = "SELECT count FROM rate_windows WHERE subject = $1 AND window_start = '2030-06-01T12:00:00Z'"
    await policy.admit_rate(principal)
    assert (await db.fetchval(windows, f"u:{user.id}"), await db.fetchval(windows, f"k:{key_id}")) == (1, 1)
    assert await db.fetchval("SELECT count(*) FROM daily_usage WHERE user_id = $1", user.id) == 0
    admission = await policy.admit(principal, "demo", prompt_tokens=2, max_tokens=10, rate=False)
    assert admission.user_reserved == 12
    assert (await db.fetchval(windows, f"u:{user.id}"), await db.fetchval(windows, f"k:{key_id}")) == (1, 1)
    await policy.admit_rate(principal)
    with pytest.raises(TooManyRequests, match="rate limit: user requests per minute"):
        await policy.admit_rate(principal)
    assert await db.fetchval(windows, f"k:{key_id}") == 2  # the refused call took nothing
    await policy.release(admission, user.id, key_id)


def test_limits_cache_computes_a_keys_limits_once_and_afresh_when_its_limits_are_read_again():
    from gateway.policy.admission import LimitsCache, limits_for

    config = LimitsConfig(requests_per_minute=60, daily_tokens=1000)
    key_id, user_id = uuid.uuid4(), uuid.uuid4()
    own = {"requests_per_minute": 5, "daily_tokens": 50}
    principal = Principal(user_id=user_id, email=None, api_key_id=key_id, scopes=frozenset({"chat"}), limits=own)
    cache = LimitsCache()
    first = cache.get(config, principal)
    assert first == limits_for(config, principal) and first.key_rpm == 5 and first.key_daily == 50
    # the next request of the same cached key: a new Principal around the same record's objects
    again = Principal(user_id=user_id, email=None, api_key_id=key_id, scopes=frozenset({"chat"}), limits=own)
    assert cache.get(config, again) is first
    # the key read again after its limits changed: a new dict, so new limits
    changed = Principal(user_id=user_id, email=None, api_key_id=key_id, scopes=frozenset({"chat"}),
                        limits={"requests_per_minute": 7})
    assert cache.get(config, changed).key_rpm == 7 and cache.get(config, changed).key_daily is None
    # another configuration (a reload) is another entry
    assert cache.get(LimitsConfig(daily_tokens=5), principal).user_daily == 5
    assert cache.get(config, principal) is first
