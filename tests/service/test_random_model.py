"""`model: "random"` for single chat: one model drawn by the configured weights,
skipping open circuits, like the arena's draw; the saved metadata names it and says how it was chosen."""

from __future__ import annotations

import random
import uuid
from collections import Counter

import orjson

from gateway.state import MODELS
from tests.support.fakes import parse_sse
from tests.support.providers import TWO_WEIGHTED


def test_random_draws_follow_the_weights(registry):
    models = registry(TWO_WEIGHTED)
    rng = random.Random(1234)
    counts = Counter(models.draw_one(rng).name for _ in range(4000))
    # demo (weight 1), heavy (3), light (1): disabled and weight-0 models are never drawn
    assert set(counts) == {"demo", "heavy", "light"}
    assert 2200 < counts["heavy"] < 2600 and 650 < counts["light"] < 950 and 650 < counts["demo"] < 950


def test_random_draws_skip_open_circuits(registry):
    models = registry(TWO_WEIGHTED, CIRCUIT_FAILURES="1")
    models.circuits.failure("heavy")
    models.circuits.failure("demo")
    rng = random.Random(5)
    assert {models.draw_one(rng).name for _ in range(200)} == {"light"}


async def chat(client, user, model: str = "random") -> tuple[int, list, dict]:
    resp = await client.post("/api/chat", json={"content": "Pick one", "model": model, "stream": True},
                             headers=user.headers)
    if resp.status != 200:
        return resp.status, [], await resp.json()
    events = parse_sse(await resp.read())
    return resp.status, events, orjson.loads(events[0].data)


async def test_chat_with_model_random_names_the_drawn_model_and_says_it_was_random(
        make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED), CIRCUIT_FAILURES="1")
    models = client.app[MODELS]
    models.circuits.failure("heavy")
    models.circuits.failure("demo")  # only "light" can be drawn
    status, events, meta = await chat(client, user)
    assert status == 200
    assert (meta["model"], meta["provider"], meta["auto"], meta["fallback_from"], meta["selected"]) == (
        "light", "local", False, None, "random")
    assert [e.event for e in events][-3:] == ["usage", "done", "message"]
    # the replay from the row says the same
    replay = await client.get(f"/api/messages/{meta['message_id']}/stream", headers=user.headers)
    assert orjson.loads(parse_sse(await replay.read())[0].data) == meta
    row = await db.fetchrow("SELECT status, model, metadata FROM messages WHERE id = $1 AND user_id = $2",
                            uuid.UUID(meta["message_id"]), user.id)
    assert (row["status"], row["model"], row["metadata"]["selected"]) == ("complete", "light", "random")


async def test_chat_with_a_named_model_says_nothing_about_random(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED))
    status, _events, meta = await chat(client, user, "heavy")
    assert status == 200 and meta["model"] == "heavy" and "selected" not in meta
    row = await db.fetchrow("SELECT metadata FROM messages WHERE id = $1", uuid.UUID(meta["message_id"]))
    assert "selected" not in row["metadata"]


async def test_model_random_spreads_over_the_enabled_models(make_client, config_file, user):
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED))
    client.app[MODELS].rng.seed(99)
    drawn = Counter()
    for _ in range(24):
        status, _events, meta = await chat(client, user)
        assert status == 200
        drawn[meta["model"]] += 1
    assert set(drawn) <= {"demo", "heavy", "light"} and drawn["heavy"] > drawn["light"]
    assert sum(drawn.values()) == 24


async def test_model_random_with_every_circuit_open_is_503_and_saves_nothing(make_client, config_file, user, db):
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED), CIRCUIT_FAILURES="1")
    for name in ("demo", "heavy", "light"):
        client.app[MODELS].circuits.failure(name)
    status, _events, body = await chat(client, user)
    assert status == 503
    assert body["error"]["message"] == "no model is available to draw from; retry later"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 0


async def test_the_openai_route_takes_model_random_too(make_client, config_file, user):
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED), CIRCUIT_FAILURES="1")
    client.app[MODELS].circuits.failure("heavy")
    client.app[MODELS].circuits.failure("light")
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "random", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    assert (await resp.json())["model"] == "demo"


async def test_the_arena_does_not_take_random_as_one_of_its_two_models(make_client, config_file, user):
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED))
    resp = await client.post("/api/arena", json={"content": "x", "models": ["random", "heavy"]}, headers=user.headers)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "unknown model 'random'"


async def test_a_model_declared_as_random_is_that_model(make_client, config_file, user, db):
    toml = TWO_WEIGHTED + '\n[models.random]\nprovider = "local"\nupstream = "rnd"\n'
    client = await make_client(GATEWAY_CONFIG=config_file(toml))
    status, _events, meta = await chat(client, user)
    assert status == 200 and meta["model"] == "random"
    row = await db.fetchrow("SELECT metadata FROM messages WHERE id = $1", uuid.UUID(meta["message_id"]))
    assert "selected" not in row["metadata"]


async def test_a_disabled_model_named_by_a_client_is_unknown_and_nothing_is_saved(make_client, config_file, user, db):
    """`enabled = false` takes a model out of service: named on a chat door it is a 400 like any
    unknown model on the native route (404 model_not_found on the OpenAI one), and no row is written."""
    client = await make_client(GATEWAY_CONFIG=config_file(TWO_WEIGHTED))
    status, _events, body = await chat(client, user, "off")
    assert status == 400 and "off" in body["error"]["message"]
    resp = await client.post("/v1/chat/completions", headers=user.headers,
                             json={"model": "off", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"  # as OpenAI answers
    assert await db.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user.id) == 0
