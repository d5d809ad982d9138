"""The configured models and the provider adapters behind them."""

from __future__ import annotations

import random

import aiohttp
import asyncpg

from ..config import ModelConfig, Settings
from ..errors import ConfigError
from ..store.models import sync_models
from .anthropic import AnthropicProvider
from .base import Provider
from .circuit import CircuitBreakers
from .demo import DemoProvider
from .openai import OpenAIProvider


class NotEnoughModels(Exception):
    """Fewer than two models can be drawn."""


class ModelRegistry:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.models: dict[str, ModelConfig] = dict(settings.models)
        self.default = settings.default_model
        self.circuits = CircuitBreakers(settings.circuit_failures, settings.circuit_cooldown_s)
        self.providers: dict[str, Provider] = {}
        for name, config in settings.providers.items():
            if config.kind == "demo":
                self.providers[name] = DemoProvider(config)
            elif config.kind == "openai":
                self.providers[name] = OpenAIProvider(config, session)
            elif config.kind == "anthropic":
                self.providers[name] = AnthropicProvider(config, session)
            else:
                raise ConfigError(f"[providers.{name}] kind {config.kind!r} has no adapter")

    def __contains__(self, name: str) -> bool:
        return name in self.models

    def chat_model(self, name: str) -> bool:
        """A configured model that chats (not an embedding model): what the chat front doors accept."""
        model = self.models.get(name)
        return model is not None and model.kind == "chat"

    def chain(self, name: str) -> list[ModelConfig]:
        """The model, then its fallbacks in order (each once, disabled ones skipped)."""
        order: list[ModelConfig] = []
        for candidate in (name, *self.models[name].fallbacks):
            model = self.models[candidate]
            if model.enabled and model not in order:
                order.append(model)
        return order or [self.models[name]]

    def draw_pair(self, rng: random.Random | None = None) -> tuple[ModelConfig, ModelConfig]:
        """Two distinct enabled models, drawn at random in proportion to their weights, skipping
        models whose circuit is open (the arena's default pairing)."""
        choices = rng.choices if rng is not None else random.choices
        pool = [m for m in self.models.values()
                if m.enabled and m.kind == "chat" and m.weight > 0 and self.circuits.available(m.name)]
        if len(pool) < 2:
            raise NotEnoughModels(f"need two available models, have {len(pool)}")
        first = choices(pool, weights=[m.weight for m in pool])[0]
        rest = [m for m in pool if m is not first]
        second = choices(rest, weights=[m.weight for m in rest])[0]
        return first, second

    def provider(self, model: ModelConfig) -> Provider:
        return self.providers[model.provider]

    async def sync(self, pool: asyncpg.Pool) -> None:
        """Mirror the configured models into the models table, so SQL can see what is enabled."""
        await sync_models(pool, self.models.values())
