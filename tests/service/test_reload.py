"""Reloading the configuration file while serving: a reply in flight keeps what it started with,
new turns get the new file, and a file that does not validate changes nothing."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import pytest

from gateway.config import Settings, located, reparse
from gateway.errors import ConfigError
from tests.support.chat import RETRY, expected_stream, first_metadata, ok_attempt, row, wait_finished
from tests.support.common import MakeClient, User
from tests.support.fakes import FakeUpstream, Reply, openai_stream, parse_sse


def first_file(first_url: str) -> str:
    return f"""[providers.first]
kind = "openai"
base_url = "{first_url}"

[models.alpha]
provider = "first"
upstream = "up-alpha"

[router]
default = "alpha"
"""


def second_file(first_url: str, second_url: str) -> str:
    return f"""[providers.first]
kind = "openai"
base_url = "{first_url}"

[providers.second]
kind = "openai"
base_url = "{second_url}"

[models.alpha]
provider = "second"
upstream = "up-alpha-2"

[models.beta]
provider = "second"
upstream = "up-beta"

[router]
default = "alpha"
"""


@pytest.fixture
async def upstream_two(aiohttp_server) -> FakeUpstream:
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app)
    return fake


@pytest.fixture
async def admin(make_user) -> User:
    return await make_user(("chat", "arena", "admin"))


async def test_a_reply_streaming_across_a_reload_finishes_byte_exact_while_a_new_turn_uses_the_new_file(
        make_client: MakeClient, upstream: FakeUpstream, upstream_two: FakeUpstream, tmp_path: Path, user: User,
        admin: User, db: asyncpg.Pool) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(first_file(upstream.base_url))
    release = asyncio.Event()
    # the role chunk and "Hel" go out, then the upstream waits until the reload is done
    upstream.queue(Reply(openai_stream(["Hel", "lo"], prompt_tokens=4), hold_at=2, release=release))
    upstream_two.queue(Reply(openai_stream(["New"], prompt_tokens=4)))
    client = await make_client(GATEWAY_CONFIG=str(config))

    resp = await client.post("/api/chat", json={"stream": True, "content": "before"}, headers=user.headers)
    assert resp.status == 200
    async with asyncio.timeout(10):
        head = [await resp.content.readuntil(b"\n\n") for _ in range(2)]  # retry + metadata, then "Hel"
    assert head[0].startswith(RETRY) and parse_sse(head[1])[0].data == '{"delta":"Hel"}'

    config.write_text(second_file(upstream.base_url, upstream_two.base_url))
    reloaded = await client.post("/api/admin/reload", headers=admin.headers)
    assert reloaded.status == 200
    assert await reloaded.json() == {
        "reloaded": True, "models": {"added": ["beta"], "removed": [], "changed": ["alpha"]},
        "providers": {"added": ["second"], "removed": [], "changed": []}, "router_changed": False,
        "default_model": None, "restart_required": []}

    after = await client.post("/api/chat", json={"stream": True, "content": "after"}, headers=user.headers)
    new_body = await after.read()
    new_meta = first_metadata(new_body)
    assert (new_meta["model"], new_meta["provider"]) == ("alpha", "second")
    assert [r["model"] for r in upstream_two.requests] == ["up-alpha-2"]

    release.set()
    body = head[0] + head[1] + await resp.read()
    meta = first_metadata(body)
    saved = await wait_finished(db, meta["message_id"])
    assert body == expected_stream(meta, "alpha", "first", ["Hel", "lo"], 4, 2, ok_attempt(saved, "alpha", "first"))
    assert [r["model"] for r in upstream.requests] == ["up-alpha"]
    assert (saved["provider"], saved["content"]) == ("first", "Hello")
    assert (await row(db, new_meta["message_id"]))["provider"] == "second"
    # the models table follows the file: beta is there, enabled
    assert await db.fetchval("SELECT enabled FROM models WHERE name = 'beta'") is True


BAD_PROVIDER = """[providers.first]
kind = "openai"
base_url = "{url}"

[models.alpha]
upstream = "up-alpha"
provider = "nowhere"

[router]
default = "alpha"
"""


async def test_a_file_that_does_not_validate_keeps_the_running_configuration_and_names_file_line_and_key(
        make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path, user: User, admin: User,
        caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(first_file(upstream.base_url))
    client = await make_client(GATEWAY_CONFIG=str(config))
    config.write_text(BAD_PROVIDER.format(url=upstream.base_url))
    caplog.set_level(logging.ERROR, logger="gateway.service.reload")
    refused = await client.post("/api/admin/reload", headers=admin.headers)
    message = (f"GATEWAY_CONFIG: {config} line 7: [models.alpha] provider 'nowhere' is not declared under "
               "[providers]")
    assert refused.status == 422
    error = (await refused.json())["error"]
    assert (error["type"], error["message"], error["request_id"]) == ("config_error", message,
                                                                       refused.headers["X-Request-ID"])
    assert [r.getMessage() for r in caplog.records] == [
        f"configuration not reloaded, the running one is kept: {message}"]
    # still the old file's model and provider
    resp = await client.post("/api/chat", json={"stream": True, "content": "still"}, headers=user.headers)
    meta = first_metadata(await resp.read())
    assert (meta["model"], meta["provider"]) == ("alpha", "first")
    assert [r["model"] for r in upstream.requests] == ["up-alpha"]


def test_a_toml_syntax_error_and_an_unknown_key_are_located_on_one_line(tmp_path: Path) -> None:
    config = tmp_path / "g.toml"
    config.write_text('[models.alpha]\nprovider = "demo"\n\n[models.beta]\nprovider = "demo"\nfallback = ["alpha"]\n')
    env = {"GATEWAY_CONFIG": str(config)}
    running = Settings.from_env({})
    with pytest.raises(ConfigError) as unknown:
        reparse(Settings(env=env, models=running.models, providers=running.providers))
    assert unknown.value.message == (f"GATEWAY_CONFIG: {config} line 6: [models.beta] fallback: unknown key "
                                     "(did you mean 'fallbacks'?)")
    config.write_text('[models.alpha]\nprovider = "demo"\nenabled = \n')
    with pytest.raises(ConfigError) as broken:
        reparse(Settings(env=env))
    assert broken.value.message.startswith(f"GATEWAY_CONFIG: {config} line 3: {config} is not valid TOML: ")
    assert "\n" not in broken.value.message
    assert located("/nowhere.toml", "DEFAULT_MODEL 'x' is not a declared model") == (
        "GATEWAY_CONFIG: /nowhere.toml: DEFAULT_MODEL 'x' is not a declared model")


async def test_reload_and_the_admin_api_refuse_a_key_without_the_admin_scope(client, user: User) -> None:
    for method, path in (("POST", "/api/admin/reload"), ("GET", "/api/admin/models"), ("GET", "/api/admin/audit")):
        resp = await client.request(method, path, headers=user.headers)
        assert resp.status == 403, path
        error = (await resp.json())["error"]
        assert (error["type"], error["message"]) == ("forbidden", "this credential lacks the 'admin' scope")


async def test_a_reload_may_not_remove_the_model_the_running_limits_downgrade_to(
        make_client: MakeClient, tmp_path: Path, admin: User) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[models.alpha]\nprovider = "demo"\n\n[models.cheap]\nprovider = "demo"\n\n'
                      '[limits]\ndaily_tokens = 1000\ndowngrade_model = "cheap"\n')
    client = await make_client(GATEWAY_CONFIG=str(config))
    config.write_text('[models.alpha]\nprovider = "demo"\n')
    refused = await client.post("/api/admin/reload", headers=admin.headers)
    assert refused.status == 422
    assert (await refused.json())["error"]["message"] == (
        f"GATEWAY_CONFIG: {config}: [limits] downgrade_model 'cheap' is running and this file removes it: "
        "restart to change [limits]")
    models = await client.get("/api/admin/models", headers=admin.headers)
    assert [m["name"] for m in (await models.json())["models"]] == ["demo", "alpha", "cheap"]
