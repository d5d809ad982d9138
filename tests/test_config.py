"""Settings.from_env: defaults, the TOML file, env-only providers, and errors that name the culprit."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.config import DEMO_MODEL, LimitsConfig, ModelConfig, ProviderConfig, Secret, Settings
from gateway.errors import ConfigError

ConfigFile = Callable[[str], str]

FULL_TOML = """
[server]
host = "0.0.0.0"
port = 9090

[providers.groq]
kind = "openai"
base_url = "https://api.groq.com/openai/v1/"
api_key = "gsk-inline"

[providers.local]
kind = "demo"
chunks = 3
delay_ms = 0

[models.fast]
provider = "groq"
upstream = "llama-3.1-8b-instant"
fallbacks = ["strong", "demo"]
timeout_s = 45
first_token_timeout_s = 10
idle_timeout_s = 20
weight = 2
input_price_per_mtok = 0.05
output_price_per_mtok = 0.08

[models.strong]
provider = "local"

[router]
default = "fast"
code = "strong"

[limits]
requests_per_minute = 60
daily_tokens = 200000
max_concurrent_streams = 4
"""


def config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return info.value.message


def test_empty_environment_gives_demo_model_on_port_8080():
    s = Settings.from_env({})
    assert (s.host, s.port, s.default_model, s.jwt_audience) == ("127.0.0.1", 8080, DEMO_MODEL, "authenticated")
    assert s.database_url is None and not s.jwt_enabled and s.jwt_algorithms == ()
    assert s.bootstrap_admin_key is True and s.cors_origins == ()
    # nothing configured: two built-in demo models, so the quickstart's arena has a pair
    assert list(s.providers) == ["demo"] and list(s.models) == ["demo", "demo-alt"]
    assert s.models["demo"] == ModelConfig("demo", "demo", "demo")
    assert s.models["demo-alt"] == ModelConfig("demo-alt", "demo", "demo-alt")
    assert s.limits == LimitsConfig()


def test_the_second_demo_model_appears_only_while_nothing_else_is_configured(config_file: ConfigFile):
    assert "demo-alt" not in Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}).models
    other = config_file('[models.x]\nprovider = "demo"\n')
    assert "demo-alt" not in Settings.from_env({"GATEWAY_CONFIG": other}).models


def test_toml_declares_server_providers_models_router_and_limits(config_file: ConfigFile):
    s = Settings.from_env({"GATEWAY_CONFIG": config_file(FULL_TOML)})
    assert (s.host, s.port) == ("0.0.0.0", 9090)
    groq = s.providers["groq"]
    assert (groq.kind, groq.base_url) == ("openai", "https://api.groq.com/openai/v1")  # trailing slash dropped
    assert groq.api_key is not None and groq.api_key.reveal() == "gsk-inline"
    assert s.providers["local"] == ProviderConfig("local", "demo", "", None, demo_chunks=3, demo_delay_s=0.0)
    assert s.models["fast"] == ModelConfig(
        "fast", "groq", "llama-3.1-8b-instant", ("strong", "demo"), timeout_s=45.0, first_token_timeout_s=10.0,
        idle_timeout_s=20.0, weight=2.0, input_price_per_mtok=0.05, output_price_per_mtok=0.08)
    assert s.models["strong"] == ModelConfig("strong", "local", "strong")  # upstream defaults to the name
    assert dict(s.router) == {"default": "fast", "code": "strong"}
    assert s.default_model == "fast"
    assert s.limits == LimitsConfig(requests_per_minute=60, daily_tokens=200000, max_concurrent_streams=4)


def test_env_port_overrides_the_toml_port(config_file: ConfigFile):
    path = config_file("[server]\nport = 9090\n")
    assert Settings.from_env({"GATEWAY_CONFIG": path, "GATEWAY_PORT": "7000"}).port == 7000
    assert Settings.from_env({"GATEWAY_CONFIG": path, "PORT": "7001"}).port == 7001


def test_openai_api_key_alone_registers_openai_and_makes_it_the_default():
    s = Settings.from_env({"OPENAI_API_KEY": "sk-test"})
    openai = s.providers["openai"]
    assert (openai.kind, openai.base_url) == ("openai", "https://api.openai.com/v1")
    assert openai.api_key is not None and openai.api_key.reveal() == "sk-test"
    assert s.models["gpt-4o-mini"] == ModelConfig("gpt-4o-mini", "openai", "gpt-4o-mini")
    assert s.default_model == "gpt-4o-mini"
    assert DEMO_MODEL in s.models  # the demo model stays available


def test_openai_base_url_without_key_registers_a_keyless_compatible_server():
    s = Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:8000/v1", "OPENAI_MODEL": "qwen"})
    assert s.providers["openai"] == ProviderConfig("openai", "openai", "http://127.0.0.1:8000/v1", None)
    assert s.models["qwen"] == ModelConfig("qwen", "openai", "qwen")
    assert s.default_model == "qwen"


def test_groq_api_key_registers_groq():
    s = Settings.from_env({"GROQ_API_KEY": "gsk-env", "GROQ_MODEL": "llama-3.3-70b"})
    groq = s.providers["groq"]
    assert (groq.kind, groq.base_url) == ("openai", "https://api.groq.com/openai/v1")
    assert groq.api_key is not None and groq.api_key.reveal() == "gsk-env"
    # GROQ_MODEL falls back to GROQ_FALLBACK_MODEL (the default chain; tests/test_env_chain.py)
    assert s.models["llama-3.3-70b"] == ModelConfig("llama-3.3-70b", "groq", "llama-3.3-70b",
                                                    ("llama-3.3-70b-versatile",))


def test_anthropic_api_key_registers_anthropic_and_the_app_builds_its_adapter():
    s = Settings.from_env({"ANTHROPIC_API_KEY": "sk-ant-env"})
    anthropic = s.providers["anthropic"]
    assert (anthropic.kind, anthropic.base_url) == ("anthropic", "https://api.anthropic.com/v1")
    assert anthropic.api_key is not None and anthropic.api_key.reveal() == "sk-ant-env"
    assert s.models["claude-3-5-haiku-latest"].provider == "anthropic"
    assert s.default_model == "claude-3-5-haiku-latest" and "demo-alt" not in s.models


def test_api_key_env_reads_the_named_variable(config_file: ConfigFile):
    path = config_file('[providers.vllm]\nbase_url = "http://gpu:8000/v1"\napi_key_env = "VLLM_TOKEN"\n')
    s = Settings.from_env({"GATEWAY_CONFIG": path, "VLLM_TOKEN": "tok-123"})
    key = s.providers["vllm"].api_key
    assert isinstance(key, Secret) and key.reveal() == "tok-123"
    assert "VLLM_TOKEN" in config_error({"GATEWAY_CONFIG": path})


@pytest.mark.parametrize("name", ["GATEWAY_PORT", "PORT"])
def test_non_integer_port_names_its_variable(name: str):
    message = config_error({name: "abc"})
    assert message.startswith(name + " ") and "'abc'" in message


def test_model_with_undeclared_provider_is_refused(config_file: ConfigFile):
    message = config_error({"GATEWAY_CONFIG": config_file('[models.fast]\nprovider = "nowhere"\n')})
    assert "[models.fast]" in message and "'nowhere'" in message


def test_fallback_to_undeclared_model_is_refused(config_file: ConfigFile):
    path = config_file('[models.fast]\nprovider = "demo"\nfallbacks = ["ghost"]\n')
    message = config_error({"GATEWAY_CONFIG": path})
    assert "[models.fast]" in message and "'ghost'" in message


def test_router_to_undeclared_model_is_refused(config_file: ConfigFile):
    message = config_error({"GATEWAY_CONFIG": config_file('[router]\ncode = "ghost"\n')})
    assert "[router]" in message and "code" in message and "'ghost'" in message


def test_unknown_provider_kind_is_refused(config_file: ConfigFile):
    path = config_file('[providers.odd]\nkind = "grpc"\nbase_url = "http://x"\n')
    message = config_error({"GATEWAY_CONFIG": path})
    assert "[providers.odd]" in message and "kind" in message and "'grpc'" in message


def test_invalid_toml_is_refused_with_the_file_named(config_file: ConfigFile):
    path = config_file("[models.fast\nprovider = 1\n")
    message = config_error({"GATEWAY_CONFIG": path})
    assert message.startswith("GATEWAY_CONFIG: ") and path in message and "not valid TOML" in message


def test_missing_config_file_is_refused():
    assert config_error({"GATEWAY_CONFIG": "/nonexistent/gw.toml"}).startswith(
        "GATEWAY_CONFIG: cannot read /nonexistent/gw.toml")


def test_hs256_without_jwt_secret_is_refused():
    message = config_error({"JWT_ALGORITHMS": "HS256"})
    assert "JWT_ALGORITHMS" in message and "JWT_SECRET" in message


def test_secrets_never_print_their_value():
    s = Settings.from_env({"DATABASE_URL": "postgresql://app:pg-pass-9f3@db/app", "OPENAI_API_KEY": "sk-live-7c1",
                           "JWT_SECRET": "jwt-secret-0123456789abcdef0123456789"})
    assert s.database_url is not None and s.database_url.reveal() == "postgresql://app:pg-pass-9f3@db/app"
    secret = s.providers["openai"].api_key
    renderings = [repr(s), str(s), f"{s}", f"{s!r}", str(s.database_url), repr(s.jwt_secret),
                  f"{secret}", f"{secret!s}", f"{secret:>40}", "%s" % secret, f"{secret}"]
    for text in renderings:
        for value in ("pg-pass-9f3", "sk-live-7c1", "jwt-secret-0123"):
            assert value not in text
    assert f"{secret}" == "**********" and repr(secret) == "'**********'"


@pytest.mark.parametrize("toml, expected", [
    ('[models.fast]\nprovider = "demo"\nfallback = ["demo"]\n',
     "GATEWAY_CONFIG: [models.fast] fallback: unknown key (did you mean 'fallbacks'?)"),
    ('[models.fast]\nprovider = "demo"\nfirst_token_timout_s = 3\n',
     "GATEWAY_CONFIG: [models.fast] first_token_timout_s: unknown key (did you mean 'first_token_timeout_s'?)"),
    ('[model.fast]\nprovider = "demo"\n', "GATEWAY_CONFIG: model: unknown key (did you mean 'models'?)"),
    ('[providers.up]\nkind = "openai"\nbase_url = "http://x"\napi_keyenv = "K"\n',
     "GATEWAY_CONFIG: [providers.up] api_keyenv: unknown key (did you mean 'api_key_env'?)"),
    ('[server]\nhots = "0.0.0.0"\n', "GATEWAY_CONFIG: [server] hots: unknown key (did you mean 'host'?)"),
    ('[limits]\ndaily_token = 5\n', "GATEWAY_CONFIG: [limits] daily_token: unknown key (did you mean 'daily_tokens'?)"),
    ('[limits]\nzzz = 5\n', "GATEWAY_CONFIG: [limits] zzz: unknown key (valid: requests_per_minute, daily_tokens, "
                            "max_concurrent_streams, max_tokens, downgrade_model, downgrade_at, daily_cost_usd, "
                            "quota_leases, monthly_tokens, monthly_cost_usd, total_tokens, total_cost_usd)"),
])
def test_an_unknown_key_stops_the_start_naming_its_path_and_the_nearest_valid_name(
        config_file: ConfigFile, toml: str, expected: str):
    assert config_error({"GATEWAY_CONFIG": config_file(toml)}) == expected


def test_a_direct_database_url_is_read_beside_the_pooled_one_and_needs_it():
    s = Settings.from_env({"DATABASE_URL": "postgresql://app:pool-pass-41@pgbouncer:6432/app",
                           "DATABASE_DIRECT_URL": "postgresql://app:direct-pass-17@db:5432/app"})
    assert s.database_direct_url is not None
    assert s.database_direct_url.reveal() == "postgresql://app:direct-pass-17@db:5432/app"
    assert "direct-pass-17" not in repr(s)
    assert Settings.from_env({"DATABASE_URL": "postgresql://db/app"}).database_direct_url is None
    assert config_error({"DATABASE_DIRECT_URL": "postgresql://db/app"}) == (
        "DATABASE_DIRECT_URL is set but DATABASE_URL is not: set both (the pooler and the server)")
