"""OpenAI's `x-ratelimit-*` headers on successful answers of the OpenAI-style routes,
read with the official SDK's `with_raw_response` after N requests under known limits, the policy's
clock pinned so the resets are exact."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import openai
import pytest

from gateway.api.openai.ratelimits import duration
from gateway.providers.base import estimate_tokens
from gateway.state import POLICY, USAGE
from tests.support.common import MakeClient, User, wait_for
from tests.support.statements import log_statements, on_the_path

LIMITS = "[limits]\nrequests_per_minute = 6\ndaily_tokens = 1000\n"
AT = datetime.now(UTC).replace(hour=10, minute=0, second=15, microsecond=0)  # 45 s left of the minute
HI = estimate_tokens("hi")


async def limited(make_client: MakeClient, config_file: Any, limits: str = LIMITS, **env: str) -> Any:
    client = await make_client(GATEWAY_CONFIG=config_file(limits), DEMO_CHUNKS="12", **env)
    client.app[POLICY].clock = lambda: AT
    return client


async def settle(client: Any, db: Any, user_id: uuid.UUID) -> None:
    """Every earlier request's usage written, so the token numbers are exact."""
    await client.app[USAGE].flush()

    async def nothing_reserved() -> bool:
        return await db.fetchval("SELECT coalesce(sum(reserved), 0) FROM daily_usage WHERE user_id = $1",
                                 user_id) == 0

    await wait_for(nothing_reserved)


def ratelimit(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}


def expected(remaining_requests: int, remaining_tokens: int, limit_requests: int = 6) -> dict[str, str]:
    return {"x-ratelimit-limit-requests": str(limit_requests),
            "x-ratelimit-remaining-requests": str(remaining_requests),
            "x-ratelimit-reset-requests": "45s",
            "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": str(remaining_tokens),
            "x-ratelimit-reset-tokens": "13h59m45s"}


def test_resets_are_written_as_openai_writes_them():
    assert [duration(s) for s in (0, 0.2, 45, 59.5, 60, 360, 3600 * 5 + 192)] == [
        "0s", "1s", "45s", "1m0s", "1m0s", "6m0s", "5h3m12s"]


async def test_every_openai_route_answers_with_what_is_left_after_each_request(
        openai_sdk, make_client: MakeClient, config_file: Any, user: User, db: Any):
    client = await limited(make_client, config_file)
    api = openai_sdk(client, user.key)
    hi = [{"role": "user", "content": "hi"}]
    used = 0  # tokens settled so far: each reply below is max 5 demo tokens on a "hi" prompt

    raw = await api.chat.completions.with_raw_response.create(model="demo", messages=hi, max_tokens=5)
    assert raw.parse().choices[0].finish_reason == "length"
    # this request's own reservation (prompt estimate + max_tokens) is already taken
    assert ratelimit(raw.headers) == expected(5, 1000 - (HI + 5))
    used += HI + 5
    await settle(client, db, user.id)

    raw = await api.chat.completions.with_raw_response.create(model="demo", messages=hi, max_tokens=5, stream=True)
    assert ratelimit(raw.headers) == expected(4, 1000 - used - (HI + 5))
    async for _ in raw.parse():
        pass
    used += HI + 5
    await settle(client, db, user.id)

    raw = await api.responses.with_raw_response.create(model="demo", input="hi", max_output_tokens=5, store=False)
    assert ratelimit(raw.headers) == expected(3, 1000 - used - (HI + 5))
    used += HI + 5
    await settle(client, db, user.id)

    raw = await api.responses.with_raw_response.create(model="demo", input="hi", max_output_tokens=5)
    assert raw.parse().output_text
    assert ratelimit(raw.headers) == expected(2, 1000 - used - (HI + 5))
    used += HI + 5
    await settle(client, db, user.id)

    raw = await api.responses.with_raw_response.create(model="demo", input="hi", max_output_tokens=5, stream=True)
    assert ratelimit(raw.headers) == expected(1, 1000 - used - (HI + 5))
    async for _ in raw.parse():
        pass
    used += HI + 5
    await settle(client, db, user.id)

    raw = await api.embeddings.with_raw_response.create(model="demo", input="hi", encoding_format="float")
    assert ratelimit(raw.headers) == expected(0, 1000 - used - (HI + 1))  # an embedding reserves its input + 1

    with pytest.raises(openai.RateLimitError) as info:  # the seventh request of the minute
        await api.embeddings.create(model="demo", input="hi")
    # a refusal says when instead (the gateway's own refusal headers)
    assert ratelimit(info.value.response.headers) == {"x-ratelimit-reset": f"{AT.date()}T10:01:00+00:00"}
    assert info.value.response.headers["Retry-After"] == "46"


async def test_the_tightest_limit_is_the_one_reported(openai_sdk, make_client: MakeClient, config_file: Any,
                                                      user: User, db: Any):
    # the key's own limits are tighter than the user's: they are what the client must pace by
    await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id,
                     {"requests_per_minute": 3, "daily_tokens": 500})
    client = await limited(make_client, config_file)
    api = openai_sdk(client, user.key)
    raw = await api.chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert ratelimit(raw.headers) == {**expected(2, 500 - (HI + 5), limit_requests=3),
                                      "x-ratelimit-limit-tokens": "500"}


async def test_only_configured_limits_appear(openai_sdk, make_client: MakeClient, config_file: Any, user: User):
    client = await limited(make_client, config_file, "[limits]\nrequests_per_minute = 6\n")
    raw = await openai_sdk(client, user.key).embeddings.with_raw_response.create(model="demo", input="hi")
    assert ratelimit(raw.headers) == {"x-ratelimit-limit-requests": "6", "x-ratelimit-remaining-requests": "5",
                                      "x-ratelimit-reset-requests": "45s"}

    client = await make_client()  # no limits: no headers (and no read)
    raw = await openai_sdk(client, user.key).chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "hi"}])
    assert ratelimit(raw.headers) == {}


@pytest.mark.parametrize("key_limits", [None, {"requests_per_minute": 500, "daily_tokens": 50000}])
async def test_a_busy_caller_gets_them_from_its_quota_slice_without_a_read(
        make_client: MakeClient, config_file: Any, user: User, db: Any, key_limits: dict[str, int] | None):
    """Once a busy caller is admitted from a quota slice, its headers come from what the
    slice's lease statement saw, less what the slice has not handed out: no statement is sent for
    them, and (each reply using exactly its reservation: "hello" is 2 tokens, max_tokens 10, 10
    demo tokens) the numbers are the exact ones."""
    if key_limits is not None:  # tighter than the user's: the key's windows and day row are reported
        await db.execute("UPDATE api_keys SET limits = $2 WHERE user_id = $1", user.id, key_limits)
    rpm, daily = (1000, 100000) if key_limits is None else (500, 50000)
    # the pool open at its full size: every connection's statements are logged
    client = await limited(make_client, config_file, "[limits]\nrequests_per_minute = 1000\ndaily_tokens = 100000\n",
                           DB_POOL_MIN="4", DB_POOL_MAX="4")
    worst = estimate_tokens("hello") + 10
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "stream": True}
    headers = {"Authorization": f"Bearer {user.key}"}
    quota = client.app[POLICY].quota

    async def completion() -> dict[str, str]:
        resp = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert resp.status == 200
        got = ratelimit(resp.headers)
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        return got

    async def quiet() -> bool:
        return not quota._leasing and all(s.renewing is None for s in quota._slices.values())

    sent = 0
    while not any(u == user.id for u, _ in quota._slices):
        await completion()
        sent += 1
        assert sent < 10, "no slice leased"
        # a slice is leased in the background: the next request waits for it, so none is admitted
        # exactly while the lease statement runs (the slice's counts would not include it)
        await wait_for(quiet)
    await client.app[USAGE].flush()
    await wait_for(quiet)
    sent_statements, stop = log_statements(client)
    try:
        resp = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert resp.status == 200
        before_body = on_the_path(sent_statements)
        got = ratelimit(resp.headers)
        await resp.read()
    finally:
        stop()
    sent += 1
    assert before_body == []  # no headroom read, no admission call
    assert got == {"x-ratelimit-limit-requests": str(rpm), "x-ratelimit-remaining-requests": str(rpm - sent),
                   "x-ratelimit-reset-requests": "45s", "x-ratelimit-limit-tokens": str(daily),
                   "x-ratelimit-remaining-tokens": str(daily - sent * worst),
                   "x-ratelimit-reset-tokens": "13h59m45s"}
    # and they agree with the database's own count once this reply is settled
    await client.app[USAGE].flush()
    assert await db.fetchval("SELECT tokens FROM daily_usage WHERE user_id = $1 AND day = $2",
                             user.id, AT.date()) == sent * worst


async def test_the_request_whose_admission_leases_a_slice_reports_only_what_the_caller_took(
        make_client: MakeClient, config_file: Any, user: User):
    """A busy caller's exact admission leases a slice of its quota in the background: that request's
    headers count the requests and tokens the caller took (each reply uses exactly its reservation),
    not the slots and tokens the new slice holds unused, whether the lease lands before or after."""
    client = await limited(make_client, config_file, "[limits]\nrequests_per_minute = 1000\ndaily_tokens = 100000\n")
    quota = client.app[POLICY].quota
    worst = estimate_tokens("hello") + 10
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "stream": True}
    for sent in range(1, 10):
        resp = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {user.key}"})
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        assert ratelimit(resp.headers) == {
            "x-ratelimit-limit-requests": "1000", "x-ratelimit-remaining-requests": str(1000 - sent),
            "x-ratelimit-reset-requests": "45s", "x-ratelimit-limit-tokens": "100000",
            "x-ratelimit-remaining-tokens": str(100000 - sent * worst), "x-ratelimit-reset-tokens": "13h59m45s"}
        if any(u == user.id for u, _ in quota._slices):  # this request's admission leased it
            assert quota.stats.from_slice == 0
            return
    raise AssertionError("no slice leased")
