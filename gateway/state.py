"""Every piece of app state, declared once as a typed `web.AppKey`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from .auth import Authenticator
    from .background import BatchWriter
    from .config import Settings
    from .db import Database
    from .generation import GenerationRegistry
    from .instance import Instance
    from .stream_tokens import StreamTokens
    from .providers.registry import ModelRegistry
    from .store.usage import UsageRecord

SETTINGS: web.AppKey["Settings"] = web.AppKey("settings")
DB: web.AppKey["Database"] = web.AppKey("db")
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)
MODELS: web.AppKey["ModelRegistry"] = web.AppKey("models")
AUTH: web.AppKey["Authenticator"] = web.AppKey("auth")
GENERATIONS: web.AppKey["GenerationRegistry"] = web.AppKey("generations")
INSTANCE: web.AppKey["Instance"] = web.AppKey("instance")
STREAM_TOKENS: web.AppKey["StreamTokens"] = web.AppKey("stream_tokens")
USAGE: web.AppKey["BatchWriter[UsageRecord]"] = web.AppKey("usage")  # batched usage rows (OpenAI route)

# per request
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
USER_ID: web.RequestKey[str] = web.RequestKey("user_id", str)
