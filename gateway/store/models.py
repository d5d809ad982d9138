"""SQL for the models table: a mirror of the configured models, so SQL can see names, prices and
which are enabled. Rows are never deleted: old messages name them."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from gateway.config import ModelConfig


async def sync_models(pool: asyncpg.Pool, models: Iterable[ModelConfig]) -> None:
    """Upsert every configured model and disable the rows of models no longer configured, in one transaction."""
    configured = list(models)
    rows = [(m.name, m.provider, m.upstream, m.enabled, m.weight, m.input_price_per_mtok, m.output_price_per_mtok)
            for m in configured]
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany("""
            INSERT INTO models (name, provider, upstream, enabled, weight,
                                input_price_per_mtok, output_price_per_mtok, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, now())
            ON CONFLICT (name) DO UPDATE SET
                provider = EXCLUDED.provider, upstream = EXCLUDED.upstream, enabled = EXCLUDED.enabled,
                weight = EXCLUDED.weight, input_price_per_mtok = EXCLUDED.input_price_per_mtok,
                output_price_per_mtok = EXCLUDED.output_price_per_mtok, updated_at = now()""", rows)
        await conn.execute("UPDATE models SET enabled = false, updated_at = now() "
                           "WHERE NOT (name = ANY($1::text[])) AND enabled", [m.name for m in configured])
