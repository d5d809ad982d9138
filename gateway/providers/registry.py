"""The configured models and the provider adapters behind them.

A model with several `deployments` becomes several chain links (one per deployment, in an order
drawn by weight for each request); its fallbacks follow only once every deployment has failed.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import replace

import aiohttp
import asyncpg

from gateway.config import ModelConfig, ProviderConfig, Settings
from gateway.errors import ConfigError, Forbidden, ServiceUnavailable
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Provider
from gateway.providers.circuit import CircuitBreakers
from gateway.providers.demo import DemoProvider
from gateway.providers.gemini import GeminiProvider
from gateway.providers.openai import OpenAIProvider, SSEAdapter
from gateway.store.models import sync_models


class NotEnoughModels(Exception):
    """Fewer models can be drawn than were asked for."""


RANDOM = "random"  # the model name that asks for one drawn by weight (router.RANDOM)


class ModelRegistry:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._session = session
        self.models: dict[str, ModelConfig] = dict(settings.models)
        self.default = settings.default_model
        self.router: dict[str, str] = dict(settings.router)
        self.circuits = CircuitBreakers(settings.circuit_failures, settings.circuit_cooldown_s)
        self.deployment_cooldown_s = settings.deployment_cooldown_s
        self.rng = random.Random()  # deployment order and random draws; tests may seed it
        self.configs: dict[str, ProviderConfig] = dict(settings.providers)
        self.providers: dict[str, Provider] = {name: self._adapter(config) for name, config in self.configs.items()}
        # the adapters a reload replaced or removed: a chain planned before it may still fall back to them
        self._retired: dict[str, Provider] = {}

    def _adapter(self, config: ProviderConfig) -> Provider:
        if config.kind == "demo":
            return DemoProvider(config)
        if config.kind == "openai":
            return OpenAIProvider(config, self._session)
        if config.kind == "anthropic":
            return AnthropicProvider(config, self._session)
        if config.kind == "gemini":
            return GeminiProvider(config, self._session)
        raise ConfigError(f"[providers.{config.name}] kind {config.kind!r} has no adapter")

    def reload(self, settings: Settings) -> None:
        """Take `settings`' models, providers, router and default model for every turn planned from now
        on. A reply already running keeps the links and the adapter it holds; the dicts are updated in
        place, so whoever holds them (the policy's prices) sees the new ones. An unchanged provider keeps
        its adapter (and its idle connections); circuits are kept by name."""
        adapters = {name: (self.providers[name] if self.configs.get(name) == config else self._adapter(config))
                    for name, config in settings.providers.items()}
        self._retired = {name: p for name, p in self.providers.items() if adapters.get(name) is not p}
        self.providers.clear()
        self.providers.update(adapters)
        self.configs.clear()
        self.configs.update(settings.providers)
        self.models.clear()
        self.models.update(settings.models)
        self.router.clear()
        self.router.update(settings.router)
        self.default = settings.default_model

    def __contains__(self, name: str) -> bool:
        """A model a request may name: a declared one, or `random` (drawn by `draw_one`)."""
        return name in self.models or name == RANDOM

    def chat_model(self, name: str) -> bool:
        """What the chat front doors accept: a configured, enabled model that chats (not an embedding
        model), or `random` (drawn by `draw_one` among those). A disabled model is as unknown to a
        client as to /v1/models: `enabled = false` takes it out of service."""
        model = self.models.get(name)
        return model.enabled and model.kind == "chat" if model is not None else name == RANDOM

    def chain(self, name: str) -> list[ModelConfig]:
        """The model, then its fallbacks in order (each once, disabled ones skipped); a model with
        deployments contributes one link per deployment, in this request's weighted order."""
        order: list[ModelConfig] = []
        seen: set[str] = set()
        for candidate in (name, *self.models[name].fallbacks):
            model = self.models[candidate]
            if model.enabled and candidate not in seen:
                seen.add(candidate)
                order.extend(self.links(model))
        return order or self.links(self.models[name])

    def links(self, model: ModelConfig) -> list[ModelConfig]:
        """The chain links of one model: itself, or its deployments drawn by weight without
        replacement (weight 0: a standby, tried after the others)."""
        if not model.deployments:
            return [model]
        pending = list(enumerate(model.deployments))
        drawn: list[int] = []
        while any(d.weight > 0 for _, d in pending):
            weighted = [(i, d) for i, d in pending if d.weight > 0]
            pick = self.rng.choices(weighted, weights=[d.weight for _, d in weighted])[0]
            drawn.append(pick[0])
            pending.remove(pick)
        drawn += [i for i, _ in pending]
        return [deployment_link(model, i) for i in drawn]

    def available(self, model: ModelConfig) -> bool:
        """Whether a request to the model could go now: its circuit (or a deployment's) lets it through."""
        if not model.deployments:
            return self.circuits.available(model.circuit_key)
        return any(self.circuits.available(deployment_link(model, i).circuit_key)
                   for i in range(len(model.deployments)))

    def drawable(self, allowed: Collection[str] | None = None) -> list[ModelConfig]:
        """The models a draw may give (enabled chat models of weight > 0), among `allowed` if given."""
        return [m for m in self.models.values()
                if m.enabled and m.kind == "chat" and m.weight > 0 and (allowed is None or m.name in allowed)]

    def _pool(self, allowed: Collection[str] | None = None) -> list[ModelConfig]:
        return [m for m in self.drawable(allowed) if self.available(m)]

    def draw_one(self, rng: random.Random | None = None, allowed: Collection[str] | None = None) -> ModelConfig:
        """One enabled model drawn in proportion to its weight, skipping open circuits (`model: random`);
        only among `allowed` when given (the models the caller may use)."""
        pool = self._pool(allowed)
        if not pool:
            raise NotEnoughModels("no model is available")
        return (rng or self.rng).choices(pool, weights=[m.weight for m in pool])[0]

    def draw_name(self, allowed: Collection[str] | None = None) -> str:
        """`model: random` resolved: a drawn model's name (or a model declared as "random" itself).
        `allowed`: the models the caller may use (its key's `models`), None for any: the draw is
        among them only. Forbidden if none of them can ever be drawn; ServiceUnavailable if they
        can, but every one's circuit is open now."""
        if RANDOM in self.models:
            return RANDOM
        try:
            return self.draw_one(allowed=allowed).name
        except NotEnoughModels:
            if allowed is not None and not self.drawable(allowed):
                raise Forbidden("model 'random' draws from no model this key may use") from None
            raise ServiceUnavailable("no model is available to draw from; retry later") from None

    def draw_pair(self, rng: random.Random | None = None,
                  allowed: Collection[str] | None = None) -> tuple[ModelConfig, ModelConfig]:
        """Two distinct enabled models, drawn at random in proportion to their weights, skipping
        models whose circuit is open (the arena's default pairing); only among `allowed` when given
        (the models the caller may use): Forbidden if fewer than two of them can ever be drawn."""
        choices = rng.choices if rng is not None else random.choices
        pool = self._pool(allowed)
        if allowed is not None and len(self.drawable(allowed)) < 2:
            raise Forbidden("the arena's pairing needs two models this key may use")
        if len(pool) < 2:
            raise NotEnoughModels(f"need two available models, have {len(pool)}")
        first = choices(pool, weights=[m.weight for m in pool])[0]
        rest = [m for m in pool if m is not first]
        second = choices(rest, weights=[m.weight for m in rest])[0]
        return first, second

    def provider(self, model: ModelConfig) -> Provider:
        found = self.providers.get(model.provider)
        # a link planned before a reload removed its provider: the adapter it was planned with
        return found if found is not None else self._retired[model.provider]

    def close(self) -> None:
        """Close the adapters' idle upstream connections (at shutdown)."""
        for provider in (*self.providers.values(), *self._retired.values()):
            if isinstance(provider, SSEAdapter):
                provider.close()

    async def sync(self, pool: asyncpg.Pool) -> None:
        """Mirror the configured models into the models table, so SQL can see what is enabled."""
        await sync_models(pool, self.models.values())


def deployment_link(model: ModelConfig, index: int) -> ModelConfig:
    """The chain link for one deployment of `model`: same name, prices and timeouts; its provider and id."""
    deployment = model.deployments[index]
    return replace(model, provider=deployment.provider, upstream=deployment.upstream, deployments=(),
                   deployment=index)
