"""Settings, parsed once from an environment mapping and an optional TOML file.

Tests pass a plain dict; `python -m gateway` passes `os.environ`. Anything wrong fails at
start with the name of the offending variable (or TOML key) in the message.
"""

from __future__ import annotations

import base64
import difflib
import importlib.util
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

DEMO_MODEL = "demo"
# a second built-in model, only while nothing else is configured: the quickstart's arena needs two
DEMO_ALT_MODEL = "demo-alt"


class Secret(str):
    """A string that never prints itself: logs and reprs show asterisks."""

    def __repr__(self) -> str:
        return "'**********'"

    def __str__(self) -> str:  # str(secret) is for logs; use .reveal() where the value is needed
        return "**********"

    def __format__(self, spec: str) -> str:  # str.__format__ would print the value for any non-empty spec
        return format("**********", spec)

    def reveal(self) -> str:
        return str.__str__(self)


PROVIDER_KINDS = ("openai", "anthropic", "gemini", "demo")


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: str  # "openai" | "anthropic" | "gemini" | "demo"
    base_url: str = ""
    api_key: Secret | None = None
    # demo provider: chunks per reply and the pause between them
    demo_chunks: int = 12
    demo_delay_s: float = 0.02
    # sent with every request to this provider (OpenRouter's attribution, Azure's `api-key`, ...);
    # values are secrets: they never print
    headers: Mapping[str, Secret] = field(default_factory=dict)
    # compatibility switches for OpenAI-compatible servers that reject what the adapter sends:
    # `stream_options` (then usage is estimated and flagged) and `max_completion_tokens` (then the
    # client's limit goes as `max_tokens`)
    send_stream_options: bool = True
    send_max_completion_tokens: bool = True


@dataclass(frozen=True)
class Deployment:
    """One place a model runs: a provider and its model id, drawn by weight among the model's others."""

    provider: str
    upstream: str
    weight: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    provider: str
    upstream: str
    fallbacks: tuple[str, ...] = ()
    timeout_s: float = 45.0  # until the first content byte (the whole call when not streaming)
    connect_timeout_s: float = 5.0
    first_token_timeout_s: float = 15.0
    idle_timeout_s: float = 20.0
    max_stream_s: float = 600.0  # a streamed reply, once it has started
    weight: float = 1.0
    input_price_per_mtok: float = 0.0
    output_price_per_mtok: float = 0.0
    # prompt tokens read from / written to a prompt cache; None: priced as input
    cached_input_price_per_mtok: float | None = None
    cache_write_price_per_mtok: float | None = None
    enabled: bool = True
    # several deployments behind this one name (`provider`/`upstream` are the first one's); a chain
    # link made from one of them carries its index in `deployment`
    deployments: tuple[Deployment, ...] = ()
    deployment: int | None = None

    @property
    def cached_price(self) -> float:
        return self.input_price_per_mtok if self.cached_input_price_per_mtok is None \
            else self.cached_input_price_per_mtok

    @property
    def cache_write_price(self) -> float:
        return self.input_price_per_mtok if self.cache_write_price_per_mtok is None \
            else self.cache_write_price_per_mtok

    @property
    def highest_input_price(self) -> float:
        """The dearest a prompt token can be (a reservation's worst case): uncached, cached or a cache write."""
        return max(self.input_price_per_mtok, self.cached_price, self.cache_write_price)

    @property
    def circuit_key(self) -> str:
        """The circuit breaker's name: the model's, or one per deployment."""
        return self.name if self.deployment is None else f"{self.name}#{self.deployment}"
    kind: str = "chat"  # "chat" | "embedding" (served by POST /v1/embeddings only)


@dataclass(frozen=True)
class LimitsConfig:
    requests_per_minute: int | None = None
    daily_tokens: int | None = None
    max_concurrent_streams: int | None = None
    max_tokens: int | None = None
    downgrade_model: str | None = None  # used instead once the day's budget is nearly spent
    downgrade_at: float | None = None  # "nearly": this fraction of daily_tokens (0..1)
    daily_cost_usd: float | None = None  # per user per UTC day, at the models' prices
    quota_leases: bool = True  # busy callers are admitted from slices leased ahead (gateway/policy/quota.py)
    # budgets per user by UTC calendar month and for the user's whole life (tokens, USD)
    monthly_tokens: int | None = None
    monthly_cost_usd: float | None = None
    total_tokens: int | None = None
    total_cost_usd: float | None = None


@dataclass(frozen=True)
class RetentionConfig:
    """[retention] (docs/retention.md): threads untouched for `threads_days` are deleted with their
    messages, `batch` threads per statement, a round every `interval_s`; None: kept for ever."""

    threads_days: int | None = None
    batch: int = 500
    interval_s: float = 60.0


# -- webhooks ([[webhooks]]: docs/webhooks.md) ---------------------------------------------------
WEBHOOK_EVENTS = ("budget.threshold", "budget.exhausted", "key.created", "key.revoked")


@dataclass(frozen=True)
class WebhookConfig:
    """One endpoint: where events go, the secret that signs them (Standard Webhooks), which events."""

    url: str
    secret: Secret  # "whsec_" + base64 of the signing key
    events: tuple[str, ...] = WEBHOOK_EVENTS
    thresholds: tuple[float, ...] = (0.8,)  # budget.threshold fires as use passes each fraction


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: Secret | None = None
    # with DATABASE_URL pointing at a pooler (PgBouncer, transaction pooling): the server itself, for
    # what needs one session (LISTEN, the instance lock, migrations); the pooled connections then
    # keep no prepared statements on the server
    database_direct_url: Secret | None = None
    data_dir: Path = Path(".gateway")
    db_pool_min: int = 2
    db_pool_max: int = 20
    # auth
    jwt_secret: Secret | None = None
    jwks_url: str | None = None
    jwt_audience: str = "authenticated"
    jwt_issuer: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_leeway_s: float = 30.0
    jwks_min_refresh_s: float = 5.0
    jwks_ttl_s: float = 600.0
    key_cache_ttl_s: float = 60.0
    user_cache_ttl_s: float = 300.0
    bootstrap_admin_key: bool = True
    # http
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    sse_ping_s: float = 15.0
    sse_retry_ms: int = 3000
    shutdown_grace_s: float = 10.0
    circuit_failures: int = 5
    leaderboard_bootstrap_rounds: int = 200
    finish_retry_s: float = 30.0
    sweep_s: float = 15.0
    checkpoint_s: float = 2.0  # a live reply's partial content is saved this often ...
    checkpoint_chunks: int = 256  # ... or after this many unsaved chunks
    stream_token_ttl_s: float = 600.0
    circuit_cooldown_s: float = 30.0
    deployment_cooldown_s: float = 5.0  # a deployment that answered 429/5xx is skipped this long
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line)
    # /metrics: a bearer token to require, and a separate listener (off the public port) if set
    metrics_token: Secret | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # the fleet: live streams across instances (gateway/fleet), and how soon dead instances are swept
    redis_url: Secret | None = None
    redis_stream_ttl_s: float = 600.0  # how long a finished reply's stream stays in Redis
    # models
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    default_model: str = DEMO_MODEL
    router: Mapping[str, str] = field(default_factory=dict)
    limits: LimitsConfig = LimitsConfig()
    retention: RetentionConfig = RetentionConfig()
    # webhooks: the endpoints, how often the outbox is read, the first retry's delay (doubling up to
    # an hour) and how long an event is retried before it is dead-lettered
    webhooks: tuple[WebhookConfig, ...] = ()
    webhook_poll_s: float = 1.0
    webhook_retry_s: float = 5.0
    webhook_give_up_s: float = 86400.0
    # the OTEL_* variables (tracing.py reads them; exporter headers are left to the SDK: they may hold keys)
    otel: Mapping[str, str] = field(default_factory=dict)
    # the environment these settings were parsed from: a reload (SIGHUP, POST /api/admin/reload) parses
    # it again with the file as it is then. It may hold secrets: never printed, never compared
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def jwt_enabled(self) -> bool:
        return bool(self.jwt_secret or self.jwks_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return _parse(env)


# -- parsing -------------------------------------------------------------------------------------

_ALGORITHMS = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA"}


def _int(name: str, raw: Any, minimum: int | None = None) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, raw: Any, minimum: float | None = 0.0) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _list(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, (list, tuple)):
        return tuple(str(x).strip() for x in raw if str(x).strip())
    return tuple(x.strip() for x in str(raw).split(",") if x.strip())


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] in GATEWAY_CONFIG must be a table")
    return value


def _load_toml(env: Mapping[str, str]) -> dict[str, Any]:
    path = env.get("GATEWAY_CONFIG")
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"GATEWAY_CONFIG: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"GATEWAY_CONFIG: {path} is not valid TOML: {e}") from None


_MODEL_FLOATS = ("timeout_s", "connect_timeout_s", "first_token_timeout_s", "idle_timeout_s", "max_stream_s",
                 "weight", "input_price_per_mtok", "output_price_per_mtok", "cached_input_price_per_mtok",
                 "cache_write_price_per_mtok")

# Every key the file may hold, by table: a misspelt key (`fallback =`, `first_token_timout_s`, `[model.x]`)
# would otherwise be ignored in silence and the gateway run with a default nobody chose.
_TOP_KEYS = ("server", "providers", "models", "router", "limits", "webhooks", "retention")
_RETENTION_KEYS = ("threads_days", "batch", "interval_s")
_WEBHOOK_KEYS = ("url", "secret", "events", "thresholds")
_SERVER_KEYS = ("host", "port")
_PROVIDER_KEYS = ("kind", "base_url", "api_key", "api_key_env", "chunks", "delay_ms", "headers",
                  "send_stream_options", "send_max_completion_tokens")
_MODEL_KEYS = ("provider", "upstream", "fallbacks", "enabled", "kind", "deployments", *_MODEL_FLOATS)
_DEPLOYMENT_KEYS = ("provider", "upstream", "weight")
_LIMIT_KEYS = ("requests_per_minute", "daily_tokens", "max_concurrent_streams", "max_tokens", "downgrade_model",
               "downgrade_at", "daily_cost_usd", "quota_leases", "monthly_tokens", "monthly_cost_usd",
               "total_tokens", "total_cost_usd")


def _retention(raw: Any) -> RetentionConfig:
    """[retention]: threads_days a whole number of days from 1 (absent: off), batch from 1 to 10000,
    interval_s above 0."""
    if not isinstance(raw, dict):
        raise ConfigError("GATEWAY_CONFIG: retention must be a table ([retention])")
    _known_keys("[retention] ", raw, _RETENTION_KEYS)

    def whole(name: str, low: int, high: int) -> int:
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"[retention] {name} must be a whole number from {low} to {high}, got {value!r}")
        return value

    days = whole("threads_days", 1, 36500) if "threads_days" in raw else None
    batch = whole("batch", 1, 10000) if "batch" in raw else 500
    interval = _float("[retention] interval_s", raw.get("interval_s", 60.0), minimum=0.01)
    return RetentionConfig(threads_days=days, batch=batch, interval_s=interval)


def _webhooks(raw: Any) -> tuple[WebhookConfig, ...]:
    """[[webhooks]] entries: an http(s) url, a whsec_ secret, known event names, thresholds in (0, 1)."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError("GATEWAY_CONFIG: webhooks must be an array of tables ([[webhooks]])")
    found: list[WebhookConfig] = []
    for i, table in enumerate(raw):
        where = f"[[webhooks]] #{i + 1}"
        _known_keys(f"{where} ", table, _WEBHOOK_KEYS)
        url = table.get("url")
        parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{where} url must be an http:// or https:// URL, got {url!r}")
        if any(w.url == url for w in found):
            raise ConfigError(f"{where} url {url!r} is configured twice")
        secret = table.get("secret")
        try:
            ok = isinstance(secret, str) and secret.startswith("whsec_") and len(
                base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{where} secret must be whsec_ followed by the base64 of at least 24 bytes")
        events = table.get("events", list(WEBHOOK_EVENTS))
        if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
            raise ConfigError(f"{where} events must be a non-empty list drawn from {list(WEBHOOK_EVENTS)}")
        unknown = sorted(set(events) - set(WEBHOOK_EVENTS))
        if unknown:
            raise ConfigError(f"{where} events: unknown {unknown}: allowed are {list(WEBHOOK_EVENTS)}")
        thresholds = table.get("thresholds", [0.8])
        if (not isinstance(thresholds, list) or not thresholds
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1 for t in thresholds)):
            raise ConfigError(f"{where} thresholds must be a non-empty list of fractions between 0 and 1, "
                              f"got {thresholds!r}")
        found.append(WebhookConfig(url=url, secret=Secret(secret),
                                   events=tuple(e for e in WEBHOOK_EVENTS if e in events),
                                   thresholds=tuple(sorted({float(t) for t in thresholds}))))
    return tuple(found)


def _known_keys(where: str, table: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """A ConfigError naming the first key not in `allowed`, with the nearest valid name."""
    for key in table:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (valid: {', '.join(allowed)})"
            raise ConfigError(f"GATEWAY_CONFIG: {where}{key}: unknown key{hint}")


def _providers_and_models(env: Mapping[str, str], doc: Mapping[str, Any]
                          ) -> tuple[dict[str, ProviderConfig], dict[str, ModelConfig]]:
    providers: dict[str, ProviderConfig] = {}
    models: dict[str, ModelConfig] = {}

    demo_chunks = _int("DEMO_CHUNKS", env.get("DEMO_CHUNKS", 12), minimum=1)
    demo_delay = _float("DEMO_DELAY_MS", env.get("DEMO_DELAY_MS", 20)) / 1000
    providers["demo"] = ProviderConfig("demo", "demo", demo_chunks=demo_chunks, demo_delay_s=demo_delay)
    models[DEMO_MODEL] = ModelConfig(DEMO_MODEL, "demo", "demo")

    env_chain = _env_providers(env, providers, models)

    for pname, table in _table(doc, "providers").items():
        where = f"[providers.{pname}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        _known_keys(f"{where} ", table, _PROVIDER_KEYS)
        kind = table.get("kind", "openai")
        if kind not in PROVIDER_KINDS:
            raise ConfigError(f"{where} kind must be openai, anthropic, gemini or demo, got {kind!r}")
        key = table.get("api_key")
        if key is None and table.get("api_key_env"):
            key = env.get(table["api_key_env"])
            if not key:
                raise ConfigError(f"{where} api_key_env: environment variable {table['api_key_env']} is not set")
        base_url = table.get("base_url", "")
        if kind != "demo" and not base_url:
            raise ConfigError(f"{where} base_url is required")
        providers[pname] = ProviderConfig(
            pname, kind, str(base_url).rstrip("/"), Secret(key) if key else None,
            demo_chunks=_int(f"{where} chunks", table.get("chunks", demo_chunks), minimum=1),
            demo_delay_s=_float(f"{where} delay_ms", table.get("delay_ms", demo_delay * 1000)) / 1000,
            headers=_headers(env, where, table.get("headers", {})),
            send_stream_options=_bool(f"{where} send_stream_options", table.get("send_stream_options", True)),
            send_max_completion_tokens=_bool(f"{where} send_max_completion_tokens",
                                             table.get("send_max_completion_tokens", True)))

    for mname, table in _table(doc, "models").items():
        where = f"[models.{mname}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        _known_keys(f"{where} ", table, _MODEL_KEYS)
        deployments = _deployments(where, mname, table, providers)
        provider = deployments[0].provider if deployments else table.get("provider")
        if provider not in providers:
            raise ConfigError(f"{where} provider {provider!r} is not declared under [providers]")
        upstream = deployments[0].upstream if deployments else str(table.get("upstream", mname))
        fallbacks = table.get("fallbacks", [])
        if not isinstance(fallbacks, list):
            raise ConfigError(f"{where} fallbacks must be a list of model names")
        kwargs: dict[str, Any] = {k: _float(f"{where} {k}", table[k]) for k in _MODEL_FLOATS if k in table}
        if kwargs.get("max_stream_s") == 0:
            raise ConfigError(f"{where} max_stream_s must be > 0")
        kind = table.get("kind", "chat")
        if kind not in ("chat", "embedding"):
            raise ConfigError(f"{where} kind must be chat or embedding, got {kind!r}")
        if kind == "embedding" and (providers[provider].kind in ("anthropic", "gemini") or fallbacks or deployments):
            # another model's vectors live in another space: an embedding model never falls back
            raise ConfigError(f"{where} an embedding model needs an openai or demo provider, no fallbacks"
                              " and no deployments")
        models[mname] = ModelConfig(mname, provider, upstream, tuple(str(f) for f in fallbacks),
                                    enabled=_bool(f"{where} enabled", table.get("enabled", True)), kind=kind,
                                    deployments=deployments, **kwargs)

    if list(models) == [DEMO_MODEL]:
        models[DEMO_ALT_MODEL] = ModelConfig(DEMO_ALT_MODEL, "demo", DEMO_ALT_MODEL)

    if env.get("FALLBACK_MODELS"):
        env_chain = list(_list(env["FALLBACK_MODELS"]))
        unknown = [m for m in env_chain if m not in models]
        if unknown:
            raise ConfigError(f"FALLBACK_MODELS: {unknown[0]!r} is not a declared model")
    # each model of the chain falls back to the ones after it, in order, and then to nothing
    for i, name in enumerate(env_chain):
        models[name] = replace(models[name], fallbacks=tuple(env_chain[i + 1:]))

    for model in models.values():
        for fb in model.fallbacks:
            if fb not in models:
                raise ConfigError(f"[models.{model.name}] fallback {fb!r} is not a declared model")
    return providers, models


# -- providers from the environment alone, and what the file adds to providers ---------------------

GROQ_BASE_URL = "https://api.groq.com/openai/v1"
GROQ_FALLBACK_MODEL = "llama-3.3-70b-versatile"  # the default chain's second link
BYTEZ_BASE_URL = "https://api.bytez.com/models/v2/openai/v1"  # Bytez's OpenAI-compatible API
BYTEZ_MODEL = "Qwen/Qwen3-4B"
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"  # Google AI's Gemini API
GEMINI_MODEL = "gemini-2.5-flash"
ENV_HEADER_PREFIX = "env:"  # a header value "env:NAME" is read from the environment variable NAME


def _env_providers(env: Mapping[str, str], providers: dict[str, ProviderConfig],
                   models: dict[str, ModelConfig]) -> list[str]:
    """Each provider key in the environment registers a provider and its model(s). Returns the
    default chain they make, in this order: GROQ_MODEL, GROQ_FALLBACK_MODEL, then Bytez,
    OpenAI, Anthropic, Gemini (each falls back to the ones after it; FALLBACK_MODELS overrides)."""
    chain: list[str] = []

    def add(provider: ProviderConfig, model: str) -> None:
        providers[provider.name] = provider
        name = model if model not in models else f"{provider.name}:{model}"  # two providers, one model id
        models[name] = ModelConfig(name, provider.name, model)
        chain.append(name)

    if env.get("GROQ_API_KEY"):
        groq = ProviderConfig("groq", "openai", (env.get("GROQ_BASE_URL") or GROQ_BASE_URL).rstrip("/"),
                              Secret(env["GROQ_API_KEY"]))
        first = env.get("GROQ_MODEL") or "llama-3.1-8b-instant"
        add(groq, first)
        second = env.get("GROQ_FALLBACK_MODEL", GROQ_FALLBACK_MODEL)  # set it empty for none
        if second and second != first:
            add(groq, second)
    if env.get("BYTEZ_API_KEY"):
        add(ProviderConfig("bytez", "openai", (env.get("BYTEZ_BASE_URL") or BYTEZ_BASE_URL).rstrip("/"),
                           Secret(env["BYTEZ_API_KEY"])), env.get("BYTEZ_MODEL") or BYTEZ_MODEL)
    if env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"):
        key = env.get("OPENAI_API_KEY")
        add(ProviderConfig("openai", "openai", (env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/"),
                           Secret(key) if key else None), env.get("OPENAI_MODEL") or "gpt-4o-mini")
    if env.get("ANTHROPIC_API_KEY"):
        base_url = (env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com/v1").rstrip("/")
        add(ProviderConfig("anthropic", "anthropic", base_url, Secret(env["ANTHROPIC_API_KEY"])),
            env.get("ANTHROPIC_MODEL") or "claude-3-5-haiku-latest")
    if env.get("GEMINI_API_KEY"):
        base_url = (env.get("GEMINI_BASE_URL") or GEMINI_BASE_URL).rstrip("/")
        add(ProviderConfig("gemini", "gemini", base_url, Secret(env["GEMINI_API_KEY"])),
            env.get("GEMINI_MODEL") or GEMINI_MODEL)
    return chain


def _headers(env: Mapping[str, str], where: str, raw: Any) -> dict[str, Secret]:
    """`headers = {Name = "value" | "env:VARIABLE"}`; values are never echoed in an error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} headers must be a table of header names to values")
    headers: dict[str, Secret] = {}
    for name, value in raw.items():
        if not name or any(c in name for c in ":\r\n \t") or not name.isascii():
            raise ConfigError(f"{where} headers: {name!r} is not a valid header name")
        if not isinstance(value, str):
            raise ConfigError(f"{where} headers.{name} must be a string")
        if value.startswith(ENV_HEADER_PREFIX):
            variable = value[len(ENV_HEADER_PREFIX):]
            if not env.get(variable):
                raise ConfigError(f"{where} headers.{name}: environment variable {variable} is not set")
            value = env[variable]
        if "\r" in value or "\n" in value:
            raise ConfigError(f"{where} headers.{name}: the value must be one line")
        headers[name] = Secret(value)
    return headers


def _deployments(where: str, model: str, table: Mapping[str, Any],
                 providers: Mapping[str, ProviderConfig]) -> tuple[Deployment, ...]:
    raw = table.get("deployments")
    if raw is None:
        return ()
    if "provider" in table or "upstream" in table:
        raise ConfigError(f"{where} give either provider/upstream or deployments, not both")
    if not isinstance(raw, list) or not raw or not all(isinstance(d, dict) for d in raw):
        raise ConfigError(f"{where} deployments must be a non-empty list of tables {{provider, upstream, weight}}")
    deployments: list[Deployment] = []
    for i, entry in enumerate(raw):
        at = f"{where} deployments[{i}]"
        _known_keys(f"{at} ", entry, _DEPLOYMENT_KEYS)
        provider = entry.get("provider")
        if provider not in providers:
            raise ConfigError(f"{at} provider {provider!r} is not declared under [providers]")
        deployments.append(Deployment(provider, str(entry.get("upstream", model)),
                                      _float(f"{at} weight", entry.get("weight", 1.0))))
    if not any(d.weight > 0 for d in deployments):
        raise ConfigError(f"{where} deployments: at least one weight must be > 0")
    return tuple(deployments)


# a Supabase project's JWKS URL; its tokens' `iss` is the project's /auth/v1 URL
_SUPABASE_JWKS = re.compile(r"(https://[a-z0-9-]+\.supabase\.co/auth/v1)/\.well-known/jwks\.json")
ANY_ISSUER = "*"  # JWT_ISSUER=* turns the issuer check off


def _jwt_issuer(env: Mapping[str, str], jwks_url: str | None) -> str | None:
    """JWT_ISSUER when set (`*`: not checked); else, for a Supabase JWKS URL, the project's issuer."""
    issuer = env.get("JWT_ISSUER")
    if issuer:
        return None if issuer.strip() == ANY_ISSUER else issuer
    match = _SUPABASE_JWKS.fullmatch(jwks_url) if jwks_url else None
    return match.group(1) if match else None


def _parse(env: Mapping[str, str]) -> Settings:
    doc = _load_toml(env)
    _known_keys("", doc, _TOP_KEYS)
    server = _table(doc, "server")
    _known_keys("[server] ", server, _SERVER_KEYS)
    providers, models = _providers_and_models(env, doc)

    router = {str(k): str(v) for k, v in _table(doc, "router").items()}
    for category, model in router.items():
        if model not in models:
            raise ConfigError(f"[router] {category} = {model!r} is not a declared model")

    default_model = env.get("DEFAULT_MODEL") or router.get("default")
    if not default_model and env.get("FALLBACK_MODELS"):
        default_model = _list(env["FALLBACK_MODELS"])[0]  # the chain's head
    if not default_model:
        # the first real model configured wins over the demo one
        real = [m for m, c in models.items() if m not in (DEMO_MODEL, DEMO_ALT_MODEL) and c.kind == "chat"]
        default_model = real[0] if real else DEMO_MODEL
    if default_model not in models:
        raise ConfigError(f"DEFAULT_MODEL {default_model!r} is not a declared model")

    limits_doc = _table(doc, "limits")
    _known_keys("[limits] ", limits_doc, _LIMIT_KEYS)
    limit_ints: dict[str, Any] = {k: _int(f"[limits] {k}", limits_doc[k], minimum=1)
                                  for k in ("requests_per_minute", "daily_tokens", "max_concurrent_streams",
                                            "max_tokens", "monthly_tokens", "total_tokens") if k in limits_doc}
    downgrade_model = limits_doc.get("downgrade_model")
    if downgrade_model is not None and downgrade_model not in models:
        raise ConfigError(f"[limits] downgrade_model {downgrade_model!r} is not a declared model")
    downgrade_at = _float("[limits] downgrade_at", limits_doc.get("downgrade_at", 0.9))
    if not 0 < downgrade_at <= 1:
        raise ConfigError("[limits] downgrade_at must be in (0, 1]")
    daily_cost = _float("[limits] daily_cost_usd", limits_doc["daily_cost_usd"]) if "daily_cost_usd" in limits_doc \
        else None
    if daily_cost is not None and not 0 < daily_cost < 1e8:
        raise ConfigError("[limits] daily_cost_usd must be a positive number of dollars below 100000000")
    budgets_usd: dict[str, Any] = {}
    for name in ("monthly_cost_usd", "total_cost_usd"):
        if name in limits_doc:
            usd = _float(f"[limits] {name}", limits_doc[name])
            if not 0 < usd < 1e8:
                raise ConfigError(f"[limits] {name} must be a positive number of dollars below 100000000")
            budgets_usd[name] = usd
    leasing = limits_doc.get("quota_leases", True)
    if not isinstance(leasing, bool):
        raise ConfigError("[limits] quota_leases must be true or false")
    limits = LimitsConfig(**limit_ints, downgrade_model=downgrade_model,
                          downgrade_at=downgrade_at if downgrade_model else None, daily_cost_usd=daily_cost,
                          quota_leases=leasing, **budgets_usd)

    webhooks = _webhooks(doc.get("webhooks", []))
    retention = _retention(doc.get("retention", {}))

    jwt_secret = env.get("JWT_SECRET")
    jwks_url = env.get("JWKS_URL") or None
    if "JWT_ALGORITHMS" in env:
        algorithms = _list(env["JWT_ALGORITHMS"])
        bad = [a for a in algorithms if a not in _ALGORITHMS]
        if bad or not algorithms:
            raise ConfigError(f"JWT_ALGORITHMS: unsupported algorithm(s) {bad or algorithms!r}")
    else:
        algorithms = (("HS256",) if jwt_secret else ()) + (("RS256", "ES256") if jwks_url else ())
    if any(a.startswith("HS") for a in algorithms) and not jwt_secret:
        raise ConfigError("JWT_ALGORITHMS allows HMAC but JWT_SECRET is not set")
    if any(not a.startswith("HS") for a in algorithms) and not jwks_url:
        raise ConfigError("JWT_ALGORITHMS allows public-key algorithms but JWKS_URL is not set")

    # the error names whichever source the port came from (PORT is what Heroku-style hosts set)
    port_name = next((n for n in ("GATEWAY_PORT", "PORT") if env.get(n)), "[server] port")
    port_raw = env.get(port_name) if port_name != "[server] port" else server.get("port", 8080)
    database_url = env.get("DATABASE_URL")
    database_direct_url = env.get("DATABASE_DIRECT_URL")
    if database_direct_url and not database_url:
        raise ConfigError("DATABASE_DIRECT_URL is set but DATABASE_URL is not: set both (the pooler and the server)")
    log_format = env.get("LOG_FORMAT", "text").strip().lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT must be text or json, got {env['LOG_FORMAT']!r}")
    metrics_token = env.get("METRICS_TOKEN")
    metrics_port = _int("METRICS_PORT", env["METRICS_PORT"], minimum=1) if env.get("METRICS_PORT") else None
    if metrics_port is not None and metrics_port > 65535:
        raise ConfigError(f"METRICS_PORT must be <= 65535, got {metrics_port}")
    otel = {k: v for k, v in env.items() if k.startswith("OTEL_") and "HEADERS" not in k}
    exporters_asked(otel)  # a tracing value the gateway cannot honour fails now, naming its variable
    return Settings(
        host=env.get("GATEWAY_HOST") or str(server.get("host", "127.0.0.1")),
        port=_int(port_name, port_raw, minimum=0),
        database_url=Secret(database_url) if database_url else None,
        database_direct_url=Secret(database_direct_url) if database_direct_url else None,
        data_dir=Path(env.get("GATEWAY_DATA_DIR", ".gateway")),
        db_pool_min=_int("DB_POOL_MIN", env.get("DB_POOL_MIN", 2), minimum=0),
        db_pool_max=_int("DB_POOL_MAX", env.get("DB_POOL_MAX", 20), minimum=1),
        jwt_secret=Secret(jwt_secret) if jwt_secret else None,
        jwks_url=jwks_url,
        jwt_audience=env.get("JWT_AUDIENCE", "authenticated"),
        jwt_issuer=_jwt_issuer(env, jwks_url),
        jwt_algorithms=algorithms,
        jwt_leeway_s=_float("JWT_LEEWAY_S", env.get("JWT_LEEWAY_S", 30)),
        jwks_min_refresh_s=_float("JWKS_MIN_REFRESH_S", env.get("JWKS_MIN_REFRESH_S", 5)),
        jwks_ttl_s=_float("JWKS_TTL_S", env.get("JWKS_TTL_S", 600)),
        key_cache_ttl_s=_float("KEY_CACHE_TTL_S", env.get("KEY_CACHE_TTL_S", 60)),
        bootstrap_admin_key=_bool("BOOTSTRAP_ADMIN_KEY", env.get("BOOTSTRAP_ADMIN_KEY", True)),
        cors_origins=_list(env.get("CORS_ORIGINS", "")),
        max_body_bytes=_int("MAX_BODY_BYTES", env.get("MAX_BODY_BYTES", 1 << 20), minimum=1024),
        sse_ping_s=_float("SSE_PING_S", env.get("SSE_PING_S", 15), minimum=0.01),
        shutdown_grace_s=_float("SHUTDOWN_GRACE_S", env.get("SHUTDOWN_GRACE_S", 10)),
        finish_retry_s=_float("FINISH_RETRY_S", env.get("FINISH_RETRY_S", 30)),
        sweep_s=_float("SWEEP_S", env.get("SWEEP_S", 15), minimum=0.05),
        checkpoint_s=_float("CHECKPOINT_S", env.get("CHECKPOINT_S", 2), minimum=0.05),
        checkpoint_chunks=_int("CHECKPOINT_CHUNKS", env.get("CHECKPOINT_CHUNKS", 256), minimum=1),
        stream_token_ttl_s=_float("STREAM_TOKEN_TTL_S", env.get("STREAM_TOKEN_TTL_S", 600), minimum=1),
        leaderboard_bootstrap_rounds=_int("LEADERBOARD_BOOTSTRAP_ROUNDS", env.get("LEADERBOARD_BOOTSTRAP_ROUNDS", 200),
                                          minimum=0),
        circuit_failures=_int("CIRCUIT_FAILURES", env.get("CIRCUIT_FAILURES", 5), minimum=1),
        circuit_cooldown_s=_float("CIRCUIT_COOLDOWN_S", env.get("CIRCUIT_COOLDOWN_S", 30)),
        deployment_cooldown_s=_float("DEPLOYMENT_COOLDOWN_S", env.get("DEPLOYMENT_COOLDOWN_S", 5)),
        log_level=env.get("LOG_LEVEL", "INFO").upper(),
        log_format=log_format,
        metrics_token=Secret(metrics_token) if metrics_token else None,
        metrics_port=metrics_port,
        metrics_host=env.get("METRICS_HOST") or "127.0.0.1",
        redis_url=Secret(env["REDIS_URL"]) if env.get("REDIS_URL") else None,
        redis_stream_ttl_s=_float("REDIS_STREAM_TTL_S", env.get("REDIS_STREAM_TTL_S", 600), minimum=1),
        providers=providers,
        models=models,
        default_model=default_model,
        router=router,
        limits=limits,
        webhooks=webhooks,
        retention=retention,
        webhook_poll_s=_float("WEBHOOK_POLL_S", env.get("WEBHOOK_POLL_S", 1), minimum=0.01),
        webhook_retry_s=_float("WEBHOOK_RETRY_S", env.get("WEBHOOK_RETRY_S", 5), minimum=0.01),
        webhook_give_up_s=_float("WEBHOOK_GIVE_UP_S", env.get("WEBHOOK_GIVE_UP_S", 86400), minimum=0.01),
        otel=otel,
        env=dict(env),
    )


# -- reloading the file while serving ------------------------------------------------------------------

# what a reload applies to new turns; every other setting differing in the file waits for a restart
RELOADABLE = ("providers", "models", "router", "default_model")
_WHERE = re.compile(r"\[(server|providers|models|router|limits)(?:\.([^\]\s]+))?\]\s*(?:deployments\[\d+\]\s*)?"
                    r"(?:headers\.)?([A-Za-z_][A-Za-z0-9_]*)?")
_DECODE_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def reparse(current: Settings) -> Settings:
    """The settings parsed again from `current`'s environment and the file GATEWAY_CONFIG names, as it
    is now. A ConfigError's message is one line that names the file, the line and the key."""
    try:
        return Settings.from_env(current.env)
    except ConfigError as e:
        path = current.env.get("GATEWAY_CONFIG")
        raise ConfigError(located(path, e.message) if path else e.message) from None


def located(path: str, message: str) -> str:
    """`message` on one line, prefixed with the file and the line it is about (when it can be found)."""
    message = " ".join(message.split())
    line = None
    decoded = _DECODE_LINE.search(message)
    if decoded:
        line = int(decoded.group(1))
    else:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        found = _WHERE.search(message)
        if found and text:
            line = _line_of(text, found.group(1), found.group(2), found.group(3))
    if message.startswith("GATEWAY_CONFIG: "):
        message = message[len("GATEWAY_CONFIG: "):]
    return f"GATEWAY_CONFIG: {path}" + (f" line {line}" if line else "") + f": {message}"


def _line_of(text: str, table: str, name: str | None, key: str | None) -> int | None:
    """The 1-based line of `key` inside the table `[table.name]`, else the table's header line."""
    header = re.compile(r"^\s*\[+\s*" + re.escape(table) + (r"\s*\.\s*\"?" + re.escape(name) + r"\"?" if name else "")
                        + r"\s*\]")
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return None
    if key:
        for i in range(start + 1, len(lines)):
            if re.match(r"^\s*\[", lines[i]) and not lines[i].lstrip().startswith("[[" + table):
                break
            # a prefix: a message may name the key in the singular ("fallback 'x'" for `fallbacks`)
            if re.match(r"^\s*\"?" + re.escape(key) + r"\w*\"?\s*=", lines[i]):
                return i + 1
    return start + 1


@dataclass(frozen=True)
class Changes:
    """What a reload changed: names added, removed and changed, and what waits for a restart."""

    models_added: tuple[str, ...] = ()
    models_removed: tuple[str, ...] = ()
    models_changed: tuple[str, ...] = ()
    providers_added: tuple[str, ...] = ()
    providers_removed: tuple[str, ...] = ()
    providers_changed: tuple[str, ...] = ()
    router_changed: bool = False
    default_model: str | None = None  # the new default, when it changed
    restart_required: tuple[str, ...] = ()  # settings that differ but are read only at start


def changes(old: Settings, new: Settings) -> Changes:
    def diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
        return (tuple(sorted(set(b) - set(a))), tuple(sorted(set(a) - set(b))),
                tuple(sorted(k for k in set(a) & set(b) if a[k] != b[k])))

    m_added, m_removed, m_changed = diff(old.models, new.models)
    p_added, p_removed, p_changed = diff(old.providers, new.providers)
    waiting = tuple(f.name for f in fields(Settings)
                    if f.compare and f.name not in RELOADABLE and getattr(old, f.name) != getattr(new, f.name))
    return Changes(m_added, m_removed, m_changed, p_added, p_removed, p_changed,
                   dict(old.router) != dict(new.router),
                   new.default_model if new.default_model != old.default_model else None, waiting)


def applied(old: Settings, new: Settings) -> Settings:
    """`old` with what a reload applies taken from `new`; the rest stays as it started."""
    return replace(old, providers=new.providers, models=new.models, router=new.router,
                   default_model=new.default_model, env=new.env)


# -- the OTEL_* variables (read here so that a bad one fails at start; gateway/observability/tracing.py
# builds the tracer from them, importing the SDK only then)

OTEL_EXPORTERS = ("otlp", "console", "none")
OTEL_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
                 "parentbased_traceidratio")
OTEL_INSTALL_HINT = "pip install 'chat-gateway[otel]'"


def exporters_asked(env: Mapping[str, str]) -> list[str]:
    """The exporters the OTEL_* variables in `env` ask for: none means tracing is off. A value the
    gateway cannot honour (or a missing package) fails here, naming its variable; Settings.from_env
    calls this, so it fails at start like every other setting."""
    exporters = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    bad = [e for e in exporters if e not in OTEL_EXPORTERS]
    if bad:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: unsupported exporter(s) {bad!r} (use otlp, console or none)")
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not exporters and endpoint:
        exporters = ["otlp"]  # an endpoint alone means "send them there", as the SDK's default exporter is otlp
    exporters = [e for e in exporters if e != "none"]
    if _otel_true(env.get("OTEL_SDK_DISABLED")) or not exporters:
        return []
    otel_sampling(env)
    if not _installed("opentelemetry.sdk.trace"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER: tracing needs the OpenTelemetry SDK ({OTEL_INSTALL_HINT})")
    if "otlp" in exporters:
        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or "http/protobuf").strip().lower()
        if protocol != "http/protobuf":
            raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf is supported, got {protocol!r}")
        if not _installed("opentelemetry.exporter.otlp.proto.http.trace_exporter"):
            raise ConfigError(f"OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter ({OTEL_INSTALL_HINT})")
    return exporters


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing (or blocked)
        return False


def otel_sampling(env: Mapping[str, str]) -> tuple[str, float]:
    """The sampler OTEL_TRACES_SAMPLER names, and its ratio (OTEL_TRACES_SAMPLER_ARG) when it takes one."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name not in OTEL_SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: unsupported sampler {name!r} (use one of {OTEL_SAMPLERS})")
    ratio = 1.0
    if name.endswith("traceidratio"):
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: a ratio from 0 to 1, got {env['OTEL_TRACES_SAMPLER_ARG']!r}")
    return name, ratio


def _otel_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"
