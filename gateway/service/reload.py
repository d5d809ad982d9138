"""Reloading the configuration file while serving (SIGHUP, POST /api/admin/reload).

The file is parsed and validated whole before anything changes: a file that does not validate
leaves the running configuration as it is, and the error is one line naming the file, the line
and the key. A valid one gives its models, providers, router and default model to every turn
planned from then on; a reply already streaming keeps the model, the provider and the adapter it
started with. Settings read only at start (the port, limits, the database, ...) that differ are
named in the answer as waiting for a restart. Every reload, applied or refused, is a row of the
activity log (`config.reloaded`), the audit trail's.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

import asyncpg

from gateway.config import Changes, Settings, applied, changes, reparse
from gateway.errors import ConfigError
from gateway.providers.registry import ModelRegistry
from gateway.store.activity import ActivityRecord
from gateway.store.background import BatchWriter

log = logging.getLogger(__name__)

ACTION = "config.reloaded"


class Reloader:
    """Holds the configuration running now and swaps in a new one, one reload at a time."""

    def __init__(self, settings: Settings, models: ModelRegistry, pool: asyncpg.Pool,
                 activity: BatchWriter[ActivityRecord]) -> None:
        self.settings = settings
        self._models = models
        self._pool = pool
        self._activity = activity
        self._lock = asyncio.Lock()

    async def reload(self, *, via: str, user_id: uuid.UUID | None = None, api_key_id: uuid.UUID | None = None,
                     request_id: str | None = None, ip: str | None = None) -> Changes:
        """Parse the file again and apply it. `via`: "SIGHUP" or the HTTP method. Raises ConfigError
        (one line: file, line, key) and keeps the running configuration when the file does not validate."""
        async with self._lock:
            path = self.settings.env.get("GATEWAY_CONFIG", "")
            try:
                new = reparse(self.settings)
                downgrade = self.settings.limits.downgrade_model  # limits are read at start only
                if downgrade is not None and downgrade not in new.models:
                    raise ConfigError(f"GATEWAY_CONFIG: {path}: [limits] downgrade_model {downgrade!r} is running and "
                                      "this file removes it: restart to change [limits]")
            except ConfigError as e:
                log.error("configuration not reloaded, the running one is kept: %s", e.message)
                self._record(via, path, 422, user_id, api_key_id, request_id, ip)
                raise
            changed = changes(self.settings, new)
            self.settings = applied(self.settings, new)
            self._models.reload(self.settings)
            await self._models.sync(self._pool)  # what SQL sees as enabled
            self._record(via, path, 200, user_id, api_key_id, request_id, ip)
            log.info("configuration reloaded from %s: %s", path or "the environment", summary(changed))
            return changed

    def _record(self, via: str, path: str, status: int, user_id: uuid.UUID | None, api_key_id: uuid.UUID | None,
                request_id: str | None, ip: str | None) -> None:
        self._activity.add(ActivityRecord(datetime.now(UTC), user_id, api_key_id, ACTION, via, path, status, ip,
                                          request_id))


def summary(changed: Changes) -> str:
    """One line: what the reload changed."""
    parts = [f"{what} {verb} {', '.join(names)}" for what, verb, names in (
        ("models", "added", changed.models_added), ("models", "removed", changed.models_removed),
        ("models", "changed", changed.models_changed), ("providers", "added", changed.providers_added),
        ("providers", "removed", changed.providers_removed), ("providers", "changed", changed.providers_changed))
        if names]
    if changed.router_changed:
        parts.append("router changed")
    if changed.default_model is not None:
        parts.append(f"default model now {changed.default_model}")
    if changed.restart_required:
        parts.append(f"needing a restart: {', '.join(changed.restart_required)}")
    return "; ".join(parts) or "nothing changed"


def as_json(changed: Changes) -> dict[str, object]:
    """The answer of POST /api/admin/reload."""
    return {"reloaded": True,
            "models": {"added": list(changed.models_added), "removed": list(changed.models_removed),
                       "changed": list(changed.models_changed)},
            "providers": {"added": list(changed.providers_added), "removed": list(changed.providers_removed),
                          "changed": list(changed.providers_changed)},
            "router_changed": changed.router_changed, "default_model": changed.default_model,
            "restart_required": list(changed.restart_required)}
